"""Load generation: streams `Job`s to a server at a concurrency level or a Poisson rate.

Upstream: `cli.py` (tgi-bench against any URL) and `compare.py` (every HTTP system of the
side-by-side run). Downstream: the server, over HTTP with asyncio + httpx: TGI's native
`/generate_stream` or an OpenAI-compatible `/v1/completions` (tgi-server, vLLM, llama.cpp's
server), both streamed so every token's arrival is timed. Returns `RequestTiming`s.

TTFT = send to the first token event; ITL = gaps between token events, pooled over requests;
e2e = send to the last event. Output tokens are what the server reports (TGI's
`details.generated_tokens`, OpenAI's `usage.completion_tokens`), else the events counted.
"""

import asyncio
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tgi_server.launcher.bench.stats import RequestTiming
from tgi_server.launcher.bench.workloads import Job

APIS = ("tgi", "openai")
_SSE_LINE_END = re.compile(r"\r\n|\r|\n")


async def _sse_lines(response: httpx.Response):
    """The stream's lines split where SSE ends a line (CRLF, LF, CR) only: httpx's `aiter_lines`
    also splits at U+2028 and U+0085, which a peer may write raw inside a JSON string."""
    rest = ""
    async for text in response.aiter_text():
        *lines, rest = _SSE_LINE_END.split(rest + text)
        for line in lines:
            yield line
    if rest:
        yield rest


@dataclass(frozen=True)
class Target:
    """A server and the API to speak to it."""

    url: str
    api: str = "tgi"  # tgi: /generate_stream; openai: /v1/completions
    model: str = "tgi"  # the OpenAI `model` field
    # OpenAI API only: send the prompt as token ids (llama.cpp's tokenizer may differ from ours)
    send_token_ids: bool = False
    # OpenAI API only: ask for exactly max_tokens tokens with vLLM's and llama.cpp's
    # `ignore_eos` and vLLM's `min_tokens` (servers that don't know them ignore them)
    force_length: bool = True


async def _tgi_request(client: httpx.AsyncClient, target: Target, job: Job,
                       stamps: list[float]) -> tuple[int | None, str | None]:
    body = {"inputs": job.prompt, "parameters": {
        "max_new_tokens": job.max_new_tokens, "details": True, "decoder_input_details": False}}
    async with client.stream("POST", "/generate_stream", json=body) as response:
        if response.status_code != 200:
            return None, await _http_error(response)
        async for line in _sse_lines(response):
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                return None, f"{event.get('error_type')}: {event['error']}"
            stamps.append(time.perf_counter())
            if details := event.get("details"):
                if details.get("input_length") != len(job.prompt_ids):
                    return None, f"input_length {details.get('input_length')} != {len(job.prompt_ids)}"
                return details["generated_tokens"], None
    return None, "stream ended without details"


async def _openai_request(client: httpx.AsyncClient, target: Target, job: Job,
                          stamps: list[float]) -> tuple[int | None, str | None]:
    body = {"model": target.model, "max_tokens": job.max_new_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True},
            "prompt": job.prompt_ids if target.send_token_ids else job.prompt}
    if target.force_length:
        body |= {"ignore_eos": True, "min_tokens": job.max_new_tokens}
    usage = None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return None, await _http_error(response)
        async for line in _sse_lines(response):
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                return None, str(chunk["error"])[:300]
            if chunk.get("choices"):
                stamps.append(time.perf_counter())
            usage = chunk.get("usage") or usage
    if usage is None:
        return len(stamps), None
    if usage.get("prompt_tokens") not in (None, len(job.prompt_ids)):
        return None, f"prompt_tokens {usage['prompt_tokens']} != {len(job.prompt_ids)}"
    return usage.get("completion_tokens", len(stamps)), None


async def _http_error(response: httpx.Response) -> str:
    text = (await response.aread()).decode(errors="replace")[:300]
    return f"HTTP {response.status_code}: {text}"


async def send(client: httpx.AsyncClient, target: Target, job: Job,
               stamps: list[float]) -> RequestTiming:
    """One streamed request; `stamps` gets the arrival time of every token event."""
    request = _tgi_request if target.api == "tgi" else _openai_request
    for attempt in range(2):
        start = time.perf_counter()
        try:
            generated, error = await request(client, target, job, stamps)
        except httpx.RemoteProtocolError as err:
            # NOTE: a server may close a kept-alive connection as we reuse it (llama.cpp's
            # did, once in ~50 requests); nothing was answered yet, so the request is resent.
            generated, error = None, repr(err)
            if not stamps and attempt == 0:
                continue
        except (httpx.HTTPError, json.JSONDecodeError) as err:
            generated, error = None, repr(err)
        break
    itl = [b - a for a, b in zip(stamps, stamps[1:])]
    ttft = stamps[0] - start if stamps else None
    return RequestTiming(ttft, itl, time.perf_counter() - start,
                         generated if generated is not None else 0, error)


