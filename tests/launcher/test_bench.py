"""The benchmark's pure parts: percentiles, aggregation, the table, ratios, roof shares,
settings, server flags, prompts. No timing assertions: every number here is made up."""

import math
import socket
from dataclasses import replace

import pytest
import torch
from transformers import AutoTokenizer

from tgi_server.launcher.bench import (
    baselines,
    compare,
    loadgen,
    output,
    report,
    roofline,
    servers,
    stats,
    workloads,
)
from tgi_server.launcher.bench.roofline import Roof
from tgi_server.launcher.bench.stats import LoadResult, RequestTiming


def test_percentile_interpolates_between_closest_ranks():
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert stats.percentile(values, 0) == 1.0
    assert stats.percentile(values, 100) == 4.0
    assert stats.percentile(values, 50) == pytest.approx(2.5)
    assert stats.percentile(values, 90) == pytest.approx(3.7)
    assert stats.percentile([7.0], 99) == 7.0
    assert math.isnan(stats.percentile([], 50))


def test_summarize_counts_tokens_and_skips_errors():
    timings = [
        RequestTiming(0.5, [0.1, 0.2], 0.8, 3),
        RequestTiming(1.5, [0.3], 1.8, 2),
        RequestTiming(None, [], 0.1, 0, error="HTTP 503: overloaded"),
    ]
    r = stats.summarize("tgi-server", "float32", "c=3", "3 streams", timings, wall_s=2.0,
                        num_requested_tokens=12, concurrency=3)
    assert (r.num_requests, r.num_errors) == (3, 1)
    assert (r.num_generated_tokens, r.num_requested_tokens) == (5, 12)
    assert r.output_tokens_per_s == pytest.approx(2.5)
    assert r.requests_per_s == pytest.approx(1.0)  # the two that succeeded
    assert r.ttft_ms["p50"] == pytest.approx(1000.0)
    assert r.itl_ms["p50"] == pytest.approx(200.0)  # pooled over requests: 0.1, 0.2, 0.3
    assert r.itl_ms["p99"] == pytest.approx(298.0)
    assert r.itl_ms["mean"] == pytest.approx(200.0)
    assert r.e2e_ms["p90"] == pytest.approx(1700.0)
    assert r.first_error == "HTTP 503: overloaded"


def _result(system: str, load: str, tok_s: float, dtype: str = "float32",
            concurrency: int = 1) -> LoadResult:
    return LoadResult(
        system=system, dtype=dtype, load=load, label=f"{load} label", num_requests=2,
        num_errors=0, num_generated_tokens=256, num_requested_tokens=256, wall_s=10.0,
        output_tokens_per_s=tok_s, requests_per_s=0.2, concurrency=concurrency,
        ttft_ms={"p50": 12.345, "p90": 1234.5, "p99": math.nan},
        itl_ms={"p50": 50.0, "p90": 60.0, "p99": 70.0, "max": 250.0}, e2e_ms={"p50": 6543.0},
        other_cpu_share=0.034,
    )


ROOF = Roof(threads=2, matmul_gflops={"float32 m=32": 100.0, "float32 m=256": 200.0,
                                      "bfloat16 m=256": 400.0}, bandwidth_gb_s=20.0)


def test_format_table_rows_line_up_with_the_header():
    results = [_result("tgi-server", "c=1", 25.6), _result("transformers", "c=1", 12.8)]
    lines = report.format_table(results).splitlines()
    assert len(lines) == 4
    assert {line.count("|") for line in lines} == {lines[0].count("|")}
    assert set(lines[1]) == {"|", "-"}
    assert lines[2] == ("| tgi-server | float32 | c=1 label | 2 (0) | 256 (256) | 25.60 | 0.20 "
                        "| 12.3 / 1234 / – | 50.0 / 60.0 / 70.0 / 250.0 | 6.54 / – / – | – | – "
                        "| 3% |")


def test_roof_shares_use_the_dtypes_peak_and_the_steps_per_second():
    cost = report.ModelCost(params_per_token=100_000_000)  # 0.2 GFLOP/token, 0.4 GB/step fp32
    flops, bandwidth = report.roof_shares(_result("tgi-server", "c=1", 25.0), cost, ROOF)
    assert flops == pytest.approx(25 * 0.2 / 200)
    assert bandwidth == pytest.approx(25 * 0.4 / 20)
    flops, bandwidth = report.roof_shares(
        _result("tgi-server", "c=32", 320.0, "bfloat16", concurrency=32), cost, ROOF)
    assert flops == pytest.approx(320 * 0.2 / 400)
    assert bandwidth == pytest.approx(10 * 0.2 / 20)  # 10 steps/s of 0.2 GB
    row = report.format_row(_result("tgi-server", "c=1", 25.0), cost, ROOF)
    assert row.endswith("| 2% | 50% | 3% |")


