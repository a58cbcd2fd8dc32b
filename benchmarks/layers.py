"""Forward + backward time of the normalization layers relative to ``nn.BatchNorm2d``.

Every layer runs in training mode and is timed for a forward pass and a backward pass of a
fixed upstream gradient (input gradient included, as inside a network), on each input shape
(default: the small feature maps (32, 16, 8, 8) and (128, 64, 8, 8), and (256, 128, 16, 16)).
Context layers receive ids checked once outside the timing (a :class:`~contextnorm.CheckedContext`,
as layers inside a model get from ``use_context``). A plain per-context loop implementation of
CN is measured too, as the reference a straightforward implementation would give; with
``--compile``, CN, CN-X and CN-E compiled by ``torch.compile`` are measured beside eager.

Timing uses ``torch.utils.benchmark`` (which synchronises CUDA itself). Shared machines are
noisy, so timings are interleaved: each round times every configuration once in a fresh
random order, each beside a BatchNorm timing of its own, and a configuration's ratio is taken
against that BatchNorm time; each timing is the fastest of a few alternating passes. The
report gives, per configuration, the median time over rounds and the median and
inter-quartile range of the per-round ratio. Results are rewritten after every round, so an
interrupted run keeps the rounds it finished.

Usage::

    python benchmarks/layers.py --threads 1                # CPU, one thread (robust to load)
    python benchmarks/layers.py --compile --threads 1      # eager and compiled side by side
    python benchmarks/layers.py --device cuda              # on a GPU
    python benchmarks/layers.py --quick --out /tmp/bench   # smoke test, seconds
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils import benchmark

import contextnorm
from contextnorm.functional import native
from contextnorm.io import atomic_write_text

SMALL_SHAPE = (32, 16, 8, 8)
LARGE_SHAPE = (256, 128, 16, 16)
DEFAULT_SHAPES = (SMALL_SHAPE, (128, 64, 8, 8), LARGE_SHAPE)
QUICK_SHAPE = (16, 8, 4, 4)
QUICK_ROUNDS = 2
QUICK_WARMUP = 1
QUICK_REPEATS = 1
CONTEXT_COUNTS = (1, 3, 20, 100, 1000)
MIXTURE_COUNTS = (3, 8)
COMPILED_COUNT = 3
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REFERENCE = "BatchNorm2d"
PAIR_BUDGET_SECONDS = 1.0
# One timing runs the step this many times, or fewer for slow steps (at least ~10 ms per timing).
MAX_NUMBER = 50

# Speed goals relative to BatchNorm, by shape: CN, CN-X and CN-E at any K; ACN at K = 3 on the
# large shape.
CONTEXT_TARGETS = {SMALL_SHAPE: 1.5, LARGE_SHAPE: 1.2}
CONTEXT_LAYERS = ("CN", "CN-X", "CN-E")
ACN_TARGET = 3.0
ACN_TARGET_COUNT = 3


class LoopContextNorm(nn.Module):
    """CN written the obvious way: a Python loop over the contexts present in the batch.

    Same function as :class:`contextnorm.ContextNorm` in training (per-context batch mean
    and biased variance, per-context affine, running statistics; the ``1/sqrt(lambda_k)``
    gain with ``prior_scaling``),
    with autograd deriving the backward pass. It is the reference the vectorised layer is
    meant to beat.
    """

    def __init__(
        self,
        num_features: int,
        num_contexts: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        prior_scaling: bool = False,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.prior_scaling = prior_scaling
        self.weight = nn.Parameter(torch.ones(num_contexts, num_features))
        self.bias = nn.Parameter(torch.zeros(num_contexts, num_features))
        self.register_buffer("prior", torch.full((num_contexts,), 1.0 / num_contexts))
        self.register_buffer("running_mean", torch.zeros(num_contexts, num_features))
        self.register_buffer("running_var", torch.ones(num_contexts, num_features))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        reduce_dims = [0, *range(2, x.dim())]
        channel_shape = (1, -1) + (1,) * (x.dim() - 2)
        pieces, rows = [], []
        for k in torch.unique(context).tolist():
            rows_k = torch.nonzero(context == k).flatten()
            members = x.index_select(0, rows_k)
            var, mean = torch.var_mean(members, dim=reduce_dims, correction=0)
            with torch.no_grad():
                count = members.numel() // members.shape[1]
                self.running_mean[k].lerp_(mean, self.momentum)
                self.running_var[k].lerp_(var * count / max(count - 1, 1), self.momentum)
            scale = torch.rsqrt(var + self.eps) * self.weight[k]
            if self.prior_scaling:
                scale = scale * self.prior[k].rsqrt()
            shift = self.bias[k] - mean * scale
            pieces.append(members * scale.view(channel_shape) + shift.view(channel_shape))
            rows.append(rows_k)
        return x.new_empty(x.shape).index_copy(0, torch.cat(rows), torch.cat(pieces))


class PyTorchImplementation(nn.Module):
    """A context layer run with its native CPU kernels turned off (``CONTEXTNORM_NATIVE=0``
    while it runs): the PyTorch implementation they replace on eager CPU calls."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor, context: object = None) -> Tensor:
        previous = os.environ.get(native.ENVIRONMENT_SWITCH)
        os.environ[native.ENVIRONMENT_SWITCH] = "0"
        try:
            return self.layer(x) if context is None else self.layer(x, context)
        finally:
            if previous is None:
                del os.environ[native.ENVIRONMENT_SWITCH]
            else:
                os.environ[native.ENVIRONMENT_SWITCH] = previous


