"""What synchronising batch statistics over processes costs (``contextnorm.convert_sync``).

Two measurements, each a ratio to the unconverted layer timed in the same processes, rounds
interleaved, median over rounds (``torch.utils.benchmark``, a fixed number of runs per timing
so that every process runs the same collectives):

1. ``world of one``: one process in a gloo group of one. A converted layer must cost what the
   plain one costs, in training (forward + backward) and in eval (forward): no collective runs.
2. ``two processes``: two CPU processes (gloo), each with its half of the batch: the cost of
   the all-reduce in the forward and the one in the backward, against the same processes
   normalising their halves alone.

Usage::

    python benchmarks/sync.py --threads 1
    python benchmarks/sync.py --quick
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import socket
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils import benchmark

import contextnorm as cn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layers import machine_description  # noqa: E402

K = 4
LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "BatchNorm2d": lambda c: nn.BatchNorm2d(c),
    "CN": lambda c: cn.ContextNorm(c, K),
    "ModeNorm": lambda c: cn.ModeNorm(c, K),
    "SwitchNorm": lambda c: cn.SwitchNorm(c),
    "ACN (momentum)": lambda c: cn.AdaptiveContextNorm(c, K),
    "ACN (gradient)": lambda c: cn.AdaptiveContextNorm(c, K, update="gradient"),
}
SHAPES = [(32, 16, 8, 8), (64, 64, 16, 16)]


def step(
    layer: nn.Module, x: torch.Tensor, context: torch.Tensor, train: bool
) -> Callable[[], None]:
    uses_context = getattr(layer, "uses_context", False)
    checked = cn.check_context(context, K)

    def run() -> None:
        if train:
            x.grad = None
            y = layer(x, checked) if uses_context else layer(x)
            y.backward(torch.ones_like(y))
        else:
            with torch.no_grad():
                layer(x, checked) if uses_context else layer(x)

    return run


def seconds(function: Callable[[], None], number: int) -> float:
    return benchmark.Timer("function()", globals={"function": function}).timeit(number).median


def ratios(
    rank: int, shape: tuple[int, ...], rounds: int, number: int
) -> dict[str, dict[str, float]]:
    """Converted / plain time of every layer, training and eval, in the current process group."""
    torch.manual_seed(rank)
    n, c, *spatial = shape
    x = torch.randn(n, c, *spatial, requires_grad=True)
    context = torch.arange(n) % K
    found: dict[str, dict[str, list[float]]] = {}
    for name, build in LAYERS.items():
        plain = build(c)
        converted = cn.convert_sync(copy.deepcopy(plain))
        for mode in ("train", "eval"):
            plain.train(mode == "train")
            converted.train(mode == "train")
            timings = found.setdefault(name, {}).setdefault(mode, [])
            for _ in range(rounds):
                slow = seconds(step(converted, x, context, mode == "train"), number)
                fast = seconds(step(plain, x, context, mode == "train"), number)
                timings.append(slow / fast)
    return {
        name: {mode: statistics.median(v) for mode, v in modes.items()}
        for name, modes in found.items()
    }


def worker(
    rank: int, world_size: int, port: int, options: argparse.Namespace, results: dict
) -> None:
    torch.set_num_threads(options.threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        for shape in SHAPES[: 1 if options.quick else None]:
            half = (shape[0] // world_size, *shape[1:])
            measured = ratios(rank, half, options.rounds, options.number)
            if rank == 0:
                results[shape] = measured
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def measure(world_size: int, options: argparse.Namespace) -> dict:
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.spawn(worker, args=(world_size, free_port(), options, results), nprocs=world_size, join=True)
    return dict(results)


def table(title: str, results: dict) -> str:
    lines = [
        f"### {title}",
        "",
        "| layer | input per process | training | eval |",
        "|---|---|---|---|",
    ]
    for shape, measured in results.items():
        for name, modes in measured.items():
            lines.append(
                f"| {name} | {tuple(shape)} | {modes['train']:.2f}x | {modes['eval']:.2f}x |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--number", type=int, default=20, help="runs per timing")
    parser.add_argument("--quick", action="store_true", help="the small shape, 2 rounds")
    options = parser.parse_args()
    if options.quick:
        options.rounds, options.number = 2, 5
    os.environ.setdefault("OMP_NUM_THREADS", str(options.threads))
    torch.set_num_threads(options.threads)
    about = ", ".join(f"{k}: {v}" for k, v in machine_description(torch.device("cpu")).items())
    print(f"# Synchronised / plain layers, same processes, {options.threads} thread(s); {about}\n")
    print(table("world of one (one process, a gloo group of one)", measure(1, options)))
    print()
    print(table("two processes (gloo), each with half the batch", measure(2, options)))


if __name__ == "__main__":
    main()
