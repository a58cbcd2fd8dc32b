"""How the layers compute per-sample moments: speed and float32 error of the candidates.

Each candidate gives the mean and biased variance of every (sample, channel) of an (N, C, L)
float32 tensor over L. The error is the largest absolute error of the variance against float64
for x = offset + noise (noise std 1); the time is one call, by ``torch.utils.benchmark``, next to
a BatchNorm2d forward on the same data. The layers use the winner, ``batch_norm_stats``.

Usage::

    python benchmarks/moments.py --threads 1
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils import benchmark

from contextnorm.io import atomic_write_text

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SHAPES = ((32, 16, 64), (128, 64, 64), (256, 128, 256))
OFFSETS = (0.0, 1e3, 1e4)


def plain_sums(x: Tensor) -> tuple[Tensor, Tensor]:
    """E[x^2] - E[x]^2 from a sum and a sum of squares (what the layers did before)."""
    mean = x.mean(2)
    return mean, (torch.einsum("ncl,ncl->nc", x, x) / x.shape[2] - mean * mean).clamp_min(0.0)


def welford(x: Tensor) -> tuple[Tensor, Tensor]:
    """torch.var_mean: a Welford reduction."""
    var, mean = torch.var_mean(x, 2, correction=0)
    return mean, var


def batch_norm_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """BatchNorm's two-pass statistics kernel on the (1, N*C, L) view (the layers' choice)."""
    n, c, length = x.shape
    mean, var = torch.batch_norm_update_stats(x.reshape(1, n * c, length), None, None, 0.0)
    return mean.view(n, c), var.view(n, c)


def shifted_sums(x: Tensor) -> tuple[Tensor, Tensor]:
    """Sums of x - x[..., 0], the first position as shift (one extra pass writing a copy)."""
    shifted = x - x[:, :, :1]
    total = shifted.sum(2)
    length = x.shape[2]
    return x[:, :, 0] + total / length, (
        torch.einsum("ncl,ncl->nc", shifted, shifted) - total * total / length
    ) / length


def two_pass(x: Tensor) -> tuple[Tensor, Tensor]:
    """The mean, then the squares of x - mean (one extra pass writing a copy)."""
    mean = x.mean(2)
    centred = x - mean.unsqueeze(2)
    return mean, torch.einsum("ncl,ncl->nc", centred, centred) / x.shape[2]


CANDIDATES: dict[str, Callable[[Tensor], tuple[Tensor, Tensor]]] = {
    "plain sums": plain_sums,
    "Welford (var_mean)": welford,
    "batch_norm_stats": batch_norm_stats,
    "shifted sums": shifted_sums,
    "two-pass": two_pass,
}


def microseconds(function: Callable[[Tensor], object], x: Tensor) -> float:
    timer = benchmark.Timer(
        "f(x)", globals={"f": function, "x": x}, num_threads=torch.get_num_threads()
    )
    return timer.blocked_autorange(min_run_time=0.3).median * 1e6


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    lines = [
        "# Per-sample moments: float32 error and time of the candidates",
        "",
        f"- torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU; 1-minute load "
        "average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} logical CPUs (shared machine: times are "
        "noisy, "
        "ratios to BatchNorm taken in the same run)",
        "- error: max |var - var_float64| for x = offset + N(0, 1); time: one call (median, "
        "torch.utils.benchmark), and its ratio to a BatchNorm2d forward on the same data",
        "",
        "| shape (N, C, L) | candidate | error, offset 0 | offset 1e3 | offset 1e4 | us | vs BN "
        "forward |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for shape in SHAPES:
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn(shape, generator=generator)
        bn = torch.nn.BatchNorm2d(shape[1])
        bn_time = microseconds(bn, noise.unsqueeze(3))
        for name, function in CANDIDATES.items():
            errors = []
            for offset in OFFSETS:
                x = noise + offset
                expected = torch.var_mean(x.double(), 2, correction=0)[0]
                errors.append((function(x)[1].double() - expected).abs().max().item())
            time = microseconds(function, noise)
            lines.append(
                f"| {shape} | {name} | "
                + " | ".join(f"{e:.1e}" for e in errors)
                + f" | {time:.0f} | {time / bn_time:.2f}x |"
            )
    report = "\n".join(lines) + "\n"
    suffix = "" if args.threads is None else f"_threads{args.threads}"
    atomic_write_text(args.out / f"moments_cpu{suffix}.md", report)
    print(report)
    return report


if __name__ == "__main__":
    main()