@dataclass
class Configuration:
    """One timed layer: its label, K (``None`` where it has none), module and extra inputs."""

    layer: str
    num_contexts: int | None
    module: nn.Module | Callable[..., Tensor]
    extra_inputs: tuple[object, ...] = ()
    target: float | None = None
    seconds: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)


def build_configurations(
    channels: int,
    batch: int,
    device: torch.device,
    seed: int,
    shape: Sequence[int] | None = None,
    compiled: bool = False,
) -> list[Configuration]:
    """Every configuration of the benchmark for one input shape, BatchNorm first."""
    generator = torch.Generator().manual_seed(seed)
    shape_key = tuple(shape) if shape is not None else None
    target = CONTEXT_TARGETS.get(shape_key) if shape_key is not None else None

    def random_ids(num_contexts: int) -> contextnorm.CheckedContext:
        ids = torch.randint(num_contexts, (batch,), generator=generator).to(device)
        return contextnorm.check_context(ids, num_contexts)

    context_layers: dict[str, Callable[[int], nn.Module]] = {
        "CN": lambda k: contextnorm.ContextNorm(channels, k),
        # The steady state: with K larger than the batch, the data-dependent start would run on
        # every timed step (it lasts until each context has been seen once in training).
        "CN-X": lambda k: contextnorm.ContextNormX(channels, k, data_init=False),
        "CN-E": lambda k: contextnorm.ContextNormE(channels, k, data_init=False),
        "CN (loop)": lambda k: LoopContextNorm(channels, k),
    }
    mixture_layers: dict[str, Callable[[int], nn.Module]] = {
        "ACN (momentum)": lambda k: contextnorm.AdaptiveContextNorm(channels, k, update="momentum"),
        "ACN (gradient)": lambda k: contextnorm.AdaptiveContextNorm(channels, k, update="gradient"),
        "MixNorm": lambda k: contextnorm.MixtureNorm(channels, k),
        "ModeNorm": lambda k: contextnorm.ModeNorm(channels, k),
    }
    configurations = [Configuration(REFERENCE, None, nn.BatchNorm2d(channels))]
    for name, build in context_layers.items():
        for k in CONTEXT_COUNTS:
            ids = random_ids(k)
            if name in CONTEXT_LAYERS:
                configurations.append(Configuration(name, k, build(k), (ids,), target))
            else:
                configurations.append(Configuration(name, k, build(k), (ids.value,)))
    if device.type == "cpu" and native.kernels() is not None:
        for name in CONTEXT_LAYERS:
            module = PyTorchImplementation(context_layers[name](COMPILED_COUNT))
            ids = random_ids(COMPILED_COUNT)
            configurations.append(
                Configuration(f"{name} (PyTorch)", COMPILED_COUNT, module, (ids,))
            )
    if compiled:
        # Each compiled layer adds an entry to the cache of the one forward they share; a model
        # compiled as a whole inlines its layers instead.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for name in CONTEXT_LAYERS:
            module = context_layers[name](COMPILED_COUNT)
            module.validate_context = False  # the ids are checked once, outside the graph
            step = torch.compile(module.to(device).train(), fullgraph=True)
            ids = random_ids(COMPILED_COUNT).value
            configurations.append(Configuration(f"{name} (compiled)", COMPILED_COUNT, step, (ids,)))
    for name, build in mixture_layers.items():
        for k in MIXTURE_COUNTS:
            aimed = name.startswith("ACN") and k == ACN_TARGET_COUNT and shape_key == LARGE_SHAPE
            goal = ACN_TARGET if aimed else None
            configurations.append(Configuration(name, k, build(k), (), goal))
    if device.type == "cpu" and native.kernels() is not None:
        for name in ("ACN (momentum)", "MixNorm"):
            module = PyTorchImplementation(mixture_layers[name](ACN_TARGET_COUNT))
            label = f"{name.removesuffix(')')}, PyTorch)" if "(" in name else f"{name} (PyTorch)"
            configurations.append(Configuration(label, ACN_TARGET_COUNT, module, (None,)))
    configurations.append(Configuration("SwitchNorm", None, contextnorm.SwitchNorm(channels)))
    for configuration in configurations:
        if isinstance(configuration.module, nn.Module):
            configuration.module.to(device).train()
    return configurations


