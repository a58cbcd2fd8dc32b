"""Two CPU processes joined by a gloo process group, kept alive to run many test cases.

Starting processes costs seconds (each imports torch), a case milliseconds, so one pair serves
a whole test module: :meth:`ProcessPair.run` sends a function and its arguments to every
process, which calls ``function(rank, world_size, *args)`` and sends back what it returns (or
its traceback). A case that does not answer within the timeout (a hang) fails the test and
stops the pair instead of blocking the suite.
"""

from __future__ import annotations

import datetime
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

START_TIMEOUT_S = 120.0
"""Seconds for both processes to import torch and join the group (a shared machine is slow)."""

CASE_TIMEOUT_S = 60.0
"""Seconds a case may take before the pair is declared hung."""

COLLECTIVE_TIMEOUT_S = 30.0
"""gloo gives up on a collective after this long, so a hung case ends with an error."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve(rank: int, world_size: int, port: int, jobs: Any, answers: Any) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
    except Exception:
        answers.put((rank, False, traceback.format_exc()))
        return
    answers.put((rank, True, "ready"))
    while (job := jobs.get()) is not None:
        function, args = job
        try:
            answers.put((rank, True, function(rank, world_size, *args)))
        except Exception:
            answers.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class ProcessPair:
    """``world_size`` spawned processes in one gloo group (two by default)."""

    def __init__(self, world_size: int = 2) -> None:
        context = mp.get_context("spawn")
        self.world_size = world_size
        self._answers = context.Queue()
        self._jobs = [context.Queue() for _ in range(world_size)]
        port = free_port()
        self._processes = [
            context.Process(
                target=_serve,
                args=(rank, world_size, port, self._jobs[rank], self._answers),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for process in self._processes:
            process.start()
        self._collect(START_TIMEOUT_S, "start")

    def run(self, function: Callable[..., Any], *args: Any) -> list[Any]:
        """``function(rank, world_size, *args)`` in every process; their results in rank order."""
        for jobs in self._jobs:
            jobs.put((function, args))
        return self._collect(CASE_TIMEOUT_S, function.__name__)

    def _collect(self, timeout: float, what: str) -> list[Any]:
        results: dict[int, Any] = {}
        failures: list[str] = []
        for _ in range(self.world_size):
            try:
                rank, ok, value = self._answers.get(timeout=timeout)
            except queue.Empty:
                self.close()
                raise AssertionError(
                    f"{what}: no answer from {self.world_size - len(results) - len(failures)} "
                    f"process(es) within {timeout:.0f} s (a hang); the process pair is stopped"
                ) from None
            if ok:
                results[rank] = value
            else:
                failures.append(f"rank {rank}:\n{value}")
        if failures:
            raise AssertionError(f"{what} failed:\n" + "\n".join(failures))
        return [results[rank] for rank in range(self.world_size)]

    def close(self) -> None:
        for jobs in self._jobs:
            jobs.put(None)
        for process in self._processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
