"""The shard micro-benchmark runs and prints one row per dtype and batch size (no timings checked)."""

from tgi_server.launcher import bench_shard


def test_bench_shard_prints_a_row_per_dtype_and_batch(model_dir, capsys):
    path = model_dir("llama", "tiny")
    bench_shard.main(["--model", str(path), "--batch-sizes", "1,3", "--dtypes", "float32,bfloat16",
                      "--prompt-len", "8", "--steps", "2", "--threads", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| float32")
            or line.startswith("| bfloat16")]
    assert [r.split("|")[1:3] for r in rows] == [
        [" float32 ", " 1 "], [" float32 ", " 3 "], [" bfloat16 ", " 1 "], [" bfloat16 ", " 3 "]]
    for row in rows:  # every figure measured (the host's share may be below zero)
        forward, step, _host, tok_s, prefill_ms, prefill_tok_s = map(float, row.split("|")[3:-1])
        assert min(forward, step, tok_s, prefill_ms, prefill_tok_s) > 0