def timing(configuration: Configuration, x: Tensor, upstream: Tensor, number: int) -> float:
    """Seconds per forward and backward pass, by ``torch.utils.benchmark`` (CUDA synchronised)."""
    module = configuration.module

    def step() -> None:
        x.grad = None
        if isinstance(module, nn.Module):
            module.zero_grad(set_to_none=True)
        module(x, *configuration.extra_inputs).backward(upstream)

    timer = benchmark.Timer(
        stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads()
    )
    return timer.timeit(number).mean


def calibrate(
    configurations: Sequence[Configuration], x: Tensor, upstream: Tensor
) -> dict[int, int]:
    """Passes per timing for each configuration: about 10 ms of work, at most ``MAX_NUMBER``."""
    numbers = {}
    for c in configurations:
        seconds = timing(c, x, upstream, 1)
        numbers[id(c)] = max(1, min(MAX_NUMBER, int(0.01 / max(seconds, 1e-6))))
    return numbers


def time_pair(
    reference: Configuration,
    configuration: Configuration,
    x: Tensor,
    upstream: Tensor,
    numbers: dict[int, int],
    order: random.Random,
    repeats: int,
) -> tuple[float, float]:
    """Seconds of ``configuration`` and of ``reference``, each the fastest of alternating passes.

    Interference from other jobs only ever adds time, so the fastest of a few passes is the
    least disturbed estimate. Passes stop after ``repeats`` or once the pair has used
    ``PAIR_BUDGET_SECONDS``. Which of the two runs first is drawn at random.
    """
    pair = [reference, configuration]
    order.shuffle(pair)
    fastest = {id(c): math.inf for c in pair}
    started = time.perf_counter()
    for _ in range(repeats):
        for c in pair:
            fastest[id(c)] = min(fastest[id(c)], timing(c, x, upstream, numbers[id(c)]))
        if time.perf_counter() - started > PAIR_BUDGET_SECONDS:
            break
    return fastest[id(configuration)], fastest[id(reference)]


def run_round(
    reference: Configuration,
    configurations: list[Configuration],
    x: Tensor,
    upstream: Tensor,
    numbers: dict[int, int],
    order: random.Random,
    repeats: int,
) -> list[tuple[Configuration, float, float]]:
    """Time every configuration once in a shuffled order, each beside its own BatchNorm timing."""
    shuffled = list(configurations)
    order.shuffle(shuffled)
    return [(c, *time_pair(reference, c, x, upstream, numbers, order, repeats)) for c in shuffled]


def record_round(
    reference: Configuration, measurements: list[tuple[Configuration, float, float]]
) -> None:
    for configuration, seconds, reference_seconds in measurements:
        configuration.seconds.append(seconds)
        configuration.ratios.append(seconds / reference_seconds)
        reference.seconds.append(reference_seconds)
        reference.ratios.append(1.0)


@dataclass
class Summary:
    """A configuration's result over the measured rounds."""

    shape: tuple[int, ...]
    layer: str
    num_contexts: int | None
    median_ms: float
    ratio_median: float
    ratio_q1: float
    ratio_q3: float
    target: float | None

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.ratio_median <= self.target


