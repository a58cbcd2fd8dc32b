"""Model surgery: BatchNorm in and out (convert, extract_context), statistics from data."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import contextnorm as cn
from helpers import one_thread

C = 4
K = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def context_model(dtype: torch.dtype) -> nn.Module:
    """A nested model with every context layer, trained a few steps (nothing at its start)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, C, 3, padding=1),
        cn.ContextNorm(C, K, prior=[0.2, 0.3, 0.5], prior_scaling=True),
        nn.ReLU(),
        nn.Sequential(
            nn.Conv2d(C, C, 1),
            cn.ContextNormX(C, K, estimate_prior=True, prior_scaling=True),
            cn.ContextNormE(C, K, hidden_features=6),
            cn.ContextNorm(C, K, affine=False, momentum=None),
        ),
        cn.ContextNormE(C, K),
    ).to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        x = torch.randn(12, 3, 5, 5, dtype=dtype) * 2 + 1
        with cn.use_context(torch.arange(12) % K):
            loss = model(x).square().mean() + model[-1].weight.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_an_extracted_model_computes_what_the_model_computes_for_that_context(
    dtype, tolerance
) -> None:
    model = context_model(dtype).eval()
    x = torch.randn(7, 3, 5, 5, dtype=dtype) * 3 - 1
    for k in range(K):
        plain = cn.extract_context(model, k)
        assert not cn.uses_context(plain)
        norms = [m for m in plain.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert len(norms) == 5 and all(type(m) is nn.BatchNorm2d for m in norms)
        assert not norms[3].affine
        with cn.use_context(torch.full((7,), k)):
            expected = model(x)
        torch.testing.assert_close(plain(x), expected, rtol=tolerance, atol=tolerance)
    # The model itself is untouched.
    assert sum(isinstance(m, cn.ContextNorm) for m in model.modules()) == 2


def test_extract_context_picks_batchnorm_1d_from_an_example_and_keeps_training_flags() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, C), cn.ContextNorm(C, K), nn.Linear(C, 2)).double()
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    model[1].weight.data.normal_()
    x = torch.randn(6, 5, dtype=torch.float64)
    plain = cn.extract_context(model.eval(), 1, example_input=x)
    assert type(plain[1]) is nn.BatchNorm1d and not plain.training
    with cn.use_context(torch.ones(6, dtype=torch.long)):
        torch.testing.assert_close(plain(x), model(x), rtol=0, atol=1e-12)
    # A context layer on its own becomes a BatchNorm; its training flag is kept.
    layer = cn.ContextNormX(C, K).train()
    assert type(cn.extract_context(layer, 0)) is nn.BatchNorm2d
    assert cn.extract_context(layer, 0).training