def test_roof_shares_are_of_the_multiply_add_peak_where_it_was_measured():
    cost = report.ModelCost(params_per_token=100_000_000)
    roof = replace(ROOF, fma_gflops={"float32": 500.0})
    assert roof.peak_gflops("float32") == 500.0
    assert roof.peak_gflops("bfloat16") == 400.0  # not measured: the fastest matmul
    flops, _ = report.roof_shares(_result("tgi-server", "c=1", 25.0), cost, roof)
    assert flops == pytest.approx(25 * 0.2 / 500)


def test_multiply_add_peak_is_measured_on_this_cpu():
    peaks = roofline.fma_peak_gflops(1, ("float32",))
    if not torch.cpu._is_avx512_supported():
        assert peaks == {}
        return
    assert set(peaks) == {"float32"} and math.isfinite(peaks["float32"]) and peaks["float32"] > 0


def test_ratios_pair_ours_with_every_other_system_at_the_same_load_and_dtype():
    results = [_result("tgi-server", "c=1", 30.0), _result("transformers", "c=1", 10.0),
               _result("llama.cpp", "c=1", 20.0), _result("vllm", "c=1", 40.0, "bfloat16"),
               _result("tgi-server", "c=8", 90.0)]  # no peer at c=8, ours has no bf16 c=1
    assert report.ratios(results) == {
        "c=1 float32": {"transformers": [pytest.approx(3.0)], "llama.cpp": [pytest.approx(1.5)]}}
    assert report.format_ratios(results)[1] == "- c=1 float32: transformers 3.00x; llama.cpp 1.50x"


def test_ratios_pair_systems_within_each_round_and_give_the_median():
    """Round 2's llama.cpp is never divided into round 1's tgi-server (--rounds)."""
    results = [
        _result("tgi-server", "c=1", 30.0), _result("llama.cpp", "c=1", 20.0),
        replace(_result("tgi-server", "c=1", 60.0), round=1),
        replace(_result("llama.cpp", "c=1", 15.0), round=1),
        replace(_result("tgi-server", "c=1", 33.0), round=2),
        replace(_result("llama.cpp", "c=1", 30.0), round=2),
        replace(_result("tgi-server", "c=1", 40.0, "bfloat16"), round=2),
    ]
    assert report.ratios(results) == {"c=1 float32": {"llama.cpp": [
        pytest.approx(1.5), pytest.approx(4.0), pytest.approx(1.1)]}}
    assert report.format_ratios(results)[1] == (
        "- c=1 float32: llama.cpp 1.50x (rounds: 1.50 / 4.00 / 1.10)")
    assert report.format_dtype_ratios(results)[1:] == ["- c=1: 1.21x"]  # round 3 only
    assert len(report.format_ratios(results)) == 2  # every load ran on a quiet machine
    # A load during which other processes took a tenth of the CPUs or more is named.
    results[2] = replace(results[2], other_cpu_share=0.17)
    assert report.format_ratios(results)[2] == (
        "- disturbed: other processes took 10% or more of the CPUs during tgi-server c=1 "
        "float32 round 2 (17%); those rounds' ratios say less")


def test_rounds_setting():
    assert compare.settings_from(compare.parse_args([])).rounds == 1
    assert compare.settings_from(compare.parse_args(["--rounds", "3"])).rounds == 3


def test_dtype_ratios_and_router_overhead():
    results = [_result("tgi-server", "c=1", 20.0), _result("tgi-server", "c=1", 36.0, "bfloat16")]
    assert report.format_dtype_ratios(results)[1] == "- c=1: 1.80x"
    shard = [{"dtype": "float32", "batch": 1, "step_ms": 48.0}]
    lines = report.router_overhead(results, shard)
    assert lines[1] == ("- float32 c=1: ITL p50 50.0 ms - shard micro-benchmark step 48.0 ms "
                        "= 2.0 ms (4.0% of the ITL)")
    # The server's own mean step during the load, when measured, wins over the micro-benchmark.
    results[0] = replace(results[0], server_step_ms=49.5)
    assert report.router_overhead(results, shard)[1] == (
        "- float32 c=1: ITL p50 50.0 ms - mean shard step in the same load 49.5 ms = 0.5 ms "
        "(1.0% of the ITL)")
    # With the ITL's mean too (bursts move the p50, not the mean): both against the mean step.
    results[0] = replace(results[0], itl_ms={**results[0].itl_ms, "mean": 49.0})
    assert report.router_overhead(results, shard)[1] == (
        "- float32 c=1: ITL p50 50.0 / mean 49.0 ms - mean shard step in the same load 49.5 ms "
        "= 0.5 / -0.5 ms (1.0% / -1.0% of the ITL)")
    # The micro-benchmark's step is another minute's: against it the p50 alone, as before.
    results[0] = replace(results[0], server_step_ms=math.nan)
    assert report.router_overhead(results, shard)[1].startswith(
        "- float32 c=1: ITL p50 50.0 ms - shard micro-benchmark step 48.0 ms")


