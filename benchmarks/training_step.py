"""Time of one training step of whole models with every norm replaced, relative to BatchNorm.

The Shallow CNN (the MixNorm paper's) and DenseNet-40 (k=12) of ``contextnorm.models`` are
built with the norm under test at every norm site (``placement="all"``) and trained for one
SGD step (forward, cross-entropy, backward, update) on a batch of CIFAR-sized images. Context
layers run through :class:`~contextnorm.ContextualModel`, which checks the contexts once per
step. Timing uses ``torch.utils.benchmark``; each round times every method once in a random
order, each beside a BatchNorm step of its own, and the ratio is taken against it; the report
gives the median over rounds and the inter-quartile range of the ratio.

Usage::

    python benchmarks/training_step.py --threads 1
    python benchmarks/training_step.py --device cuda
    python benchmarks/training_step.py --quick --out /tmp/bench
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils import benchmark

import contextnorm
from contextnorm.io import atomic_write_text
from contextnorm.models import ShallowCNN, densenet40

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layers import machine_description  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NUM_CONTEXTS = 4
METHODS: dict[str, Callable[[int], nn.Module] | None] = {
    "BatchNorm2d": None,
    "CN": lambda c: contextnorm.ContextNorm(c, NUM_CONTEXTS),
    "CN-X": lambda c: contextnorm.ContextNormX(c, NUM_CONTEXTS),
    "CN-E": lambda c: contextnorm.ContextNormE(c, NUM_CONTEXTS),
    "ModeNorm": lambda c: contextnorm.ModeNorm(c, NUM_CONTEXTS),
    "SwitchNorm": lambda c: contextnorm.SwitchNorm(c),
    "ACN": lambda c: contextnorm.AdaptiveContextNorm(c, NUM_CONTEXTS),
}
MODELS: dict[str, Callable[[Callable[[int], nn.Module] | None], nn.Module]] = {
    "Shallow CNN": lambda norm: ShallowCNN(10, norm_layer=norm or nn.BatchNorm2d),
    "DenseNet-40": lambda norm: densenet40(num_classes=10, norm_layer=norm or nn.BatchNorm2d),
}


def training_step(
    model_name: str, method: str, batch: int, size: int, device: torch.device
) -> Callable[[], None]:
    """One SGD step of ``model_name`` with ``method`` at every norm site, as a closure."""
    torch.manual_seed(0)
    model = MODELS[model_name](METHODS[method]).to(device).train()
    if contextnorm.uses_context(model):
        model = contextnorm.ContextualModel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(10, (batch,), device=device)
    # Every context holds several samples: CN needs two values per channel and context.
    contexts = (torch.randperm(batch) % NUM_CONTEXTS).to(device)
    arguments = (images, contexts) if isinstance(model, contextnorm.ContextualModel) else (images,)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(*arguments), labels).backward()
        optimizer.step()

    step()  # lazy state: optimizer buffers, data-dependent starts
    return step


def seconds(step: Callable[[], None], number: int) -> float:
    timer = benchmark.Timer(
        stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads()
    )
    return timer.timeit(number).mean


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    parser.add_argument("--batch", type=int, default=64, help="images per step (default 64)")
    parser.add_argument(
        "--size", type=int, default=16, help="image side (default 16, as the reduced configs)"
    )
    parser.add_argument("--number", type=int, default=2, help="steps per timing (default 2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 1 round, batch 8, 8x8 images"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available; use --device cpu")
    if args.quick:
        args.rounds, args.batch, args.size, args.number = 1, 8, 8, 1
    return args


def main(argv: Sequence[str] | None = None) -> dict[tuple[str, str], list[float]]:
    """Run the benchmark; write ``training_step_<device>.md``; return the ratios per (model,
    method)."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    order = random.Random(args.seed)
    steps = {
        (model, method): training_step(model, method, args.batch, args.size, device)
        for model in MODELS
        for method in METHODS
    }
    ratios: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    load = []
    for _ in range(args.rounds):
        load.append(os.getloadavg()[0])
        keys = list(steps)
        order.shuffle(keys)
        for model, method in keys:
            reference = steps[(model, "BatchNorm2d")]
            pair = [("method", steps[(model, method)]), ("reference", reference)]
            order.shuffle(pair)
            measured = {name: seconds(step, args.number) for name, step in pair}
            times[(model, method)].append(measured["method"])
            ratios[(model, method)].append(measured["method"] / measured["reference"])
    machine = machine_description(device)
    lines = [
        "# Training step time with every norm replaced, relative to BatchNorm2d",
        "",
        f"- Machine: {machine['machine']} ({device.type}), {machine['threads']} torch threads",
        f"- torch {machine['torch']}, {machine['date']}",
        f"- contextnorm's native CPU kernels: {machine['native']}",
        (
            f"- Machine load: 1-minute load average {min(load):.1f}-{max(load):.1f} over the "
            "rounds on "
            f"{os.cpu_count()} logical CPUs (above the CPU count: other jobs shared the machine)"
        ),
        (
            f"- One SGD step (forward, cross-entropy, backward, update) on {args.batch} images "
            f"3x{args.size}x{args.size}, every norm site replaced, K = {NUM_CONTEXTS} for the "
            "layers "
            "that take one; context layers through ContextualModel (contexts checked once per step)"
        ),
        (
            f"- {args.rounds} rounds; each times every method once ({args.number} steps, "
            "torch.utils.benchmark) beside its own BatchNorm timing, in random order; median and "
            "IQR of the per-round ratio"
        ),
        "",
        "| model | norm | median ms | ratio vs BN (median) | ratio IQR |",
        "|---|---|---:|---:|---:|",
    ]
    for (model, method), values in ratios.items():
        quartiles = (
            statistics.quantiles(values, n=4, method="inclusive")
            if len(values) > 1
            else [values[0]] * 3
        )
        lines.append(
            f"| {model} | {method} | {1e3 * statistics.median(times[(model, method)]):.1f} | "
            f"{statistics.median(values):.2f}x | {quartiles[0]:.2f}-{quartiles[2]:.2f} |"
        )
    suffix = "" if args.threads is None else f"_threads{args.threads}"
    report = "\n".join(lines) + "\n"
    atomic_write_text(args.out / f"training_step_{device.type}{suffix}.md", report)
    print(report)
    return ratios


if __name__ == "__main__":
    main()
