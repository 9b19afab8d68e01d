// One decoder layer of a decode step (one new token per sequence) in one call: the ops of
// fused_ops.cpp, packed_linear.cpp and decode_attention.cpp in the order models/llama.py
// calls them, on the same tensors, so the result is the same bits.
//
// Called by models/llama.py through cpu_kernels.decode_layer when every op of the layer runs
// here (llama.py decides). In Python the layer is ~40 dispatches, views and module calls:
// measured 1.2 ms of a 17.9 ms float32 step at one sequence, 3 ms at 32 (benchmarks/NOTES.md
// 36); here the ops are called through the dispatcher from C++.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace {

using OptTensor = c10::optional<at::Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The ops this layer calls, looked up once (they are registered when the library loads).
struct Ops {
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, double)> rms_norm =
      find<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("tgi_cpu::rms_norm");
  c10::TypedOperatorHandle<void(at::Tensor&, at::Tensor&, const at::Tensor&, double)>
      add_rms_norm_ = find<void(at::Tensor&, at::Tensor&, const at::Tensor&, double)>(
          "tgi_cpu::add_rms_norm_");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                      int64_t)>
      linear = find<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t)>(
          "tgi_cpu::packed_linear");
  c10::TypedOperatorHandle<void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&)>
      rotary_ = find<void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&)>(
          "tgi_cpu::rotary_");
  c10::TypedOperatorHandle<void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&)>
      store_kv_ = find<void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&)>("tgi_cpu::store_kv_");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, const at::Tensor&, double, int64_t)>
      attention = find<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&, double, int64_t)>(
          "tgi_cpu::decode_attention");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&)> silu_and_mul =
      find<at::Tensor(const at::Tensor&)>("tgi_cpu::silu_and_mul");
};

const Ops& ops() {
  static const Ops instance;
  return instance;
}

// hidden [tokens, hidden] -> this layer's output; `residual`, the residual stream before the
// layer, gets the attention output added in place (add_rms_norm_ does the same in Python).
// At the first layer there is nothing to add yet: the caller passes the embeddings as both.
// `shape`: heads, kv_heads, head_dim, intermediate (per rank).
at::Tensor decode_layer(
    at::Tensor& hidden, at::Tensor& residual, const at::Tensor& positions,
    const at::Tensor& slots, const at::Tensor& block_tables, const at::Tensor& context_lens,
    at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cos_sin,
    const at::Tensor& input_norm, const at::Tensor& post_norm, double eps, const at::Tensor& qkv_w,
    const OptTensor& qkv_b, const at::Tensor& o_w, const OptTensor& o_b,
    const at::Tensor& gate_up_w, const OptTensor& gate_up_b, const at::Tensor& down_w,
    const OptTensor& down_b, at::IntArrayRef shape, double scale, int64_t window) {
  TORCH_CHECK(shape.size() == 4,
              "decode_layer: shape is [heads, kv_heads, head_dim, intermediate]");
  TORCH_CHECK(hidden.dim() == 2 && positions.numel() == hidden.size(0),
              "decode_layer: hidden [tokens, hidden], one position per token");
  const auto& op = ops();
  const int64_t tokens = hidden.size(0), width = hidden.size(1);
  const int64_t heads = shape[0], kv_heads = shape[1], head_dim = shape[2];
  at::Tensor x = hidden;
  if (hidden.is_same(residual)) {
    x = op.rms_norm.call(hidden, input_norm, eps);
  } else {
    op.add_rms_norm_.call(x, residual, input_norm, eps);
  }
  const int64_t q_size = heads * head_dim, kv_size = kv_heads * head_dim;
  const auto qkv = op.linear.call(x, qkv_w, qkv_b, q_size + 2 * kv_size);
  auto q = qkv.narrow(1, 0, q_size).view({tokens, heads, head_dim});
  auto k = qkv.narrow(1, q_size, kv_size).view({tokens, kv_heads, head_dim});
  const auto v = qkv.narrow(1, q_size + kv_size, kv_size).view({tokens, kv_heads, head_dim});
  op.rotary_.call(q, k, cos_sin, positions);
  op.store_kv_.call(k_cache, v_cache, k, v, slots);
  const auto attended = op.attention.call(q, k_cache, v_cache, block_tables, context_lens, scale,
                                          window);
  auto out = op.linear.call(attended.view({tokens, q_size}), o_w, o_b, width);
  op.add_rms_norm_.call(out, residual, post_norm, eps);
  const auto gate_up = op.linear.call(out, gate_up_w, gate_up_b, 2 * shape[3]);
  return op.linear.call(op.silu_and_mul.call(gate_up), down_w, down_b, width);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tgi_cpu, m) {
  m.def("decode_layer(Tensor(a!) hidden, Tensor(b!) residual, Tensor positions, Tensor slots, "
        "Tensor block_tables, Tensor context_lens, Tensor(c!) k_cache, Tensor(d!) v_cache, "
        "Tensor cos_sin, Tensor input_norm, Tensor post_norm, float eps, Tensor qkv, "
        "Tensor? qkv_bias, Tensor o, Tensor? o_bias, Tensor gate_up, Tensor? gate_up_bias, "
        "Tensor down, Tensor? down_bias, int[] shape, float scale, int window) "
        "-> Tensor");
  m.impl("decode_layer", c10::DispatchKey::CPU, &decode_layer);
}
