"""N-gram speculation: the drafter, the per-step draft budget, and a speculating shard's tokens
against the same shard without speculation (tokens, logprobs, lengths, lookahead)."""

from dataclasses import dataclass

import pytest
import torch

from tgi_server.proto import generate_pb2 as pb
from tgi_server.shard.batch import Batch
from tgi_server.shard.config import ShardConfig
from tgi_server.shard.distributed import ParallelState
from tgi_server.shard.layers.linear import pack_linear_weights
from tgi_server.shard.model_runner import ModelRunner
from tgi_server.shard.models import load_model
from tgi_server.shard.sampling import Sampler, SamplingParams
from tgi_server.shard.server import TextGenerationService
from tgi_server.shard.speculation import MAX_ROWS, NgramDrafter, draft_lengths

BLOCK_SIZE = 16
BLOCKS_PER_REQUEST = 6  # 96 tokens: prompt + max_new_tokens below


def test_drafter_copies_what_followed_the_longest_earlier_match():
    tokens = [1, 2, 3, 9, 8, 2, 3, 7, 6, 5, 1, 2, 3]
    # the last 3 tokens [1, 2, 3] occurred at the start, followed by 9, 8, 2
    assert NgramDrafter().propose(tokens, 3) == [9, 8, 2]
    # neither [7, 7, 3] nor [7, 3] occurred before; 3 did, latest followed by 7, 7
    assert NgramDrafter().propose([3, 5, 6, 3, 7, 7, 3], 2) == [7, 7]
    assert NgramDrafter().propose([1, 2, 3, 4], 4) == []  # nothing occurs twice
    assert NgramDrafter().propose([1, 2, 1], 5) == [2, 1]  # cut at the sequence's end


def test_drafter_never_matches_the_sequence_end_itself():
    assert NgramDrafter().propose([4], 3) == []
    assert NgramDrafter().propose([4, 4], 3) == [4]  # the earlier 4 was followed by 4


def test_drafter_indexes_new_tokens_as_the_sequence_grows():
    drafter, tokens = NgramDrafter(), [1, 2, 3, 4]
    assert drafter.propose(tokens, 2) == []
    tokens += [5, 1, 2]
    assert drafter.propose(tokens, 2) == [3, 4]
    tokens += [6, 1, 2]  # the latest occurrence of [1, 2] is now followed by 6
    assert drafter.propose(tokens, 2) == [6, 1]
    assert drafter.propose(tokens, 0) == []


