"""The report: a markdown table, ratios between systems, shares of the roofs, JSON and a plot.

Upstream: `compare.py` and `cli.py` hand over `LoadResult`s (and, for the side-by-side run,
the `Roof`, the model's size and the shard micro-benchmark). Pure except `write_plot`, which
needs matplotlib (the optional `bench` extra) and says so when it is missing.
"""

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from tgi_server.launcher.bench.stats import LoadResult

OURS = "tgi-server"


@dataclass(frozen=True)
class ModelCost:
    """What one decode step costs at least: every weight read once, 2 FLOPs per weight per token."""

    params_per_token: int  # weights a token multiplies with (all but the embedding table)

    def gflop_per_token(self) -> float:
        return 2 * self.params_per_token / 1e9

    def gb_per_step(self, dtype: str) -> float:
        return self.params_per_token * (4 if dtype == "float32" else 2) / 1e9


def num(value: float | None, digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"


def _joined(values: dict[str, float], scale: float = 1.0, digits: int = 1,
           keys: tuple[str, ...] = ("p50", "p90", "p99")) -> str:
    return " / ".join(num(values.get(p, math.nan) * scale, digits) for p in keys)


TABLE_HEADER = (
    "| system | dtype | load | requests (errors) | output tokens (of requested) | output tok/s "
    "| req/s | TTFT p50 / p90 / p99 (ms) | ITL p50 / p90 / p99 / max (ms) "
    "| e2e p50 / p90 / p99 (s) "
    "| % of compute peak | % of bandwidth | other procs' CPU |"
)


def roof_shares(r: LoadResult, cost: ModelCost | None, roof) -> tuple[float, float]:
    """(share of the dtype's compute peak, `Roof.peak_gflops`; share of the memory bandwidth)
    that the decode work behind `r`'s tokens would need: a lower bound on the work done (no
    attention, no prefill)."""
    if cost is None or roof is None or not r.output_tokens_per_s > 0:
        return math.nan, math.nan
    flops = r.output_tokens_per_s * cost.gflop_per_token() / roof.peak_gflops(r.dtype)
    batch = r.concurrency or 1
    steps_per_s = r.output_tokens_per_s / batch
    return flops, steps_per_s * cost.gb_per_step(r.dtype) / roof.bandwidth_gb_s


def format_row(r: LoadResult, cost: ModelCost | None = None, roof=None) -> str:
    flops, bandwidth = roof_shares(r, cost, roof)
    other = "–" if math.isnan(r.other_cpu_share) else f"{100 * r.other_cpu_share:.0f}%"
    pct = lambda v: "–" if math.isnan(v) else f"{100 * v:.0f}%"
    return (f"| {r.system} | {r.dtype} | {r.label} | {r.num_requests} ({r.num_errors}) "
            f"| {r.num_generated_tokens} ({r.num_requested_tokens}) "
            f"| {num(r.output_tokens_per_s, 2)} | {num(r.requests_per_s, 2)} "
            f"| {_joined(r.ttft_ms)} | {_joined(r.itl_ms, keys=('p50', 'p90', 'p99', 'max'))} "
            f"| {_joined(r.e2e_ms, 1e-3, 2)} "
            f"| {pct(flops)} | {pct(bandwidth)} | {other} |")


def format_table(results: list[LoadResult], cost: ModelCost | None = None, roof=None) -> str:
    separator = "|" + "---|" * (TABLE_HEADER.count(" | ") + 1)
    return "\n".join([TABLE_HEADER, separator, *(format_row(r, cost, roof) for r in results)])


def ratios(results: list[LoadResult]) -> dict[str, dict[str, list[float]]]:
    """Per `load dtype`: ours / each other system's output tok/s where both ran, one ratio per
    round (`--rounds`) in round order: systems are only paired within a round."""
    ours = {(r.round, r.load, r.dtype): r for r in results if r.system == OURS}
    out: dict[str, dict[str, list[float]]] = {}
    for r in sorted(results, key=lambda r: r.round):
        mine = ours.get((r.round, r.load, r.dtype))
        if r.system != OURS and mine and r.output_tokens_per_s > 0:
            per_round = out.setdefault(f"{r.load} {r.dtype}", {}).setdefault(r.system, [])
            per_round.append(mine.output_tokens_per_s / r.output_tokens_per_s)
    return out


def num_rounds(results: list[LoadResult]) -> int:
    return max((r.round for r in results), default=0) + 1


def format_ratio(per_round: list[float]) -> str:
    """`1.50x`; over several rounds their median, then each round's."""
    if len(per_round) == 1:
        return f"{per_round[0]:.2f}x"
    each = " / ".join(f"{v:.2f}" for v in per_round)
    return f"{statistics.median(per_round):.2f}x (rounds: {each})"


# Other processes' share of the CPUs during a load past which its ratios are flagged.
DISTURBED_SHARE = 0.10


def format_ratios(results: list[LoadResult]) -> list[str]:
    found = ratios(results)
    if not found:
        return []
    lines = [f"{OURS} / other system, output tok/s at the same load and dtype:"]
    lines += [f"- {key}: " + "; ".join(f"{system} {format_ratio(values)}"
                                       for system, values in per.items())
              for key, per in found.items()]
    multi_round = num_rounds(results) > 1
    disturbed = [f"{r.system} {r.load} {r.dtype}" + (f" round {r.round + 1}" if multi_round else "")
                 + f" ({100 * r.other_cpu_share:.0f}%)" for r in results
                 if r.other_cpu_share >= DISTURBED_SHARE and f"{r.load} {r.dtype}" in found]
    if disturbed:
        lines.append(f"- disturbed: other processes took {100 * DISTURBED_SHARE:.0f}% or more of "
                     f"the CPUs during {', '.join(disturbed)}; those rounds' ratios say less")
    return lines


def format_dtype_ratios(results: list[LoadResult], system: str = OURS) -> list[str]:
    """bfloat16 / float32 output tok/s of one system at each load (per round, as ratios)."""
    by = {(r.round, r.load, r.dtype): r for r in results if r.system == system}
    per_load: dict[str, list[float]] = {}
    for (rnd, load, dtype), r in sorted(by.items(), key=lambda item: item[0][0]):
        bf16 = by.get((rnd, load, "bfloat16"))
        if dtype == "float32" and bf16 and r.output_tokens_per_s > 0:
            per_load.setdefault(load, []).append(bf16.output_tokens_per_s / r.output_tokens_per_s)
    lines = [f"- {load}: {format_ratio(values)}" for load, values in per_load.items()]
    return [f"{system} bfloat16 / float32, output tok/s:", *lines] if lines else []


SHARD_HEADER = ("| dtype | batch | forward ms | step ms | shard host ms | tok/s | prefill ms "
                "| prefill tok/s |\n|---|---|---|---|---|---|---|---|")


def format_shard_row(r: dict) -> str:
    """One row of `bench_shard.measure`."""
    return (f"| {r['dtype']} | {r['batch']} | {r['forward_ms']:.1f} | {r['step_ms']:.1f} | "
            f"{r['host_ms']:.2f} | {r['tok_s']:.1f} | {r['prefill_ms']:.1f} "
            f"| {r['prefill_tok_s']:.0f} |")


def format_shard(rows: list[dict]) -> str:
    return "\n".join([SHARD_HEADER, *map(format_shard_row, rows)])


def router_overhead(results: list[LoadResult], shard_rows: list[dict]) -> list[str]:
    """ITL of tgi-server at concurrency c minus the shard's own decode step: the per-token
    cost of the router, gRPC and HTTP streaming. The step is the server's mean during the same
    load (its /metrics) when known, else the micro-benchmark's at batch c (another minute of
    a machine whose speed drifts). Against the server's mean step both the ITL's p50 and its
    mean are given: the mean is the like-for-like figure (tokens that come in bursts move the
    p50 but not the mean), the p50 the one robust to a load's stalls behind other prompts'
    prefills (at c > 1 the mean includes them)."""
    steps = {(r["dtype"], r["batch"]): r["step_ms"] for r in shard_rows}
    multi_round = num_rounds(results) > 1
    lines = []
    for r in results:
        itl = r.itl_ms.get("p50", math.nan)
        if math.isnan(itl) or (r.system != OURS and math.isnan(r.server_step_ms)):
            continue
        if not math.isnan(r.draft_acceptance):
            continue  # it speculated: a step streamed several tokens, so ITL p50 is no step
        if not math.isnan(r.server_step_ms):
            step, where = r.server_step_ms, "mean shard step in the same load"
        elif (step := steps.get((r.dtype, r.concurrency))) is not None:
            where = "shard micro-benchmark step"
        else:
            continue
        name = r.load if r.dtype == "-" else f"{r.dtype} {r.load}"
        name += f" (round {r.round + 1})" if multi_round else ""
        itls = {"p50": itl}
        if not math.isnan(r.server_step_ms) and not math.isnan(r.itl_ms.get("mean", math.nan)):
            itls["mean"] = r.itl_ms["mean"]
        lines.append(
            f"- {name}: ITL {' / '.join(f'{k} {v:.1f}' for k, v in itls.items())} ms - {where} "
            f"{step:.1f} ms = {' / '.join(f'{v - step:.1f}' for v in itls.values())} ms "
            f"({' / '.join(f'{100 * (v - step) / v:.1f}%' for v in itls.values())} of the ITL)")
    return ["router + gRPC + HTTP per decode step (end-to-end ITL - shard step):", *lines] \
        if lines else []


def server_shares(results: list[LoadResult]) -> list[str]:
    """The share of drafts tgi-server accepted in each load where it speculated (its /metrics),
    and of its prompt tokens taken from its prefix cache where it took any."""
    return (_shares(results, "draft_acceptance", "drafts accepted (tgi-server --speculate):")
            + _shares(results, "prompt_cache_share",
                      "prompt tokens from the prefix cache (tgi-server):"))


def _shares(results: list[LoadResult], field: str, title: str) -> list[str]:
    multi_round = num_rounds(results) > 1
    lines = []
    for r in results:
        value = getattr(r, field)
        if math.isnan(value):
            continue
        name = r.load if r.dtype == "-" else f"{r.dtype} {r.load}"
        name += f" (round {r.round + 1})" if multi_round else ""
        lines.append(f"- {name}: {100 * value:.0f}%")
    return [title, *lines] if lines else []


def write_plot(results: list[LoadResult], path: Path, title: str) -> str:
    """Output tok/s against ITL p50, one line per (system, dtype) and round, one point per
    load."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "no plot: matplotlib is not installed (pip install 'tgi-server[bench]')"
    fig, ax = plt.subplots(figsize=(8, 5.5))
    lines: dict[tuple[str, str, int], list[LoadResult]] = {}
    for r in results:
        if r.output_tokens_per_s > 0 and not math.isnan(r.itl_ms.get("p50", math.nan)):
            lines.setdefault((r.system, r.dtype, r.round), []).append(r)
    colors: dict[tuple[str, str], str] = {}
    rounds = num_rounds(results)
    for (system, dtype, rnd), points in lines.items():
        # One colour per (system, dtype); each round its own marker, labelled once.
        color = colors.setdefault((system, dtype), f"C{len(colors) % 10}")
        points.sort(key=lambda r: (r.concurrency or 0, r.request_rate or 0))
        x = [p.itl_ms["p50"] for p in points]
        y = [p.output_tokens_per_s for p in points]
        style = "-" if system == OURS else "--"
        label = f"{system} {dtype}" + (f" ({rounds} rounds)" if rounds > 1 else "")
        ax.plot(x, y, style, color=color, marker="os^vD<>"[rnd % 7],
                label=label if rnd == 0 else None)
        for p, xi, yi in zip(points, x, y):
            ax.annotate(p.load, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("inter-token latency p50 (ms), lower is better")
    ax.set_ylabel("output tokens/s, higher is better")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"
