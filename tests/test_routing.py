"""Converting existing models and routing contexts to layers deep inside them."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import contextnorm as cn


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.inner = nn.Sequential(
            nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels), nn.ReLU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(torch.relu(self.bn(self.conv(x))))


class TinyResNet(nn.Module):
    """Nested Sequential/Module tree with BatchNorm at several depths, as in a ResNet."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stages = nn.Sequential(Block(8), nn.Sequential(Block(8)))
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def trained_batchnorm_model() -> TinyResNet:
    torch.manual_seed(0)
    model = TinyResNet()
    for _ in range(3):
        model(torch.randn(16, 3, 4, 4) * 2 + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.normal_()
                module.bias.normal_()
    return model


@pytest.mark.parametrize(
    "layer",
    [
        cn.ContextNorm,
        cn.ContextNormX,
        cn.ContextNormE,
        cn.AdaptiveContextNorm,
        cn.MixtureNorm,
        cn.ModeNorm,
    ],
)
def test_convert_replaces_every_batchnorm_at_any_depth(layer: type[nn.Module]) -> None:
    model = cn.convert(trained_batchnorm_model(), layer, 3)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(isinstance(m, layer) for m in model.modules()) == 6
    with cn.use_context(torch.randint(0, 3, (16,))):
        assert model(torch.randn(16, 3, 4, 4)).shape == (16, 3)


def test_convert_switchnorm_takes_no_context_count() -> None:
    model = cn.convert(trained_batchnorm_model(), cn.SwitchNorm)
    assert sum(isinstance(m, cn.SwitchNorm) for m in model.modules()) == 6
    assert model(torch.randn(4, 3, 4, 4)).shape == (4, 3)


@pytest.mark.parametrize("layer", [cn.ContextNorm, cn.ContextNormX, cn.ContextNormE])
def test_converted_model_in_eval_reproduces_batchnorm_without_prior_scaling(
    layer: type[nn.Module],
) -> None:
    """What carries over: affine parameters and running statistics, into every context."""
    original = trained_batchnorm_model().eval()
    converted = cn.convert(trained_batchnorm_model(), layer, 4, prior_scaling=False).eval()
    x = torch.randn(8, 3, 4, 4)
    with cn.use_context(torch.randint(0, 4, (8,))):
        torch.testing.assert_close(converted(x), original(x), atol=1e-4, rtol=1e-4)


def test_convert_carries_hyperparameters_and_copies_into_each_context() -> None:
    bn = nn.BatchNorm2d(4, eps=1e-3, momentum=0.2)
    bn.running_mean.uniform_()
    layer = cn.ContextNorm.from_batchnorm(bn, 3)
    assert layer.eps == 1e-3 and layer.momentum == 0.2
    assert torch.equal(layer.running_mean, bn.running_mean.expand(3, 4))


def test_convert_without_batchnorm_is_an_error() -> None:
    with pytest.raises(ValueError, match="no BatchNorm"):
        cn.convert(nn.Linear(2, 2), cn.ContextNorm, 2)


def test_missing_context_names_the_fix() -> None:
    model = cn.convert(trained_batchnorm_model(), cn.ContextNorm, 3)
    with pytest.raises(RuntimeError, match=r"ran without a context.*use_context"):
        model(torch.randn(4, 3, 4, 4))
    model.eval()
    with pytest.raises(RuntimeError, match="ran without a context"):
        model(torch.randn(4, 3, 4, 4))


def test_context_does_not_leak_after_an_exception() -> None:
    model = cn.convert(trained_batchnorm_model(), cn.ContextNormX, 3)

    class Boom(Exception):
        pass

    def exploding_hook(module: nn.Module, inputs: tuple) -> None:
        raise Boom

    handle = model.stages[0].register_forward_pre_hook(exploding_hook)
    with pytest.raises(Boom), cn.use_context(torch.zeros(4, dtype=torch.long)):
        model(torch.randn(4, 3, 4, 4))
    handle.remove()
    with pytest.raises(RuntimeError, match="ran without a context"):
        model(torch.randn(4, 3, 4, 4))


def test_nested_scopes_restore_the_outer_context() -> None:
    layer = cn.ContextNormX(2, 3, data_init=False)
    with torch.no_grad():
        layer.mean.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [20.0, 20.0]]))
    x = torch.zeros(2, 2)
    with cn.use_context(torch.tensor([1, 1])):
        outer = layer(x)
        with cn.use_context(torch.tensor([2, 2])):
            inner = layer(x)
        assert torch.equal(layer(x), outer)
    assert not torch.equal(inner, outer)
    explicit = layer(x, torch.tensor([2, 2]))
    with cn.use_context(torch.tensor([1, 1])):
        assert torch.equal(layer(x, torch.tensor([2, 2])), explicit)  # an explicit context wins


def test_scopes_are_per_thread() -> None:
    layer = cn.ContextNormX(2, 2)
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            layer(torch.zeros(2, 2))
        except RuntimeError as error:
            errors.append(error)

    with cn.use_context(torch.tensor([0, 1])):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert len(errors) == 1 and "ran without a context" in str(errors[0])


def test_contextual_model_routes_and_trains() -> None:
    model = cn.ContextualModel(cn.convert(trained_batchnorm_model(), cn.ContextNorm, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(12, 3, 4, 4), torch.randint(0, 3, (12,))
    context = torch.arange(12) % 3
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x, context), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert cn.uses_context(model) and not cn.uses_context(TinyResNet())


def test_contexts_change_the_output_of_a_converted_model() -> None:
    model = cn.convert(trained_batchnorm_model(), cn.ContextNormX, 2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, cn.ContextNormX):
                module.mean[1].add_(1.0)
    x = torch.randn(4, 3, 4, 4)
    with cn.use_context(torch.zeros(4, dtype=torch.long)):
        first = model(x)
    with cn.use_context(torch.ones(4, dtype=torch.long)):
        second = model(x)
    assert not torch.allclose(first, second)