def test_decode_steps_are_read_from_the_routers_metrics():
    from tgi_server.router.metrics import Metrics

    metrics = Metrics()
    before = loadgen.parse_decode_steps(metrics.render().decode())
    assert before is None  # no step yet
    for seconds in (0.020, 0.030):
        metrics.batch_forward_duration.labels("decode").observe(seconds)
    metrics.batch_forward_duration.labels("prefill").observe(1.0)
    after = loadgen.parse_decode_steps(metrics.render().decode())
    assert after == (pytest.approx(0.050), 2, 0, 0, 0, 0)
    assert math.isnan(loadgen.draft_acceptance(before, after))  # no speculation
    metrics.speculation_draft_tokens.inc(8)
    metrics.speculation_accepted_tokens.inc(3)
    drafting = loadgen.parse_decode_steps(metrics.render().decode())
    assert loadgen.draft_acceptance(after, drafting) == pytest.approx(3 / 8)
    drafting_load = replace(_result("tgi-server", "c=1", 10.0), draft_acceptance=3 / 8,
                            server_step_ms=40.0)
    assert report.server_shares([drafting_load]) == [
        "drafts accepted (tgi-server --speculate):", "- float32 c=1: 38%"]
    # a step that streamed several tokens is not an ITL: no router cost is derived from it
    assert report.router_overhead([drafting_load], []) == []
    assert report.router_overhead([replace(drafting_load, draft_acceptance=math.nan)], [])
    assert loadgen.mean_step_ms((0.010, 1), after) == pytest.approx(40.0)
    # the prefix cache's share of the prompt tokens received
    assert math.isnan(loadgen.prompt_cache_share(after, drafting))  # none taken
    for length in (100, 60):
        metrics.request_input_length.observe(length)
    metrics.prefix_cache_hit_tokens.inc(48)
    caching = loadgen.parse_decode_steps(metrics.render().decode())
    assert loadgen.prompt_cache_share(drafting, caching) == pytest.approx(48 / 160)
    assert report.server_shares([replace(drafting_load, prompt_cache_share=0.3)])[2:] == [
        "prompt tokens from the prefix cache (tgi-server):", "- float32 c=1: 30%"]
    assert math.isnan(loadgen.mean_step_ms(after, after))  # no step in between
    assert math.isnan(loadgen.mean_step_ms(before, after))  # a server without the metric


def test_decode_steps_of_a_server_without_prometheus_metrics_is_none():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    assert loadgen.decode_steps(f"http://127.0.0.1:{port}") is None
    with pytest.raises(ValueError):  # what decode_steps turns into None for odd /metrics
        loadgen.parse_decode_steps("<html>not found</html>\n")


def test_plot_is_written_or_its_absence_explained(tmp_path):
    results = [_result("tgi-server", "c=1", 25.0), _result("tgi-server", "c=8", 90.0, concurrency=8),
               _result("transformers", "c=1", 12.0)]
    message = report.write_plot(results, tmp_path / "plot.png", "title")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in message
    else:
        assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_other_cpu_share_is_busy_time_not_ours_over_all_cores():
    before, after = stats.CpuSnapshot(100.0, 10.0), stats.CpuSnapshot(118.0, 26.0)
    # 18 s busy, 16 s of it ours: 2 s of others over 10 s x 2 cores
    assert stats.other_cpu_share(before, after, wall_s=10.0, cores=2) == pytest.approx(0.1)
    assert stats.other_cpu_share(before, stats.CpuSnapshot(110.0, 30.0), 10.0, 2) == 0.0
    assert math.isnan(stats.other_cpu_share(before, after, wall_s=0.0, cores=2))


