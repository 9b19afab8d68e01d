"""Batched sampling against transformers' logits processors/warpers, seeds, logprobs, state."""

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from tgi_server.shard.sampling import Sampler, SamplingParams, _inverse_cdf

VOCAB = 64
CPU = torch.device("cpu")


def random_logits(batch: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=generator) * 3  # [batch, vocab]


def build(params, prompts=None, processors=None, vocab: int = VOCAB) -> Sampler:
    prompts = prompts if prompts is not None else [[] for _ in params]
    return Sampler.build(params, prompts, vocab, CPU, processors)


def sample_steps(sampler: Sampler, steps: int, row: int, seed: int = 0) -> list[int]:
    tokens = []
    for step in range(steps):
        out = sampler(random_logits(len(sampler), seed=seed + step), [0] * len(sampler))
        tokens.append(int(out.next_token_ids[row]))
    return tokens


def test_greedy_is_argmax():
    logits = random_logits(4)
    out = build([SamplingParams()] * 4)(logits, [0] * 4)
    assert out.next_token_ids.tolist() == logits.argmax(-1).tolist()
    assert out.next_token_ids.dtype == torch.int64
    assert out.top_token_ids.shape == (4, 0)


def test_repetition_penalty_matches_hf():
    prompts = [[1, 2, 2, 5], [3, 4], [7, 8, 9]]
    penalties = [1.3, 0.7, 1.0]
    logits = random_logits(3)
    sampler = build([SamplingParams(repetition_penalty=p) for p in penalties], prompts)
    processed = sampler.process(logits)
    for row, (prompt, penalty) in enumerate(zip(prompts, penalties)):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(
            torch.tensor([prompt]), logits[row : row + 1].clone())
        torch.testing.assert_close(processed[row], expected[0], rtol=0, atol=0)


def test_frequency_and_presence_penalties():
    prompts = [[1, 1, 1, 4], [2, 2]]
    logits = random_logits(2)
    params = [SamplingParams(frequency_penalty=0.5),
              SamplingParams(presence_penalty=1.5, frequency_penalty=-0.25)]
    processed = build(params, prompts).process(logits)
    expected = logits.clone()
    expected[0, 1] -= 0.5 * 3
    expected[0, 4] -= 0.5 * 1
    expected[1, 2] -= -0.25 * 2 + 1.5
    torch.testing.assert_close(processed, expected)


def test_no_penalty_keeps_logits_and_skips_counts():
    logits = random_logits(2)
    sampler = build([SamplingParams()] * 2, [[1, 2], [3]])
    assert sampler.token_counts is None
    assert torch.equal(sampler.process(logits), logits)


def test_logit_bias_changes_argmax():
    logits = random_logits(2)
    target = int(logits[0].argmin())
    out = build([SamplingParams(logit_bias={target: 100.0}), SamplingParams()])(logits, [0, 0])
    assert out.next_token_ids.tolist() == [target, int(logits[1].argmax())]


def test_temperature_matches_hf_and_greedy_rows_stay_at_one():
    logits = random_logits(3)
    params = [SamplingParams(do_sample=True, temperature=0.5),
              SamplingParams(temperature=0.5),  # greedy: temperature does not apply
              SamplingParams(do_sample=True, temperature=2.0)]
    processed = build(params).process(logits)
    torch.testing.assert_close(processed[0], TemperatureLogitsWarper(0.5)(None, logits[:1])[0])
    torch.testing.assert_close(processed[1], logits[1])
    torch.testing.assert_close(processed[2], TemperatureLogitsWarper(2.0)(None, logits[2:])[0])


@pytest.mark.parametrize(
    ("name", "values", "hf_warper"),
    [
        ("top_k", [1, 5, 0, VOCAB + 10], lambda v: TopKLogitsWarper(v) if v else None),
        ("top_p", [0.1, 0.5, 0.95, 1.0], lambda v: TopPLogitsWarper(v) if v < 1 else None),
        ("typical_p", [0.2, 0.5, 0.9, 1.0],
         lambda v: TypicalLogitsWarper(v) if v < 1 else None),
    ],
)
def test_warpers_match_hf(name, values, hf_warper):
    logits = random_logits(len(values), seed=3)
    params = [SamplingParams(do_sample=True, **{name: v}) for v in values]
    warped = build(params).warp(logits)
    for row, value in enumerate(values):
        warper = hf_warper(value)
        expected = logits[row : row + 1] if warper is None else warper(None, logits[row : row + 1])
        assert torch.equal(warped[row], expected[0]), (name, value)
    if name != "top_k":
        assert (warped == float("-inf")).any(1).tolist()[:2] == [True, True]


