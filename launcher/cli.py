"""`tgi-launch`: TGI's launcher flags (names, defaults, env vars) -> `LaunchConfig` -> launch.

This file is the single source of the CLI. Every flag also reads the UPPER_SNAKE env var
TGI uses for it; the README flag table is generated from this app (`flags_doc.py`).
Downstream: `supervisor.launch`.
"""

import importlib.metadata
import os
import shlex
from typing import Annotated, Any

import typer

from tgi_server.launcher.config import ROUTER_COMMAND, SHARD_COMMAND, LaunchConfig
from tgi_server.launcher.supervisor import launch

app = typer.Typer(
    add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Launch the shards and the router of tgi-server, a drop-in for TGI's launcher.",
)


def _opt(*names: str, env: str | list[str] | None, help: str, hidden: bool = False) -> Any:
    return typer.Option(*names, envvar=env, help=help, hidden=hidden)


@app.command()
def tgi_launch(
    ctx: typer.Context,
    model_id: Annotated[str, _opt(
        "--model-id", "--model", env="MODEL_ID",
        help="Model to serve: a local directory, or a hub id (HF cache or download).",
    )],
    revision: Annotated[str | None, _opt(
        "--revision", env="REVISION", help="Hub revision: a branch, tag or commit sha.",
    )] = None,
    num_shard: Annotated[int, _opt(
        "--num-shard", env="NUM_SHARD", help="Number of tensor-parallel shards (processes).",
    )] = 1,
    dtype: Annotated[str, _opt(
        "--dtype", env="DTYPE",
        help="auto, float32, bfloat16 or float16 (auto: bfloat16 on CUDA and on CPUs with "
        "AVX512-BF16 or AMX, else float32).",
    )] = "auto",
    device: Annotated[str, _opt("--device", env="DEVICE", help="auto, cpu or cuda.")] = "auto",
    trust_remote_code: Annotated[bool, _opt(
        "--trust-remote-code", env="TRUST_REMOTE_CODE",
        help="Allow custom code from the model repository.",
    )] = False,
    disable_custom_kernels: Annotated[bool, _opt(
        "--disable-custom-kernels", env="DISABLE_CUSTOM_KERNELS",
        help="Do not build or use the shard's C++ CPU kernels (packed linear, paged decode "
        "attention, fused norm/activation/rotary): oneDNN, SDPA and torch ops instead.",
    )] = False,
    hostname: Annotated[str, _opt(
        "--hostname", env="HOSTNAME", help="Address the HTTP server listens on.",
    )] = "0.0.0.0",
    port: Annotated[int, _opt("--port", "-p", env="PORT", help="HTTP port.")] = 3000,
    shard_uds_path: Annotated[str | None, _opt(
        "--shard-uds-path", env="SHARD_UDS_PATH",
        help="Shard gRPC sockets are {path}-{rank} (default: /tmp/tgi-server-<launcher pid>).",
    )] = None,
    master_addr: Annotated[str, _opt(
        "--master-addr", env="MASTER_ADDR", help="torch.distributed rendezvous address.",
    )] = "localhost",
    master_port: Annotated[int | None, _opt(
        "--master-port", env="MASTER_PORT",
        help="torch.distributed rendezvous port (default: a free port).",
    )] = None,
    nnodes: Annotated[int, _opt(
        "--nnodes", env="NNODES",
        help="Machines the --num-shard ranks are spread over; run tgi-launch on each.",
    )] = 1,
    node_rank: Annotated[int, _opt(
        "--node-rank", env="NODE_RANK",
        help="This machine's index in [0, --nnodes); node 0 also runs the router.",
    )] = 0,
    shard_grpc_port: Annotated[int | None, _opt(
        "--shard-grpc-port", env="SHARD_GRPC_PORT",
        help="Shards also serve gRPC on TCP port this + rank "
             "(default: --master-port + 1 with --nnodes > 1, else unix sockets only).",
    )] = None,
    max_concurrent_requests: Annotated[int, _opt(
        "--max-concurrent-requests", env="MAX_CONCURRENT_REQUESTS",
        help="Requests in flight beyond this are refused (HTTP 429).",
    )] = 128,
    max_best_of: Annotated[int, _opt(
        "--max-best-of", env="MAX_BEST_OF", help="Largest `best_of` a request may ask for.",
    )] = 2,
    max_stop_sequences: Annotated[int, _opt(
        "--max-stop-sequences", env="MAX_STOP_SEQUENCES",
        help="Most stop sequences per request.",
    )] = 4,
    max_top_n_tokens: Annotated[int, _opt(
        "--max-top-n-tokens", env="MAX_TOP_N_TOKENS", help="Largest `top_n_tokens` per request.",
    )] = 5,
    max_input_tokens: Annotated[int | None, _opt(
        "--max-input-tokens", "--max-input-length", env=["MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH"],
        help="Longest prompt in tokens (default: decided at warmup from the model and memory).",
    )] = None,
    max_total_tokens: Annotated[int | None, _opt(
        "--max-total-tokens", env="MAX_TOTAL_TOKENS",
        help="Longest prompt + max_new_tokens (default: decided at warmup).",
    )] = None,
    max_batch_prefill_tokens: Annotated[int | None, _opt(
        "--max-batch-prefill-tokens", env="MAX_BATCH_PREFILL_TOKENS",
        help="Token budget of one prefill (default: decided at warmup).",
    )] = None,
    max_batch_total_tokens: Annotated[int | None, _opt(
        "--max-batch-total-tokens", env="MAX_BATCH_TOTAL_TOKENS",
        help="Tokens a running batch may hold (default: what the KV cache fits).",
    )] = None,
    max_batch_size: Annotated[int | None, _opt(
        "--max-batch-size", env="MAX_BATCH_SIZE", help="Most requests in a batch.",
    )] = None,
    max_waiting_tokens: Annotated[int, _opt(
        "--max-waiting-tokens", env="MAX_WAITING_TOKENS",
        help="Decode steps before waiting requests are forced into the running batch.",
    )] = 20,
    waiting_served_ratio: Annotated[float, _opt(
        "--waiting-served-ratio", env="WAITING_SERVED_RATIO",
        help="Waiting/running ratio above which a prefill interrupts decoding.",
    )] = 0.3,
    max_client_batch_size: Annotated[int, _opt(
        "--max-client-batch-size", env="MAX_CLIENT_BATCH_SIZE",
        help="Most inputs in one client request.",
    )] = 4,
    payload_limit: Annotated[int, _opt(
        "--payload-limit", env="PAYLOAD_LIMIT", help="Largest request body in bytes.",
    )] = 2_000_000,
    enable_prefill_logprobs: Annotated[bool, _opt(
        "--enable-prefill-logprobs", env="ENABLE_PREFILL_LOGPROBS",
        help="Allow requests to ask for the prompt tokens' logprobs (`decoder_input_details`).",
    )] = False,
    disable_lookahead: Annotated[bool, _opt(
        "--disable-lookahead", env="DISABLE_LOOKAHEAD",
        help="Decode one step at a time instead of having the shards start the next step "
             "before the router has handled the last one (that overlap hides the round trip "
             "between steps; a request arriving meanwhile waits one more step to start).",
    )] = False,
    prefix_caching: Annotated[bool, _opt(
        "--prefix-caching/--no-prefix-caching", env="PREFIX_CACHING",
        help="Reuse the KV cache of earlier prompts' and answers' common prefixes, in blocks: a "
             "request whose prompt starts the same way (a system prompt, a chat's earlier "
             "turns) prefills only the rest. Off: `--no-prefix-caching`, or TGI's `PREFIX_CACHING=0`.",
    )] = True,
    prefill_chunking: Annotated[bool, _opt(
        "--prefill-chunking/--no-prefill-chunking", env="PREFILL_CHUNKING",
        help="A prompt longer than what is left of --max-batch-prefill-tokens is prefilled in "
             "chunks, decode steps of the running requests between them, so "
             "--max-batch-prefill-tokens bounds how long they wait and may be below "
             "--max-input-tokens. Off: `--no-prefill-chunking`, or TGI's `PREFILL_CHUNKING=0`.",
    )] = True,
    speculate: Annotated[int | None, _opt(
        "--speculate", env="SPECULATE",
        help="Draft tokens to verify per request and decode step, copied from what followed "
             "the last tokens' latest earlier occurrence in the request (n-gram speculation). "
             "The tokens are those without speculation (sampling, seeds and penalties "
             "included); a step drafts only while its rows stay cheap (small batches). "
             "Default: no speculation.",
    )] = None,
    api_key: Annotated[str | None, _opt(
        "--api-key", env="API_KEY",
        help="When set, requests need `Authorization: Bearer <key>`.",
    )] = None,
    chat_template: Annotated[str | None, _opt(
        "--chat-template", env="CHAT_TEMPLATE",
        help="Jinja chat template file for /v1/chat/completions (default: the tokenizer's).",
    )] = None,
    served_model_name: Annotated[list[str] | None, _opt(
        "--served-model-name", env="SERVED_MODEL_NAME",
        help="Model name(s) the OpenAI API answers to; repeat the flag or separate with commas "
             "(default: the model id; `tgi` is always accepted).",
    )] = None,
    block_size: Annotated[int, _opt(
        "--block-size", env="BLOCK_SIZE", help="Tokens per KV-cache block.",
    )] = 16,
    memory_fraction: Annotated[float, _opt(
        "--memory-fraction", "--cuda-memory-fraction",
        env=["MEMORY_FRACTION", "CUDA_MEMORY_FRACTION"],
        help="Share of the memory left after loading the weights that the KV cache may take.",
    )] = 0.8,
    num_threads: Annotated[int | None, _opt(
        "--num-threads", env="NUM_THREADS",
        help="CPU threads per shard (default: the cores divided by the shard count).",
    )] = None,
    graceful_termination_timeout: Annotated[float, _opt(
        "--graceful-termination-timeout", env="GRACEFUL_TERMINATION_TIMEOUT",
        help="Seconds in-flight requests get to finish on SIGTERM before processes are killed.",
    )] = 90.0,
    json_output: Annotated[bool, _opt(
        "--json-output", env="JSON_OUTPUT", help="Log JSON lines instead of text.",
    )] = False,
    validation_workers: Annotated[int, _opt(
        "--validation-workers", env="VALIDATION_WORKERS",
        help="Threads that tokenize and validate requests in the router.",
    )] = 2,
    prometheus_port: Annotated[int, _opt(
        "--prometheus-port", env="PROMETHEUS_PORT",
        help="/metrics is also served on this port, on --hostname (0: not served). A port "
             "already taken is logged and skipped.",
    )] = 9000,
    huggingface_hub_cache: Annotated[str | None, _opt(
        "--huggingface-hub-cache", env="HUGGINGFACE_HUB_CACHE",
        help="Hugging Face cache directory the shards and the router read models from "
             "(default: huggingface_hub's, HF_HOME or ~/.cache/huggingface/hub).",
    )] = None,
    cors_allow_origin: Annotated[list[str] | None, _opt(
        "--cors-allow-origin", env="CORS_ALLOW_ORIGIN",
        help="Origins browsers may call the API from; repeat the flag or separate with commas "
             "(default: any origin, as TGI).",
    )] = None,
    tokenizer_config_path: Annotated[str | None, _opt(
        "--tokenizer-config-path", env="TOKENIZER_CONFIG_PATH",
        help="A tokenizer_config.json whose `chat_template` the OpenAI chat API uses instead "
             "of the model's (as --chat-template).",
    )] = None,
    show_env: Annotated[bool, _opt(
        "--env", "-e", env=None, help="Print the runtime environment (versions, CPU, GPU) "
                                      "before starting.",
    )] = False,
    sharded: Annotated[str | None, _opt(
        "--sharded", env="SHARDED",
        help="true or false, checked against --num-shard as TGI does (true needs "
             "--num-shard > 1, false needs 1).",
    )] = None,
    cuda_graphs: Annotated[str | None, _opt(
        "--cuda-graphs", env="CUDA_GRAPHS",
        help="Accepted for TGI compatibility and ignored: no CUDA graphs are captured.",
    )] = None,
    disable_grammar_support: Annotated[bool, _opt(
        "--disable-grammar-support", env="DISABLE_GRAMMAR_SUPPORT",
        help="Accepted for TGI compatibility: requests with a `grammar` are refused (HTTP "
             "422) with or without it, guided generation not being built yet.",
    )] = False,
    usage_stats: Annotated[str, _opt(
        "--usage-stats", env="USAGE_STATS",
        help="on, off or no-stack, as TGI; tgi-server sends no usage statistics at all.",
    )] = "on",
    otlp_endpoint: Annotated[str | None, _opt(
        "--otlp-endpoint", env="OTLP_ENDPOINT",
        help="OTLP/gRPC collector the router sends a span per generation request to (with "
             "validate, queue and infer inside; a `traceparent` header is continued).",
    )] = None,
    otlp_service_name: Annotated[str, _opt(
        "--otlp-service-name", env="OTLP_SERVICE_NAME",
        help="The service name of those spans.",
    )] = "text-generation-inference.router",
    watermark_gamma: Annotated[float | None, _opt(
        "--watermark-gamma", env="WATERMARK_GAMMA",
        help="Accepted for TGI compatibility; watermarking is not built yet (requests asking "
             "for it are refused), which the launcher logs.",
    )] = None,
    watermark_delta: Annotated[float | None, _opt(
        "--watermark-delta", env="WATERMARK_DELTA", help="As --watermark-gamma.",
    )] = None,
    quantize: Annotated[str | None, _opt(
        "--quantize", env="QUANTIZE",
        help="Not supported yet: any value is refused at start (a usage error), rather than "
             "serving the unquantized weights unasked.",
    )] = None,
    kv_cache_dtype: Annotated[str | None, _opt(
        "--kv-cache-dtype", env="KV_CACHE_DTYPE",
        help="Not supported yet (fp8 KV cache): any value is refused at start.",
    )] = None,
    lora_adapters: Annotated[str | None, _opt(
        "--lora-adapters", env="LORA_ADAPTERS",
        help="Not supported yet: any value is refused at start.",
    )] = None,
    rope_scaling: Annotated[str | None, _opt(
        "--rope-scaling", env="ROPE_SCALING",
        help="linear or dynamic: replaces the model config's rope scaling (with --rope-factor, "
             "default 1). Linear scaling by F also lets positions reach F x the config's "
             "max_position_embeddings.",
    )] = None,
    rope_factor: Annotated[float | None, _opt(
        "--rope-factor", env="ROPE_FACTOR",
        help="The rope scaling factor; alone it means linear scaling, as TGI.",
    )] = None,
    weights_cache_override: Annotated[str | None, _opt(
        "--weights-cache-override", env="WEIGHTS_CACHE_OVERRIDE",
        help="Not supported (refused at start): pass the weights' directory as --model-id.",
    )] = None,
    ngrok: Annotated[bool, _opt(
        "--ngrok", env="NGROK", help="Not supported: refused at start.",
    )] = False,
    ngrok_authtoken: Annotated[str | None, _opt(
        "--ngrok-authtoken", env="NGROK_AUTHTOKEN", help="Not supported: refused at start.",
    )] = None,
    ngrok_edge: Annotated[str | None, _opt(
        "--ngrok-edge", env="NGROK_EDGE", help="Not supported: refused at start.",
    )] = None,
    version: Annotated[bool, typer.Option(
        "--version", "-V", callback=lambda value: _print_version(value), is_eager=True,
        help="Print the version and exit.",
    )] = False,
    shard_command: Annotated[str | None, _opt(
        "--shard-command", env=None, hidden=True,
        help="Command run for each shard, before its argv (tests, wrappers such as numactl).",
    )] = None,
    router_command: Annotated[str | None, _opt(
        "--router-command", env=None, hidden=True,
        help="Command run for the router, before its argv.",
    )] = None,
) -> None:
    config = config_from_params(ctx.params)
    if config.show_env:
        typer.echo(runtime_environment(), err=True)
    raise typer.Exit(launch(config))