def test_draft_lengths_stay_within_the_row_cap_and_the_tokens_left():
    rows = MAX_ROWS["cpu"]
    assert draft_lengths(4, "cpu", 1, [100]) == [min(4, rows - 1)]
    assert draft_lengths(10, "cpu", 2, [100, 100]) == [rows // 2 - 1] * 2
    assert draft_lengths(4, "cpu", rows, [100] * rows) == [0] * rows  # a full step: no drafts
    # one fewer than the tokens left, so a step never yields more than max_new_tokens
    assert draft_lengths(4, "cpu", 1, [3]) == [2]
    assert draft_lengths(4, "cpu", 1, [1]) == [0]


@pytest.fixture(scope="module", params=["modules", "packed"])
def model(request, model_dir):
    """The layers as modules, or packed as the shard serves them (a step's rows then run
    through decode_layer, the speculative ones included)."""
    model = load_model(model_dir("llama"), torch.float32, torch.device("cpu"), ParallelState())
    if request.param == "packed":
        pack_linear_weights(model)
    return model


def make_service(model, model_dir, speculate: int) -> TextGenerationService:
    runner = ModelRunner(model, torch.device("cpu"), torch.float32, BLOCK_SIZE, speculate=speculate)
    runner.warmup(48, 96, 256 * BLOCK_SIZE, 0.5, 1)
    config = ShardConfig(model_id=str(model_dir("llama")), block_size=BLOCK_SIZE,
                         speculate=speculate)
    return TextGenerationService(config, runner, [], pb.InfoResponse())


def repetitive_batch(size: int = 3, top_n: int = 0, max_new_tokens: int = 40) -> pb.Batch:
    """Request 11, when there, samples (seeded); 12 is greedy with penalties; 10 is plain."""
    requests = []
    for i in range(size):
        rid = 10 + i
        sampling = pb.SamplingParameters()
        if i == 1:
            sampling = pb.SamplingParameters(do_sample=True, temperature=0.8, top_k=30, seed=rid)
        if i == 2:
            sampling = pb.SamplingParameters(repetition_penalty=1.5, frequency_penalty=0.5)
        requests.append(pb.Request(
            id=rid,
            # a phrase said three times: its continuation is worth drafting from the start
            input_ids=[(5 * rid + k) % 50 + 3 for k in range(6 + i)] * 3,
            sampling=sampling,
            stopping=pb.StoppingParameters(max_new_tokens=max_new_tokens - 3 * i,
                                           ignore_eos_token=True),
            top_n_tokens=top_n,
            block_ids=[rid * BLOCKS_PER_REQUEST + b for b in range(BLOCKS_PER_REQUEST)],
        ))
    return pb.Batch(id=1, requests=requests)


@dataclass
class Run:
    """Every request's (tokens, logprobs, top tokens); the most tokens one step gave; the drafts
    verified and accepted."""

    tokens: dict[int, tuple[list, list, list]]
    most: int = 0
    drafted: int = 0
    accepted: int = 0


async def run(service, batch: pb.Batch, lookahead: bool = False) -> Run:
    result = Run({r.id: ([], [], []) for r in batch.requests})
    response = await service.Prefill(pb.PrefillRequest(batch=batch), None)
    while True:
        for g in response.generations:
            ids, lps, tops = result.tokens[g.request_id]
            ids += g.tokens.ids
            lps += g.tokens.logprobs
            tops += [list(t.ids) for t in g.top_tokens]
            result.most = max(result.most, len(g.tokens.ids))
            assert len(g.tokens.ids) - 1 <= g.drafted
            result.drafted += g.drafted
            result.accepted += len(g.tokens.ids) - 1
            if g.finish_reason:
                assert g.finish_reason == pb.FINISH_REASON_LENGTH
        if not response.HasField("batch"):
            break
        cached = response.batch
        finished = {g.request_id for g in response.generations if g.finish_reason}
        if finished:
            keep = [rid for rid in cached.request_ids if rid not in finished]
            cached = (await service.FilterBatch(
                pb.FilterBatchRequest(batch_id=cached.id, request_ids=keep), None)).batch
        response = await service.Decode(pb.DecodeRequest(batches=[cached], lookahead=lookahead),
                                        None)
    assert not service.cache and not service.ahead
    return result


def oracle_drafter(monkeypatch, plain: dict, batch: pb.Batch, wrong_at: dict[int, int]):
    """Drafts from the plain run's tokens, the `wrong_at[request id]`-th token of every draft
    (counting from 0) made wrong, so that steps accept all, some or none of their drafts."""
    by_prompt = {tuple(r.input_ids): r.id for r in batch.requests}

    def propose(self, tokens, k):
        for prompt, rid in by_prompt.items():
            if tuple(tokens[:len(prompt)]) == prompt:
                done = len(tokens) - len(prompt)
                draft = list(plain[rid][0][done:done + k])
                if wrong_at.get(rid, k) < len(draft):
                    draft[wrong_at[rid]] += 1
                return draft
        raise AssertionError("a draft asked for an unknown request")

    monkeypatch.setattr(NgramDrafter, "propose", propose)


@pytest.mark.parametrize("lookahead", [False, True])
@pytest.mark.parametrize("size, wrong_at, most", [
    (1, {}, 5),  # every draft right: 4 drafts + the token after them each step
    (1, {10: 2}, 3),  # the third draft wrong: 2 drafts + the model's own third token
    (3, {10: 0}, 2),  # 1 draft each (the row cap); request 10's always wrong, 12's
    # (penalized) right
    (2, {10: 0}, 4),  # 3 drafts each; only request 11's, a seeded sampling row's, are right
])
async def test_speculation_gives_the_tokens_of_plain_decoding(
        model, model_dir, monkeypatch, lookahead, size, wrong_at, most):
    batch = repetitive_batch(size, top_n=3)
    plain = await run(make_service(model, model_dir, 0), batch, lookahead)
    oracle_drafter(monkeypatch, plain.tokens, batch, wrong_at)
    fast = await run(make_service(model, model_dir, 4), batch, lookahead)
    assert (plain.most, fast.most) == (1, most)
    assert plain.drafted == 0
    assert 0 < fast.accepted < fast.drafted or (not wrong_at and fast.accepted == fast.drafted > 0)
    for request in batch.requests:
        ids, lps, tops = fast.tokens[request.id]
        plain_ids, plain_lps, plain_tops = plain.tokens[request.id]
        # the seeded sampling row (11) too: it draws once per token it yields
        assert ids == plain_ids
        assert len(ids) == request.stopping.max_new_tokens
        assert lps == pytest.approx(plain_lps, abs=1e-4)
        assert tops == plain_tops and all(len(t) == 3 for t in tops)


async def test_a_batch_too_large_to_draft_decodes_one_token_a_step(model, model_dir, monkeypatch):
    batch = repetitive_batch()
    requests = list(batch.requests)
    for k in range(MAX_ROWS["cpu"] - len(requests)):  # fill the step's rows with plain requests
        extra = pb.Request()
        extra.CopyFrom(requests[0])
        extra.id = 100 + k
        extra.block_ids[:] = [(30 + k) * BLOCKS_PER_REQUEST + b for b in range(BLOCKS_PER_REQUEST)]
        requests.append(extra)
    big = pb.Batch(id=2, requests=requests)
    plain = await run(make_service(model, model_dir, 0), big)
    oracle_drafter(monkeypatch, plain.tokens, big, {})  # drafts that would all be right
    fast = await run(make_service(model, model_dir, 4), big)
    assert (fast.most, fast.drafted) == (1, 0)
    assert {rid: v[0] for rid, v in fast.tokens.items()} == {
        rid: v[0] for rid, v in plain.tokens.items()}


def test_rows_with_logits_processors_do_not_draft(model):
    runner = ModelRunner(model, torch.device("cpu"), torch.float32, BLOCK_SIZE, speculate=4)
    prompt = [5, 6, 5, 6, 5]  # 5 was followed by 6: a draft is there to make
    batch = Batch(
        batch_id=1, request_ids=[1, 2], token_ids=[list(prompt), list(prompt)],
        num_prompt_tokens=[5, 5], num_computed_tokens=[4, 4], block_tables=[[0], [1]],
        max_new_tokens=[10, 10], ignore_eos=[True, True], top_n_tokens=[0, 0],
        prefill_logprobs=[False, False],
        sampler=Sampler.build([SamplingParams()] * 2, [prompt, prompt], 512, "cpu",
                              processors=[[], [lambda ids, logits: logits]]),
        drafters=[NgramDrafter(), NgramDrafter()],
    )
    assert runner._drafts(batch) == [[6, 5], []]  # cut at the sequence end
