"""`make bench`: tgi-server against its peers on the same weights, side by side in one run.

Upstream: `python -m tgi_server.launcher.bench`. Downstream, in this order (no two systems
ever run at once; each load waits for the machine to be quiet first):
1. the machine's roofs (`roofline.py`) and the shard micro-benchmark (`bench_shard.py`);
2. per dtype, `tgi-launch` and llama.cpp's server and vLLM when found (`baselines.py`), up
   together, each paused while another is measured, driven over HTTP by `loadgen.py` in
   turns at each concurrency level;
3. transformers `generate` in this process: one request at a time, or one padded batch.
Every request of the run gets a fresh prompt. The report (`report.py`) is printed and written
with the JSON and the plot to benchmarks/results/.
"""

import argparse
import asyncio
import gc
import json
import platform
import random
import signal
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from tgi_server.launcher.bench import baselines, loadgen, roofline
from tgi_server.launcher.bench.baselines import Peer, Shape
from tgi_server.launcher.bench.output import write_outputs
from tgi_server.launcher.bench.report import OURS
from tgi_server.launcher.bench.servers import Served, log, tgi_server, tgi_server_flags
from tgi_server.launcher.bench.stats import (
    LoadResult,
    RequestTiming,
    Stopwatch,
    summarize,
    wait_until_quiet,
)
from tgi_server.launcher.bench.workloads import Job, PromptSource, Workload

ROOT = Path(__file__).resolve().parents[2]
MODEL_CACHE = ROOT / ".cache" / "bench-models"
RESULTS_DIR = ROOT / "benchmarks" / "results"
SYSTEMS = ("tgi-server", "llama.cpp", "vllm", "transformers")
# Ours with `--no-prefix-caching`: what the prefix cache gives, beside the peers' own caches.
# Not run unless named (`--systems ...,tgi-server-no-prefix-cache` with --shared-prefix-tokens).
UNCACHED = "tgi-server-no-prefix-cache"


@dataclass(frozen=True)
class Settings:
    size: str = "medium"
    workload: Workload = Workload()
    levels: tuple[int, ...] = (1, 8, 32)  # concurrency levels
    num_sequential_requests: int = 3  # requests at concurrency 1
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    threads: int = 2
    block_size: int = 16
    shard_batch_sizes: tuple[int, ...] = (1, 8, 32, 64)
    max_quiet_wait_s: float = 600.0  # before each load, for other processes to go idle
    # Passes over every system: ratios are paired within a pass, so a machine whose speed
    # drifts shows as the spread between rounds (NOTES 30, 44).
    rounds: int = 1
    # N-gram speculation, N draft tokens a step, in every system that has it (0: none): ours
    # `--speculate N`, llama.cpp's and vLLM's own n-gram drafting (baselines.py).
    speculate: int = 0

    def num_requests(self, level: int) -> int:
        return self.num_sequential_requests if level == 1 else level

    @property
    def shape(self) -> Shape:
        return Shape(self.threads, max(self.levels), self.workload.max_prompt_tokens,
                     self.workload.max_new, self.workload.shared_prefix_tokens > 0)


QUICK = Settings(size="small", workload=Workload(new_tokens=32), levels=(1, 8),
                 num_sequential_requests=2, shard_batch_sizes=(1, 8), max_quiet_wait_s=60.0)


# ---- one system ----------------------------------------------------------------------------

def _label(level: int) -> str:
    return "1 stream" if level == 1 else f"{level} concurrent streams"


def _result(system: str, dtype: str, level: int, jobs: list[Job], timings: list[RequestTiming],
            watch: Stopwatch) -> LoadResult:
    wall, other = watch.stop()
    if other > 0.05:
        log(f"  WARNING: other processes used {100 * other:.0f}% of the CPUs meanwhile")
    r = summarize(system, dtype, f"c={level}", _label(level), timings, wall,
                  sum(j.max_new_tokens for j in jobs), other, concurrency=level)
    log(f"  {system} {dtype} c={level}: {r.output_tokens_per_s:.1f} tok/s, "
        f"ITL p50 {r.itl_ms['p50']:.1f} ms, {r.num_errors} errors {r.first_error or ''}")
    return r


