"""BatchNorm's contracts: empty batches, activation checkpointing, factory arguments, conversion."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

import contextnorm as cn
from helpers import call, layer_factories, one_thread

K = 3
C = 4
LAYERS = layer_factories(C, K)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(0, C), (0, C, 3, 3)])
def test_empty_batch_gives_an_empty_output_and_leaves_state_untouched(
    name: str, training: bool, shape: tuple[int, ...]
) -> None:
    layer = LAYERS[name]()
    call(layer, torch.randn(6, C, 3, 3) * 2 + 1, torch.arange(6) % K)
    layer.train(training)
    state = copy.deepcopy(layer.state_dict())
    x = torch.randn(shape, requires_grad=True)
    y = layer(x, torch.empty(0, dtype=torch.long))
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_empty_batch_through_a_scope_and_unknown_contexts() -> None:
    layer = cn.ContextNormX(C, K)
    with cn.use_context(torch.empty(0, dtype=torch.long)):
        assert layer(torch.randn(0, C, 2)).shape == (0, C, 2)
    assert layer(torch.randn(0, C, 2), None).shape == (0, C, 2)


class Block(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(x)))


class Checkpointed(nn.Module):
    """Two blocks, each recomputed in the backward pass."""

    def __init__(self, norm: type[nn.Module] | None, checkpoint, reentrant: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        build = (
            (lambda: nn.BatchNorm2d(C))
            if norm is None
            else (lambda: norm(C, K, prior_scaling=False))
        )
        self.blocks = nn.ModuleList([Block(build()), Block(build())])
        self.checkpoint = checkpoint
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = (
                self.checkpoint(block, x, use_reentrant=self.reentrant)
                if self.checkpoint
                else block(x)
            )
        return x


def one_step(
    model: nn.Module, context: torch.Tensor | None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward inside the context's scope, backward outside it (as trainers do); the gradients."""
    x = (
        torch.randn(6, C, 5, 5, generator=torch.Generator().manual_seed(1)) * 2 + 1
    ).requires_grad_()
    if context is None:
        loss = model(x).square().mean()
    else:
        with cn.use_context(context):
            loss = model(x).square().mean()
    loss.backward()
    return loss, [x.grad, *(p.grad for p in model.parameters())]


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("layer", [cn.ContextNorm, cn.ContextNormX, cn.ContextNormE])
def test_checkpoint_recomputes_with_the_forwards_contexts(
    layer: type[nn.Module], reentrant: bool
) -> None:
    context = torch.tensor([0, 1, 2, 2, 1, 0])
    plain = Checkpointed(layer, None, reentrant)
    loss, grads = one_step(plain, context)
    checkpointed = Checkpointed(layer, cn.checkpoint, reentrant)
    checkpointed_loss, checkpointed_grads = one_step(checkpointed, context)
    torch.testing.assert_close(checkpointed_loss, loss)
    for got, expected in zip(checkpointed_grads, grads, strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("reentrant", [False, True])
def test_recomputation_outside_the_scope_is_refused_not_guessed(reentrant: bool) -> None:
    """torch.utils.checkpoint cannot carry the scope: an error names cn.checkpoint, even when
    another scope is open at backward (which would silently give the wrong contexts)."""
    model = Checkpointed(cn.ContextNormX, torch.utils.checkpoint.checkpoint, reentrant)
    x = torch.randn(6, C, 5, 5, requires_grad=True)
    for backward_scope in (None, torch.zeros(6, dtype=torch.long)):
        with cn.use_context(torch.tensor([0, 1, 2, 2, 1, 0])):
            loss = model(x).square().mean()
        with pytest.raises(RuntimeError, match="contextnorm.checkpoint"):
            if backward_scope is None:
                loss.backward()
            else:
                with cn.use_context(backward_scope):
                    loss.backward()


@pytest.mark.parametrize("reentrant", [False, True])
def test_cn_with_one_context_keeps_batchnorms_running_statistics_under_checkpointing(
    reentrant: bool,
) -> None:
    """BatchNorm updates its running statistics again when recomputed; CN(K=1) does exactly the
    same."""
    bn = Checkpointed(None, torch.utils.checkpoint.checkpoint, reentrant)
    context_norm = Checkpointed(cn.ContextNorm, cn.checkpoint, reentrant)
    for block, reference in zip(context_norm.blocks, bn.blocks, strict=True):
        block.norm = cn.ContextNorm(C, 1, prior_scaling=False)
        block.conv.load_state_dict(reference.conv.state_dict())
    for _ in range(2):
        one_step(bn, None)
        one_step(context_norm, torch.zeros(6, dtype=torch.long))
    for bn_block, cn_block in zip(bn.blocks, context_norm.blocks, strict=True):
        torch.testing.assert_close(cn_block.norm.running_mean[0], bn_block.norm.running_mean)
        torch.testing.assert_close(cn_block.norm.running_var[0], bn_block.norm.running_var)
        assert int(cn_block.norm.num_batches_tracked[0]) == int(bn_block.norm.num_batches_tracked)


@pytest.mark.parametrize("name", LAYERS)
def test_factory_arguments_place_every_parameter_and_buffer(name: str) -> None:
    layer = LAYERS[name](device="cpu", dtype=torch.float64)
    tensors = [*layer.parameters(), *(b for b in layer.buffers() if b.is_floating_point())]
    assert tensors and all(t.dtype == torch.float64 for t in tensors)
    x = torch.randn(6, C, 2, dtype=torch.float64)
    assert layer(x, torch.arange(6) % K).dtype == torch.float64


@pytest.mark.parametrize("name", LAYERS)
def test_every_layer_takes_a_context_argument(name: str) -> None:
    """Models call any norm as norm(x, context=...); layers without contexts ignore it."""
    layer = LAYERS[name]()
    x = torch.randn(6, C, 2)
    context = torch.arange(6) % K
    if name in ("modenorm", "switchnorm"):
        torch.testing.assert_close(layer(x, context=context), layer(x))
    else:
        assert layer(x, context=context).shape == x.shape


def test_former_count_names_warn_and_still_work() -> None:
    with pytest.warns(FutureWarning, match="num_modes is renamed num_contexts"):
        layer = cn.ModeNorm(C, num_modes=2)
    assert layer.num_contexts == 2
    with pytest.raises(ValueError, match="disagree"), pytest.warns(FutureWarning):
        cn.ModeNorm(C, 3, num_modes=2)


def batchnorm_model(bn: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, C, 1), bn, nn.ReLU())


