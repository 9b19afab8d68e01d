"""A prefill that starts after a cached prefix (`Request.cache_len`, blocks shared with an
earlier request) or after earlier chunks of its prompt (`Request.chunk_len`) gives the tokens
and logprobs of the same prompt prefilled whole, for short tails (the fused decode layers)
and long ones (the modules and the prefill kernel), alone or beside a fresh prompt."""

import asyncio

import pytest
import torch

from tgi_server.proto import generate_pb2 as pb
from tgi_server.shard.config import ShardConfig
from tgi_server.shard.distributed import ParallelState
from tgi_server.shard.layers.linear import pack_linear_weights
from tgi_server.shard.model_runner import ModelRunner
from tgi_server.shard.models import load_model
from tgi_server.shard.models.llama import FUSED_MAX_PREFILL_ROWS
from tgi_server.shard.server import TextGenerationService

BLOCK_SIZE = 16
NEW_TOKENS = 8


@pytest.fixture(scope="module", params=["modules", "packed"])
def service(request, model_dir):
    model = load_model(model_dir("llama"), torch.float32, torch.device("cpu"), ParallelState())
    if request.param == "packed":
        pack_linear_weights(model)
    runner = ModelRunner(model, torch.device("cpu"), torch.float32, BLOCK_SIZE)
    runner.warmup(48, 256, 256 * BLOCK_SIZE, 0.5, 1)
    return TextGenerationService(ShardConfig(model_id="m", block_size=BLOCK_SIZE), runner, [],
                                 pb.InfoResponse())


def make_request(rid: int, prompt: list[int], blocks: list[int], cache_len: int = 0,
                 chunk_len: int = 0, seed: int = 0) -> pb.Request:
    sampling = (pb.SamplingParameters(do_sample=True, temperature=0.9, seed=seed) if seed
                else pb.SamplingParameters())
    return pb.Request(id=rid, input_ids=prompt, sampling=sampling,
                      stopping=pb.StoppingParameters(max_new_tokens=NEW_TOKENS,
                                                     ignore_eos_token=True),
                      block_ids=blocks, cache_len=cache_len, chunk_len=chunk_len)


def generate(service, batch_id: int, *requests: pb.Request) -> dict[int, tuple[list, list]]:
    async def run():
        out = {r.id: ([], []) for r in requests}
        response = await service.Prefill(pb.PrefillRequest(batch=pb.Batch(id=batch_id,
                                                                         requests=requests)), None)
        while True:
            for g in response.generations:
                out[g.request_id][0].extend(g.tokens.ids)
                out[g.request_id][1].extend(g.tokens.logprobs)
            if not response.HasField("batch"):
                return out
            response = await service.Decode(pb.DecodeRequest(batches=[response.batch]), None)

    return asyncio.run(run())


@pytest.mark.parametrize("tail", [5, FUSED_MAX_PREFILL_ROWS + 8])
def test_a_prefill_after_a_cached_prefix_equals_the_whole_prompts(service, tail):
    generator = torch.Generator().manual_seed(tail)
    prefix = torch.randint(3, 500, (96,), generator=generator).tolist()  # 6 blocks
    other = torch.randint(3, 500, (30,), generator=generator).tolist()
    prompt = prefix + torch.randint(3, 500, (tail,), generator=generator).tolist()
    blocks = list(range(12))
    # the first request writes the prefix's k/v into blocks 0-5
    generate(service, 1, make_request(1, prefix + [7, 7], blocks))
    # the second starts after them, beside a fresh prompt; the third computes it all
    shared = blocks[:6] + list(range(20, 26))
    got = generate(service, 2, make_request(2, prompt, shared, cache_len=96),
                   make_request(3, other, list(range(30, 33))))
    want = generate(service, 3, make_request(4, prompt, list(range(40, 52))),
                    make_request(5, other, list(range(60, 63))))
    for mine, theirs in ((2, 4), (3, 5)):
        assert got[mine][0] == want[theirs][0]
        torch.testing.assert_close(torch.tensor(got[mine][1]), torch.tensor(want[theirs][1]),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed", [0, 7])
def test_a_prompt_prefilled_in_chunks_equals_it_prefilled_whole(service, seed):
    """Chunks of 48 then 32 tokens (no token, no cached batch), then the rest beside another
    request: the tokens and logprobs of one whole prefill, greedy or seeded sampling."""
    generator = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(3, 500, (100,), generator=generator).tolist()
    other = torch.randint(3, 500, (20,), generator=generator).tolist()
    blocks = list(range(100, 108))

    async def chunks():
        for cache_len, chunk_len in ((0, 48), (48, 32)):
            batch = pb.Batch(id=10 + cache_len, requests=[
                make_request(1, prompt, blocks, cache_len, chunk_len, seed)])
            response = await service.Prefill(pb.PrefillRequest(batch=batch), None)
            assert not response.generations and not response.HasField("batch")
        assert not service.cache  # nothing kept for the chunked request

    asyncio.run(chunks())
    got = generate(service, 20, make_request(1, prompt, blocks, 80, seed=seed),
                   make_request(2, other, list(range(110, 113)), seed=seed))
    want = generate(service, 21, make_request(3, prompt, list(range(120, 128)), seed=seed),
                    make_request(4, other, list(range(130, 133)), seed=seed))
    for mine, theirs in ((1, 3), (2, 4)):
        assert got[mine][0] == want[theirs][0]
        torch.testing.assert_close(torch.tensor(got[mine][1]), torch.tensor(want[theirs][1]),
                                   atol=1e-4, rtol=1e-4)