def run_load(system: str, dtype: str, target: loadgen.Target, level: int, jobs: list[Job],
             s: Settings) -> LoadResult:
    log(f"{system} {dtype} / concurrency {level}: {len(jobs)} requests")
    wait_until_quiet(s.max_quiet_wait_s, log)
    before = loadgen.decode_steps(target.url) if system == OURS else None
    watch = Stopwatch()
    timings = asyncio.run(loadgen.run_concurrency(target, jobs, level,
                                                  f"{system} {dtype} c={level}"))
    r = _result(system, dtype, level, jobs, timings, watch)
    if before is not None:
        r = replace(r, **loadgen.server_fields(before, target.url))
    return r


def run_transformers(model: Path, dtype: str, jobs: dict[int, list[Job]], warm: Job,
                     s: Settings) -> list[LoadResult]:
    hf_model, tokenizer = baselines.load_transformers(model, dtype, s.threads)
    baselines.timed_generate(hf_model, tokenizer, [replace(warm, max_new_tokens=8)])
    results = []
    for level, level_jobs in jobs.items():
        log(f"transformers {dtype} / concurrency {level}: "
            + ("one at a time" if level == 1 else f"one padded batch of {level}"))
        wait_until_quiet(s.max_quiet_wait_s, log)
        watch = Stopwatch()
        timings = baselines.transformers_run(hf_model, tokenizer, level_jobs, level)
        r = _result("transformers", dtype, level, level_jobs, timings, watch)
        results.append(replace(r, label="1 request at a time" if level == 1
                               else f"batch of {level}, left-padded"))
    del hf_model
    gc.collect()
    return results


# ---- environment ----------------------------------------------------------------------------

def _peer_failed(what: str, error: Exception, notes: list[str]) -> None:
    log(f"{what} failed: {error}")
    notes.append(f"{what}: failed: {str(error).splitlines()[0]}")


def start_http(model: Path, dtype: str, systems: list[str], peers: list[Peer],
               flags: dict[str, list[str]], warm, s: Settings, tag: str, notes: list[str],
               stack: ExitStack) -> list[tuple[str, Served]]:
    """The HTTP systems of `dtype` (ours, then the peers found), each started, warmed up and
    paused; `stack` stops them. Logs go to RESULTS_DIR/<system>-<tag>-<dtype>.log; a peer that
    fails is noted and left out, ours failing ends the run."""
    starts = [(OURS, "server", lambda path: tgi_server(model, flags[dtype], path))
              ] if OURS in systems else []
    if UNCACHED in systems:
        starts.append((UNCACHED, "server-no-prefix-cache", lambda path: tgi_server(
            model, [*flags[dtype], "--no-prefix-caching"], path)))
    starts += [(p.name, p.name, lambda path, p=p: p.start(model, dtype, s.shape, path))
               for p in peers if dtype in p.dtypes]
    up = []
    for name, log_name, start in starts:
        try:
            with ExitStack() as one:  # stops the server if its warmup fails
                served = one.enter_context(start(RESULTS_DIR / f"{log_name}-{tag}-{dtype}.log"))
                first = asyncio.run(loadgen.warmup(served.target, replace(warm(), max_new_tokens=8)))
                log(f"{name} {dtype} warmup request: {first.num_generated_tokens} tokens, "
                    f"error={first.error}")
                served.pause()
                stack.enter_context(one.pop_all())
        except Exception as e:  # noqa: BLE001 -- a peer failing is reported, not fatal
            if name == OURS:
                raise
            _peer_failed(f"{name} {dtype}", e, notes)
            continue
        up.append((name, served))
    return up


