"""Shard micro-benchmark: one decode step with no router and no gRPC.

`python -m tgi_server.launcher.bench_shard [--model PATH] [--batch-sizes 1,8,32,64]` times, per
batch size, (a) the model's forward + LM head alone and (b) the runner's whole decode step
(inputs, forward, sampling, outputs), so the end-to-end benchmark's inter-token latency minus
(b) is the router + gRPC cost, and (b) minus (a) the shard's host work; and (c) the runner's
prefill of that many fresh prompts at once, the compute under a load's first tokens.
"""

import argparse
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from tgi_server.launcher.bench.report import SHARD_HEADER, format_shard_row
from tgi_server.shard.attention import forward_context
from tgi_server.shard.batch import Batch
from tgi_server.shard.cli import keep_freed_memory
from tgi_server.shard.distributed import ParallelState
from tgi_server.shard.kv_cache import allocate_kv_cache
from tgi_server.shard.layers.linear import pack_linear_weights
from tgi_server.shard.model_runner import ModelRunner
from tgi_server.shard.models import load_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_batch(runner: ModelRunner, batch_size: int, prompt_len: int, max_new: int) -> Batch:
    blocks_per_seq = -(-(prompt_len + max_new) // runner.block_size)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, runner.vocab_size, (prompt_len,), generator=gen).tolist()
               for _ in range(batch_size)]
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch_size)]
    return Batch.of_prompts(1, prompts, tables, max_new, runner.vocab_size, runner.device)


@torch.inference_mode()
def time_steps(runner: ModelRunner, batch_size: int, prompt_len: int, steps: int,
               prefills: int = 3) -> dict:
    prefill_ms = []
    for _ in range(prefills):
        batch = make_batch(runner, batch_size, prompt_len, steps * 2 + 4)
        start = time.perf_counter()
        runner.prefill(batch)
        prefill_ms.append((time.perf_counter() - start) * 1000)
    batch = make_batch(runner, batch_size, prompt_len, steps * 2 + 4)
    # NOTE: no prefill: the prompts count as cached and the cache holds random k/v, which
    # costs a decode step the same as real ones (and saves minutes at batch 64).
    batch.num_computed_tokens = [prompt_len - 1] * batch_size
    forward_ms, step_ms = [], []
    for _ in range(steps):
        inputs = runner.prepare_decode(batch)
        start = time.perf_counter()
        with forward_context(inputs.meta):
            hidden = runner.model(inputs.input_ids, inputs.positions)
        runner.model.compute_logits(hidden[inputs.last_token_rows])
        forward_ms.append((time.perf_counter() - start) * 1000)
        # NOTE: the forward above wrote this step's k/v; the real step rewrites the same slots.
        start = time.perf_counter()
        runner.decode(batch)
        step_ms.append((time.perf_counter() - start) * 1000)
    fwd, step = statistics.median(forward_ms), statistics.median(step_ms)
    prefill = statistics.median(prefill_ms) if prefill_ms else math.nan
    return {"batch": batch_size, "forward_ms": fwd, "step_ms": step, "host_ms": step - fwd,
            "tok_s": batch_size / step * 1000, "prefill_ms": prefill,
            "prefill_tok_s": batch_size * prompt_len / prefill * 1000}


def measure(model_dir: Path, dtypes: tuple[str, ...], sizes: tuple[int, ...], prompt_len: int,
            steps: int, threads: int, report=print, prefills: int = 3) -> list[dict]:
    """One row per dtype and batch size (`report` gets each as a table line)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    keep_freed_memory()  # as the shard does
    rows = []
    try:
        for name in dtypes:
            dtype = DTYPES[name]
            model = load_model(Path(model_dir), dtype, torch.device("cpu"), ParallelState())
            pack_linear_weights(model)
            runner = ModelRunner(model, torch.device("cpu"), dtype, 16)
            need = max(sizes) * (-(-(prompt_len + steps * 2 + 4) // 16))
            runner.kv_cache = allocate_kv_cache(model, need, 16, dtype, torch.device("cpu"))
            runner.kv_cache.normal_(0, 0.5)
            for b in sizes:
                rows.append({"dtype": name,
                             **time_steps(runner, b, prompt_len, steps, prefills)})
                report(format_shard_row(rows[-1]))
            del runner, model
    finally:
        torch.set_num_threads(previous)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=".cache/bench-models/llama-medium-seed0-v2")
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefills", type=int, default=3, help="prefills timed per row")
    args = parser.parse_args(argv)
    sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads; "
          f"torch {torch.__version__}; model {args.model}; prompt {args.prompt_len} tokens")
    print(f"\n{SHARD_HEADER}")
    measure(Path(args.model), tuple(args.dtypes.split(",")), sizes, args.prompt_len, args.steps,
            args.threads, report=lambda line: print(line, flush=True), prefills=args.prefills)


if __name__ == "__main__":
    main()
