"""`tgi-launch` flags and env vars -> LaunchConfig -> ShardConfig / RouterConfig argv."""

import dataclasses
import os
import socket

import pytest
import torch
import typer
from typer.testing import CliRunner

from tgi_server.launcher.argv import from_argv, to_argv
from tgi_server.launcher.cli import app, parse_config, runtime_environment
from tgi_server.launcher.config import LaunchConfig, default_num_threads
from tgi_server.router.config import RouterConfig
from tgi_server.shard.config import ShardConfig

# TGI's launcher defaults (launcher/src/main.rs) for the flags we share with it.
TGI_DEFAULTS = {
    "revision": None, "trust_remote_code": False,
    "hostname": "0.0.0.0", "port": 3000, "master_addr": "localhost",
    "max_concurrent_requests": 128, "max_best_of": 2, "max_stop_sequences": 4,
    "max_top_n_tokens": 5, "max_input_tokens": None, "max_total_tokens": None,
    "max_batch_prefill_tokens": None, "max_batch_total_tokens": None, "max_batch_size": None,
    "max_waiting_tokens": 20, "waiting_served_ratio": 0.3, "max_client_batch_size": 4,
    "payload_limit": 2_000_000, "enable_prefill_logprobs": False, "api_key": None,
    "graceful_termination_timeout": 90.0, "json_output": False,
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No flag env var from the machine running the tests leaks into the parse."""
    for name in list(os.environ):
        if name in {"HOSTNAME", "PORT", "MODEL_ID", "REVISION", "DTYPE", "DEVICE", "API_KEY"} or (
            name.startswith(("MAX_", "NUM_", "MASTER_", "SHARD_", "MEMORY_", "CUDA_MEMORY"))
        ):
            monkeypatch.delenv(name)


def test_defaults_equal_tgi():
    config = parse_config(["--model-id", "m"])
    assert {name: getattr(config, name) for name in TGI_DEFAULTS} == TGI_DEFAULTS
    assert config.model_id == "m"
    assert config.num_shard == 1


def test_cli_defaults_equal_dataclass_defaults():
    parsed = parse_config(["--model-id", "m"])
    assert parsed == LaunchConfig(model_id="m")


def test_router_defaults_are_launch_defaults():
    """A flag left alone means the router's own default: the two cannot drift apart."""
    router = LaunchConfig(model_id="m", shard_uds_path="/tmp/x", master_port=1).to_router_config()
    assert to_argv(router) == ["--tokenizer", "m", "--shard-urls", "/tmp/x-0", "--model-id", "m"]


@pytest.mark.parametrize(("env", "field", "expected"), [
    ({"MAX_INPUT_TOKENS": "100"}, "max_input_tokens", 100),
    ({"MAX_INPUT_LENGTH": "101"}, "max_input_tokens", 101),
    ({"MAX_TOTAL_TOKENS": "4096"}, "max_total_tokens", 4096),
    ({"NUM_SHARD": "2"}, "num_shard", 2),
    ({"PORT": "8080"}, "port", 8080),
    ({"HOSTNAME": "127.0.0.1"}, "hostname", "127.0.0.1"),
    ({"WAITING_SERVED_RATIO": "1.2"}, "waiting_served_ratio", 1.2),
    ({"CUDA_MEMORY_FRACTION": "0.5"}, "memory_fraction", 0.5),
    ({"TRUST_REMOTE_CODE": "true"}, "trust_remote_code", True),
    ({"GRACEFUL_TERMINATION_TIMEOUT": "5"}, "graceful_termination_timeout", 5.0),
    ({"API_KEY": "secret"}, "api_key", "secret"),
    ({"VALIDATION_WORKERS": "4"}, "validation_workers", 4),
    ({"PROMETHEUS_PORT": "9100"}, "prometheus_port", 9100),
    ({"HUGGINGFACE_HUB_CACHE": "/data"}, "huggingface_hub_cache", "/data"),
    ({"SHARDED": "false"}, "sharded", False),
    ({"USAGE_STATS": "off"}, "usage_stats", "off"),
    ({"CUDA_GRAPHS": "0"}, "cuda_graphs", "0"),
    ({"PREFIX_CACHING": "0"}, "prefix_caching", False),
    ({"PREFIX_CACHING": "1"}, "prefix_caching", True),
    ({"PREFILL_CHUNKING": "0"}, "prefill_chunking", False),
])
def test_env_vars(monkeypatch, env, field, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert getattr(parse_config(["--model-id", "m"]), field) == expected


def test_model_id_from_env_and_alias(monkeypatch):
    assert parse_config(["--model", "a"]).model_id == "a"
    monkeypatch.setenv("MODEL_ID", "b")
    assert parse_config([]).model_id == "b"


def test_flag_beats_env(monkeypatch):
    monkeypatch.setenv("MAX_INPUT_TOKENS", "100")
    assert parse_config(["--model-id", "m", "--max-input-tokens", "7"]).max_input_tokens == 7


@pytest.mark.parametrize(("argv", "field", "expected"), [
    (["--max-input-length", "50"], "max_input_tokens", 50),
    (["--cuda-memory-fraction", "0.3"], "memory_fraction", 0.3),
    (["-p", "81"], "port", 81),
    (["--enable-prefill-logprobs"], "enable_prefill_logprobs", True),
    (["--disable-lookahead"], "disable_lookahead", True),
    (["--no-prefix-caching"], "prefix_caching", False),
    (["--no-prefill-chunking"], "prefill_chunking", False),
    (["--max-input-tokens", "10", "--max-batch-prefill-tokens", "5"], "max_batch_prefill_tokens",
     5),
    (["--speculate", "3"], "speculate", 3),
    (["--shard-command", "python fake.py --x 'a b'"], "shard_command",
     ("python", "fake.py", "--x", "a b")),
])
def test_aliases_and_flags(argv, field, expected):
    assert getattr(parse_config(["--model-id", "m", *argv]), field) == expected


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-input-tokens", "10", "--max-total-tokens", "10"], "must be < `max_total_tokens`"),
    (["--max-input-tokens", "10", "--max-batch-prefill-tokens", "5", "--no-prefill-chunking"],
     "must be >= `max_input"),
    (["--num-shard", "0"], "num_shard"),
    (["--dtype", "float8"], "dtype"),
    (["--memory-fraction", "1.5"], "memory_fraction"),
    (["--speculate", "-1"], "`speculate` must be >= 0"),
    (["--nnodes", "2", "--num-shard", "2"], "needs an explicit `master_port`, the same on every"),
    (["--nnodes", "2", "--num-shard", "3", "--master-port", "1"],
     r"`num_shard` \(3, all nodes together\) must be divisible by `nnodes` \(2\)"),
    (["--nnodes", "2", "--node-rank", "2", "--master-port", "1"], "`node_rank` must be in"),
    (["--sharded", "true"], "`sharded` is true but `num_shard` is 1"),
    (["--sharded", "false", "--num-shard", "2"], "`sharded` is false but `num_shard` is 2"),
    (["--sharded", "maybe"], "`sharded` must be true or false"),
    (["--usage-stats", "sometimes"], "`usage_stats` must be one of on, off, no-stack"),
    (["--validation-workers", "0"], "`validation_workers` must be > 0"),
    (["--prometheus-port", "70000"], "`prometheus_port` must be between"),
    # TGI features not built yet: refused, never served differently without a word
    (["--quantize", "gptq"], "`quantize` gptq: quantized weights are not supported yet"),
    (["--kv-cache-dtype", "fp8_e5m2"], "`kv_cache_dtype` fp8_e5m2: an fp8 KV cache is not"),
    (["--lora-adapters", "a,b"], "`lora_adapters` a,b: LoRA adapters are not supported yet"),
    (["--rope-scaling", "yarn"], "`rope_scaling` must be linear or dynamic"),
    (["--rope-factor", "0"], "`rope_factor` must be > 0"),
    (["--weights-cache-override", "/w"], "pass the weights' directory as `--model-id`"),
    (["--ngrok"], "ngrok tunnelling is not supported"),
    (["--tokenizer-config-path", "/no/such.json"], "`tokenizer_config_path` '/no/such.json'"),
    (["--cors-allow-origin", ","], "`cors_allow_origin` must not be empty"),
])
def test_bad_combinations_are_usage_errors(argv, message):
    with pytest.raises(typer.BadParameter, match=message):
        parse_config(["--model-id", "m", *argv])


