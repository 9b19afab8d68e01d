"""Configuration of the router process, built by the launcher and passed as argv."""

from dataclasses import dataclass


@dataclass(frozen=True)
class RouterConfig:
    """Configuration of the HTTP router: limits, batching budgets, shard addresses."""

    # Where the tokenizer and chat template come from (local dir, HF cache or hub id).
    tokenizer: str
    # Shard addresses: unix socket paths or host:port, rank 0 first.
    shard_urls: tuple[str, ...]
    model_id: str = ""
    revision: str | None = None
    hostname: str = "0.0.0.0"
    port: int = 3000
    # Request limits (TGI's names and defaults).
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_client_batch_size: int = 4
    payload_limit: int = 2_000_000
    # Continuous batching budgets.
    max_batch_prefill_tokens: int | None = None
    max_batch_total_tokens: int | None = None
    max_batch_size: int | None = None
    max_waiting_tokens: int = 20
    waiting_served_ratio: float = 0.3
    enable_prefill_logprobs: bool = False
    # Decode one step at a time (no lookahead, see batcher.py).
    disable_lookahead: bool = False
    # Start prefills from the cached k/v of the prompt's prefix (block_allocator.py), where the
    # shards support it.
    prefix_caching: bool = True
    # Prefill a prompt longer than the prefill budget left in chunks, between decode steps
    # (queue.py), where the shards support it; --max-batch-prefill-tokens may then be below
    # --max-input-tokens.
    prefill_chunking: bool = True
    api_key: str | None = None
    # OpenAI API: a Jinja chat template file overriding the tokenizer's, and the model names
    # clients may ask for (default: the model id; "tgi" is always accepted too).
    chat_template: str | None = None
    served_model_name: tuple[str, ...] = ()
    # Seconds in-flight requests get to finish on SIGTERM.
    graceful_timeout: float = 90.0
    # Threads that tokenize and validate requests (TGI's `--validation-workers`).
    validation_workers: int = 2
    # /metrics is also served on this port (TGI's `--prometheus-port`); 0: not served.
    prometheus_port: int = 9000
    # Origins browsers may call the API from (CORS); empty: any, as TGI.
    cors_allow_origin: tuple[str, ...] = ()
    # Request spans go to this OTLP/gRPC collector (tracing.py); None: no tracing.
    otlp_endpoint: str | None = None
    otlp_service_name: str = "text-generation-inference.router"