def config_from_params(params: dict[str, Any]) -> LaunchConfig:
    """The parsed flags as a `LaunchConfig`; a bad combination is a usage error."""
    values = dict(params)
    values["shard_command"] = _command(values.get("shard_command"), SHARD_COMMAND)
    values["router_command"] = _command(values.get("router_command"), ROUTER_COMMAND)
    values.pop("version", None)
    values["sharded"] = _tristate(values.get("sharded"), "sharded")
    values["cors_allow_origin"] = _listed(values.get("cors_allow_origin"))
    values["served_model_name"] = _listed(values.get("served_model_name"))
    try:
        return LaunchConfig(**values)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


def _listed(values: list[str] | None) -> tuple[str, ...]:
    """A repeatable flag whose values may also be comma-separated."""
    return tuple(item.strip() for value in values or () for item in value.split(","))


def package_version() -> str:
    try:
        return importlib.metadata.version("tgi-server")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def runtime_environment() -> str:
    """`--env`: what a bug report needs about this machine."""
    import platform

    import torch

    lines = [f"tgi-server: {package_version()}", f"python: {platform.python_version()}",
             f"platform: {platform.platform()}", f"torch: {torch.__version__}",
             f"cpus: {os.cpu_count()} ({torch.get_num_threads()} torch threads)",
             f"cpu kernels: avx512 {torch.cpu._is_avx512_supported()}, "
             f"avx512-bf16 {torch.cpu._is_avx512_bf16_supported()}"]
    if torch.cuda.is_available():
        lines += [f"gpu {i}: {torch.cuda.get_device_name(i)}"
                  for i in range(torch.cuda.device_count())]
    else:
        lines.append("gpus: none")
    return "\n".join(lines)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"tgi-launch {package_version()}")
        raise typer.Exit()


def _tristate(text: str | None, name: str) -> bool | None:
    """TGI's `--flag true|false` (clap's bool with a value); None when not given."""
    if text is None:
        return None
    if text.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if text.strip().lower() in ("false", "0", "no", "off"):
        return False
    raise typer.BadParameter(f"`{name}` must be true or false, not {text!r}")


def _command(text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(shlex.split(text)) if text else default


def parse_config(argv: list[str]) -> LaunchConfig:
    """Flags (and env vars) -> `LaunchConfig`, without launching anything."""
    command = typer.main.get_command(app)
    with command.make_context("tgi-launch", list(argv)) as ctx:
        return config_from_params(ctx.params)


def main() -> None:
    app(prog_name="tgi-launch")


if __name__ == "__main__":
    main()
