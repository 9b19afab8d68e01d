"""The launcher's startup, failure and shutdown behaviour, with stub shards and router."""

import json
import os
import signal
import socket
import sys
import time

import pytest
from launch_harness import wait_dead

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process groups, /proc")


def test_sigterm_stops_router_then_shards_and_exits_0(launcher, records):
    launched = launcher("ok", "ok", "--num-shard", "2")
    launched.wait_for_line(f"ready at http://127.0.0.1:{launched.port}")
    assert sum("ready at" in line for line in launched.lines) == 1
    assert "[shard 1] loading weights..." in launched.lines

    launched.signal(signal.SIGTERM)
    assert launched.wait(10) == 0
    router_term = launched.term_time("router")
    assert router_term is not None
    assert all(router_term <= launched.term_time(f"shard-{rank}") for rank in (0, 1))
    assert wait_dead(launched.recorded_pids()) == []
    assert not list(records.glob("s-*")), "the shard sockets are left behind"


def test_children_get_their_rank_rendezvous_and_the_shard_addresses(launcher, records):
    launched = launcher("ok", "ok", "--num-shard", "2", "--master-port", "29611",
                        "--huggingface-hub-cache", "/data/hub", "--cuda-graphs", "0")
    launched.wait_for_line("ready at")
    assert "--cuda-graphs: tgi-server captures no CUDA graphs; ignored" in launched.lines
    shard = launched.record("shard-1")
    assert shard["env"] == {
        "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29611"}
    assert shard["hub_cache"] == "/data/hub"
    assert (shard["config"]["rank"], shard["config"]["world_size"]) == (1, 2)
    router = launched.record("router")["config"]
    assert router["shard_urls"] == [str(records / "s-0"), str(records / "s-1")]
    assert (router["tokenizer"], router["port"]) == ("stub-model", launched.port)
    launched.signal(signal.SIGTERM)
    assert launched.wait(10) == 0


def test_failing_shard_exits_nonzero_with_its_error_line(launcher):
    start = time.monotonic()
    launched = launcher("error@1", "ok", "--num-shard", "2")
    assert launched.wait(10) != 0
    assert time.monotonic() - start < 8
    failure = "shard 1 failed to start: ERROR: no such model: stub-model"
    assert [line for line in launched.lines if "failed to start" in line] == [failure]
    assert launched.term_time("shard-0") is not None
    assert wait_dead(launched.recorded_pids()) == []


def test_router_failing_to_start_stops_the_shards(launcher):
    launched = launcher("ok", "error")
    assert launched.wait(10) == 1
    launched.wait_for_line("router failed to start: ERROR: cannot connect to the shards")
    assert launched.term_time("shard-0") is not None
    assert wait_dead(launched.recorded_pids()) == []


def test_missing_shard_executable_is_one_readable_line(launcher):
    launched = launcher(shard_command="/nonexistent/tgi-shard")
    assert launched.wait(10) == 1
    launched.wait_for_line(
        "shard 0 failed to start: ERROR: cannot run '/nonexistent/tgi-shard': No such file")


def test_shard_dying_later_stops_everything(launcher):
    launched = launcher("die=1.0@0", "ok", "--num-shard", "2")
    launched.wait_for_line("ready at")
    assert launched.wait(10) == 1
    launched.wait_for_line("shard 0 exited unexpectedly with exit code 3: ERROR: simulated crash")
    assert launched.term_time("router") is not None
    assert launched.term_time("shard-1") is not None
    assert wait_dead(launched.recorded_pids()) == []


def test_shard_dying_while_the_router_warms_up_is_a_startup_failure(launcher):
    launched = launcher("die=0.5@0", "slow=30")
    assert launched.wait(10) == 1
    launched.wait_for_line("shard 0 failed to start: ERROR: simulated crash")
    assert launched.term_time("router") is not None
    assert wait_dead(launched.recorded_pids()) == []