def test_settings_quick_and_overrides():
    quick = compare.settings_from(compare.parse_args(["--quick", "--concurrency", "1,4"]))
    assert (quick.size, quick.workload.new_tokens, quick.levels) == ("small", 32, (1, 4))
    full = compare.settings_from(compare.parse_args([]))
    assert (full.size, full.workload.prompt_tokens, full.workload.new_tokens) == (
        "medium", 128, 128)
    assert full.levels == (1, 8, 32) and full.dtypes == ("float32", "bfloat16")
    assert [full.num_requests(c) for c in full.levels] == [3, 8, 32]
    none = compare.settings_from(compare.parse_args(["--shard-batch-sizes", "", "--dtypes",
                                                     "bfloat16", "--new-tokens", "16"]))
    assert (none.shard_batch_sizes, none.dtypes, none.workload.new_tokens) == ((), ("bfloat16",), 16)


def test_server_flags_fit_every_stream_in_one_batch():
    flags = servers.tgi_server_flags("float32", 2, 128, 128, 32)
    values = dict(zip(flags[::2], flags[1::2]))
    assert values["--dtype"] == "float32"
    assert int(values["--max-batch-total-tokens"]) >= 32 * (128 + 128)
    assert int(values["--max-batch-prefill-tokens"]) >= 32 * 128
    assert int(values["--max-input-tokens"]) < int(values["--max-total-tokens"])
    one = dict(zip(*[iter(servers.tgi_server_flags("float32", 2, 128, 128, 1))] * 2))
    assert int(one["--max-batch-total-tokens"]) >= int(one["--max-total-tokens"])


def test_speculation_is_asked_of_every_system_that_has_it():
    assert compare.settings_from(compare.parse_args([])).speculate == 0
    s = compare.settings_from(compare.parse_args(["--speculate", "4"]))
    assert s.speculate == 4
    assert "--speculate" not in servers.tgi_server_flags("float32", 2, 128, 128, 32)
    ours = servers.tgi_server_flags("float32", 2, 128, 128, 32, speculate=4)
    assert ours[-2:] == ["--speculate", "4"]
    plain = baselines.llama_cpp_flags(s.shape)
    drafting = baselines.llama_cpp_flags(s.shape, speculate=4)
    assert "--spec-type" not in plain
    assert drafting[:len(plain)] == plain
    values = dict(zip(drafting[len(plain)::2], drafting[len(plain) + 1::2]))
    assert values == {"--spec-type": "ngram-map-k", "--spec-ngram-map-k-size-n": "2",
                      "--spec-ngram-map-k-size-m": "4"}


def test_prompts_have_exact_length_and_distinct_first_blocks(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir("llama", "tiny"))
    prompts = workloads.make_prompts(tokenizer, count=6, num_tokens=32, block_size=16)
    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    assert [len(i) for i in ids] == [32] * 6
    assert len({tuple(i[:16]) for i in ids}) == 6


def test_sampled_lengths_stay_in_their_ranges_and_prompts_are_never_reused(model_dir):
    import random

    tokenizer = AutoTokenizer.from_pretrained(model_dir("llama", "tiny"))
    source = workloads.PromptSource(tokenizer, block_size=16)
    work = workloads.Workload(prompt_tokens=20, new_tokens=4, prompt_tokens_max=40,
                              new_tokens_max=9)
    jobs = work.jobs(source, 12, random.Random(0)) + work.jobs(source, 12, random.Random(0))
    assert all(20 <= len(j.prompt_ids) <= 40 and 4 <= j.max_new_tokens <= 9 for j in jobs)
    assert len({len(j.prompt_ids) for j in jobs}) > 1
    assert all(tokenizer(j.prompt, add_special_tokens=False).input_ids == j.prompt_ids for j in jobs)
    assert len({j.prompt for j in jobs}) == len(jobs)
    assert replace(work, new_tokens_max=None).describe() == (
        "fresh uniform 20-40-token prompts, 4 new tokens, greedy")


def test_a_shared_prefix_starts_every_prompt_of_a_draw_and_only_that_draw(model_dir):
    import random

    tokenizer = AutoTokenizer.from_pretrained(model_dir("llama", "tiny"))
    source = workloads.PromptSource(tokenizer, block_size=16)
    work = workloads.Workload(prompt_tokens=48, new_tokens=4, shared_prefix_tokens=32)
    first, second = (work.jobs(source, 4, random.Random(0)) for _ in range(2))
    for jobs in (first, second):
        assert [len(j.prompt_ids) for j in jobs] == [48] * 4
        assert len({tuple(j.prompt_ids[:32]) for j in jobs}) == 1
        assert len({tuple(j.prompt_ids[32:]) for j in jobs}) == 4
        assert len({j.prompt[:40] for j in jobs}) == 1
        assert all(tokenizer(j.prompt, add_special_tokens=False).input_ids == j.prompt_ids
                   for j in jobs)
    assert first[0].prompt_ids[:32] != second[0].prompt_ids[:32]
    assert work.describe().startswith("48-token prompts whose first 32 tokens are the same")
    with pytest.raises(ValueError, match="does not leave room"):
        workloads.Workload(prompt_tokens=32, shared_prefix_tokens=32)


