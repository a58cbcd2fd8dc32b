"""The native CPU kernels against the PyTorch implementation they replace on eager CPU calls.

Every comparison runs the same call twice: with the native kernels (the default) and with
``CONTEXTNORM_NATIVE=0``, which routes it to the PyTorch implementation. Outputs, every
gradient, running statistics and batch counters must agree, for the functional steps and for
the layers built on them.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

import contextnorm as cn
from contextnorm import functional as F
from contextnorm.functional import native
from helpers import one_thread

pytestmark = pytest.mark.skipif(
    native.kernels() is None, reason="the native kernels could not be built on this machine"
)

# Relative to each tensor's largest value: the two implementations round differently (fused
# multiply-adds, summation order), and an output computed as x * scale + shift carries the
# rounding of its largest terms.
TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-12}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


def run_both(
    monkeypatch: pytest.MonkeyPatch, compute: Callable[[], list[Tensor]]
) -> tuple[list[Tensor], list[Tensor]]:
    """``compute()`` with the native kernels, then with the PyTorch implementation."""
    native_result = compute()
    with monkeypatch.context() as patch:
        patch.setenv(native.ENVIRONMENT_SWITCH, "0")
        assert native.kernels() is None
        reference = compute()
    return native_result, reference


def assert_all_close(
    got: list[Tensor], expected: list[Tensor], dtype: torch.dtype, tolerance: float | None = None
) -> None:
    assert len(got) == len(expected)
    for index, (a, b) in enumerate(zip(got, expected, strict=True)):
        if b is None:
            assert a is None, f"item {index}"
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, f"item {index}"
        tolerance = tolerance or TOLERANCE[dtype]
        if not b.is_floating_point():
            assert torch.equal(a, b), f"item {index} differs"
            continue
        scale = float(b.detach().abs().max()) if b.numel() else 1.0
        torch.testing.assert_close(
            a, b, atol=tolerance * max(scale, 1.0), rtol=tolerance, msg=f"item {index} differs"
        )


def is_native(y: Tensor) -> bool:
    """Whether a native kernel's autograd node is in ``y``'s graph."""
    pending, seen = [y.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "contextnorm::" in node.name():
            return True
        pending.extend(next_node for next_node, _ in node.next_functions)
    return False


def leaves(*tensors: Tensor | None) -> list[Tensor | None]:
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


CASES = [
    # (N, C, L, K, with gain, weight shape per context, empty contexts)
    pytest.param(12, 5, 7, 3, True, True, id="gain-weights-per-context"),
    pytest.param(12, 5, 7, 3, False, False, id="shared-weights"),
    pytest.param(9, 4, 1, 20, False, True, id="one-position-empty-contexts"),
    pytest.param(30, 3, 16, 1, True, True, id="one-context"),
]


def batch(n: int, c: int, length: int, k: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    # Far from zero: the statistics must stay accurate there.
    x = torch.randn(n, c, length, generator=generator, dtype=dtype) * 3 + 50
    ids = torch.randint(0, k, (n,), generator=generator)
    ids[: min(k, n)] = torch.arange(min(k, n))  # every context that fits holds a sample
    return x, ids, generator


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "c", "length", "k", "with_gain", "per_context"), CASES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_context_batch_norm_matches_pytorch(
    monkeypatch: pytest.MonkeyPatch,
    dtype: torch.dtype,
    n: int,
    c: int,
    length: int,
    k: int,
    with_gain: bool,
    per_context: bool,
    momentum: float | None,
) -> None:
    x, ids, generator = batch(n, c, length, k, dtype)
    # Per-context affine parameters, or none (CN with affine=False).
    weight = torch.randn(k, c, generator=generator, dtype=dtype) if per_context else None
    bias = torch.randn(k, c, generator=generator, dtype=dtype) if per_context else None
    gain = torch.rand(k, 1, generator=generator, dtype=dtype) + 0.5 if with_gain else None
    upstream = torch.randn(n, c, length, generator=generator, dtype=dtype)
    start_mean = torch.randn(k, c, generator=generator, dtype=dtype)

    def compute() -> list[Tensor]:
        xs, ws, bs = leaves(x, weight, bias)
        running_mean, running_var = start_mean.clone(), torch.ones(k, c, dtype=dtype)
        batches = torch.full((k,), 2, dtype=torch.long)
        results = []
        for _ in range(2):  # twice: the cumulative average's second step uses the counter
            y, mean, var, count = F.context_batch_norm(
                xs, ids, k, 1e-5, gain, ws, bs, running_mean, running_var, batches, momentum
            )
            results += [y, mean, var, count]
        wanted = [t for t in (xs, ws, bs) if t is not None]
        grads = torch.autograd.grad(y, wanted, upstream)
        return [*results, *grads, running_mean, running_var, batches]

    got, expected = run_both(monkeypatch, compute)
    assert_all_close(got, expected, dtype)
    if k == 20:  # contexts without data keep their running statistics and counters
        absent = torch.ones(k, dtype=torch.bool)
        absent[ids] = False
        assert absent.any()
        assert torch.equal(got[-3][absent], start_mean[absent])
        assert bool((got[-1][absent] == 2).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "c", "length", "k", "with_gain", "per_context"), CASES)
def test_context_affine_matches_pytorch(
    monkeypatch: pytest.MonkeyPatch,
    dtype: torch.dtype,
    n: int,
    c: int,
    length: int,
    k: int,
    with_gain: bool,
    per_context: bool,
) -> None:
    x, ids, generator = batch(n, c, length, k, dtype)
    shape = (k, c) if per_context else (c,)
    weight = torch.randn(shape, generator=generator, dtype=dtype)
    bias = torch.randn(shape, generator=generator, dtype=dtype)
    gain = torch.rand(k, 1, generator=generator, dtype=dtype) + 0.5 if with_gain else None
    # A strided (transposed) table, as CN-E's encoders produce.
    mean = (torch.randn(c, k, generator=generator, dtype=dtype) + 50).t()
    var = torch.rand(k, c, generator=generator, dtype=dtype) * 9 + 0.1
    upstream = torch.randn(n, c, length, generator=generator, dtype=dtype)

    def compute() -> list[Tensor]:
        xs, ms, vs, ws, bs = leaves(x, mean, var, weight, bias)
        y = F.context_affine(xs, ids, ms, vs, 1e-5, gain, ws, bs)
        return [y, *torch.autograd.grad(y, (xs, ms, vs, ws, bs), upstream)]

    got, expected = run_both(monkeypatch, compute)
    assert_all_close(got, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offsets", [True, False])
def test_learned_context_affine_matches_pytorch(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, offsets: bool
) -> None:
    n, c, length, k = 11, 4, 6, 3
    x, ids, generator = batch(n, c, length, k, dtype)
    mean = (torch.randn(c, k, generator=generator, dtype=dtype) + 50).t()  # CN-E: W.t()
    # Raw values on both sides of softplus's linear region (above 20) and far below zero.
    raw_std = torch.randn(k, c, generator=generator, dtype=dtype)
    raw_std[0, 0], raw_std[1, 1] = 25.0, -30.0
    mean_offset = torch.randn(c, generator=generator, dtype=dtype) if offsets else None
    raw_offset = torch.randn(c, generator=generator, dtype=dtype) * 0.1 if offsets else None
    weight = torch.randn(c, generator=generator, dtype=dtype)
    bias = torch.randn(c, generator=generator, dtype=dtype)
    upstream = torch.randn(n, c, length, generator=generator, dtype=dtype)

    def compute() -> list[Tensor]:
        inputs = leaves(x, mean, raw_std, weight, bias, mean_offset, raw_offset)
        xs, ms, rs, ws, bs, mo, ro = inputs
        y = F.learned_context_affine(xs, ids, ms, rs, 1e-5, None, ws, bs, mo, ro)
        wanted = [t for t in inputs if t is not None]
        return [y, *torch.autograd.grad(y, wanted, upstream)]

    got, expected = run_both(monkeypatch, compute)
    assert_all_close(got, expected, dtype)


@pytest.mark.parametrize("step", ["context_batch_norm", "context_affine", "learned"])
def test_native_gradients_pass_gradcheck(step: str) -> None:
    generator = torch.Generator().manual_seed(3)
    n, c, length, k = 7, 3, 5, 3
    x = torch.randn(n, c, length, generator=generator, dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, 0, 1, 1, 0])
    weight = torch.randn(k, c, generator=generator, dtype=torch.float64)
    bias = torch.randn(k, c, generator=generator, dtype=torch.float64)
    gain = torch.rand(k, 1, generator=generator, dtype=torch.float64) + 0.5
    mean = torch.randn(k, c, generator=generator, dtype=torch.float64)
    var = torch.rand(k, c, generator=generator, dtype=torch.float64) + 0.5
    assert native.kernels() is not None
    if step == "context_batch_norm":

        def function(*inputs: Tensor) -> Tensor:
            return F.context_batch_norm(inputs[0], ids, k, 1e-5, gain, *inputs[1:])[0]

        inputs = leaves(x, weight, bias)
    elif step == "context_affine":

        def function(*inputs: Tensor) -> Tensor:
            xs, ms, vs, ws, bs = inputs
            return F.context_affine(xs, ids, ms, vs, 1e-5, gain, ws, bs)

        inputs = leaves(x, mean, var, weight, bias)
    else:

        def function(*inputs: Tensor) -> Tensor:
            xs, ms, rs, ws, bs, mo, ro = inputs
            return F.learned_context_affine(xs, ids, ms, rs, 1e-5, gain, ws, bs, mo, ro)

        offsets = torch.randn(2, c, generator=generator, dtype=torch.float64)
        inputs = leaves(x, mean, var, weight, bias, offsets[0], offsets[1])
    assert is_native(function(*inputs))
    assert torch.autograd.gradcheck(function, tuple(inputs))


def test_native_results_do_not_depend_on_the_thread_count() -> None:
    x, ids, _ = batch(64, 96, 300, 5, torch.float32)
    x.requires_grad_()
    upstream = torch.randn_like(x)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        y, mean, var, _ = F.context_batch_norm(x, ids, 5, 1e-5)
        (grad,) = torch.autograd.grad(y, x, upstream)
        results.append([y, mean, var, grad])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


LAYERS = {
    "cn": lambda: cn.ContextNorm(6, 3, momentum=None, prior_scaling=True),
    "cnx": lambda: cn.ContextNormX(6, 3, prior_scaling=True),
    "cne": lambda: cn.ContextNormE(6, 3),
    "cne-mlp": lambda: cn.ContextNormE(6, 3, hidden_features=5),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layers_train_and_evaluate_as_with_pytorch(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    torch.manual_seed(0)
    start = LAYERS[name]()
    with torch.no_grad():
        for parameter in start.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    xs = [torch.randn(10, 6, 4, 4) * (step + 1) + step for step in range(3)]
    ids = [torch.randint(0, 3, (10,)) for _ in range(3)]
    for context in ids:
        context[:3] = torch.arange(3)

    def compute() -> list[Tensor]:
        layer = copy.deepcopy(start)
        results = []
        for x, context in zip(xs, ids, strict=True):
            x = x.clone().requires_grad_()
            y = layer(x, context)
            paths.append(is_native(y))
            results += [y, *torch.autograd.grad(y.square().sum(), (x, *layer.parameters()))]
        layer.eval()
        with torch.no_grad():
            results.append(layer(xs[0], ids[0]))
        return results + list(layer.buffers())

    paths: list[bool] = []
    got, expected = run_both(monkeypatch, compute)
    assert paths == [True] * 3 + [False] * 3
    assert_all_close(got, expected, torch.float32)


@pytest.fixture
def mixture_path(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, per call of the mixture transform, whether its native passes ran."""
    from contextnorm.functional import mixture

    calls: list[bool] = []
    choose = mixture._native_passes

    def spy(*args: object) -> object:
        kernels = choose(*args)
        calls.append(kernels is not None)
        return kernels

    monkeypatch.setattr(mixture, "_native_passes", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("posterior_grad", "batch_gain", "floor"),
    [(True, False, 0.0), (True, True, 0.4), (False, False, 0.0)],
)
def test_mixture_transform_matches_pytorch(
    monkeypatch: pytest.MonkeyPatch,
    mixture_path: list[bool],
    dtype: torch.dtype,
    posterior_grad: bool,
    batch_gain: bool,
    floor: float,
) -> None:
    generator = torch.Generator().manual_seed(5)
    n, c, length, k = 6, 5, 9, 3

    def draw(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype)

    x = draw(n, c, length) * 2 + 30
    reference = x.mean((0, 2))
    alpha, beta, gamma = -draw(k, c).abs() - 0.1, draw(k, c), draw(k)
    gain = None if batch_gain else draw(k).abs() + 0.5
    weight, bias = draw(c), draw(c)
    upstream = draw(n, c, length)

    def compute() -> list[Tensor]:
        inputs = leaves(x, alpha, beta, gamma, gain, weight, bias)
        xs, a, b, g, gn, w, bs = inputs
        out, stats = F.batch_mixture_norm(
            xs, a, b, g, 1e-5, gn, w, bs, posterior_grad, reference, floor
        )
        wanted = [t for t in inputs if t is not None]
        if not posterior_grad:
            wanted = [xs, w, bs] + ([gn] if gn is not None else [])
        return [out, *stats, *torch.autograd.grad(out, wanted, upstream)]

    got, expected = run_both(monkeypatch, compute)
    assert mixture_path == [True, False]
    assert_all_close(got, expected, dtype)


