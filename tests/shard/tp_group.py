"""A tensor-parallel group of worker processes for tests: gloo on CPU, one rank per process.

`TPGroup(world_size)` spawns the ranks once (importing torch takes seconds) and joins them
into one process group; `group.run(fn, *args)` calls `fn(tp, *args)` on every rank at the
same time and returns the per-rank results in rank order. `fn` must be a module-level function
(it is pickled by reference and imported by the workers).
"""

import multiprocessing as mp
import queue
import socket
import traceback
from collections.abc import Callable

import torch

from tgi_server.shard.distributed import init_distributed

_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks: mp.Queue, results: mp.Queue) -> None:
    torch.set_num_threads(1)
    tp = init_distributed(rank, world_size, "127.0.0.1", port, "cpu")
    while (task := tasks.get()) is not None:
        fn, args = task
        try:
            results.put((rank, None, fn(tp, *args)))
        except BaseException:  # noqa: BLE001 -- reported to the test process
            results.put((rank, traceback.format_exc(), None))


class TPGroup:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.procs = [
            ctx.Process(target=_worker, args=(rank, world_size, port, self.tasks[rank],
                                              self.results), daemon=True)
            for rank in range(world_size)
        ]
        for proc in self.procs:
            proc.start()
        self.closed = False

    def run(self, fn: Callable, *args) -> list:
        """`fn(tp, *args)` on every rank; raises with the worker's traceback if one fails."""
        assert not self.closed, "the group was closed after an earlier failure"
        for task_queue in self.tasks:
            task_queue.put((fn, args))
        by_rank: dict[int, object] = {}
        for _ in range(self.world_size):
            try:
                rank, error, result = self.results.get(timeout=_TIMEOUT_S)
            except queue.Empty:
                self.close()
                raise TimeoutError(f"{fn.__name__}: a rank did not answer (hung?)") from None
            if error:
                self.close()  # the other ranks may wait forever in a collective
                raise AssertionError(f"rank {rank} failed in {fn.__name__}:\n{error}")
            by_rank[rank] = result
        return [by_rank[rank] for rank in range(self.world_size)]

    def close(self) -> None:
        self.closed = True
        for proc in self.procs:
            proc.kill()
            proc.join()