def test_warpers_chain_like_hf_on_sampling_rows_only():
    logits = random_logits(3, seed=5)
    chained = SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, typical_p=0.9)
    sampler = build([SamplingParams(top_k=1), chained, SamplingParams(do_sample=True)])
    warped = sampler.warp(sampler.process(logits))
    assert warped.shape == (2, VOCAB)
    expected = logits[1:2]
    for warper in [TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8),
                   TypicalLogitsWarper(0.9)]:
        expected = warper(None, expected)
    torch.testing.assert_close(warped[0], expected[0], rtol=0, atol=0)
    assert torch.equal(warped[1], logits[2])


def test_processor_applies_only_to_its_row():
    banned = [int(t) for t in random_logits(1)[0].topk(3).indices]
    seen = []

    def ban(token_ids, logits):
        seen.append(list(token_ids))
        return logits.index_fill(0, torch.tensor(banned), float("-inf"))

    logits = random_logits(2, seed=0).expand(2, VOCAB).clone()
    logits[1] = logits[0]
    sampler = build([SamplingParams()] * 2, [[5, 6], [7]], processors=[[], [ban]])
    out = sampler(logits, [0, 0])
    assert int(out.next_token_ids[0]) == banned[0]
    assert int(out.next_token_ids[1]) not in banned
    sampler(logits, [0, 0])
    assert seen == [[7], [7, int(out.next_token_ids[1])]]


def test_seeded_row_reproduces_alone_in_batch_and_across_filter_concatenate():
    mine = SamplingParams(do_sample=True, seed=1234, temperature=1.5, top_k=30)
    alone = []
    sampler = build([mine])
    for step in range(20):
        out = sampler(random_logits(1, seed=100 + step), [0])
        alone.append(int(out.next_token_ids[0]))

    others = [SamplingParams(do_sample=True, seed=s) for s in (1, 2, 3)] + [SamplingParams()]
    batch = build(others[:3] + [mine] + others[3:])  # row 3 of 5
    in_batch = []
    row = 3
    for step in range(20):
        if step == 8:  # drop two rows, then put a new batch in front: row 3 becomes row 1
            batch = batch.filter([3, 0, 4])
            batch = Sampler.concatenate([build([SamplingParams(do_sample=True, seed=9)]), batch])
            row = 1
        logits = random_logits(len(batch), seed=7 + step)
        logits[row] = random_logits(1, seed=100 + step)[0]
        out = batch(logits, [0] * len(batch))
        in_batch.append(int(out.next_token_ids[row]))
    assert in_batch == alone


def test_different_seeds_differ():
    runs = [sample_steps(build([SamplingParams(do_sample=True, seed=s)]), 20, 0) for s in (1, 2)]
    assert runs[0] != runs[1]
    assert sample_steps(build([SamplingParams(do_sample=True, seed=1)]), 20, 0) == runs[0]


def test_sampling_frequencies_follow_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5, 3.0, -5.0, 1.5]])  # [1, 8]
    probs = logits.softmax(-1)[0]
    num_draws = 4000
    params = [SamplingParams(do_sample=True, seed=s) for s in range(num_draws)]
    sampler = build(params, vocab=8)
    out = sampler(logits.expand(num_draws, 8), [0] * num_draws)
    observed = torch.bincount(out.next_token_ids, minlength=8).double()
    expected = probs.double() * num_draws
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 30.0  # 7 degrees of freedom: p < 1e-4 of failing for a correct sampler
    # One request over many steps follows the same distribution.
    single = build([SamplingParams(do_sample=True, seed=42)], vocab=8)
    draws = torch.tensor([int(single(logits, [0]).next_token_ids[0]) for _ in range(2000)])
    observed = torch.bincount(draws, minlength=8).double()
    expected = probs.double() * 2000
    assert float(((observed - expected) ** 2 / expected).sum()) < 30.0


def test_sampling_never_picks_truncated_tokens():
    logits = random_logits(8, seed=11)
    params = [SamplingParams(do_sample=True, seed=s, top_k=3) for s in range(8)]
    sampler = build(params)
    for _ in range(20):
        out = sampler(logits, [0] * 8)
        top3 = logits.topk(3).indices
        assert (top3 == out.next_token_ids[:, None]).any(1).all()


