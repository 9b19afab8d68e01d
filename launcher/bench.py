"""`make bench`: tgi-launch against transformers `generate`, measured in the same run.

Upstream: `python -m tgi_server.launcher.bench`. Downstream: `make_model` (a cached random-weight
model), `tgi-launch` as a subprocess spoken to over HTTP (`/generate_stream`), and transformers
`AutoModelForCausalLM.generate` as the baseline, run only while the server is stopped (both
would share the same cores). Prints a markdown table; writes JSON to benchmarks/results/.

Every request gets a fresh prompt of exactly `prompt_tokens` tokens (distinct first KV block,
so no prefix cache can help). Output tokens are counted from what came back
(`details.generated_tokens`): the native API has no `ignore_eos`, so a request may stop early.
"""

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODEL_CACHE = ROOT / ".cache" / "bench-models"
RESULTS_DIR = ROOT / "benchmarks" / "results"
SCENARIOS = ("sequential", "concurrent")
_T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[bench {time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Settings:
    size: str = "medium"
    prompt_tokens: int = 128
    new_tokens: int = 128
    num_sequential_requests: int = 3
    concurrency: int = 32
    threads: int = 2
    block_size: int = 16
    max_quiet_wait_s: float = 600.0  # before each scenario, for other processes to go idle


QUICK = Settings(size="small", new_tokens=32, num_sequential_requests=2, max_quiet_wait_s=60.0)


# ---- pure: statistics and formatting ------------------------------------------------------

@dataclass(slots=True)
class RequestTiming:
    """One request as the client saw it; times in seconds from sending it."""

    ttft_s: float | None
    itl_s: list[float]
    e2e_s: float
    num_generated_tokens: int
    error: str | None = None


@dataclass(frozen=True)
class ScenarioResult:
    system: str  # "tgi-server" | "transformers"
    scenario: str  # a key of SCENARIOS: pairs ours with the baseline
    label: str
    num_requests: int
    num_errors: int
    num_generated_tokens: int
    num_requested_tokens: int
    wall_s: float
    output_tokens_per_s: float
    ttft_ms: dict[str, float] = field(default_factory=dict)
    itl_ms: dict[str, float] = field(default_factory=dict)
    e2e_ms: dict[str, float] = field(default_factory=dict)
    # CPU time of processes outside this benchmark, as a share of all cores over the wall time
    other_cpu_share: float = math.nan


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _quantiles_ms(values_s: list[float]) -> dict[str, float]:
    return {f"p{q}": 1000 * percentile(values_s, q) for q in (50, 90, 99)}


def summarize(system: str, scenario: str, label: str, timings: list[RequestTiming],
              wall_s: float, new_tokens: int, other_cpu_share: float = math.nan) -> ScenarioResult:
    """Aggregates per-request timings; errors count no tokens and no latencies."""
    ok = [t for t in timings if t.error is None]
    num_generated = sum(t.num_generated_tokens for t in ok)
    return ScenarioResult(
        system=system, scenario=scenario, label=label,
        num_requests=len(timings), num_errors=len(timings) - len(ok),
        num_generated_tokens=num_generated, num_requested_tokens=new_tokens * len(timings),
        wall_s=wall_s, output_tokens_per_s=num_generated / wall_s if wall_s > 0 else math.nan,
        ttft_ms=_quantiles_ms([t.ttft_s for t in ok if t.ttft_s is not None]),
        itl_ms=_quantiles_ms([itl for t in ok for itl in t.itl_s]),
        e2e_ms=_quantiles_ms([t.e2e_s for t in ok]), other_cpu_share=other_cpu_share,
    )


@dataclass(frozen=True)
class CpuSnapshot:
    busy_s: float  # the whole machine, from /proc/stat
    own_s: float  # this process and its descendants (the server, during our scenarios)


def other_cpu_share(before: CpuSnapshot, after: CpuSnapshot, wall_s: float, cores: int) -> float:
    """Share of all cores that other processes used between two snapshots (0 on a quiet box)."""
    other = (after.busy_s - before.busy_s) - (after.own_s - before.own_s)
    return max(0.0, other) / (wall_s * cores) if wall_s > 0 else math.nan


def _num(value: float, digits: int = 1) -> str:
    if math.isnan(value):
        return "–"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"


TABLE_HEADER = (
    "| system | scenario | requests (errors) | output tokens (of requested) | output tok/s "
    "| TTFT p50 / p90 / p99 (ms) | ITL p50 / p90 / p99 (ms) | e2e p50 (s) | other procs' CPU |"
)


def format_row(r: ScenarioResult) -> str:
    ttft = " / ".join(_num(r.ttft_ms.get(p, math.nan)) for p in ("p50", "p90", "p99"))
    itl = " / ".join(_num(r.itl_ms.get(p, math.nan)) for p in ("p50", "p90", "p99"))
    e2e = _num(r.e2e_ms.get("p50", math.nan) / 1000, 2)
    other = "–" if math.isnan(r.other_cpu_share) else f"{100 * r.other_cpu_share:.0f}%"
    return (f"| {r.system} | {r.label} | {r.num_requests} ({r.num_errors}) "
            f"| {r.num_generated_tokens} ({r.num_requested_tokens}) "
            f"| {_num(r.output_tokens_per_s, 2)} | {ttft} | {itl} | {e2e} | {other} |")


def format_table(results: list[ScenarioResult]) -> str:
    separator = "|" + "---|" * TABLE_HEADER.count(" | ") + "---|"
    return "\n".join([TABLE_HEADER, separator, *(format_row(r) for r in results)])


def ratios(results: list[ScenarioResult]) -> dict[str, float]:
    """Ours / transformers output tokens/s, per scenario both systems ran."""
    by_key = {(r.system, r.scenario): r for r in results}
    out = {}
    for scenario in SCENARIOS:
        ours, base = by_key.get(("tgi-server", scenario)), by_key.get(("transformers", scenario))
        if ours and base and base.output_tokens_per_s > 0:
            out[scenario] = ours.output_tokens_per_s / base.output_tokens_per_s
    return out


def format_report(header: list[str], results: list[ScenarioResult]) -> str:
    lines = [*header, "", format_table(results)]
    if found := ratios(results):
        lines += ["", "ours / transformers, output tok/s: " + "; ".join(
            f"{key}: {value:.2f}x" for key, value in found.items())]
    return "\n".join(lines)


# ---- environment: machine, versions, model, prompts -------------------------------------

def machine_info() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    kib = next((int(line.split()[1]) for line in meminfo.splitlines()
                if line.startswith("MemTotal:")), 0)
    return {"cpu": cpu, "cores": str(len(os.sched_getaffinity(0))),
            "ram": f"{kib / 2**20:.1f} GiB"}


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


def describe_model(path: Path) -> str:
    from safetensors import safe_open

    config = json.loads((path / "config.json").read_text())
    num_params = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            num_params += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return (f"{path} ({config.get('architectures', ['?'])[0]}, {num_params / 1e6:.0f}M params, "
            f"hidden {config.get('hidden_size')}, {config.get('num_hidden_layers')} layers, "
            f"{config.get('num_attention_heads')} heads / {config.get('num_key_value_heads')} KV "
            f"heads, vocab {config.get('vocab_size')})")


def _text_chunks(seed: int, chars: int) -> Iterator[str]:
    """Windows of the standard library's .py files, in a seeded random order of files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    random.Random(seed).shuffle(files)
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for start in range(chars // 2, len(text) - chars, chars):  # skip license headers
            yield text[start:start + chars]


def make_prompts(tokenizer, count: int, num_tokens: int, block_size: int,
                 seed: int = 0) -> list[str]:
    """`count` texts that re-tokenize to exactly `num_tokens` ids, each with a distinct first
    block (so neither a prefix cache nor anything else can reuse work across requests)."""
    prompts: list[str] = []
    first_blocks: set[tuple[int, ...]] = set()
    for chunk in _text_chunks(seed, chars=num_tokens * 12):
        ids = tokenizer(chunk, add_special_tokens=False).input_ids
        for cut in (num_tokens, num_tokens - 1, num_tokens + 1, num_tokens - 2, num_tokens + 2):
            text = tokenizer.decode(ids[:cut])
            again = tokenizer(text, add_special_tokens=False).input_ids
            if len(again) == num_tokens and tuple(again[:block_size]) not in first_blocks:
                first_blocks.add(tuple(again[:block_size]))
                prompts.append(text)
                break
        if len(prompts) == count:
            return prompts
    raise RuntimeError(f"the standard library gave only {len(prompts)} of {count} prompts")


# ---- our server ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_flags(s: Settings) -> list[str]:
    """Budgets that fit `concurrency` full requests in one running batch and one prefill."""
    per_request = s.prompt_tokens + s.new_tokens + s.block_size
    max_input = 2 * s.prompt_tokens
    prefill = max(max_input, s.concurrency * s.prompt_tokens)
    return ["--dtype", "float32", "--num-threads", str(s.threads),
            "--max-input-tokens", str(max_input), "--max-total-tokens", str(max_input + s.new_tokens),
            "--max-batch-prefill-tokens", str(prefill),
            "--max-batch-total-tokens", str(max(prefill, s.concurrency * per_request)),
            "--graceful-termination-timeout", "10"]


def _process_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, start time, CPU ticks used) of every process, from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            f = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid ...
        except OSError:
            continue
        table[int(stat.parent.name)] = (int(f[1]), int(f[19]), int(f[11]) + int(f[12]))
    return table


def cpu_snapshot() -> CpuSnapshot:
    tick = os.sysconf("SC_CLK_TCK")
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    table = _process_table()
    own = [os.getpid(), *_descendants(os.getpid(), table)]
    return CpuSnapshot(busy / tick, sum(table[pid][2] for pid in own if pid in table) / tick)


class Stopwatch:
    """Wall time and other processes' CPU share since construction."""

    def __init__(self) -> None:
        self.start, self.cpu = time.perf_counter(), cpu_snapshot()

    def stop(self) -> tuple[float, float]:
        wall = time.perf_counter() - self.start
        return wall, other_cpu_share(self.cpu, cpu_snapshot(), wall, len(os.sched_getaffinity(0)))


def _descendants(pid: int, table: dict | None = None) -> dict[int, int]:
    """pid -> start time of every process under `pid` (the shards and router run in their own
    sessions, so the launcher's process group alone does not reach them)."""
    table, found, todo = table or _process_table(), {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, started, _) in table.items():
            if ppid == parent and child not in found:
                found[child] = started
                todo.append(child)
    return found


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the launcher; SIGKILL whatever of its tree is left after it exits or in 60 s."""
    tree = _descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            log("tgi-launch still running 60s after SIGTERM: SIGKILL")
            os.killpg(proc.pid, signal.SIGKILL)
    table = _process_table()
    for pid, started in tree.items():
        if table.get(pid, (0, None, 0))[1] == started:  # still alive, and not a reused pid
            log(f"SIGKILL left-over child {pid}")
            os.kill(pid, signal.SIGKILL)
    proc.wait()


@contextmanager
def running_server(model: Path, flags: list[str], log_path: Path,
                   timeout_s: float = 1200.0) -> Iterator[str]:
    """`tgi-launch` in its own session; yields its URL once /health is 200; always stopped."""
    port = free_port()
    cmd = [sys.executable, "-m", "tgi_server.launcher.cli", "--model-id", str(model),
           "--port", str(port), "--hostname", "127.0.0.1", *flags]
    log(f"starting: {' '.join(cmd[1:])} (log: {log_path})")
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text()[-3000:]
                raise RuntimeError(f"tgi-launch not healthy (exit code {proc.poll()}):\n{tail}")
            time.sleep(0.5)
        log(f"server ready at {url}")
        yield url
    finally:
        _stop(proc)
        log(f"server stopped (exit code {proc.returncode})")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


async def stream_one(client: httpx.AsyncClient, prompt: str, s: Settings, new_tokens: int,
                     stamps: list[float]) -> RequestTiming:
    """POST /generate_stream; `stamps` gets the arrival time of every token event."""
    body = {"inputs": prompt, "parameters": {
        "max_new_tokens": new_tokens, "details": True, "decoder_input_details": False}}
    start = time.perf_counter()
    try:
        async with client.stream("POST", "/generate_stream", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:300]
                details, error = None, f"HTTP {response.status_code}: {text}"
            else:
                details, error = await _read_events(response, stamps)
    except httpx.HTTPError as err:
        details, error = None, repr(err)
    if error is None and details and details.get("input_length") != s.prompt_tokens:
        error = f"input_length {details.get('input_length')} != {s.prompt_tokens}"
    itl = [b - a for a, b in zip(stamps, stamps[1:])]
    ttft = stamps[0] - start if stamps else None
    generated = details["generated_tokens"] if details else len(stamps)
    return RequestTiming(ttft, itl, time.perf_counter() - start, generated, error)


async def _read_events(response: httpx.Response,
                       stamps: list[float]) -> tuple[dict | None, str | None]:
    """SSE `data:{json}` events -> (the final event's details, an in-stream error)."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        event = json.loads(line[5:])
        if "error" in event:
            return None, f"{event.get('error_type')}: {event['error']}"
        stamps.append(time.perf_counter())
        if event.get("details"):
            return event["details"], None
    return None, "stream ended without details"


async def _heartbeat(name: str, stamps: list[list[float]], every_s: float = 15.0) -> None:
    while True:
        await asyncio.sleep(every_s)
        log(f"  {name}: {sum(map(len, stamps))} tokens streamed so far")


def wait_until_quiet(max_wait_s: float, window_s: float = 5.0, threshold: float = 0.1) -> None:
    """Blocks until other processes use under `threshold` of the CPUs for `window_s`, or
    `max_wait_s` passed (the machine may be shared; the table reports what remained)."""
    deadline = time.monotonic() + max_wait_s
    while max_wait_s > 0:
        watch = Stopwatch()
        time.sleep(window_s)
        other = watch.stop()[1]
        if other < threshold or time.monotonic() > deadline:
            return
        log(f"  waiting: other processes use {100 * other:.0f}% of the CPUs")


def _stopped(watch: Stopwatch, s: Settings) -> tuple[float, int, float]:
    """`summarize`'s (wall_s, new_tokens, other_cpu_share), logging a busy machine."""
    wall, other = watch.stop()
    if other > 0.05:
        log(f"  WARNING: other processes used {100 * other:.0f}% of the CPUs meanwhile")
    return wall, s.new_tokens, other


async def run_ours(url: str, prompts: Iterator[str], s: Settings,
                   scenarios: list[str]) -> list[ScenarioResult]:
    results = []
    limits = httpx.Limits(max_connections=s.concurrency + 8)
    # NOTE: the read timeout is per event, so only a stalled stream trips it.
    async with httpx.AsyncClient(base_url=url, timeout=600.0, limits=limits) as client:
        warmup = await stream_one(client, next(prompts), s, 8, [])
        log(f"warmup request: {warmup.num_generated_tokens} tokens, error={warmup.error}")
        if "sequential" in scenarios:
            log(f"tgi-server / sequential: {s.num_sequential_requests} requests, one at a time")
            await asyncio.to_thread(wait_until_quiet, s.max_quiet_wait_s)
            timings, watch = [], Stopwatch()
            for i in range(s.num_sequential_requests):
                timings.append(await stream_one(client, next(prompts), s, s.new_tokens, []))
                log(f"  request {i + 1}: {timings[-1].num_generated_tokens} tokens "
                    f"in {timings[-1].e2e_s:.1f}s, error={timings[-1].error}")
            results.append(summarize("tgi-server", "sequential", "1 stream, sequential", timings,
                                     *_stopped(watch, s)))
        if "concurrent" in scenarios:
            n = s.concurrency
            log(f"tgi-server / concurrent: {n} streams started at once")
            stamps: list[list[float]] = [[] for _ in range(n)]
            await asyncio.to_thread(wait_until_quiet, s.max_quiet_wait_s)
            beat = asyncio.create_task(_heartbeat("concurrent", stamps))
            watch = Stopwatch()
            timings = await asyncio.gather(*(
                stream_one(client, next(prompts), s, s.new_tokens, stamps[i]) for i in range(n)))
            beat.cancel()
            results.append(summarize("tgi-server", "concurrent", f"{n} concurrent streams",
                                     list(timings), *_stopped(watch, s)))
    return results


# ---- baseline: transformers generate ------------------------------------------------------

class _StampStreamer:
    """A `generate` streamer that keeps the time each step's tokens appear (first put: prompt)."""

    def __init__(self, progress_every: int = 0) -> None:
        self.puts: list[float] = []
        self.progress_every = progress_every

    def put(self, value) -> None:
        self.puts.append(time.perf_counter())
        steps = len(self.puts) - 1  # the first put is the prompt
        if self.progress_every and steps and steps % self.progress_every == 0:
            log(f"  {steps} steps done")

    def end(self) -> None:
        pass


def timed_generate(model, tokenizer, prompts: list[str], new_tokens: int,
                   progress_every: int = 0) -> list[RequestTiming]:
    """One left-padded `generate` call over `prompts`; every row shares the call's timings."""
    import torch

    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    streamer = _StampStreamer(progress_every)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, streamer=streamer)
    e2e = time.perf_counter() - start
    stamps = streamer.puts[1:]
    itl = [b - a for a, b in zip(stamps, stamps[1:])]
    num_new = out.shape[1] - batch.input_ids.shape[1]
    return [RequestTiming(stamps[0] - start, itl, e2e, num_new) for _ in prompts]


def run_baseline(model_path: Path, prompts: Iterator[str], s: Settings,
                 scenarios: list[str]) -> list[ScenarioResult]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(s.threads)
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    timed_generate(model, tokenizer, [next(prompts)], 8)  # warmup
    results = []
    if "sequential" in scenarios:
        log(f"transformers / sequential: {s.num_sequential_requests} requests, one at a time")
        wait_until_quiet(s.max_quiet_wait_s)
        timings, watch = [], Stopwatch()
        for i in range(s.num_sequential_requests):
            timings += timed_generate(model, tokenizer, [next(prompts)], s.new_tokens)
            log(f"  request {i + 1}: {timings[-1].e2e_s:.1f}s")
        results.append(summarize("transformers", "sequential", "1 request at a time", timings,
                                 *_stopped(watch, s)))
    if "concurrent" in scenarios:
        n = s.concurrency
        log(f"transformers / concurrent: one left-padded batch of {n}")
        batch_prompts = [next(prompts) for _ in range(n)]
        wait_until_quiet(s.max_quiet_wait_s)
        watch = Stopwatch()
        timings = timed_generate(model, tokenizer, batch_prompts, s.new_tokens, progress_every=32)
        results.append(summarize("transformers", "concurrent", f"batch of {n}, left-padded",
                                 timings, *_stopped(watch, s)))
    return results


# ---- CLI ----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tgi_server.launcher.bench",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="model directory (default: a cached llama --size)")
    p.add_argument("--size", choices=["tiny", "small", "medium"], help="default: medium")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK.size} model, {QUICK.new_tokens} new tokens")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument("--skip-baseline", action="store_true", help="don't run transformers")
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--requests", type=int, help="requests of the sequential scenario")
    p.add_argument("--concurrency", type=int)
    p.add_argument("--threads", type=int, help="torch threads of the shard and the baseline")
    p.add_argument("--max-quiet-wait", type=float, dest="max_quiet_wait_s",
                   help="seconds to wait before each scenario for other processes to go idle "
                        "(default 600; 0: don't wait)")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    s = QUICK if args.quick else Settings()
    overrides = {"size": args.size, "new_tokens": args.new_tokens, "threads": args.threads,
                 "num_sequential_requests": args.requests, "concurrency": args.concurrency,
                 "max_quiet_wait_s": args.max_quiet_wait_s}
    return replace(s, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> None:
    # SIGTERM unwinds like Ctrl-C, so the server is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    args = parse_args(argv)
    s = settings_from(args)
    scenarios = [name for name in args.scenarios.split(",") if name]
    if unknown := set(scenarios) - set(SCENARIOS):
        raise SystemExit(f"unknown scenarios {sorted(unknown)}; choose from {SCENARIOS}")
    model = args.model or cached_model(s.size)
    from transformers import AutoTokenizer

    num_prompts = 2 * (2 + s.num_sequential_requests + s.concurrency)
    prompts = iter(make_prompts(AutoTokenizer.from_pretrained(model), num_prompts,
                                s.prompt_tokens, s.block_size))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    flags = server_flags(s)
    with running_server(model, flags, RESULTS_DIR / f"server-{stamp}.log") as url:
        results = asyncio.run(run_ours(url, prompts, s, scenarios))
    if not args.skip_baseline:
        results += run_baseline(model, prompts, s, scenarios)
    machine, vers = machine_info(), versions()
    header = [
        f"- machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram']} RAM",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
        f"- model: {describe_model(model)}, float32",
        f"- workload: fresh {s.prompt_tokens}-token prompts, max_new_tokens {s.new_tokens}, "
        f"greedy, {s.threads} torch threads; tgi-launch flags: {' '.join(flags)}",
    ]
    report = format_report(header, results)
    print(report, flush=True)
    out = RESULTS_DIR / f"bench-{stamp}.json"
    out.write_text(json.dumps({
        "command": " ".join(["python -m tgi_server.launcher.bench", *(argv or sys.argv[1:])]),
        "machine": machine, "versions": vers, "model": str(model), "settings": asdict(s),
        "server_flags": flags, "results": [asdict(r) for r in results],
        "ratios": ratios(results)}, indent=2) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