@pytest.mark.parametrize(
    "layer", [cn.ContextNorm, cn.ContextNormX, cn.ContextNormE, cn.ModeNorm, cn.SwitchNorm]
)
def test_convert_keeps_training_flags_momentum_none_and_dtype(layer: type[nn.Module]) -> None:
    model = nn.Sequential(nn.BatchNorm2d(C, momentum=None).double().eval(), nn.BatchNorm2d(C))
    count = () if layer is cn.SwitchNorm else (K,)
    cn.convert(model, layer, *count)
    assert [m.training for m in model] == [False, True]
    assert all(getattr(m, "momentum", None) is None for m in model[:1])
    assert all(p.dtype == torch.float64 for p in model[0].parameters())


def test_convert_accepts_every_batchnorm_kind() -> None:
    lazy = nn.LazyBatchNorm2d()
    with pytest.raises(ValueError, match="has not seen an input yet.*forward pass"):
        cn.convert(batchnorm_model(lazy), cn.ContextNorm, K)
    model = batchnorm_model(nn.LazyBatchNorm2d())
    model(torch.randn(2, 3, 4, 4))
    for source in (
        model,
        batchnorm_model(nn.SyncBatchNorm(C)),
        nn.Sequential(nn.BatchNorm1d(C), nn.BatchNorm3d(C)),
    ):
        batchnorms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in source.modules())
        cn.convert(source, cn.ContextNormX, K)
        assert sum(isinstance(m, cn.ContextNormX) for m in source.modules()) == batchnorms
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in source.modules())