def summarize(configuration: Configuration, shape: Sequence[int]) -> Summary:
    ratios = configuration.ratios
    if len(ratios) > 1:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    else:
        q1 = q3 = ratios[0]
    return Summary(
        shape=tuple(shape),
        layer=configuration.layer,
        num_contexts=configuration.num_contexts,
        median_ms=1e3 * statistics.median(configuration.seconds),
        ratio_median=statistics.median(ratios),
        ratio_q1=q1,
        ratio_q3=q3,
        target=configuration.target,
    )


def machine_description(device: torch.device) -> dict[str, str]:
    """What the numbers depend on: processor, threads, torch version, date."""
    if device.type == "cuda":
        processor = torch.cuda.get_device_name(device)
    else:
        processor = platform.processor() or "unknown"
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists():
            for line in cpuinfo.read_text().splitlines():
                if line.startswith("model name"):
                    processor = line.split(":", 1)[1].strip()
                    break
    if device.type != "cpu":
        kernels = "not used (CPU only)"
    elif native.kernels() is None:
        kernels = f"off ({native.ENVIRONMENT_SWITCH}=0 or not built): the PyTorch implementation"
    else:
        kernels = "on (CN, CN-X, CN-E with known ids; the ACN and MixNorm transform in training)"
    return {
        "machine": processor,
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "native": kernels,
    }


def _format_k(num_contexts: int | None) -> str:
    return "-" if num_contexts is None else str(num_contexts)


def _format_met(met: bool | None) -> str:
    return "-" if met is None else ("yes" if met else "no")


def markdown_report(
    summaries: list[Summary],
    machine: dict[str, str],
    device: torch.device,
    rounds_done: int,
    rounds: int,
    warmup: int,
    repeats: int,
    load: Sequence[float],
) -> str:
    lines = [
        "# Normalization layers: forward + backward time relative to BatchNorm2d",
        "",
        f"- Machine: {machine['machine']} ({device.type}), {machine['threads']} torch threads",
        f"- torch {machine['torch']}, {machine['date']}",
        f"- contextnorm's native CPU kernels: {machine['native']}",
        (
            "- Machine load (this run included): 1-minute load average "
            f"{min(load):.1f}-{max(load):.1f} over the rounds, on {os.cpu_count()} logical CPUs; "
            "a load above the CPU count means other jobs shared the machine"
        ),
        f"- float32, training mode; rounds: {rounds_done} of {rounds} measured after {warmup} "
        "warm-up",
        (
            "- Each round times every configuration once in a shuffled order, each beside its own "
            f"BatchNorm2d timing: up to {repeats} alternating passes of the two (fewer once the "
            f"pair has used {PAIR_BUDGET_SECONDS:g} s), each pass a torch.utils.benchmark timing "
            "of "
            "about 10 ms of steps, the fastest of each kept. The ratio is the configuration's time "
            "over that BatchNorm2d time. Reported: median over rounds and IQR (25th-75th "
            "percentile) of the ratio; BatchNorm2d's ms is the median of all its timings."
        ),
        (
            "- Context ids are uniform at random over K, checked once before timing; CN-X and CN-E "
            "are timed in their steady state (data_init=False: the data-dependent start, which "
            "runs until every context has been seen once in training, is not timed); CN (loop) "
            "is a per-context Python loop with autograd, the straightforward implementation; "
            "(PyTorch): the layer with its native kernels turned off; "
            "(compiled): torch.compile(fullgraph=True) of the layer, inductor backend."
        ),
    ]
    for shape in dict.fromkeys(s.shape for s in summaries):
        lines += [
            "",
            f"## Input {shape}",
            "",
            "| layer | K | median ms | ratio vs BN (median) | ratio IQR | target | met |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for s in summaries:
            if s.shape != shape:
                continue
            target = "-" if s.target is None else f"<= {s.target:g}x"
            lines.append(
                f"| {s.layer} | {_format_k(s.num_contexts)} | {s.median_ms:.3f} | "
                f"{s.ratio_median:.2f}x | "
                f"{s.ratio_q1:.2f}-{s.ratio_q3:.2f} | {target} | {_format_met(s.met)} |"
            )
    return "\n".join(lines) + "\n"


def csv_report(summaries: list[Summary], machine: dict[str, str], device: torch.device) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "shape",
            "layer",
            "K",
            "median_ms",
            "ratio_median",
            "ratio_q1",
            "ratio_q3",
            "target",
            "met",
            "device",
            "machine",
            "threads",
            "torch",
            "date",
        ]
    )
    for s in summaries:
        writer.writerow(
            [
                "x".join(map(str, s.shape)),
                s.layer,
                "" if s.num_contexts is None else s.num_contexts,
                f"{s.median_ms:.4f}",
                f"{s.ratio_median:.4f}",
                f"{s.ratio_q1:.4f}",
                f"{s.ratio_q3:.4f}",
                "" if s.target is None else s.target,
                "" if s.met is None else _format_met(s.met),
                device.type,
                machine["machine"],
                machine["threads"],
                machine["torch"],
                machine["date"],
            ]
        )
    return buffer.getvalue()