def run_round(model: Path, systems: list[str], peers: list[Peer], flags: dict[str, list[str]],
              fresh, warm, s: Settings, tag: str, notes: list[str],
              turn: int = 0) -> list[LoadResult]:
    """Every system once. Per dtype the HTTP systems are up together, all paused but the one
    measured, and take turns at each concurrency level, starting with system `turn` (rounds
    rotate it): the loads a ratio compares run back to back, where a system's loads used to
    run minutes apart while this machine's speed drifted by a quarter (NOTES 44). Then
    transformers."""
    results: list[LoadResult] = []
    for dtype in s.dtypes:
        with ExitStack() as stack:
            up = start_http(model, dtype, systems, peers, flags, warm, s, tag, notes, stack)
            jobs = {name: fresh() for name, _ in up}
            first = turn % len(up) if up else 0
            order = up[first:] + up[:first]
            for level in s.levels:
                for name, served in order:
                    if name not in jobs:  # a peer that failed at an earlier level
                        continue
                    served.resume()
                    try:
                        results.append(run_load(name, dtype, served.target, level,
                                                jobs[name][level], s))
                    except Exception as e:  # noqa: BLE001 -- as in start_http
                        if name == OURS:
                            raise
                        _peer_failed(f"{name} {dtype} c={level}", e, notes)
                        del jobs[name]
                    finally:
                        served.pause()
    if "transformers" in systems:
        for dtype in s.dtypes:
            results += run_transformers(model, dtype, fresh(), warm(), s)
    return results


def versions() -> dict[str, str]:
    import torch
    import transformers

    def git(*args: str) -> str:
        run = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return run.stdout.strip() if run.returncode == 0 else ""

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = "+dirty" if git("status", "--porcelain", "--untracked-files=no") else ""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tgi-server git": commit + dirty}


def cached_model(size: str, seed: int = 0) -> Path:
    """The llama model of `size` under .cache/bench-models, built once (atomically renamed)."""
    import os
    import shutil

    from tgi_server.launcher.make_model import MAKER_VERSION, make_model

    target = MODEL_CACHE / f"llama-{size}-seed{seed}-v{MAKER_VERSION}"
    if (target / "config.json").is_file():
        return target
    log(f"building the {size} model into {target} (once)")
    tmp = MODEL_CACHE / f".{target.name}.{os.getpid()}"
    try:
        make_model(tmp, "llama", size, seed=seed, tokenizer_cache_dir=MODEL_CACHE / "tokenizers")
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---- CLI ------------------------------------------------------------------------------------

def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tgi_server.launcher.bench",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="model directory (default: a cached llama --size)")
    p.add_argument("--size", choices=["tiny", "small", "medium"], help="default: medium")
    p.add_argument("--quick", action="store_true", help="smoke run: small model, 32 new tokens, "
                   "concurrency 1 and 8")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of "
                   f"{','.join(SYSTEMS)} (peers that are not found are reported and skipped), "
                   f"and {UNCACHED} (ours with --no-prefix-caching)")
    p.add_argument("--skip-baseline", action="store_true", help="same as leaving out transformers")
    p.add_argument("--dtypes", help="comma-separated, default float32,bfloat16")
    p.add_argument("--concurrency", help="comma-separated concurrency levels, default 1,8,32")
    p.add_argument("--requests", type=int, help="requests at concurrency 1 (default 3; "
                   "concurrency c sends c requests at once)")
    p.add_argument("--prompt-tokens", type=int)
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--shared-prefix-tokens", type=int, help="the first N tokens of every "
                   "prompt of a load are the same text (a system prompt), for prefix caches to "
                   "reuse; default 0: all fresh")
    p.add_argument("--threads", type=int, help="CPU threads of every system (default 2)")
    p.add_argument("--shard-batch-sizes", help="shard micro-benchmark batch sizes, default "
                   "1,8,32,64 ('' to skip it)")
    p.add_argument("--llama-server", help="llama.cpp's llama-server binary (default: on PATH)")
    p.add_argument("--vllm-python", help="a python that imports vllm (default: this one)")
    p.add_argument("--rounds", type=int, help="run every system's loads this many times, all "
                   "systems once per round, and give each ratio per round and as the median "
                   "(default 1)")
    p.add_argument("--speculate", type=int, help="n-gram speculation with this many draft "
                   "tokens a step in every HTTP system that has it (default 0: none)")
    p.add_argument("--max-quiet-wait", type=float, dest="max_quiet_wait_s",
                   help="seconds to wait before each load for other processes to go idle "
                        "(default 600; 0: don't wait)")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    s = QUICK if args.quick else Settings()
    work = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "shared_prefix_tokens": args.shared_prefix_tokens}
    overrides = {
        "size": args.size, "threads": args.threads, "num_sequential_requests": args.requests,
        "max_quiet_wait_s": args.max_quiet_wait_s, "rounds": args.rounds,
        "speculate": args.speculate,
        "levels": _ints(args.concurrency) if args.concurrency else None,
        "dtypes": tuple(args.dtypes.split(",")) if args.dtypes else None,
        "shard_batch_sizes": (_ints(args.shard_batch_sizes)
                              if args.shard_batch_sizes is not None else None),
        "workload": replace(s.workload, **{k: v for k, v in work.items() if v is not None}),
    }
    return replace(s, **{k: v for k, v in overrides.items() if v is not None})