def test_extract_context_without_running_statistics_normalises_with_the_batch() -> None:
    layer = cn.ContextNorm(C, K, track_running_stats=False).double().eval()
    layer.weight.data.normal_()
    plain = cn.extract_context(layer, 2)
    assert not plain.track_running_stats
    x = torch.randn(5, C, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(plain(x), layer(x, torch.full((5,), 2)), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("model", "context", "error", "message"),
    [
        (cn.ContextNorm(C, K), 3, ValueError, r"context=3 is out of range .* num_contexts=3"),
        (nn.Sequential(nn.BatchNorm2d(C)), 0, ValueError, "found no context layer"),
        (cn.ContextNorm(C, K, channel_last=True), 0, ValueError, "channel-last input"),
        (cn.ContextNorm(C, K), 1.0, TypeError, "context must be an int"),
    ],
)
def test_extract_context_refuses_bad_input(model, context, error, message) -> None:
    with pytest.raises(error, match=message):
        cn.extract_context(model, context)


@pytest.mark.parametrize(
    "layer",
    [
        lambda bn: cn.ContextNorm.from_batchnorm(bn, 1),
        lambda bn: cn.ModeNorm.from_batchnorm(bn, 1),
        cn.SwitchNorm.from_batchnorm,
    ],
)
def test_converted_layers_keep_batchnorm_running_statistics_with_momentum_none(layer) -> None:
    torch.manual_seed(0)
    batchnorm = nn.BatchNorm2d(C, momentum=None).double()
    converted = layer(copy.deepcopy(batchnorm))
    if isinstance(converted, cn.SwitchNorm):
        # Only the batch statistics: SwitchNorm's running estimates are those of its batch part.
        converted.mean_logits.data.copy_(torch.tensor([-30.0, -30.0, 30.0]))
    for step in range(3):
        x = torch.randn(4 + step, C, 3, 3, dtype=torch.float64) * (step + 1)
        batchnorm(x)
        converted(x, torch.zeros(len(x), dtype=torch.long))
    torch.testing.assert_close(
        converted.running_mean.view(-1), batchnorm.running_mean, rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        converted.running_var.view(-1), batchnorm.running_var, rtol=0, atol=1e-12
    )


def test_convert_places_layers_on_the_batchnorm_device() -> None:
    model = nn.Sequential(nn.BatchNorm2d(C, device="meta"))
    cn.convert(model, cn.ContextNorm, K)
    assert all(t.device.type == "meta" for t in [*model[0].parameters(), *model[0].buffers()])


def population(
    values: list[torch.Tensor], contexts: list[torch.Tensor], k: int
) -> tuple[torch.Tensor, ...]:
    """Mean and unbiased variance per channel over every sample (and position) of context ``k``."""
    members = torch.cat([x[c == k] for x, c in zip(values, contexts, strict=True)])
    flat = members.transpose(0, 1).reshape(members.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=True)


def data(
    sizes: list[int], present: list[list[int]]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    xs, cs = [], []
    for size, allowed in zip(sizes, present, strict=True):
        contexts = torch.tensor(allowed)[torch.randint(len(allowed), (size,), generator=generator)]
        x = torch.randn(size, C, 3, 2, generator=generator, dtype=torch.float64)
        xs.append(x * (1 + contexts.view(-1, 1, 1, 1)) + 10 * contexts.view(-1, 1, 1, 1))
        cs.append(contexts)
    return xs, cs


def test_recalibrate_sets_exact_population_statistics_per_context() -> None:
    # Batches of different sizes; context 1 is missing from the second, context 3 never occurs.
    xs, cs = data([9, 5, 12], [[0, 1, 2], [0, 2], [0, 1, 2]])
    layer = cn.ContextNorm(C, 4, momentum=0.3).double()
    layer.running_mean[3].fill_(7.0)
    layer.eval()
    returned = cn.recalibrate(layer, zip(xs, cs, strict=True), progress=False)
    assert returned is layer and not layer.training and layer.momentum == 0.3
    for k in range(3):
        mean, var = population(xs, cs, k)
        torch.testing.assert_close(layer.running_mean[k], mean, rtol=0, atol=1e-10)
        torch.testing.assert_close(layer.running_var[k], var, rtol=0, atol=1e-10)
    assert layer.running_mean[3].eq(7.0).all() and layer.running_var[3].eq(1.0).all()
    assert layer.num_batches_tracked.tolist() == [3, 2, 3, 0]


@pytest.mark.parametrize(
    "layer", [nn.BatchNorm2d(C), cn.SwitchNorm(C), cn.ModeNorm(C, 1), cn.SyncBatchNorm(C)]
)
def test_recalibrate_sets_exact_population_statistics_of_batch_layers(layer) -> None:
    xs, _ = data([9, 5, 12], [[0, 1], [0, 1], [0, 1]])
    layer = layer.double()
    cn.recalibrate(layer, iter(xs), progress=False)
    everything = [torch.zeros(len(x), dtype=torch.long) for x in xs]
    mean, var = population(xs, everything, 0)
    torch.testing.assert_close(layer.running_mean.view(-1), mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.running_var.view(-1), var, rtol=0, atol=1e-10)
    assert int(layer.num_batches_tracked) == 3


def test_recalibrate_a_nested_model_from_what_each_layer_sees_and_restores_the_rest() -> None:
    model = cn.ContextualModel(context_model(torch.float64))
    model.model[3][1].training = False  # a mixed state, restored module by module
    before = copy.deepcopy(model.state_dict())
    flags = {name: module.training for name, module in model.named_modules()}
    xs, cs = data([9, 5, 12], [[0, 1, 2], [0, 2], [0, 1, 2]])
    xs = [
        torch.randn(len(x), 3, 3, 2, dtype=torch.float64) + c.view(-1, 1, 1, 1)
        for x, c in zip(xs, cs, strict=True)
    ]
    # What the context layers see in the recalibration pass: training mode, per-batch statistics.
    seen: dict[str, list[torch.Tensor]] = {"1": [], "3.3": []}
    reference = copy.deepcopy(model).train()
    hooks = [
        reference.model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: seen[name].append(args[0])
        )
        for name in seen
    ]
    with torch.no_grad():
        for x, c in zip(xs, cs, strict=True):
            reference(x, c)
    for hook in hooks:
        hook.remove()
    cn.recalibrate(model, zip(xs, cs, strict=True), progress=False)
    assert {name: module.training for name, module in model.named_modules()} == flags
    for name in seen:
        layer = model.model.get_submodule(name)
        for k in range(K):
            mean, var = population(seen[name], cs, k)
            torch.testing.assert_close(layer.running_mean[k], mean, rtol=0, atol=1e-10)
            torch.testing.assert_close(layer.running_var[k], var, rtol=0, atol=1e-10)
    recalibrated = {"model.1.", "model.3.3."}
    for key, value in model.state_dict().items():
        if not any(key.startswith(prefix) for prefix in recalibrated) or key.endswith("prior"):
            torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


def test_recalibrate_needs_a_layer_with_running_statistics() -> None:
    with pytest.raises(ValueError, match="no layer with running statistics"):
        cn.recalibrate(nn.Sequential(cn.ContextNormX(C, K)), [], progress=False)


def test_recalibrate_shows_progress_without_tqdm(monkeypatch, capsys) -> None:
    monkeypatch.setitem(__import__("sys").modules, "tqdm.auto", None)
    monkeypatch.setattr("contextnorm.layers.surgery._PROGRESS_EVERY_S", 0.0)
    layer = nn.BatchNorm1d(C)
    cn.recalibrate(layer, [torch.randn(4, C) for _ in range(3)])
    assert "recalibrate: 3 batches" in capsys.readouterr().err
