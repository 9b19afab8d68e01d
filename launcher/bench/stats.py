"""What a benchmark measures: per-request timings, their summary, and the machine's noise.

Upstream: `loadgen.py` (HTTP systems) and `baselines.py` (transformers in-process) produce
`RequestTiming`s; `summarize` turns a run of them into a `LoadResult`, which `report.py`
prints and plots. `Stopwatch` / `wait_until_quiet` read /proc so every row says how much CPU
other processes took meanwhile (the machine may be shared). Pure except for the /proc reads.
"""

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

QUANTILES = (50, 90, 99)


@dataclass(slots=True)
class RequestTiming:
    """One request as the client saw it; times in seconds from sending it."""

    ttft_s: float | None
    itl_s: list[float]
    e2e_s: float
    num_generated_tokens: int
    error: str | None = None


@dataclass(frozen=True)
class LoadResult:
    """One system under one load (a concurrency level or a request rate)."""

    system: str  # "tgi-server" | "transformers" | "llama.cpp" | "vllm"
    dtype: str
    load: str  # "c=8", "rate=2.0/s": pairs systems in ratios and points in the plot
    label: str
    num_requests: int
    num_errors: int
    num_generated_tokens: int
    num_requested_tokens: int
    wall_s: float
    output_tokens_per_s: float
    requests_per_s: float
    concurrency: int | None = None
    request_rate: float | None = None
    ttft_ms: dict[str, float] = field(default_factory=dict)
    itl_ms: dict[str, float] = field(default_factory=dict)
    e2e_ms: dict[str, float] = field(default_factory=dict)
    # CPU time of processes outside this benchmark, as a share of all cores over the wall time
    other_cpu_share: float = math.nan
    first_error: str | None = None
    # tgi-server: its shards' mean decode step during this load, from its /metrics
    # (tgi_batch_forward_duration), so the router's share of the ITL is read in one window.
    server_step_ms: float = math.nan
    # tgi-server with --speculate: accepted drafts over drafts verified during the load.
    draft_acceptance: float = math.nan
    # tgi-server: prompt tokens from its prefix cache over prompt tokens, during the load.
    prompt_cache_share: float = math.nan
    # Which pass over the systems this load belongs to (`make bench --rounds`), from 0:
    # ratios pair systems within a round.
    round: int = 0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def quantiles_ms(values_s: list[float]) -> dict[str, float]:
    """p50 / p90 / p99 and the max (the longest stall, where a p99 can hide a few long ones)."""
    return {**{f"p{q}": 1000 * percentile(values_s, q) for q in QUANTILES},
            "max": 1000 * percentile(values_s, 100)}


def itl_summary_ms(gaps_s: list[float]) -> dict[str, float]:
    """The quantiles, and the mean: what a token costs on average beside a mean step, where
    bursts (a late token, then one right behind it) move the median but not the mean."""
    mean = 1000 * sum(gaps_s) / len(gaps_s) if gaps_s else math.nan
    return {**quantiles_ms(gaps_s), "mean": mean}


def summarize(system: str, dtype: str, load: str, label: str, timings: list[RequestTiming],
              wall_s: float, num_requested_tokens: int, other_cpu_share: float = math.nan,
              concurrency: int | None = None, request_rate: float | None = None) -> LoadResult:
    """Aggregates per-request timings; errors count no tokens and no latencies."""
    ok = [t for t in timings if t.error is None]
    num_generated = sum(t.num_generated_tokens for t in ok)
    per_s = (lambda n: n / wall_s) if wall_s > 0 else (lambda n: math.nan)
    return LoadResult(
        system=system, dtype=dtype, load=load, label=label,
        num_requests=len(timings), num_errors=len(timings) - len(ok),
        num_generated_tokens=num_generated, num_requested_tokens=num_requested_tokens,
        wall_s=wall_s, output_tokens_per_s=per_s(num_generated), requests_per_s=per_s(len(ok)),
        concurrency=concurrency, request_rate=request_rate,
        ttft_ms=quantiles_ms([t.ttft_s for t in ok if t.ttft_s is not None]),
        itl_ms=itl_summary_ms([itl for t in ok for itl in t.itl_s]),
        e2e_ms=quantiles_ms([t.e2e_s for t in ok]), other_cpu_share=other_cpu_share,
        first_error=next((t.error for t in timings if t.error is not None), None),
    )


# ---- other processes' CPU ----------------------------------------------------------------

@dataclass(frozen=True)
class CpuSnapshot:
    busy_s: float  # the whole machine, from /proc/stat
    own_s: float  # this process and its descendants (the servers under test)


def other_cpu_share(before: CpuSnapshot, after: CpuSnapshot, wall_s: float, cores: int) -> float:
    """Share of all cores that other processes used between two snapshots (0 on a quiet box)."""
    other = (after.busy_s - before.busy_s) - (after.own_s - before.own_s)
    return max(0.0, other) / (wall_s * cores) if wall_s > 0 else math.nan


def process_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, start time, CPU ticks used) of every process, from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            f = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid ...
        except OSError:
            continue
        table[int(stat.parent.name)] = (int(f[1]), int(f[19]), int(f[11]) + int(f[12]))
    return table


def descendants(pid: int, table: dict | None = None) -> dict[int, int]:
    """pid -> start time of every process under `pid` (servers may start their own sessions,
    so a process group alone does not reach them)."""
    table, found, todo = table or process_table(), {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, started, _) in table.items():
            if ppid == parent and child not in found:
                found[child] = started
                todo.append(child)
    return found


def cpu_snapshot() -> CpuSnapshot:
    tick = os.sysconf("SC_CLK_TCK")
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    table = process_table()
    own = [os.getpid(), *descendants(os.getpid(), table)]
    return CpuSnapshot(busy / tick, sum(table[pid][2] for pid in own if pid in table) / tick)


def num_cores() -> int:
    return len(os.sched_getaffinity(0))


class Stopwatch:
    """Wall time and other processes' CPU share since construction."""

    def __init__(self) -> None:
        self.start, self.cpu = time.perf_counter(), cpu_snapshot()

    def stop(self) -> tuple[float, float]:
        wall = time.perf_counter() - self.start
        return wall, other_cpu_share(self.cpu, cpu_snapshot(), wall, num_cores())


def wait_until_quiet(max_wait_s: float, log, window_s: float = 5.0,
                     threshold: float = 0.1) -> float:
    """Blocks until other processes use under `threshold` of the CPUs for `window_s`, or
    `max_wait_s` passed (the report shows what remained). Returns the last share seen."""
    deadline = time.monotonic() + max_wait_s
    other = 0.0
    while max_wait_s > 0:
        watch = Stopwatch()
        time.sleep(window_s)
        other = watch.stop()[1]
        if other < threshold or time.monotonic() > deadline:
            break
        log(f"  waiting: other processes use {100 * other:.0f}% of the CPUs")
    return other