def test_mixture_transform_passes_gradcheck_natively(mixture_path: list[bool]) -> None:
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(3, 4, 5, generator=generator, dtype=torch.float64)
    alpha = -torch.rand(2, 4, generator=generator, dtype=torch.float64) - 0.2
    beta = torch.randn(2, 4, generator=generator, dtype=torch.float64)
    gamma = torch.randn(2, generator=generator, dtype=torch.float64)
    weight = torch.randn(4, generator=generator, dtype=torch.float64)
    bias = torch.randn(4, generator=generator, dtype=torch.float64)

    reference = x.mean((0, 2))  # fixed: the coefficients are around it

    def function(*inputs: Tensor) -> Tensor:
        xs, a, b, g, w, bs = inputs
        return F.batch_mixture_norm(
            xs, a, b, g, 1e-5, None, w, bs, reference=reference, variance_floor=0.3
        )[0]

    assert torch.autograd.gradcheck(function, tuple(leaves(x, alpha, beta, gamma, weight, bias)))
    assert mixture_path and all(mixture_path)


MIXTURE_LAYERS = {
    "acn-momentum": lambda: cn.AdaptiveContextNorm(6, 3, update="momentum"),
    "acn-gradient": lambda: cn.AdaptiveContextNorm(6, 3, update="gradient"),
    "mixnorm": lambda: cn.MixtureNorm(6, 3),
}


