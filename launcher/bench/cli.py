"""`tgi-bench`: load any TGI-native or OpenAI-compatible server and report what it sustained.

    tgi-bench --url http://127.0.0.1:3000                      # concurrency 1, 4, 16, 64
    tgi-bench --url http://127.0.0.1:8000 --api openai --model M --rate 0.5,1,2
    tgi-bench --url ... --prompt-tokens 64-512 --new-tokens 16-256 --requests 100
    tgi-bench --merge a.json b.json --out both                # one table and plot of runs

Upstream: the command line. Downstream: `workloads.py` (fresh exact-length prompts, made with
the model's tokenizer), `loadgen.py` (the requests), `report.py` (table, JSON, plot). TTFT,
inter-token and end-to-end latency (p50/p90/p99), output tokens/s, requests/s and errors for
each load, as a markdown table, a JSON file and a PNG plot (throughput against latency).
"""

import argparse
import asyncio
import json
import random
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

import httpx

from tgi_server.launcher.bench import loadgen, report
from tgi_server.launcher.bench.servers import log
from tgi_server.launcher.bench.stats import LoadResult, Stopwatch, summarize
from tgi_server.launcher.bench.workloads import PromptSource, Workload


def _span(text: str) -> tuple[int, int | None]:
    """"128" -> (128, None); "64-512" -> (64, 512)."""
    low, _, high = text.partition("-")
    return int(low), (int(high) if high else None)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tgi-bench", description=__doc__.splitlines()[0])
    p.add_argument("--url", help="server base URL, e.g. http://127.0.0.1:3000")
    p.add_argument("--api", choices=loadgen.APIS, default="tgi",
                   help="tgi: /generate_stream; openai: /v1/completions (default tgi)")
    p.add_argument("--model", default="tgi", help="OpenAI `model` field (default tgi)")
    p.add_argument("--tokenizer", help="tokenizer directory or hub id that makes the prompts "
                   "(default: the model_id of the server's /info)")
    p.add_argument("--token-ids", action="store_true", help="OpenAI API: send token-id prompts")
    p.add_argument("--prompt-tokens", default="128", help="N or MIN-MAX (uniform), default 128")
    p.add_argument("--new-tokens", default="128", help="N or MIN-MAX (uniform), default 128")
    p.add_argument("--shared-prefix-tokens", type=int, default=0,
                   help="the first N tokens of every prompt of a load are the same text (a "
                        "system prompt), for prefix caches to reuse; default 0: all fresh")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", default="1,4,16,64", help="levels, default 1,4,16,64")
    load.add_argument("--rate", help="Poisson request rates per second, e.g. 0.5,1,2")
    p.add_argument("--requests", type=int, help="requests per load (default: 4 x concurrency, "
                   "at least 8; with --rate: 32)")
    p.add_argument("--name", default="server", help="system name in the table and plot")
    p.add_argument("--dtype", default="", help="dtype label in the table (informative)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="output prefix for .json/.md/.png (default "
                   "benchmarks/results/tgi-bench-<UTC time>)")
    p.add_argument("--merge", nargs="+", type=Path, help="combine earlier JSON outputs into "
                   "one table and plot instead of running")
    return p.parse_args(argv)


def _tokenizer(args: argparse.Namespace):
    from transformers import AutoTokenizer

    name = args.tokenizer
    if name is None:
        if args.api != "tgi":
            raise SystemExit("--tokenizer is needed with --api openai")
        name = httpx.get(f"{args.url}/info", timeout=30).json()["model_id"]
    return AutoTokenizer.from_pretrained(name)


def _loads(args: argparse.Namespace) -> list[tuple[str, float]]:
    if args.rate:
        return [("rate", float(v)) for v in args.rate.split(",")]
    return [("concurrency", int(v)) for v in args.concurrency.split(",")]


def run(args: argparse.Namespace) -> list[LoadResult]:
    (prompt, prompt_max), (new, new_max) = _span(args.prompt_tokens), _span(args.new_tokens)
    workload = Workload(prompt, new, prompt_max, new_max, args.seed, args.shared_prefix_tokens)
    source = PromptSource(_tokenizer(args), seed=args.seed)
    rng = random.Random(args.seed)
    target = loadgen.Target(args.url, args.api, args.model, args.token_ids)
    first = asyncio.run(loadgen.warmup(target, workload.jobs(source, 1, rng)[0]))
    log(f"warmup: {first.num_generated_tokens} tokens, error={first.error}")
    results = []
    for kind, value in _loads(args):
        n = args.requests or (32 if kind == "rate" else max(8, 4 * int(value)))
        jobs = workload.jobs(source, n, rng)
        key = f"c={int(value)}" if kind == "concurrency" else f"rate={value:g}/s"
        log(f"{args.name} {key}: {n} requests")
        before = loadgen.decode_steps(args.url)
        watch = Stopwatch()
        if kind == "concurrency":
            timings = asyncio.run(loadgen.run_concurrency(target, jobs, int(value), key))
        else:
            timings = asyncio.run(loadgen.run_rate(target, jobs, value, key, args.seed))
        wall, _ = watch.stop()
        # NOTE: the server is not this process's child, so "other processes" would include it.
        results.append(summarize(
            args.name, args.dtype or "-", key, key, timings, wall,
            sum(j.max_new_tokens for j in jobs),
            concurrency=int(value) if kind == "concurrency" else None,
            request_rate=value if kind == "rate" else None))
        if before is not None:
            results[-1] = replace(results[-1], **loadgen.server_fields(before, args.url))
        log(report.format_row(results[-1]))
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    prefix = args.out or Path("benchmarks/results") / f"tgi-bench-{stamp}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        results = [LoadResult(**r) for f in args.merge for r in json.loads(f.read_text())["results"]]
    elif args.url:
        results = run(args)
    else:
        raise SystemExit("tgi-bench: give --url (or --merge)")
    overhead = report.router_overhead(results, []) + report.server_shares(results)
    table = "\n".join([report.format_table(results), *(["", *overhead] if overhead else [])])
    print(table)
    prefix.with_suffix(".md").write_text(table + "\n")
    prefix.with_suffix(".json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()},
         "results": [asdict(r) for r in results]}, indent=2) + "\n")
    print(report.write_plot(results, prefix.with_suffix(".png"), f"tgi-bench {stamp}"))


if __name__ == "__main__":
    main()