def test_tgi_flags_are_accepted_and_those_that_change_nothing_said_so():
    config = parse_config([
        "--model-id", "m", "--num-shard", "2", "--sharded", "true", "--cuda-graphs", "1,2,4",
        "--disable-grammar-support", "--usage-stats", "no-stack", "--otlp-endpoint",
        "http://collector:4317", "--otlp-service-name", "svc",
    ])
    assert (config.sharded, config.num_shard) == (True, 2)
    assert config.ignored_flags() == ["--cuda-graphs: tgi-server captures no CUDA graphs; ignored"]
    assert parse_config(["--model-id", "m"]).ignored_flags() == []
    router = config.resolved().to_router_config()  # tracing is the router's
    assert (router.otlp_endpoint, router.otlp_service_name) == ("http://collector:4317", "svc")


def test_tokenizer_config_and_cors_origins_reach_the_router(tmp_path):
    path = tmp_path / "tokenizer_config.json"
    path.write_text("{}")
    config = parse_config(["--model-id", "m", "--tokenizer-config-path", str(path),
                           "--cors-allow-origin", "https://a.example,https://b.example",
                           "--cors-allow-origin", "https://c.example"])
    router = config.resolved().to_router_config()
    assert router.chat_template == str(path)
    assert router.cors_allow_origin == ("https://a.example", "https://b.example",
                                        "https://c.example")
    with pytest.raises(typer.BadParameter, match="both give the chat template"):
        parse_config(["--model-id", "m", "--tokenizer-config-path", str(path),
                      "--chat-template", str(path)])


