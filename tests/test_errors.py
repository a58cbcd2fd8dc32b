"""Bad input gets a clear error naming the argument and the fix, never a silent NaN."""

from __future__ import annotations

import pytest
import torch

import contextnorm as cn

x = torch.randn(6, 4, 3, 3)


@pytest.mark.parametrize(
    "context, error, message",
    [
        (
            torch.tensor([0, 1, 2, 3, 0, 1]),
            ValueError,
            r"context ids must lie in \[0, 3\).*num_contexts=3",
        ),
        (torch.tensor([0, 1, -2, 0, 1, 2]), ValueError, r"lie in \[0, 3\)"),
        (torch.tensor([0, 1, 2]), ValueError, r"shape \(N,\) = \(6,\)"),
        (torch.zeros(6, 1, dtype=torch.long), ValueError, r"shape \(N,\)"),
        (torch.zeros(6, dtype=torch.bool), TypeError, "not booleans"),
        (torch.zeros(6, dtype=torch.complex64), TypeError, "integer tensor"),
        (
            torch.zeros(6),
            ValueError,
            r"soft context assignments must have shape \(N, K\) = \(6, 3\)",
        ),
        (torch.full((6, 4), 0.25), ValueError, r"\(N, K\) = \(6, 3\)"),
        (torch.full((6, 3), 0.5), ValueError, "sum to 1"),
        (torch.tensor([[1.5, -0.5, 0.0]] * 6), ValueError, "non-negative"),
        ([0, 1, 2, 0, 1, 2], TypeError, "torch.Tensor"),
    ],
)
@pytest.mark.parametrize("layer_class", [cn.ContextNorm, cn.ContextNormX, cn.ContextNormE])
def test_bad_context(layer_class: type, context: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        layer_class(4, 3)(x, context)


@pytest.mark.parametrize(
    "layer",
    [cn.ContextNorm(8, 3), cn.ModeNorm(8, 3), cn.AdaptiveContextNorm(8, 3), cn.SwitchNorm(8)],
)
def test_feature_mismatch_names_layout(layer: torch.nn.Module) -> None:
    args = (x, torch.zeros(6, dtype=torch.long)) if layer.uses_context else (x,)
    with pytest.raises(
        ValueError,
        match=r"expected 8 channels at dim 1.*got shape \(6, 4, 3, 3\).*channel_last=True",
    ):
        layer(*args)


def test_integer_input_and_scalar_input() -> None:
    with pytest.raises(TypeError, match="floating-point"):
        cn.SwitchNorm(4)(torch.ones(6, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        cn.SwitchNorm(4)(torch.ones(4))


@pytest.mark.parametrize(
    "context, error, message",
    [
        (
            torch.tensor([0, 1, -2, 0, 1, 2]),
            ValueError,
            r"lie in \[0, K\).*got values in \[-2, 2\]",
        ),
        (torch.zeros(6, 1, dtype=torch.long), ValueError, r"shape \(N,\)"),
        (torch.full((6, 3), 0.5), ValueError, "sum to 1"),
        ([0, 1, 2, 0, 1, 2], TypeError, "torch.Tensor"),
    ],
)
def test_bad_context_is_refused_where_the_scope_opens(
    context: object, error: type, message: str
) -> None:
    with pytest.raises(error, match=message), cn.use_context(context):
        pytest.fail("the scope opened with a bad context")


def test_scoped_ids_beyond_a_layers_contexts_name_its_count() -> None:
    layer = cn.ContextNormX(4, 2)
    with (
        cn.use_context(torch.arange(6) % 3),
        pytest.raises(ValueError, match=r"lie in \[0, 2\).*num_contexts=2 matches"),
    ):
        layer(x)
    # Shapes are compared in every layer call, checked or not.
    with (
        cn.use_context(torch.tensor([0, 1]), validate=False),
        pytest.raises(ValueError, match=r"shape \(N,\) = \(6,\)"),
    ):
        layer(x)


def test_single_value_per_context_in_training() -> None:
    layer = cn.ContextNorm(4, 3)
    with pytest.raises(ValueError, match=r"context\(s\) \[2\] have a single value per channel"):
        layer(torch.randn(5, 4), torch.tensor([0, 0, 1, 1, 2]))
    # Spatial extent gives a context of one sample enough values; eval needs none.
    assert torch.isfinite(layer(torch.randn(3, 4, 2, 2), torch.tensor([0, 1, 2]))).all()
    layer.eval()
    assert torch.isfinite(layer(torch.randn(1, 4), torch.tensor([2]))).all()


def test_cn_unknown_context_in_training() -> None:
    with pytest.raises(ValueError, match="needs a known context for every sample while training"):
        cn.ContextNorm(4, 3)(x, torch.tensor([0, 1, -1, 0, 1, 2]))
    # CN-X handles it in training through the posterior.
    assert torch.isfinite(cn.ContextNormX(4, 3)(x, torch.tensor([0, 1, -1, 0, 1, 2]))).all()


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: cn.ContextNorm(0, 3), "num_features must be a positive integer"),
        (lambda: cn.ContextNorm(4, 0), "num_contexts must be a positive integer"),
        (lambda: cn.ContextNorm(4, 2.5), "num_contexts must be a positive integer"),
        (lambda: cn.ContextNorm(4, 3, eps=0), "eps must be positive"),
        (lambda: cn.ContextNorm(4, 3, momentum=1.5), "momentum must be a float in"),
        (
            lambda: cn.ContextNorm(4, 3, prior=[0.5, 0.5]),
            r"prior must hold one probability per context: shape \(3,\)",
        ),
        (lambda: cn.ContextNormX(4, 2, prior=[1.0, 0.0]), "finite and positive"),
        (lambda: cn.AdaptiveContextNorm(4, 3, update="adam"), "update must be one of"),
        (lambda: cn.MixtureNorm(4, 3, em_steps=0), "em_steps must be a positive integer"),
        (lambda: cn.ModeNorm(4, 0), "num_contexts must be a positive integer"),
        (lambda: cn.SwitchNorm(4, momentum=-0.5), "momentum must be a float in"),
    ],
)
def test_bad_constructor_arguments(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_k_mismatch_between_context_and_layer() -> None:
    layer = cn.ContextNorm(4, 2)
    with pytest.raises(ValueError, match="num_contexts=2 matches how the contexts were built"):
        layer(x, torch.arange(6) % 3)
