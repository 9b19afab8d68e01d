"""Prometheus metrics under TGI's names, so existing dashboards keep working.

Written by `infer.py`, `batcher.py` and `routes.py`; read by `GET /metrics`. Each app has its
own registry (tests run several apps in one process).

NOTE: prometheus_client renames every counter to `<name>_total`; TGI exposes `tgi_request_count`
etc. without the suffix, so counters are kept here and rendered by hand with TYPE counter.
"""

from collections import defaultdict
from threading import Lock

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Tokens a step gave beyond its first: at most --speculate (TGI's buckets are 0..speculate).
SKIPPED_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 12, 16)


class Counter:
    """A monotonically increasing value per label set, exposed under its exact name."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()):
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self._values: dict[tuple[str, ...], float] = defaultdict(float)
        self._lock = Lock()
        if not labelnames:
            self._values[()] = 0.0

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(labels[n] for n in self.labelnames)
        with self._lock:
            self._values[key] += amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(labels[n] for n in self.labelnames), 0.0)

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.documentation}", f"# TYPE {self.name} counter"]
        for key, value in sorted(self._values.items()):
            labels = ",".join(f'{n}="{v}"' for n, v in zip(self.labelnames, key))
            lines.append(f"{self.name}{{{labels}}} {value}" if labels else f"{self.name} {value}")
        return "\n".join(lines) + "\n"


METRICS_MEDIA_TYPE = "text/plain; version=0.0.4"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.counters: list[Counter] = []

        def counter(name, doc, labels=()):
            c = Counter(name, doc, labels)
            self.counters.append(c)
            return c

        def hist(name, doc, buckets, labels=()):
            return Histogram(name, doc, labels, registry=r, buckets=buckets)

        self.request_count = counter("tgi_request_count", "Requests received")
        self.request_success = counter("tgi_request_success", "Requests that succeeded")
        self.request_failure = counter("tgi_request_failure", "Requests that failed", ("err",))
        self.batch_inference_count = counter("tgi_batch_inference_count", "Inference calls", ("method",))
        self.batch_inference_success = counter("tgi_batch_inference_success", "Successful inference calls", ("method",))
        self.batch_inference_failure = counter("tgi_batch_inference_failure", "Failed inference calls", ("method",))
        self.batch_concat = counter("tgi_batch_concat", "New batches joined to a running one", ("reason",))
        # Not TGI's: how well `--speculate` pays (accepted / draft is the acceptance rate).
        self.speculation_draft_tokens = counter(
            "tgi_speculation_draft_tokens", "Draft tokens the shards verified (--speculate)")
        self.speculation_accepted_tokens = counter(
            "tgi_speculation_accepted_tokens", "Draft tokens the shards accepted (--speculate)")
        # Not TGI's: what prefix caching saves (against tgi_request_input_length's sum).
        self.prefix_cache_hit_tokens = counter(
            "tgi_prefix_cache_hit_tokens", "Prompt tokens whose k/v came from the prefix cache")

        self.queue_size = Gauge("tgi_queue_size", "Requests waiting in the queue", registry=r)
        self.batch_current_size = Gauge("tgi_batch_current_size", "Requests in the running batch", registry=r)
        self.batch_current_max_tokens = Gauge(
            "tgi_batch_current_max_tokens", "KV tokens reserved by the running batch", registry=r)
        self.batch_max_total_tokens = Gauge(
            "tgi_batch_max_total_tokens", "KV tokens available to batches", registry=r)
        self.kv_blocks_free = Gauge("tgi_kv_blocks_free", "Free KV-cache blocks", registry=r)
        self.kv_blocks_cached = Gauge(
            "tgi_kv_blocks_cached", "KV-cache blocks holding a cached prefix, in use or not",
            registry=r)

        self.request_duration = hist("tgi_request_duration", "End-to-end request time (s)", DURATION_BUCKETS)
        self.request_validation_duration = hist(
            "tgi_request_validation_duration", "Validation time (s)", DURATION_BUCKETS)
        self.request_queue_duration = hist("tgi_request_queue_duration", "Time in the queue (s)", DURATION_BUCKETS)
        self.request_inference_duration = hist(
            "tgi_request_inference_duration", "Time from first prefill to the end (s)", DURATION_BUCKETS)
        self.request_mean_time_per_token_duration = hist(
            "tgi_request_mean_time_per_token_duration", "Mean time per generated token (s)", DURATION_BUCKETS)
        self.request_generated_tokens = hist(
            "tgi_request_generated_tokens", "Generated tokens per request", TOKEN_BUCKETS)
        self.request_input_length = hist("tgi_request_input_length", "Prompt tokens per request", TOKEN_BUCKETS)
        self.request_max_new_tokens = hist("tgi_request_max_new_tokens", "max_new_tokens per request", TOKEN_BUCKETS)
        self.batch_inference_duration = hist(
            "tgi_batch_inference_duration", "Prefill/decode call time (s)", DURATION_BUCKETS, ("method",))
        self.batch_forward_duration = hist(
            "tgi_batch_forward_duration", "Shard forward time (s)", DURATION_BUCKETS, ("method",))
        self.batch_concat_duration = hist(
            "tgi_batch_concat_duration", "Shard time joining batches (s)", DURATION_BUCKETS, ("method",))
        self.batch_filter_duration = hist("tgi_batch_filter_duration", "FilterBatch time (s)", DURATION_BUCKETS)
        # TGI's shard detokenizes; here the router does, as it hands out a step's tokens.
        self.batch_decode_duration = hist(
            "tgi_batch_decode_duration", "Detokenizing and handing out a step's tokens (s)",
            DURATION_BUCKETS, ("method",))
        self.request_skipped_tokens = hist(
            "tgi_request_skipped_tokens", "Speculated tokens a step gave a request beyond its first",
            SKIPPED_BUCKETS)
        self.batch_next_size = hist("tgi_batch_next_size", "Size of each new batch", SIZE_BUCKETS)

    def render(self) -> bytes:
        return "".join(c.render() for c in self.counters).encode() + generate_latest(self.registry)