def test_machine_info_reads_cpu_cores_and_ram():
    info = output.machine_info()
    assert int(info["cores"]) >= 1
    assert info["ram"].endswith("GiB") and info["cpu"]


def test_rounds_take_turns_at_each_level_with_every_other_system_paused(monkeypatch, tmp_path):
    """Per dtype the HTTP systems are up together; each load runs with only its system
    resumed, and each round starts the turns one system further on."""
    events = []

    class FakeServed:
        def __init__(self, name):
            self.name, self.target = name, loadgen.Target(f"http://{name}")

        def pause(self):
            events.append(("pause", self.name))

        def resume(self):
            events.append(("resume", self.name))

    def start_http(model, dtype, systems, peers, flags, warm, s, tag, notes, stack):
        return [(n, FakeServed(n)) for n in ("tgi-server", "llama.cpp", "vllm")]

    def run_load(system, dtype, target, level, jobs, s):
        assert jobs == [f"job-{level}"]
        events.append(("load", system, dtype, level))
        if system == "vllm" and level == 8:
            raise RuntimeError("vllm fell over")
        return _result(system, f"c={level}", 1.0, dtype)

    monkeypatch.setattr(compare, "start_http", start_http)
    monkeypatch.setattr(compare, "run_load", run_load)
    s = replace(compare.Settings(), levels=(1, 8, 32), dtypes=("float32",))
    notes = []
    results = compare.run_round(tmp_path, ["tgi-server", "llama.cpp", "vllm"], [], {},
                                lambda: {lv: [f"job-{lv}"] for lv in s.levels}, lambda: None,
                                s, "tag", notes, turn=1)
    loads = [e[1:] for e in events if e[0] == "load"]
    assert loads == [("llama.cpp", "float32", 1), ("vllm", "float32", 1),
                     ("tgi-server", "float32", 1), ("llama.cpp", "float32", 8),
                     ("vllm", "float32", 8), ("tgi-server", "float32", 8),
                     ("llama.cpp", "float32", 32), ("tgi-server", "float32", 32)]
    # every load is wrapped in its own system's resume ... pause, the failed one too
    for i, event in enumerate(events):
        if event[0] == "load":
            assert events[i - 1] == ("resume", event[1]) and events[i + 1] == ("pause", event[1])
    assert [(r.system, r.load) for r in results] == [
        (e[0], f"c={e[2]}") for e in loads if e != ("vllm", "float32", 8)]
    assert notes == ["vllm float32 c=8: failed: vllm fell over"]


def test_a_paused_server_is_stopped_and_resumed_whole_and_can_still_be_shut_down(tmp_path):
    """Served.pause stops every process of the server, a child in a session of its own too;
    leaving `running` continues them first, so the SIGTERM ends the server rather than the
    SIGKILL after the grace period."""
    import signal
    import sys
    import time

    port = servers.free_port()
    # a parent that answers /health, and a child in its own session (as tgi-launch's shards)
    code = ("import http.server, subprocess, sys; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
            "start_new_session=True); "
            f"http.server.HTTPServer(('127.0.0.1', {port}), "
            "http.server.SimpleHTTPRequestHandler).serve_forever()")

    def states(root):
        found = {}
        for pid in [root, *stats.descendants(root)]:
            try:
                found[pid] = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
        return {pid: state for pid, state in found.items() if state != "Z"}

    with servers.running([sys.executable, "-c", code], f"http://127.0.0.1:{port}/",
                         tmp_path / "server.log") as proc:
        served = servers.Served(loadgen.Target(f"http://127.0.0.1:{port}"), proc.pid)
        for _ in range(50):
            if len(states(proc.pid)) == 2:
                break
            time.sleep(0.1)
        pids = set(states(proc.pid))
        assert len(pids) == 2
        served.pause()
        time.sleep(0.2)
        assert set(states(proc.pid).values()) == {"T"}
        served.resume()
        time.sleep(0.2)
        assert "T" not in states(proc.pid).values()
        served.pause()  # left paused: `running` must still shut it down
    # ended by the SIGTERM (it was continued first), not by the SIGKILL after the grace period
    assert proc.returncode == -signal.SIGTERM
    # The child too, though it had left the tree when its parent ended: `stop` SIGKILLs it,
    # and init reaps it a moment later (not our child, so nothing here can wait for it).
    def gone(pid):
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True

    for _ in range(100):
        if all(gone(pid) for pid in pids):
            break
        time.sleep(0.05)
    assert all(gone(pid) for pid in pids)