def test_watermark_flags_are_accepted_and_said_to_change_nothing():
    notes = parse_config(["--model-id", "m", "--watermark-gamma", "0.5"]).ignored_flags()
    assert notes == ["--watermark-gamma/--watermark-delta: watermarking is not built yet; "
                     "requests asking for it are refused (HTTP 422)"]


def test_version_and_environment():
    result = CliRunner().invoke(app, ["-V"])
    assert result.exit_code == 0 and result.output.startswith("tgi-launch ")
    env = runtime_environment()
    assert f"torch: {torch.__version__}" in env and "python: " in env


def test_rope_override_reaches_the_shards():
    config = parse_config(["--model-id", "m", "--rope-scaling", "dynamic", "--rope-factor", "2"])
    shard = config.resolved().to_shard_config(0)
    assert (shard.rope_scaling, shard.rope_factor) == ("dynamic", 2.0)
    assert from_argv(ShardConfig, to_argv(shard)) == shard


def test_hub_cache_and_router_settings_reach_the_children():
    config = parse_config(["--model-id", "m", "--huggingface-hub-cache", "/data",
                           "--validation-workers", "3", "--prometheus-port", "9100"])
    assert config.child_env() == {"HF_HUB_CACHE": "/data", "HUGGINGFACE_HUB_CACHE": "/data"}
    assert parse_config(["--model-id", "m"]).child_env() == {}
    router = config.resolved().to_router_config()
    assert (router.validation_workers, router.prometheus_port) == (3, 9100)


def test_resolved_picks_unique_socket_and_free_port():
    config = LaunchConfig(model_id="m").resolved()
    assert config.shard_uds_path == f"/tmp/tgi-server-{os.getpid()}"
    with socket.socket() as sock:
        sock.bind(("", config.master_port))  # nobody holds it
    explicit = LaunchConfig(model_id="m", shard_uds_path="/tmp/s", master_port=29500).resolved()
    assert (explicit.shard_uds_path, explicit.master_port) == ("/tmp/s", 29500)


