"""Mixed precision and large activations, with BatchNorm on the same inputs as the yardstick.

Under autocast a layer must give what it gives in float32 on the same (rounded) input, within
the low-precision dtype's own tolerance, wherever BatchNorm does; and no non-finite value where
BatchNorm has none. In float32, activations far from zero must not lose more accuracy against
float64 than BatchNorm loses (within 10x).
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import contextnorm as cn
from helpers import call, one_thread

K = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def build(name: str, channels: int) -> nn.Module:
    torch.manual_seed(0)
    return {
        "bn": lambda: nn.BatchNorm1d(channels),
        "cn": lambda: cn.ContextNorm(channels, K),
        "cnx": lambda: cn.ContextNormX(channels, K),
        "cne": lambda: cn.ContextNormE(channels, K),
        "modenorm": lambda: cn.ModeNorm(channels, K),
        "switchnorm": lambda: cn.SwitchNorm(channels),
    }[name]()


def run(
    layer: nn.Module,
    x: torch.Tensor,
    context: torch.Tensor,
    upstream: torch.Tensor,
    autocast: torch.dtype | None,
) -> dict:
    """Output, input gradient and running buffers of one training step of ``layer``.

    The backward pass runs outside the autocast block, as PyTorch's AMP recipe does.
    """
    x = x.detach().clone().requires_grad_()
    flat = x.reshape(x.shape[0], x.shape[1], -1) if isinstance(layer, nn.BatchNorm1d) else x
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        y = call(layer, flat, context).reshape(x.shape)
    y.backward(upstream.to(y.dtype))
    buffers = {k: v.clone() for k, v in layer.named_buffers() if v.is_floating_point()}
    return {"y": y.detach(), "grad": x.grad, "buffers": buffers}


def within(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    """``torch.testing``'s default tolerance for ``dtype``, relative to the tensor's largest value.

    A normalisation's input gradient is a difference of nearly equal terms in places, so
    some of its elements are far smaller than the rounding of the others: the error is
    measured against the tensor's scale (max norm), not element by element.
    """
    rtol, atol = _TOLERANCE[dtype]
    error = (got.float() - expected.float()).abs().max()
    return bool(error <= atol + rtol * expected.float().abs().max())


_TOLERANCE = {torch.bfloat16: (1.6e-2, 1e-5), torch.float16: (1e-3, 1e-5)}
LAYERS = ("cn", "cnx", "cne", "modenorm", "switchnorm")
SHAPES = ((12, 4), (12, 4, 5), (12, 6, 3, 3))
MAGNITUDES = (
    (0.0, 1.0),
    (0.0, 1e-2),
    (3.0, 0.1),
    (10.0, 1.0),
    (100.0, 1.0),
    (0.0, 300.0),
    (1e3, 10.0),
)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", LAYERS)
def test_autocast_matches_float32_wherever_batchnorm_does(name: str, dtype: torch.dtype) -> None:
    context = torch.arange(12) % K
    failures = []
    cases = 0
    for shape, (offset, std), seed in itertools.product(SHAPES, MAGNITUDES, range(2)):
        generator = torch.Generator().manual_seed(seed)
        x = (offset + std * torch.randn(shape, generator=generator)).to(dtype)
        # Both runs get the same rounded input and upstream gradient: what is measured is the
        # layer's own computation.
        upstream = torch.randn(shape, generator=generator).to(dtype).float()
        results = {}
        for layer_name in ("bn", name):
            layer = build(layer_name, shape[1])
            reference = copy.deepcopy(layer)
            low = run(layer, x, context, upstream, dtype)
            high = run(reference, x.float(), context, upstream, None)
            results[layer_name] = (low, high)
        cases += 1
        (bn_low, bn_high), (low, high) = results["bn"], results[name]
        assert low["y"].dtype == dtype, "the output keeps the input's dtype, as BatchNorm's"
        for key, value in low["buffers"].items():
            assert value.dtype == torch.float32 and torch.isfinite(value).all(), key
        for quantity in ("y", "grad"):
            if (
                torch.isfinite(bn_low[quantity].float()).all()
                and not torch.isfinite(low[quantity].float()).all()
            ):
                failures.append(
                    f"{shape} offset={offset} std={std} seed={seed}: non-finite {quantity}"
                )
            if within(bn_low[quantity], bn_high[quantity], dtype) and not within(
                low[quantity], high[quantity], dtype
            ):
                error = (low[quantity].float() - high[quantity]).abs().max().item()
                failures.append(
                    f"{shape} offset={offset} std={std} seed={seed}: {quantity} off by {error:.3g}"
                )
        for key, value in low["buffers"].items():
            torch.testing.assert_close(value, high["buffers"][key], rtol=2e-2, atol=1e-3)
    assert cases == len(SHAPES) * len(MAGNITUDES) * 2
    assert not failures, "\n".join(failures)


def float64_error(layer: nn.Module, x: torch.Tensor, context: torch.Tensor | None) -> float:
    """Max error of the float32 output against the same layer (same state) in float64."""
    wide = copy.deepcopy(layer).double()
    narrow = copy.deepcopy(layer)
    flat = (
        (lambda t: t.reshape(t.shape[0], t.shape[1], -1))
        if isinstance(layer, nn.BatchNorm1d)
        else (lambda t: t)
    )
    expected = call(wide, flat(x.double()), context)
    got = call(narrow, flat(x), context)
    return (got.double() - expected).abs().max().item()


@pytest.mark.parametrize("ratio", [1e2, 1e3, 1e4])
@pytest.mark.parametrize(
    "name, mode",
    [
        ("cn", "train"),
        ("modenorm", "train"),
        ("switchnorm", "train"),
        ("cn", "unknown"),
        ("cnx", "unknown"),
        ("cne", "unknown"),
    ],
)
def test_float32_far_from_zero_within_ten_times_batchnorm(
    name: str, mode: str, ratio: float
) -> None:
    """x = offset + std * noise with offset / std = ``ratio``; "unknown": the posterior path (ids
    of -1)."""
    torch.manual_seed(0)
    known = torch.arange(16) % K
    context = torch.tensor([-1, 0, 1, 2] * 4) if mode == "unknown" else known
    for std in (1.0, 1e-2):
        x = ratio * std + std * torch.randn(16, 6, 4, 4)
        layer = build(name, 6)
        call(layer, x, known)  # running statistics / the data-dependent start from this data
        if mode == "unknown":
            layer.train(name != "cn")
        bn = nn.BatchNorm1d(6)
        bn_error = float64_error(bn, x, None)
        error = float64_error(layer, x, context)
        assert error <= max(10 * bn_error, 1e-5), (
            f"std={std}: error {error:.3g}, BatchNorm {bn_error:.3g}"
        )


@pytest.mark.parametrize("grouping", ["ids", "weights"])
def test_group_sums_of_two_halves_add_up_to_the_whole_batch(grouping: str) -> None:
    """What a multi-process layer all-reduces: the sums of each process's group statistics,
    around a shift every process shares (here one far from the data's mean), give the
    statistics of the whole batch."""
    from contextnorm import functional as F

    torch.manual_seed(0)
    x = 1e3 + torch.randn(12, 5, 7, dtype=torch.float64)
    ids = torch.arange(12) % K
    weights = torch.softmax(torch.randn(12, K, dtype=torch.float64), 1)
    moments = F.sample_moments(x)
    shift = moments.mean[:K].clone() + 3.0 if grouping == "ids" else moments.mean[0] + 3.0

    def sums(rows: slice) -> F.GroupSums:
        by = {"ids": ids[rows]} if grouping == "ids" else {"weights": weights[rows]}
        return F.group_sums(moments.mean[rows], moments.var[rows], 7, shift, **by)

    halves = [sums(slice(0, 5)), sums(slice(5, 12))]
    combined = F.GroupSums(*(a + b for a, b in zip(*halves, strict=True)))
    mean, var = F.group_moments(combined, shift)
    by = {"ids": ids, "num_groups": K} if grouping == "ids" else {"weights": weights}
    expected_mean, expected_var, count = F.pooled_moments(moments.mean, moments.var, 7, **by)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(var, expected_var)
    torch.testing.assert_close(combined.count, count)
    if grouping == "ids":
        for k in range(K):
            values = x[ids == k].transpose(0, 1).reshape(5, -1)
            torch.testing.assert_close(var[k], values.var(1, correction=0))
