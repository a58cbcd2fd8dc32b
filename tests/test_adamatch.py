"""AdaMatch: each function against a hand-computed reference, the training module on tiny data
with BatchNorm and CN, the gradient-variance measurement, and bad setups."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

import contextnorm as cn
from contextnorm.config import TrainConfig
from contextnorm.models.wide_resnet import WideResNet
from contextnorm.tasks import build_task
from contextnorm.tasks.adamatch import (
    AdaMatchModule,
    WeakStrongAugment,
    adamatch_loss,
    align_distribution,
    buffers_restored,
    interpolate_logits,
    relative_confidence_threshold,
    source_loss,
    warmup_weight,
)
from contextnorm.tasks.adaptation_data import DomainAdaptationDataModule
from contextnorm.tasks.gradient_variance import GradientVariance, _RunningVariance
from contextnorm.tasks.preprocess import BatchPreprocess

from tiny import tiny_adaptation_config

IMAGE_SIZE = 8


def softmax(row: list[float]) -> list[float]:
    exps = [math.exp(value) for value in row]
    return [value / sum(exps) for value in exps]


def cross_entropy(row: list[float], label: int) -> float:
    return -math.log(softmax(row)[label])


# --- the functions -------------------------------------------------------------------------------


def test_interpolation_mixes_each_logit_with_its_own_weight() -> None:
    combined = torch.tensor([[1.0, 2.0], [0.0, -4.0]])
    source_only = torch.tensor([[3.0, 6.0], [2.0, 4.0]])
    weights = torch.tensor([[0.25, 1.0], [0.0, 0.5]])
    expected = torch.tensor([[0.25 * 1 + 0.75 * 3, 2.0], [2.0, 0.0]])
    assert torch.equal(interpolate_logits(combined, source_only, weights), expected)
    with pytest.raises(ValueError, match="one shape"):
        interpolate_logits(combined, source_only[:1], weights)


def test_alignment_against_a_hand_computed_reference() -> None:
    target = torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64)
    source_marginal = torch.tensor([0.5, 0.5], dtype=torch.float64)
    aligned = align_distribution(target, source_marginal, target.mean(0))
    # ratio = E[source] / E[target] = (0.5/0.7, 0.5/0.3); rows renormalised to sum 1.
    first = [0.5 * 5 / 7, 0.5 * 5 / 3]
    second = [0.9 * 5 / 7, 0.1 * 5 / 3]
    expected = torch.tensor(
        [[v / sum(first) for v in first], [v / sum(second) for v in second]], dtype=torch.float64
    )
    torch.testing.assert_close(aligned, expected)


def test_alignment_keeps_rows_on_the_simplex_and_moves_the_marginal_to_the_source() -> None:
    generator = torch.Generator().manual_seed(0)
    target = (3 * torch.randn(64, 10, generator=generator)).softmax(1)
    source_marginal = torch.softmax(torch.randn(10, generator=generator), 0)
    aligned = align_distribution(target, source_marginal, target.mean(0))
    assert (aligned >= 0).all()
    torch.testing.assert_close(aligned.sum(1), torch.ones(64))
    before = (target.mean(0) - source_marginal).abs().sum()
    after = (aligned.mean(0) - source_marginal).abs().sum()
    assert after < 0.6 * before  # one alignment step: about half the gap closed here
    # Equal marginals: nothing to correct.
    torch.testing.assert_close(align_distribution(target, target.mean(0), target.mean(0)), target)
    # A class that no target row predicts stays at zero mass instead of becoming NaN.
    degenerate = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    aligned = align_distribution(degenerate, torch.tensor([0.5, 0.5]), degenerate.mean(0))
    assert torch.equal(aligned, degenerate)


def test_alignment_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(n_t, k\)"):
        align_distribution(torch.ones(4, 3) / 3, torch.ones(2) / 2, torch.ones(3) / 3)


def test_threshold_is_tau_times_the_mean_source_confidence() -> None:
    source = torch.tensor([[0.9, 0.1], [0.4, 0.6]])
    torch.testing.assert_close(relative_confidence_threshold(source, 0.9), torch.tensor(0.9 * 0.75))
    with pytest.raises(ValueError, match="tau must be in"):
        relative_confidence_threshold(source, 1.5)


def test_threshold_relative_to_the_source_decides_the_mask() -> None:
    # Two target rows of confidence 0.7 (after alignment, which leaves them unchanged here
    # because source and target marginals agree); the source confidence sets the bar.
    target = torch.tensor([[math.log(0.7), math.log(0.3)], [math.log(0.3), math.log(0.7)]])
    labels = torch.tensor([0, 1])

    def masked(source_confidence: float) -> list[bool]:
        p = source_confidence
        source = torch.tensor([[math.log(p), math.log(1 - p)], [math.log(1 - p), math.log(p)]])
        terms = adamatch_loss(source, source, labels, target, target, tau=0.9, target_weight=1.0)
        return terms.mask.tolist()

    assert masked(0.75) == [True, True]  # threshold 0.675 < 0.7
    assert masked(0.99) == [False, False]  # threshold 0.891 > 0.7


def test_warmup_schedule_values() -> None:
    total = 800
    assert warmup_weight(0, total) == 0.0
    assert warmup_weight(total / 8, total) == pytest.approx(0.5 - math.cos(math.pi / 4) / 2)
    assert warmup_weight(total / 4, total) == pytest.approx(0.5)
    assert warmup_weight(total / 2, total) == pytest.approx(1.0)
    assert warmup_weight(0.75 * total, total) == 1.0
    assert warmup_weight(total, total) == 1.0
    with pytest.raises(ValueError, match="total_steps must be positive"):
        warmup_weight(1, 0)


def test_total_loss_against_a_hand_computed_reference() -> None:
    source_weak = torch.tensor([[2.0, 0.0]], requires_grad=True)
    source_strong = torch.tensor([[1.0, 0.0]], requires_grad=True)
    target_weak = torch.tensor([[3.0, 0.0], [0.0, 0.2]], requires_grad=True)
    target_strong = torch.tensor([[0.0, 1.0], [1.0, 0.0]], requires_grad=True)
    terms = adamatch_loss(
        source_weak,
        source_strong,
        torch.tensor([0]),
        target_weak,
        target_strong,
        tau=0.9,
        target_weight=0.5,
    )
    # Reference in plain Python.
    supervised = cross_entropy([2.0, 0.0], 0) + cross_entropy([1.0, 0.0], 0)
    p_source = softmax([2.0, 0.0])
    p_target = [softmax([3.0, 0.0]), softmax([0.0, 0.2])]
    marginal = [(p_target[0][j] + p_target[1][j]) / 2 for j in range(2)]
    aligned = []
    for row in p_target:
        scaled = [row[j] * p_source[j] / marginal[j] for j in range(2)]
        aligned.append([value / sum(scaled) for value in scaled])
    threshold = 0.9 * max(p_source)
    mask = [max(row) >= threshold for row in aligned]
    assert mask == [True, False]  # 0.984 passes, 0.720 does not pass 0.793
    pseudo = [row.index(max(row)) for row in aligned]
    unsupervised = (
        sum(
            cross_entropy(strong, label) * keep
            for strong, label, keep in zip([[0.0, 1.0], [1.0, 0.0]], pseudo, mask, strict=True)
        )
        / 2
    )
    assert terms.source.item() == pytest.approx(supervised, rel=1e-6)
    assert terms.target.item() == pytest.approx(unsupervised, rel=1e-6)
    assert terms.total.item() == pytest.approx(supervised + 0.5 * unsupervised, rel=1e-6)
    assert terms.threshold.item() == pytest.approx(threshold, rel=1e-6)
    # Pseudo-labels, alignment and threshold are constants: no gradient reaches the weak
    # target logits, while the strong target and both source views get one.
    terms.total.backward()
    assert target_weak.grad is None
    assert target_strong.grad is not None and target_strong.grad[0].abs().sum() > 0
    assert target_strong.grad[1].abs().sum() == 0  # masked out
    assert source_weak.grad is not None and source_strong.grad is not None


def test_source_loss_sums_both_views() -> None:
    weak, strong = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    expected = cross_entropy([2.0, 0.0], 1) + math.log(2.0)
    assert source_loss(weak, strong, torch.tensor([1])).item() == pytest.approx(expected)


def test_buffers_restored_undoes_running_statistics_updates() -> None:
    norm = nn.BatchNorm2d(3).train()
    norm(torch.randn(4, 3, 2, 2) + 5)
    before = {name: buffer.clone() for name, buffer in norm.named_buffers()}
    with buffers_restored(norm):
        norm(torch.randn(4, 3, 2, 2) - 5)
        assert not torch.equal(norm.running_mean, before["running_mean"])
    for name, buffer in norm.named_buffers():
        assert torch.equal(buffer, before[name])


@pytest.mark.parametrize(
    ("factory", "interpolation_acts"),
    [
        (nn.BatchNorm2d, True),
        (lambda c: cn.ContextNorm(c, num_contexts=2), False),
        (lambda c: cn.ContextNormX(c, num_contexts=2), False),
    ],
    ids=["bn", "cn", "cnx"],
)
def test_what_the_combined_pass_means_for_each_norm(factory, interpolation_acts: bool) -> None:
    """With per-domain statistics at every site, the source samples of the combined pass see
    exactly the source-only statistics, so random logit interpolation has nothing to mix."""
    torch.manual_seed(0)
    model = WideResNet(depth=10, widen_factor=1, norm_layer=factory, placement="all").train()
    source, target = torch.randn(6, 3, 8, 8), 3 * torch.randn(6, 3, 8, 8) + 1
    domains = torch.tensor([0] * 6 + [1] * 6)
    with cn.use_context(domains), buffers_restored(model):
        combined = model(torch.cat([source, target]))[:6]
    with cn.use_context(domains[:6]), buffers_restored(model):
        alone = model(source)
    assert torch.allclose(combined, alone, atol=1e-4) != interpolation_acts


def test_weak_view_is_a_shift_and_strong_views_differ_per_image() -> None:
    augment = WeakStrongAugment((8, 8), translate=0.125, flip=False, randaugment_ops=2, cutout=True)
    image = torch.rand(1, 3, 8, 8)
    batch = image.expand(16, -1, -1, -1).contiguous()
    torch.manual_seed(0)
    weak = augment.weak(batch)
    # A shift by at most round(0.125 * 8) = 1 pixel with reflected borders: the centre 6x6
    # of every weak view is a window of the original image.
    windows = {
        (dy, dx): image[0, :, 1 + dy : 7 + dy, 1 + dx : 7 + dx]
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
    }
    for view in weak:
        assert any(torch.equal(view[:, 1:7, 1:7], window) for window in windows.values())
    strong = augment.strong(batch)
    assert strong.shape == batch.shape and strong.min() >= 0 and strong.max() <= 1
    distinct = {tuple(view.flatten().tolist()) for view in strong}
    assert len(distinct) == len(batch)
    torch.manual_seed(0)
    augment.weak(batch)
    assert torch.equal(augment.strong(batch), strong)  # the global seed decides the views


# --- the training module -------------------------------------------------------------------------


def tiny_setup(
    tmp_path, *overrides: str, method: str = "cn"
) -> tuple[AdaMatchModule, DomainAdaptationDataModule]:
    """The module and data of one method of the tiny digits adaptation, built by the task."""
    task = build_task(tiny_adaptation_config(tmp_path, f"methods=[{method}]", *overrides))
    task.setup()
    module = task.build_module(0)
    assert isinstance(module, AdaMatchModule)
    return module, task.datamodule(0, module)


def fit(
    module: AdaMatchModule, data: DomainAdaptationDataModule, steps: int, **kwargs
) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )
    trainer.fit(module, data)
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize(("norm", "placement"), [("bn", "all"), ("cn", "all"), ("cn", "input")])
def test_adamatch_trains_with_finite_loss_and_records_gradient_variance(
    tmp_path, norm: str, placement: str
) -> None:
    torch.manual_seed(0)
    module, data = tiny_setup(tmp_path, f"model.placement={placement}", method=norm)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = fit(module, data, steps=3, callbacks=[GradientVariance()])
    metrics = trainer.callback_metrics
    for name in ("train/loss", "train/source_loss", "train/target_loss", "val/target/accuracy"):
        assert torch.isfinite(metrics[name]), name
    assert 0.0 <= float(metrics["train/mask_rate"]) <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    for domain in ("source", "target"):
        for statistic in ("max", "mean"):
            value = float(metrics[f"grad_variance/{domain}/{statistic}"])
            assert math.isfinite(value) and value >= 0.0
        assert metrics[f"grad_variance/{domain}/max"] >= metrics[f"grad_variance/{domain}/mean"]
    # Weight decay on conv and linear weights only; the per-step cosine ends at 0.25 x lr.
    decayed, kept = trainer.optimizers[0].param_groups
    assert decayed["weight_decay"] == 5e-4 and kept["weight_decay"] == 0.0
    norm_parameters = {id(p) for layer in module.tested_layers for p in layer.parameters()}
    assert norm_parameters <= {id(p) for p in kept["params"]}
    assert decayed["lr"] == pytest.approx(0.25 * 0.003)
    results = trainer.test(module, data, verbose=False)
    assert [next(iter(r)).split("/")[1] for r in results] == module.test_views


@pytest.mark.slow
def test_source_only_trains_on_the_source_loss_alone(tmp_path) -> None:
    torch.manual_seed(0)
    module, data = tiny_setup(tmp_path, "task.options.source_only=[cn]")
    trainer = fit(module, data, steps=2, callbacks=[GradientVariance()])
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert "train/target_loss" not in metrics and "grad_variance/target/max" not in metrics
    assert metrics["train/loss"] == metrics["train/source_loss"]
    assert "grad_variance/source/max" in metrics


@pytest.mark.slow
def test_target_labels_never_reach_the_loss(tmp_path) -> None:
    def train_loss(shuffle_target_labels: bool) -> tuple[float, float]:
        torch.manual_seed(0)
        module, data = tiny_setup(tmp_path, method="bn")
        if shuffle_target_labels:
            target = data.train.data.domains == 1
            labels = data.train.data.labels
            labels[target] = (labels[target] + 1) % 10
        torch.manual_seed(1)
        trainer = fit(module, data, steps=2)
        metrics = trainer.callback_metrics
        return float(metrics["train/loss"]), float(metrics["train/pseudo_label_accuracy"])

    loss, accuracy = train_loss(False)
    shuffled_loss, shuffled_accuracy = train_loss(True)
    assert loss == shuffled_loss
    assert accuracy != shuffled_accuracy  # the labels did change, and only the monitor saw it


# --- gradient variance -------------------------------------------------------------------------


def test_running_variance_matches_the_population_variance() -> None:
    steps = torch.randn(7, 5, dtype=torch.float64)
    running = _RunningVariance()
    for row in steps:
        running.add(row)
    variance = steps.var(dim=0, unbiased=False)
    assert running.summary() == pytest.approx((float(variance.max()), float(variance.mean())))
    single = _RunningVariance()
    single.add(steps[0])
    assert all(math.isnan(value) for value in single.summary())


class ToyDomains(L.LightningModule):
    """Two quadratic domain losses on one weight vector, trained with learning rate 0."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], weight: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
        self.batches = batches
        self.target_weight = weight
        self.domain_losses: dict[str, torch.Tensor] = {}

    def losses(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        source, target = self.batches[step]
        return ((source @ self.w - 1.0) ** 2).mean(), ((target @ self.w) ** 2).mean()

    def training_step(self, batch, batch_idx):
        source, target = self.losses(batch_idx)
        self.domain_losses = {"source": source, "target": target}
        return source + self.target_weight * target

    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(len(self.batches)), batch_size=None)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_gradient_variance_separates_the_domain_gradients_exactly() -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(4, 3, generator=generator), torch.randn(6, 3, generator=generator))
        for _ in range(5)
    ]
    toy = ToyDomains(batches, weight=0.3)
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[GradientVariance()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(toy)
    # Reference: each domain's gradient per step, computed directly.
    gradients: dict[str, list[torch.Tensor]] = {"source": [], "target": []}
    for step in range(5):
        for domain, loss in zip(("source", "target"), toy.losses(step), strict=True):
            gradients[domain].append(torch.autograd.grad(loss, toy.w)[0])
    record = {name: float(value) for name, value in trainer.callback_metrics.items()}
    for domain, values in gradients.items():
        variance = torch.stack(values).double().var(dim=0, unbiased=False)
        assert record[f"grad_variance/{domain}/max"] == pytest.approx(
            float(variance.max()), rel=1e-5
        )
        assert record[f"grad_variance/{domain}/mean"] == pytest.approx(
            float(variance.mean()), rel=1e-5
        )


# --- bad setups --------------------------------------------------------------------------------


def test_the_module_refuses_a_preprocess_that_augments() -> None:
    augmenting = BatchPreprocess([0.5] * 3, [0.25] * 3, (8, 8), crop_flip=True)
    with pytest.raises(ValueError, match="crop_flip=False"):
        AdaMatchModule(
            WideResNet(depth=10, widen_factor=1),
            [],
            augmenting,
            WeakStrongAugment((8, 8), translate=0.125, flip=False, randaugment_ops=2, cutout=True),
            TrainConfig(),
            10,
            ["source"],
            uratio=3,
            tau=0.9,
            final_lr_fraction=0.25,
            source_only=False,
        )


@pytest.mark.slow
def test_a_loader_with_the_wrong_batch_layout_is_a_clear_error(tmp_path) -> None:
    module, data = tiny_setup(tmp_path, method="bn")
    data.sampler.target_batch_size = 3  # disagrees with uratio = 2
    with pytest.raises(ValueError, match="must hold batch_size \\+ uratio"):
        fit(module, data, steps=1)