def test_unresolved_config_has_no_shard_config():
    with pytest.raises(ValueError, match="resolved"):
        LaunchConfig(model_id="m").to_shard_config(0)


def launch_config(**overrides) -> LaunchConfig:
    return LaunchConfig(**{**dict(
        model_id="org/model", revision="v2", num_shard=2, dtype="bfloat16", device="cpu",
        trust_remote_code=True, hostname="127.0.0.1", port=8080, shard_uds_path="/tmp/u",
        master_addr="10.0.0.1", master_port=29501, max_input_tokens=1000,
        max_total_tokens=2000, max_batch_prefill_tokens=4000, max_batch_total_tokens=8000,
        max_batch_size=32, waiting_served_ratio=1.5, enable_prefill_logprobs=True,
        disable_lookahead=True, speculate=2,
        api_key="k", block_size=32, memory_fraction=0.5, num_threads=3,
        graceful_termination_timeout=7.5), **overrides,
    })


def test_shard_config_round_trips_through_argv():
    config = launch_config()
    for rank in range(config.num_shard):
        shard = config.to_shard_config(rank)
        assert from_argv(ShardConfig, to_argv(shard)) == shard
    assert config.to_shard_config(1) == ShardConfig(
        model_id="org/model", revision="v2", dtype="bfloat16", device="cpu", rank=1,
        world_size=2, uds_path="/tmp/u", master_addr="10.0.0.1", master_port=29501,
        block_size=32, memory_fraction=0.5, num_threads=3, trust_remote_code=True, speculate=2,
    )
    assert config.to_shard_config(1).socket_path == "/tmp/u-1"


def test_router_config_round_trips_through_argv():
    router = launch_config().to_router_config()
    assert from_argv(RouterConfig, to_argv(router)) == router
    assert router.shard_urls == ("/tmp/u-0", "/tmp/u-1")  # rank 0 first
    assert router.tokenizer == router.model_id == "org/model"
    assert router.graceful_timeout == 7.5
    shared = {f.name for f in dataclasses.fields(RouterConfig)} & {
        f.name for f in dataclasses.fields(LaunchConfig)}
    config = launch_config()
    assert {name: getattr(router, name) for name in shared} == {
        name: getattr(config, name) for name in shared}


def test_multi_node_ranks_ports_and_router_addresses():
    node1 = launch_config(nnodes=2, node_rank=1, num_shard=4, num_threads=None)
    assert list(node1.local_ranks) == [2, 3]
    assert node1.socket_paths() == ("/tmp/u-2", "/tmp/u-3")
    shard = node1.to_shard_config(3)
    assert (shard.rank, shard.world_size, shard.master_port) == (3, 4, 29501)
    assert shard.grpc_port == 29501 + 1 + 3  # default: TCP ports after the rendezvous port
    assert shard.listen_addresses == ["unix:///tmp/u-3", "0.0.0.0:29505"]
    assert shard.num_threads == default_num_threads(2)  # this machine's cores, 2 local shards
    # Node 0's router gets rank 0 only; it finds the others through ServiceDiscovery.
    node0 = launch_config(nnodes=2, node_rank=0, num_shard=4)
    assert node0.to_router_config().shard_urls == ("/tmp/u-0",)
    single = launch_config(shard_grpc_port=40000)
    assert [single.to_shard_config(r).grpc_port for r in (0, 1)] == [40000, 40001]
    assert launch_config().to_shard_config(0).grpc_port is None  # unix sockets only


def test_default_threads_share_the_cores():
    cores = len(os.sched_getaffinity(0))
    assert default_num_threads(1) == cores
    assert default_num_threads(cores * 4) == 1
    assert launch_config(num_threads=None, num_shard=1).to_shard_config(0).num_threads == cores


def test_prefix_caching_is_on_unless_turned_off_and_reaches_the_router():
    assert parse_config(["--model-id", "m"]).prefix_caching is True
    router = launch_config(prefix_caching=False).to_router_config()
    assert router.prefix_caching is False
    assert "--no-prefix-caching" in to_argv(router)
    assert from_argv(RouterConfig, to_argv(router)).prefix_caching is False
