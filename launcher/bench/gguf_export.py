"""A Llama checkpoint (safetensors + byte-level BPE tokenizer.json) as a GGUF file for llama.cpp.

Upstream: `baselines.py`, so llama.cpp's server runs the very weights the other systems run.
Downstream: the `gguf` package (the optional `bench` extra). Only what the benchmark models
need: the llama architecture without rope scaling, float32 or bfloat16 tensors (norms stay
float32), a "gpt2"-style BPE vocabulary. The benchmark sends llama.cpp token ids, so its
tokenizer only has to load and to detokenize.
"""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

# HF name inside `model.layers.{i}.` -> llama.cpp name inside `blk.{i}.`
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
              "output_norm.weight", "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    _, _, index, rest = hf_name.split(".", 3)  # model.layers.{i}.{rest}
    return f"blk.{index}.{_LAYER_NAMES[rest]}"


def rope_pairs_adjacent(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """q/k rows of each head reordered from HF's halves (i, i + d/2) to adjacent pairs
    (2i, 2i + 1), the rotation llama.cpp's llama architecture applies."""
    rows, cols = w.shape
    head_dim = rows // num_heads
    return w.reshape(num_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def _vocab(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) from tokenizer.json, padded to the model's vocab size."""
    import gguf

    spec = json.loads((model_dir / "tokenizer.json").read_text())
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"only BPE tokenizers are exported, not {spec['model']['type']}")
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    special = {a["id"]: a["content"] for a in spec.get("added_tokens", []) if a.get("special")}
    by_id |= special
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.CONTROL if i in special else
                     gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, types, merges


def _header(writer, config: dict, dtype: str) -> None:
    import gguf

    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rope = config.get("rope_parameters") or {}
    writer.add_name(config.get("_name_or_path") or "tgi-bench model")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "float32"
                         else gguf.LlamaFileType.MOSTLY_BF16)


def export(model_dir: Path, out: Path, dtype: str = "float32") -> Path:
    """Writes `out` (atomically) from the llama checkpoint in `model_dir`."""
    import gguf

    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "llama" or (config.get("rope_parameters") or {}).get(
            "rope_type", "default") != "default":
        raise ValueError("only llama models without rope scaling are exported")
    if config.get("tie_word_embeddings"):
        raise ValueError("tied embeddings are not exported")
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    _header(writer, config, dtype)
    tokens, types, merges = _vocab(model_dir, config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eos = config.get("eos_token_id")
    writer.add_eos_token_id(eos[0] if isinstance(eos, list) else (eos or 0))
    writer.add_add_bos_token(False)
    heads = {"attn_q.weight": config["num_attention_heads"],
             "attn_k.weight": config["num_key_value_heads"]}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                _add_tensor(writer, gguf_name(name), f.get_tensor(name), heads, dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out


def _add_tensor(writer, name: str, tensor: torch.Tensor, heads: dict[str, int], dtype: str) -> None:
    import gguf

    suffix = name.split(".", 2)[-1]
    if suffix in heads:
        tensor = rope_pairs_adjacent(tensor, heads[suffix])
    data = tensor.float().numpy()
    if dtype == "bfloat16" and data.ndim > 1:
        q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16)
        writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.BF16)
    else:
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
