"""The benchmark's pure parts: percentiles, aggregation, the table, settings, prompts.
No timing assertions: every number here is made up."""

import math

import pytest
from transformers import AutoTokenizer

from tgi_server.launcher import bench
from tgi_server.launcher.bench import RequestTiming, ScenarioResult


def test_percentile_interpolates_between_closest_ranks():
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert bench.percentile(values, 0) == 1.0
    assert bench.percentile(values, 100) == 4.0
    assert bench.percentile(values, 50) == pytest.approx(2.5)
    assert bench.percentile(values, 90) == pytest.approx(3.7)
    assert bench.percentile([7.0], 99) == 7.0
    assert math.isnan(bench.percentile([], 50))


def test_summarize_counts_tokens_and_skips_errors():
    timings = [
        RequestTiming(0.5, [0.1, 0.2], 0.8, 3),
        RequestTiming(1.5, [0.3], 1.8, 2),
        RequestTiming(None, [], 0.1, 0, error="HTTP 503: overloaded"),
    ]
    r = bench.summarize("tgi-server", "concurrent", "3 streams", timings, wall_s=2.0, new_tokens=4)
    assert (r.num_requests, r.num_errors) == (3, 1)
    assert (r.num_generated_tokens, r.num_requested_tokens) == (5, 12)
    assert r.output_tokens_per_s == pytest.approx(2.5)
    assert r.ttft_ms["p50"] == pytest.approx(1000.0)
    assert r.itl_ms["p50"] == pytest.approx(200.0)  # pooled over requests: 0.1, 0.2, 0.3
    assert r.itl_ms["p99"] == pytest.approx(298.0)
    assert r.e2e_ms["p90"] == pytest.approx(1700.0)


def _result(system: str, scenario: str, tok_s: float) -> ScenarioResult:
    return ScenarioResult(
        system=system, scenario=scenario, label=f"{scenario} label", num_requests=2,
        num_errors=0, num_generated_tokens=256, num_requested_tokens=256, wall_s=10.0,
        output_tokens_per_s=tok_s, ttft_ms={"p50": 12.345, "p90": 1234.5, "p99": math.nan},
        itl_ms={"p50": 50.0, "p90": 60.0, "p99": 70.0}, e2e_ms={"p50": 6543.0},
        other_cpu_share=0.034,
    )


def test_format_table_rows_line_up_with_the_header():
    results = [_result("tgi-server", "sequential", 25.6), _result("transformers", "sequential", 12.8)]
    lines = bench.format_table(results).splitlines()
    assert len(lines) == 4
    assert {line.count("|") for line in lines} == {lines[0].count("|")}
    assert set(lines[1]) == {"|", "-"}
    assert lines[2] == ("| tgi-server | sequential label | 2 (0) | 256 (256) | 25.60 "
                        "| 12.3 / 1234 / – | 50.0 / 60.0 / 70.0 | 6.54 | 3% |")


def test_ratios_pair_ours_with_the_baseline_per_scenario():
    results = [_result("tgi-server", "sequential", 30.0), _result("transformers", "sequential", 10.0),
               _result("tgi-server", "concurrent", 90.0)]  # no baseline: no ratio
    assert bench.ratios(results) == {"sequential": pytest.approx(3.0)}
    report = bench.format_report(["- machine: x"], results)
    assert report.startswith("- machine: x\n\n| system |")
    assert report.endswith("ours / transformers, output tok/s: sequential: 3.00x")


def test_other_cpu_share_is_busy_time_not_ours_over_all_cores():
    before, after = bench.CpuSnapshot(100.0, 10.0), bench.CpuSnapshot(118.0, 26.0)
    # 18 s busy, 16 s of it ours: 2 s of others over 10 s x 2 cores
    assert bench.other_cpu_share(before, after, wall_s=10.0, cores=2) == pytest.approx(0.1)
    assert bench.other_cpu_share(before, bench.CpuSnapshot(110.0, 30.0), 10.0, 2) == 0.0
    assert math.isnan(bench.other_cpu_share(before, after, wall_s=0.0, cores=2))


def test_settings_quick_and_overrides():
    quick = bench.settings_from(bench.parse_args(["--quick", "--concurrency", "4"]))
    assert (quick.size, quick.new_tokens, quick.concurrency) == ("small", 32, 4)
    full = bench.settings_from(bench.parse_args([]))
    assert (full.size, full.prompt_tokens, full.new_tokens, full.concurrency) == (
        "medium", 128, 128, 32)


def test_server_flags_fit_every_stream_in_one_batch():
    flags = bench.server_flags(bench.Settings())
    values = dict(zip(flags[::2], flags[1::2]))
    assert int(values["--max-batch-total-tokens"]) >= 32 * (128 + 128)
    assert int(values["--max-batch-prefill-tokens"]) >= 32 * 128
    assert int(values["--max-input-tokens"]) < int(values["--max-total-tokens"])


def test_prompts_have_exact_length_and_distinct_first_blocks(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir("llama", "tiny"))
    prompts = bench.make_prompts(tokenizer, count=6, num_tokens=32, block_size=16)
    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    assert [len(i) for i in ids] == [32] * 6
    assert len({tuple(i[:16]) for i in ids}) == 6


def test_machine_info_reads_cpu_cores_and_ram():
    info = bench.machine_info()
    assert int(info["cores"]) >= 1
    assert info["ram"].endswith("GiB") and info["cpu"]