def parse_shape(text: str) -> tuple[int, int, int, int]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--shape must be four integers N,C,H,W, got {text!r}"
        ) from None
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"--shape must be four positive integers N,C,H,W, got {text!r}"
        )
    return shape  # type: ignore[return-value]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds", type=positive_int, default=7, help="measured rounds (default 7)"
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=3,
        help="alternating passes per configuration and its BatchNorm in a round, the fastest "
        f"kept; fewer once the pair has used {PAIR_BUDGET_SECONDS:g} s (default 3)",
    )
    parser.add_argument(
        "--warmup", type=non_negative_int, default=1, help="discarded rounds first (default 1)"
    )
    parser.add_argument(
        "--shape",
        type=parse_shape,
        action="append",
        dest="shapes",
        help="input N,C,H,W; repeat for several (default: 32,16,8,8 128,64,8,8 256,128,16,16)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--compile",
        action="store_true",
        help=f"also time CN, CN-X, CN-E (K={COMPILED_COUNT}) compiled",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: shape {QUICK_SHAPE}, {QUICK_ROUNDS} rounds, {QUICK_WARMUP} warm-up, "
        f"{QUICK_REPEATS} pass per timing",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch intra-op threads (default: torch's own choice); the result files then "
        "carry a _threads<N> suffix",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR,
        help="folder for layers_<device>.md and .csv (default benchmarks/results)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available; use --device cpu")
    if args.quick:
        args.shapes, args.rounds, args.warmup = [QUICK_SHAPE], QUICK_ROUNDS, QUICK_WARMUP
        args.repeats = QUICK_REPEATS
    args.shapes = args.shapes or list(DEFAULT_SHAPES)
    return args


def main(argv: Sequence[str] | None = None) -> list[Summary]:
    """Run the benchmark, write ``layers_<device>.md`` and ``.csv`` into ``--out``, print the table.

    Returns the summaries, per shape BatchNorm2d first.
    """
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    order = random.Random(args.seed)
    machine = machine_description(device)
    stem = f"layers_{device.type}" + ("" if args.threads is None else f"_threads{args.threads}")
    setups = []
    for shape in args.shapes:
        reference, *configurations = build_configurations(
            shape[1], shape[0], device, args.seed, shape, args.compile
        )
        x = torch.randn(shape, device=device, requires_grad=True)
        upstream = torch.randn(shape, device=device)
        numbers = calibrate([reference, *configurations], x, upstream)
        setups.append((shape, reference, configurations, x, upstream, numbers))

    for _ in range(args.warmup):
        for _, reference, configurations, x, upstream, numbers in setups:
            run_round(reference, configurations, x, upstream, numbers, order, args.repeats)
    summaries: list[Summary] = []
    load = []
    for done in range(1, args.rounds + 1):
        started = time.perf_counter()
        load.append(os.getloadavg()[0])
        summaries = []
        for shape, reference, configurations, x, upstream, numbers in setups:
            measurements = run_round(
                reference, configurations, x, upstream, numbers, order, args.repeats
            )
            record_round(reference, measurements)
            summaries += [summarize(c, shape) for c in (reference, *configurations)]
        report = markdown_report(
            summaries, machine, device, done, args.rounds, args.warmup, args.repeats, load
        )
        atomic_write_text(args.out / f"{stem}.md", report)
        atomic_write_text(args.out / f"{stem}.csv", csv_report(summaries, machine, device))
        print(
            f"round {done}/{args.rounds}: {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    print(report)
    return summaries


if __name__ == "__main__":
    main()