def test_inverse_cdf_never_picks_zero_probability_tokens():
    probs = torch.tensor([[0.0, 0.3, 0.7, 0.0, 0.0]] * 4)
    uniforms = torch.tensor([0.0, 0.29, 0.31, 1 - 2**-53], dtype=torch.float64)
    assert _inverse_cdf(probs, uniforms).tolist() == [1, 1, 2, 2]


def test_top_n_logprobs_sorted_and_consistent():
    logits = random_logits(3, seed=2)
    params = [SamplingParams(), SamplingParams(do_sample=True, seed=3, temperature=0.8),
              SamplingParams(do_sample=True, seed=4, top_k=2)]
    out = build(params)(logits, [5, 0, 2])
    assert out.top_token_ids.shape == out.top_logprobs.shape == (3, 5)
    assert out.top_logprobs.dtype == out.logprobs.dtype == torch.float32
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    expected = torch.log_softmax(logits / torch.tensor([[1.0], [0.8], [1.0]]), dim=-1)
    torch.testing.assert_close(out.top_logprobs, expected.topk(5).values)
    chosen = expected.gather(1, out.next_token_ids[:, None])[:, 0]
    torch.testing.assert_close(out.logprobs, chosen)
    # The greedy row's choice is its best alternative.
    assert int(out.top_token_ids[0, 0]) == int(out.next_token_ids[0])
    assert float(out.top_logprobs[0, 0]) == float(out.logprobs[0])


def test_penalty_counts_update_after_each_call():
    params = [SamplingParams(), SamplingParams(repetition_penalty=1.2),
              SamplingParams(presence_penalty=0.5)]
    sampler = build(params, [[3], [1, 1, 2], [4]])
    counts = sampler.token_counts  # one row per penalized request
    assert counts.shape == (2, VOCAB) and counts.dtype == torch.int32
    assert counts[0, 1] == 2 and counts[0, 2] == 1 and counts[1, 4] == 1 and counts.sum() == 4
    before = counts.clone()
    out = sampler(random_logits(3), [0, 0, 0])
    assert sampler.token_counts is counts  # updated in place
    diff = counts - before
    assert diff.sum() == 2 and diff[torch.arange(2), out.next_token_ids[1:]].tolist() == [1, 1]
    # The generated token is now penalized like a prompt token.
    logits = random_logits(3, seed=9)
    token = int(out.next_token_ids[1])
    expected = RepetitionPenaltyLogitsProcessor(1.2)(
        torch.tensor([[1, 1, 2, token]]), logits[1:2].clone())
    torch.testing.assert_close(sampler.process(logits)[1], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(sampler.process(logits)[0], logits[0], rtol=0, atol=0)


def test_filter_and_concatenate_carry_state():
    a = build([SamplingParams(frequency_penalty=1.0), SamplingParams(top_k=2, do_sample=True)],
              [[1], [2]])
    b = build([SamplingParams(do_sample=True, seed=5), SamplingParams(presence_penalty=1.0)],
              [[3], [4, 4]])
    merged = Sampler.concatenate([a, b])
    assert len(merged) == 4
    assert merged.token_counts.shape == (2, VOCAB)
    assert merged.token_counts[0, 1] == 1 and merged.token_counts[1, 4] == 2
    kept = merged.filter([3, 1, 0])
    assert len(kept) == 3 and kept.params == [b.params[1], a.params[1], a.params[0]]
    assert kept.token_counts[0, 4] == 2 and kept.token_counts[1, 1] == 1
    assert kept.generators[1] is a.generators[1]
    assert merged.filter([1, 2]).token_counts is None  # no penalty rows left
    logits = random_logits(3)
    expected = logits.clone()
    expected[0, 4] -= 1.0
    expected[2, 1] -= 1.0
    torch.testing.assert_close(kept.process(logits), expected)


def test_invalid_params_rejected():
    with pytest.raises(ValueError):
        SamplingParams(temperature=0.0)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError):
        build([SamplingParams(logit_bias={VOCAB: 1.0})])
    with pytest.raises(ValueError):
        build([SamplingParams()])(random_logits(2), [0, 0])


def test_tiny_temperature_samples_the_argmax_without_nan():
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(do_sample=True, temperature=t, seed=1) for t in (1e-300, 1e-30, 1e-6)]
    sampler = Sampler.build(params, [[1, 2]] * 3, 64, torch.device("cpu"))
    out = sampler(logits, [0, 0, 0])
    assert out.next_token_ids.tolist() == logits.argmax(dim=-1).tolist()
    assert not torch.isnan(out.logprobs).any()
