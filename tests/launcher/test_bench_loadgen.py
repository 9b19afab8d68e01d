"""The load generator against in-process fakes of both APIs (httpx ASGI transport): tokens and
errors counted from what the server reports, every request sent once, at a concurrency level
or at Poisson arrivals; tgi-bench's --merge; the GGUF export read back. No timing assertions."""

import asyncio
import json

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from tgi_server.launcher.bench import cli, gguf_export, loadgen
from tgi_server.launcher.bench.workloads import Job


class FakeServer:
    """Streams one event per token, as TGI's /generate_stream and OpenAI's /v1/completions do;
    counts requests in flight."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0

    async def _events(self, n: int, make):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            for i in range(n):
                await asyncio.sleep(0.001)
                # raw non-ASCII, as llama.cpp writes it: U+2028 must not split an event
                yield f"data:{json.dumps(make(i), ensure_ascii=False)}\n\n"
        finally:
            self.in_flight -= 1

    async def generate_stream(self, request: Request):
        body = await request.json()
        self.bodies.append(body)
        n = body["parameters"]["max_new_tokens"]
        if body["inputs"] == "fail":
            return JSONResponse({"error": "bad", "error_type": "validation"}, status_code=422)
        length = len(body["inputs"].split())
        details = {"generated_tokens": n, "input_length": length}
        make = lambda i: {"token": {"id": i}, "details": details if i == n - 1 else None}
        return StreamingResponse(self._events(n, make), media_type="text/event-stream")

    async def completions(self, request: Request):
        body = await request.json()
        self.bodies.append(body)
        n = body["max_tokens"]

        async def events():
            async for event in self._events(n, lambda i: {"choices": [{"text": f"t{i}\u2028"}]}):
                yield event
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n}
            yield f"data:{json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def transport(self) -> httpx.ASGITransport:
        app = Starlette(routes=[Route("/generate_stream", self.generate_stream, methods=["POST"]),
                                Route("/v1/completions", self.completions, methods=["POST"])])
        return httpx.ASGITransport(app=app)


def _jobs(n: int, new_tokens: int = 5) -> list[Job]:
    return [Job(f"prompt {i} of three", [i, 1, 2, 3], new_tokens) for i in range(n)]


async def test_concurrency_level_caps_requests_in_flight_and_times_every_token():
    fake = FakeServer()
    timings = await loadgen.run_concurrency(loadgen.Target("http://fake"), _jobs(7), 3, "c=3",
                                            transport=fake.transport())
    assert len(timings) == 7 and all(t.error is None for t in timings)
    assert [t.num_generated_tokens for t in timings] == [5] * 7
    assert all(len(t.itl_s) == 4 and t.ttft_s is not None for t in timings)
    assert fake.max_in_flight == 3
    assert sorted(b["inputs"] for b in fake.bodies) == sorted(j.prompt for j in _jobs(7))


async def test_tgi_errors_and_prompt_length_mismatches_are_counted_as_errors():
    fake = FakeServer()
    jobs = [Job("fail", [1], 3), Job("two words", [1, 2, 3], 3), Job("a b c", [1, 2, 3], 3)]
    timings = await loadgen.run_concurrency(loadgen.Target("http://fake"), jobs, 1, "c=1",
                                            transport=fake.transport())
    errors = sorted(t.error or "" for t in timings)
    assert errors[0] == "" and errors[1].startswith("HTTP 422") and "input_length 2 != 3" in errors[2]


async def test_openai_api_sends_token_ids_and_counts_usage():
    fake = FakeServer()
    target = loadgen.Target("http://fake", api="openai", model="m", send_token_ids=True)
    timings = await loadgen.run_rate(target, _jobs(4, new_tokens=6), rate=200.0, name="r",
                                     transport=fake.transport())
    assert [t.num_generated_tokens for t in timings] == [6] * 4
    assert all(t.error is None and len(t.itl_s) == 5 for t in timings)
    body = fake.bodies[0]
    assert body["prompt"][1:] == [1, 2, 3] and body["model"] == "m"
    assert (body["ignore_eos"], body["min_tokens"], body["stream"]) == (True, 6, True)


def test_merge_combines_earlier_runs(tmp_path, capsys):
    row = {"system": "a", "dtype": "float32", "load": "c=1", "label": "c=1", "num_requests": 1,
           "num_errors": 0, "num_generated_tokens": 8, "num_requested_tokens": 8, "wall_s": 1.0,
           "output_tokens_per_s": 8.0, "requests_per_s": 1.0, "concurrency": 1,
           "itl_ms": {"p50": 100.0, "p90": 100.0, "p99": 100.0}}
    (tmp_path / "a.json").write_text(json.dumps({"results": [row]}))
    (tmp_path / "b.json").write_text(json.dumps({"results": [row | {"system": "b"}]}))
    cli.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
              "--out", str(tmp_path / "both")])
    table = (tmp_path / "both.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["a", "b"]
    assert len(json.loads((tmp_path / "both.json").read_text())["results"]) == 2


def test_rope_rows_move_from_halves_to_adjacent_pairs():
    import torch

    w = torch.arange(8.0)[:, None].repeat(1, 2)  # 2 heads of head_dim 4, rows 0..7
    out = gguf_export.rope_pairs_adjacent(w, num_heads=2)
    assert out[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert gguf_export.gguf_name("model.layers.3.mlp.down_proj.weight") == "blk.3.ffn_down.weight"
    assert gguf_export.gguf_name("lm_head.weight") == "output.weight"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gguf_export_reads_back(model_dir, tmp_path, dtype):
    gguf = pytest.importorskip("gguf")
    path = model_dir("llama", "tiny")
    out = gguf_export.export(path, tmp_path / "m.gguf", dtype)
    reader = gguf.GGUFReader(str(out))
    names = {t.name: t for t in reader.tensors}
    assert len(names) == 2 * 9 + 3  # 2 layers of 9 tensors, embedding, final norm, head
    assert names["blk.0.attn_q.weight"].tensor_type.name == ("F32" if dtype == "float32" else "BF16")
    assert names["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == json.loads((path / "config.json").read_text())["vocab_size"]