def _peers(args: argparse.Namespace, systems: list[str],
           speculate: int = 0) -> tuple[list[Peer], list[str]]:
    peers, notes = [], []
    for name, find, explicit in (("llama.cpp", baselines.find_llama_cpp, args.llama_server),
                                 ("vllm", baselines.find_vllm, args.vllm_python)):
        if name not in systems:
            notes.append(f"{name}: not measured (left out of --systems)")
            continue
        peer, note = find(explicit, speculate)
        notes.append(note)
        if peer is not None:
            peers.append(peer)
    return peers, notes


def main(argv: list[str] | None = None) -> None:
    # SIGTERM unwinds like Ctrl-C, so a running server is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    args = parse_args(argv)
    s = settings_from(args)
    systems = [n for n in args.systems.split(",") if n and not (
        n == "transformers" and args.skip_baseline)]
    if unknown := set(systems) - {*SYSTEMS, UNCACHED}:
        raise SystemExit(f"unknown systems {sorted(unknown)}; choose from {(*SYSTEMS, UNCACHED)}")
    if s.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, not {s.rounds}")
    if s.speculate < 0:
        raise SystemExit(f"--speculate must be at least 0, not {s.speculate}")
    model = args.model or cached_model(s.size)
    peers, notes = _peers(args, systems, s.speculate)
    if s.speculate:
        notes.append(f"n-gram speculation, {s.speculate} draft tokens a step: tgi-server "
                     f"--speculate {s.speculate}; {baselines.SPECULATION_NOTE}")
    for note in notes:
        log(note)
    from transformers import AutoTokenizer

    source = PromptSource(AutoTokenizer.from_pretrained(model), s.block_size)
    rng = random.Random(0)
    fresh = lambda: {lv: s.workload.jobs(source, s.num_requests(lv), rng) for lv in s.levels}
    warm = lambda: s.workload.jobs(source, 1, rng)[0]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    config = json.loads((model / "config.json").read_text())

    wait_until_quiet(s.max_quiet_wait_s, log)
    log("measuring the machine's roofs")
    roof = roofline.measure(config["hidden_size"], config["intermediate_size"], s.threads, s.dtypes)
    log(roofline.describe(roof))
    shard_rows = []
    if s.shard_batch_sizes:
        from tgi_server.launcher import bench_shard

        log(f"shard micro-benchmark, batch {s.shard_batch_sizes}")
        shard_rows = bench_shard.measure(model, s.dtypes, s.shard_batch_sizes,
                                         s.workload.prompt_tokens, steps=10, threads=s.threads)

    results: list[LoadResult] = []
    flags = {dtype: tgi_server_flags(dtype, s.threads, s.workload.max_prompt_tokens,
                                     s.workload.max_new, max(s.levels), s.block_size,
                                     s.speculate)
             for dtype in s.dtypes if {OURS, UNCACHED} & set(systems)}
    for rnd in range(s.rounds):
        if s.rounds > 1:
            log(f"round {rnd + 1} of {s.rounds}")
        tag = f"{stamp}-round{rnd + 1}" if s.rounds > 1 else stamp
        suffix = f", round {rnd + 1}" if s.rounds > 1 else ""
        results += [replace(r, round=rnd, label=r.label + suffix)
                    for r in run_round(model, systems, peers, flags, fresh, warm, s, tag, notes,
                                       turn=rnd)]

    write_outputs(RESULTS_DIR / f"bench-{stamp}", args=argv, settings=s, model=model,
                  config=config, roof=roof, shard_rows=shard_rows, results=results,
                  notes=notes, flags=flags, versions=versions(), peers=peers)


if __name__ == "__main__":
    main()