@pytest.mark.parametrize("name", sorted(MIXTURE_LAYERS))
def test_mixture_layers_train_as_with_pytorch(
    monkeypatch: pytest.MonkeyPatch, mixture_path: list[bool], name: str
) -> None:
    torch.manual_seed(0)
    start = MIXTURE_LAYERS[name]()
    xs = [torch.randn(8, 6, 4, 4) * (step + 1) + 3 * step for step in range(3)]

    def compute() -> list[Tensor]:
        torch.manual_seed(1)  # the same EM seeds (MixNorm) in both runs
        layer = copy.deepcopy(start)
        results = []
        for x in xs:
            x = x.clone().requires_grad_()
            y = layer(x)
            results += [y, *torch.autograd.grad(y.square().sum(), (x, *layer.parameters()))]
        return results + list(layer.buffers())

    got, expected = run_both(monkeypatch, compute)
    assert mixture_path == [True] * 3 + [False] * 3
    # Three training steps of gradients summed over every position in float32: the two
    # implementations' summation orders differ by more than one step's rounding.
    assert_all_close(got, expected, torch.float32, tolerance=2e-4)


def test_layer_without_a_gradient_runs_under_inference_mode() -> None:
    layer = cn.ContextNorm(4, 2)
    x, ids = torch.randn(6, 4, 3, 3), torch.tensor([0, 1, 0, 1, 0, 1])
    expected = layer(x, ids).detach()
    layer.reset_running_stats()
    with torch.inference_mode():
        torch.testing.assert_close(layer(x, ids), expected)
    assert int(layer.num_batches_tracked.sum()) == 2


