"""Benchmarks: `tgi-bench` (a load generator against any server, `cli.py`) and the side-by-side
run of `make bench` (`compare.py`; `python -m tgi_server.launcher.bench`).

Data flow: workloads.py (prompts, lengths) → loadgen.py (HTTP load) / baselines.py (peers,
transformers) → stats.py (timings → results) → report.py + output.py (table, JSON, plot).
"""
