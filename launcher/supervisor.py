"""Start the shards, then the router; supervise them; stop them in order.

Upstream: `cli.py` (a `LaunchConfig`); downstream: `shards.py`, `router.py`, `process.py`.

Exit status: 0 after SIGINT/SIGTERM (router stopped first so it can drain, then the shards);
1 when a child fails to start or dies, after the others are stopped at once (a tensor-parallel
group missing a rank cannot serve, so there is nothing to drain). A second signal while
stopping kills every process group at once.

Multi-node (`--nnodes`): each machine's launcher supervises its own ranks; only node 0 runs
the router. A node's failure reaches the others through the process group: their ranks' next
collective fails, those shards exit, and their launchers stop too.
"""

import asyncio
import signal
from collections.abc import Awaitable

from tgi_server.launcher.config import LaunchConfig
from tgi_server.launcher.output import Output, StartupProgress
from tgi_server.launcher.process import Child, ChildFailed
from tgi_server.launcher.router import (
    ROUTER_NAME,
    check_port_free,
    public_url,
    spawn_router,
    wait_router_ready,
)
from tgi_server.launcher.shards import (
    check_sharding,
    clear_stale_socket,
    remove_socket,
    spawn_shard,
    wait_shard_ready,
)

# NOTE: the router drains for up to `graceful_termination_timeout` itself; give it a margin
# before the SIGKILL so its own timeout, not ours, ends the drain.
_ROUTER_MARGIN_S = 5.0
# After a child died: how long the others get to exit on SIGTERM before SIGKILL.
_FAILURE_STOP_S = 2.0


class Stopped(Exception):
    """The launcher was asked to stop (SIGINT/SIGTERM)."""


def launch(config: LaunchConfig, output: Output | None = None) -> int:
    """Run the whole server until a signal or a failure; returns the exit status."""
    output = output or Output(config.json_output)
    return asyncio.run(Supervisor(config.resolved(), output).run())


class Supervisor:
    def __init__(self, config: LaunchConfig, output: Output) -> None:
        self.config = config
        self.output = output
        # Every child spawned so far, shards (rank order) then the router.
        self.children: list[Child] = []
        self._stop_requested = asyncio.Event()
        self._shutting_down = False
        self._failed = False

    async def run(self) -> int:
        self._install_signal_handlers()
        for note in self.config.ignored_flags():
            self.output.warning(note)
        try:
            await self._start()
            self.output.info(self._ready_message())
            await self._supervise()
            return 0
        except ChildFailed as failure:
            self._failed = True
            self.output.error(str(failure))
            return 1
        except Stopped:
            return 0
        finally:
            await self._shutdown()

    @property
    def _runs_router(self) -> bool:
        return self.config.node_rank == 0

    def _ready_message(self) -> str:
        if self._runs_router:
            return f"ready at {public_url(self.config)}"
        ranks = self.config.local_ranks
        return (f"ranks {ranks[0]}-{ranks[-1]} of {self.config.num_shard} ready "
                f"(node {self.config.node_rank}); the router runs on node 0")

    async def _start(self) -> None:
        check_sharding(self.config)
        if self._runs_router:
            check_port_free(self.config.hostname, self.config.port)
        for path in self.config.socket_paths():
            clear_stale_socket(path)
        async with StartupProgress(self.output, self.children) as progress:
            for rank in self.config.local_ranks:
                await self._add(spawn_shard(self.config, rank, self.output.child_line))
            shards = list(self.children)
            await self._until_ready(
                [wait_shard_ready(s, p) for s, p in zip(shards, self.config.socket_paths())]
            )
            progress.report_changes()
            if not self._runs_router:
                return
            self.output.info(
                f"all {len(shards)} shard(s) ready in "
                f"{max(s.elapsed_s() for s in shards):.1f}s, starting the router"
            )
            router = await self._add(spawn_router(self.config, self.output.child_line))
            await self._until_ready([wait_router_ready(router, self.config)])
            progress.report_changes()

    async def _add(self, spawning: Awaitable[Child]) -> Child:
        child = await spawning
        self.children.append(child)
        return child

    async def _until_ready(self, probes: list[Awaitable[None]]) -> None:
        """Wait for every probe; any child exiting first is a startup failure."""
        probe_tasks = [asyncio.create_task(probe) for probe in probes]
        stop = asyncio.create_task(self._stop_requested.wait())
        exits = {child.exited: child for child in self.children}
        try:
            pending = set(probe_tasks)
            while pending:
                done, _ = await asyncio.wait(
                    [*pending, *exits, stop], return_when=asyncio.FIRST_COMPLETED
                )
                if stop in done:
                    raise Stopped
                for dead in (exits[task] for task in done if task in exits):
                    raise ChildFailed(f"{dead.name} failed to start: "
                                      f"{dead.error_line or dead.failure()}")
                for task in done & pending:
                    task.result()
                pending -= done
        finally:
            for task in (*probe_tasks, stop):
                task.cancel()

    async def _supervise(self) -> None:
        """Returns on a stop request; raises ChildFailed when any child exits."""
        stop = asyncio.create_task(self._stop_requested.wait())
        exits = {child.exited: child for child in self.children}
        done, _ = await asyncio.wait([*exits, stop], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if stop in done:
            return
        dead = next(exits[task] for task in exits if task in done)
        raise ChildFailed(f"{dead.name} exited unexpectedly with {dead.failure()}")

    async def _shutdown(self) -> None:
        """Router first (it drains in-flight requests), then every shard at once; after a
        failure, everything at once without a drain."""
        self._shutting_down = True
        timeout_s = self.config.graceful_termination_timeout
        routers = [c for c in self.children if c.name == ROUTER_NAME]
        shards = [c for c in self.children if c.name != ROUTER_NAME]
        running = [c for c in (*routers, *shards) if c.returncode is None]
        if running:
            self.output.info("shutting down: " + ", ".join(c.name for c in running))
        if self._failed:
            stop_s = min(timeout_s, _FAILURE_STOP_S)
            await asyncio.gather(*(self._stop(child, stop_s) for child in running))
        for router in routers:
            await self._stop(router, timeout_s + _ROUTER_MARGIN_S)
        await asyncio.gather(*(self._stop(shard, timeout_s) for shard in shards))
        for path in self.config.socket_paths():
            remove_socket(path)
        self._restore_signal_handlers()

    async def _stop(self, child: Child, timeout_s: float) -> None:
        if await child.stop(timeout_s):
            self.output.info(f"{child.name} did not stop within {timeout_s:g}s: killed")

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _restore_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop_requested.is_set() or self._shutting_down:
            self.output.info(f"{sig.name} again: killing every process now")
            for child in self.children:
                child.signal(signal.SIGKILL)
            return
        self.output.info(f"{sig.name} received")
        self._stop_requested.set()