def test_sigkilled_shard_stops_everything_at_once_without_a_drain(launcher):
    """A group missing a rank cannot serve: the router is not given its drain timeout."""
    launched = launcher("ok", "drain=60", "--num-shard", "2",
                        "--graceful-termination-timeout", "60")
    launched.wait_for_line("ready at")
    start = time.monotonic()
    os.kill(launched.record("shard-1")["pid"], signal.SIGKILL)
    assert launched.wait(10) == 1
    assert time.monotonic() - start < 6  # 2 s of SIGTERM grace, then SIGKILL
    failure = launched.wait_for_line("exited unexpectedly")
    assert failure.endswith(
        "shard 1 exited unexpectedly with signal SIGKILL (the kernel's out-of-memory killer, "
        "or kill -9); its last output: ready")
    launched.wait_for_line("router did not stop within 2s: killed")
    assert wait_dead(launched.recorded_pids()) == []


def test_node_1_runs_its_ranks_and_no_router(launcher, records):
    launched = launcher("ok", "ok", "--num-shard", "4", "--nnodes", "2", "--node-rank", "1",
                        "--master-addr", "10.1.2.3", "--master-port", "29700")
    launched.wait_for_line("ranks 2-3 of 4 ready (node 1); the router runs on node 0")
    assert not (records / "router.json").exists()
    assert not (records / "shard-0.json").exists()
    for rank in (2, 3):
        shard = launched.record(f"shard-{rank}")
        assert shard["env"] == {"RANK": str(rank), "WORLD_SIZE": "4",
                                "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29700"}
        assert shard["config"]["grpc_port"] == 29701 + rank  # TCP for node 0's router
    launched.signal(signal.SIGTERM)
    assert launched.wait(10) == 0
    assert wait_dead(launched.recorded_pids()) == []


def test_unsupported_split_fails_before_spawning_anything(launcher, records, model_dir):
    launched = launcher("ok", "ok", "--num-shard", "3", model_id=str(model_dir("llama")))
    assert launched.wait(10) == 1
    errors = [line for line in launched.lines if "cannot split" in line]
    assert len(errors) == 1 and errors[0].endswith(
        "cannot split the model over 3 shards: 4 attention heads are not divisible by 3; "
        "2 key/value heads neither divide 3 nor are divisible by it; intermediate size 128 is "
        "not divisible by 3. Valid --num-shard values for this model: 1, 2, 4")
    assert not list(records.glob("shard-*"))


def test_router_dying_later_stops_the_shards(launcher):
    launched = launcher("ok", "die=1.0")
    launched.wait_for_line("ready at")
    assert launched.wait(10) == 1
    launched.wait_for_line("router exited unexpectedly with exit code 5")
    assert wait_dead(launched.recorded_pids()) == []


def test_shard_ignoring_sigterm_is_killed_after_the_timeout(launcher):
    launched = launcher("ignore-term@1", "ok", "--num-shard", "2",
                        "--graceful-termination-timeout", "1")
    launched.wait_for_line("ready at")
    launched.signal(signal.SIGTERM)
    assert launched.wait(10) == 0
    launched.wait_for_line("shard 1 did not stop within 1s: killed")
    assert wait_dead(launched.recorded_pids()) == []


def test_sigint_while_loading_stops_and_exits_0(launcher):
    launched = launcher("hang", "ok", "--graceful-termination-timeout", "1")
    launched.wait_for_line("[shard 0] loading weights...")
    launched.signal(signal.SIGINT)
    assert launched.wait(10) == 0
    assert wait_dead(launched.recorded_pids()) == []


def test_killed_launcher_takes_its_children_along(launcher):
    launched = launcher("ok", "ok")
    launched.wait_for_line("ready at")
    children = [launched.record("shard-0")["pid"], launched.record("router")["pid"]]
    launched.signal(signal.SIGKILL)
    launched.wait(5)
    assert wait_dead(children) == []


def test_busy_port_fails_before_any_shard_starts(launcher, records):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        launched = launcher(port=busy.getsockname()[1])
        assert launched.wait(10) == 1
    launched.wait_for_line("is already in use on 127.0.0.1; pass another --port")
    assert not list(records.glob("shard-*"))


def test_json_output_is_one_object_per_line(launcher):
    launched = launcher("error", "ok", "--json-output")
    assert launched.wait(10) == 1
    events = [json.loads(line) for line in launched.lines]
    assert all({"timestamp", "level", "target", "message"} <= set(e) for e in events)
    assert {"level": "INFO", "target": "shard 0", "message": "loading weights..."}.items() <= (
        next(e for e in events if e["target"] == "shard 0").items())
    errors = [e["message"] for e in events if e["level"] == "ERROR"]
    assert errors == ["shard 0 failed to start: ERROR: no such model: stub-model"]