def test_bad_direct_calls_raise_instead_of_reading_out_of_bounds() -> None:
    x = torch.randn(4, 3, 5)
    mean, var = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(RuntimeError, match=r"context ids must lie in \[0, 2\), got 2"):
        F.context_affine(x, torch.tensor([0, 1, 2, 0]), mean, var, 1e-5)
    with pytest.raises(RuntimeError, match=r"context ids must lie in \[0, 2\), got -1"):
        F.context_batch_norm(x, torch.tensor([0, 1, -1, 0]), 2, 1e-5)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        F.context_affine(x, torch.tensor([0, 1, 1, 0]), mean, var, 1e-5, None, torch.ones(3, 2))
    with pytest.raises(RuntimeError, match="ids must be an int64"):
        F.context_batch_norm(x, torch.tensor([0, 1]), 2, 1e-5)


def test_momentum_none_without_a_counter_is_refused() -> None:
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        F.context_batch_norm(
            x, torch.tensor([0, 1, 1, 0]), 2, 1e-5, None, None, None,
            torch.zeros(2, 3), torch.ones(2, 3), None, None,
        )  # fmt: skip


def broken_build(*args: object, **kwargs: object) -> None:
    raise RuntimeError("Error building extension: g++ not found")


def test_a_finished_build_is_imported_without_the_build_system(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", broken_build)
    native._build.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.kernels() is not None
    finally:
        native._build.cache_clear()


def test_a_failed_build_warns_once_and_the_layers_still_work(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from torch.utils import cpp_extension

    layer = cn.ContextNorm(3, 2)
    x, ids = torch.randn(4, 3, 5), torch.tensor([0, 1, 1, 0])
    expected = layer(x, ids)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # no finished build there
    monkeypatch.setattr(cpp_extension, "load", broken_build)
    native._build.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built .*g\\+\\+ not found"):
            assert native.kernels() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            assert native.kernels() is None
            torch.testing.assert_close(layer(x, ids), expected)
    finally:
        native._build.cache_clear()
        monkeypatch.undo()
    assert native.kernels() is not None


def test_switched_off_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.ENVIRONMENT_SWITCH, "0")
    assert not native.enabled() and native.kernels() is None
    x = torch.randn(4, 3, 5, requires_grad=True)
    y = F.context_affine(x, torch.tensor([0, 1, 1, 0]), torch.zeros(2, 3), torch.ones(2, 3), 1e-5)
    assert not is_native(y)