class Progress:
    """Requests done, tokens streamed and errors so far, on stderr every `every_s` seconds
    (rewritten in place on a terminal)."""

    def __init__(self, name: str, total: int, every_s: float = 10.0) -> None:
        self.name, self.total, self.every_s = name, total, every_s
        self.stamps: list[list[float]] = []
        self.timings: list[RequestTiming] = []
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def line(self) -> str:
        tokens = sum(map(len, self.stamps))
        elapsed = time.perf_counter() - self.start
        errors = sum(t.error is not None for t in self.timings)
        return (f"  {self.name}: {len(self.timings)}/{self.total} requests, {tokens} tokens, "
                f"{tokens / max(elapsed, 1e-9):.1f} tok/s, {errors} errors, {elapsed:.0f}s")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(1.0 if self.tty else self.every_s)
            print(("\r" if self.tty else "") + self.line(), end="" if self.tty else "\n",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print("\r" + self.line(), file=sys.stderr, flush=True)


async def _with_progress(progress: Progress, work) -> list[RequestTiming]:
    beat = asyncio.create_task(progress.run())
    try:
        await work
    finally:
        beat.cancel()
        progress.close()
    return progress.timings


def _client(target: Target, connections: int, transport=None) -> httpx.AsyncClient:
    """`transport`: an httpx transport to use instead of the network (tests: an ASGI app)."""
    # NOTE: the read timeout is per event, so only a stalled stream trips it.
    limits = httpx.Limits(max_connections=connections + 8, max_keepalive_connections=connections + 8)
    return httpx.AsyncClient(base_url=target.url, timeout=600.0, limits=limits,
                             transport=transport)


async def run_concurrency(target: Target, jobs: list[Job], concurrency: int, name: str,
                          transport=None) -> list[RequestTiming]:
    """Closed loop: `concurrency` workers, each sending its next job when the last one ends."""
    progress = Progress(name, len(jobs))
    queue = list(reversed(jobs))

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            stamps: list[float] = []
            progress.stamps.append(stamps)
            progress.timings.append(await send(client, target, queue.pop(), stamps))

    async with _client(target, concurrency, transport) as client:
        work = asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return await _with_progress(progress, work)


async def run_rate(target: Target, jobs: list[Job], rate: float, name: str, seed: int = 0,
                   transport=None) -> list[RequestTiming]:
    """Open loop: jobs start at Poisson arrivals of `rate` per second, however many run."""
    progress = Progress(name, len(jobs))
    rng = random.Random(seed)

    async def one(client: httpx.AsyncClient, job: Job) -> None:
        stamps: list[float] = []
        progress.stamps.append(stamps)
        progress.timings.append(await send(client, target, job, stamps))

    async def arrivals(client: httpx.AsyncClient) -> None:
        tasks = []
        for i, job in enumerate(jobs):
            if i:
                await asyncio.sleep(rng.expovariate(rate))
            tasks.append(asyncio.create_task(one(client, job)))
        await asyncio.gather(*tasks)

    async with _client(target, len(jobs), transport) as client:
        return await _with_progress(progress, arrivals(client))


async def warmup(target: Target, job: Job, transport=None) -> RequestTiming:
    async with _client(target, 1, transport) as client:
        return await send(client, target, job, [])


class ServerSteps(NamedTuple):
    """A server's decode-step counters so far, from its /metrics."""

    seconds: float  # tgi_batch_forward_duration{method="decode"} sum
    count: float  # ... and count
    drafted: float = 0.0  # tgi_speculation_draft_tokens (tgi-server --speculate)
    accepted: float = 0.0  # tgi_speculation_accepted_tokens
    prompt_tokens: float = 0.0  # tgi_request_input_length sum
    cached_tokens: float = 0.0  # tgi_prefix_cache_hit_tokens (tgi-server's prefix cache)


def decode_steps(url: str) -> ServerSteps | None:
    """The decode steps the server's shards ran so far, from its /metrics
    (`tgi_batch_forward_duration{method="decode"}`: tgi-server and TGI); None when it has none."""
    try:
        response = httpx.get(f"{url}/metrics", timeout=10)
        return parse_decode_steps(response.text) if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):  # no server there, or /metrics is not Prometheus text
        return None


def parse_decode_steps(text: str) -> ServerSteps | None:
    total = count = None
    counters = {"tgi_speculation_draft_tokens": 0.0, "tgi_speculation_accepted_tokens": 0.0,
                "tgi_request_input_length": 0.0, "tgi_prefix_cache_hit_tokens": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name in counters:
            # a counter's value, or a histogram's sum (not its buckets, count or creation time)
            counters[family.name] = sum(sample.value for sample in family.samples
                                        if sample.name in (family.name, family.name + "_total",
                                                           family.name + "_sum"))
        if family.name != "tgi_batch_forward_duration":
            continue
        for sample in family.samples:
            if sample.labels.get("method") == "decode":
                if sample.name.endswith("_sum"):
                    total = sample.value
                elif sample.name.endswith("_count"):
                    count = sample.value
    if total is None or count is None:
        return None
    return ServerSteps(total, count, *counters.values())


def draft_acceptance(before: ServerSteps | None, after: ServerSteps | None) -> float:
    """Accepted drafts over drafts verified between two readings; NaN when none was drafted."""
    if before is None or after is None or after.drafted <= before.drafted:
        return math.nan
    return (after.accepted - before.accepted) / (after.drafted - before.drafted)


def prompt_cache_share(before: ServerSteps | None, after: ServerSteps | None) -> float:
    """Prompt tokens taken from the prefix cache over those received between two readings;
    NaN when none was taken."""
    if before is None or after is None or after.cached_tokens <= before.cached_tokens:
        return math.nan
    return ((after.cached_tokens - before.cached_tokens)
            / (after.prompt_tokens - before.prompt_tokens))


def server_fields(before: ServerSteps | None, url: str) -> dict[str, float]:
    """The `LoadResult` fields read from the server's /metrics over a load that began at
    `before` (its `decode_steps` then): the mean decode step, the share of drafts accepted
    and the share of prompt tokens from the prefix cache."""
    after = decode_steps(url)
    return {"server_step_ms": mean_step_ms(before, after),
            "draft_acceptance": draft_acceptance(before, after),
            "prompt_cache_share": prompt_cache_share(before, after)}


def mean_step_ms(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float:
    """The mean decode step between two `decode_steps` readings; NaN without both or a step."""
    if before is None or after is None or after[1] <= before[1]:
        return math.nan
    return 1000 * (after[0] - before[0]) / (after[1] - before[1])
