"""The side-by-side run's outputs: the markdown report (printed), its JSON and its plot.

Upstream: `compare.py` once every system ran. Downstream: `report.py` for the pieces; files
go to benchmarks/results/bench-<UTC stamp>.{md,json,png}.
"""

import json
import math
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path

from tgi_server.launcher.bench import report, roofline
from tgi_server.launcher.bench.servers import log


def machine_info() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.startswith("flags")), [])
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    kib = next((int(line.split()[1]) for line in meminfo.splitlines()
                if line.startswith("MemTotal:")), 0)
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return {"cpu": cpu, "cores": str(len(os.sched_getaffinity(0))),
            "ram": f"{kib / 2**20:.1f} GiB", "isa": " ".join(isa) or "unknown"}


def model_params(path: Path) -> tuple[int, int]:
    """(all parameters, parameters outside the input embedding) of a safetensors checkpoint."""
    from safetensors import safe_open

    total = embedding = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                n = math.prod(f.get_slice(name).get_shape())
                total += n
                embedding += n if name.endswith("embed_tokens.weight") else 0
    return total, total - embedding


def describe_model(path: Path, config: dict) -> str:
    total, _ = model_params(path)
    return (f"{path} ({config.get('architectures', ['?'])[0]}, {total / 1e6:.0f}M params, "
            f"hidden {config.get('hidden_size')}, {config.get('num_hidden_layers')} layers, "
            f"{config.get('num_attention_heads')} heads / {config.get('num_key_value_heads')} KV "
            f"heads, vocab {config.get('vocab_size')})")


def _header(args, settings, model: Path, config: dict, roof, notes, flags, versions, peers) -> list[str]:
    machine = machine_info()
    command = " ".join(["python -m tgi_server.launcher.bench", *(args or sys.argv[1:])])
    vers = dict(versions) | {p.name: p.version for p in peers}
    lines = [
        f"- command: `{command}`",
        f"- machine: {machine['cpu']} ({machine['isa']}), {machine['cores']} cores, "
        f"{machine['ram']} RAM",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
        f"- model: {describe_model(model, config)}",
        f"- workload: {settings.workload.describe()}; {settings.threads} threads per system; "
        f"concurrency c sends c requests at once ({settings.num_sequential_requests} one after "
        "another at c=1)",
    ]
    lines += [f"- tgi-launch flags ({d}): {' '.join(f)}" for d, f in flags.items()]
    if roof is not None:
        lines.append(roofline.describe(roof))
    return lines + [f"- {note}" for note in notes]


def write_outputs(prefix: Path, *, args, settings, model: Path, config: dict, roof, shard_rows,
                  results, notes, flags, versions, peers) -> str:
    cost = report.ModelCost(model_params(model)[1])
    lines = _header(args, settings, model, config, roof, notes, flags, versions, peers)
    lines += ["", report.format_table(results, cost, roof), ""]
    lines += ["% of compute peak: output tok/s x 2 x non-embedding params over the dtype's "
              "multiply-add peak (the best matmul where that was not measured); % of bandwidth: "
              "decode steps/s (tok/s / c) x weight bytes over the read bandwidth. Both leave out "
              "attention and prefill.", ""]
    for block in (report.format_ratios(results), report.format_dtype_ratios(results)):
        lines += [*block, ""] if block else []
    if shard_rows:
        lines += ["Shard micro-benchmark (one decode step, no router, no gRPC; "
                  f"context {settings.workload.prompt_tokens} tokens):", "",
                  report.format_shard(shard_rows), ""]
    overhead = report.router_overhead(results, shard_rows)
    lines += [*overhead, ""] if overhead else []
    shares = report.server_shares(results)
    lines += [*shares, ""] if shares else []
    title = f"{model.name}: {settings.workload.describe()}, {settings.threads} threads"
    lines.append(report.write_plot(results, prefix.with_suffix(".png"), title))
    text = "\n".join(lines)
    print(text, flush=True)
    prefix.with_suffix(".md").write_text(text + "\n")
    prefix.with_suffix(".json").write_text(json.dumps({
        "command": lines[0], "machine": machine_info(), "versions": versions,
        "model": str(model), "settings": asdict(settings), "server_flags": flags,
        "roof": asdict(roof) if roof is not None else None, "shard": shard_rows,
        "notes": notes, "results": [asdict(r) for r in results],
        "ratios": report.ratios(results)}, indent=2) + "\n")
    log(f"wrote {prefix}.md, .json, .png")
    return text
