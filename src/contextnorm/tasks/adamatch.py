"""Domain adaptation with AdaMatch, and the source-only baseline.

AdaMatch: Berthelot, Roelofs, Sohn, Carlini and Kurakin, "AdaMatch: A Unified Approach to
Semi-Supervised Learning and Domain Adaptation", arXiv:2106.04732 (2021), Section 3, whose
paragraphs (random logit interpolation, distribution alignment, relative confidence threshold,
loss function) the functions below cite by name, with their formulas written out. Where the
paper is silent this follows the Keras example that the context-normalization papers trained
("Semi-supervision and domain adaptation with AdaMatch", Sayak Paul, 2021,
keras.io/examples/vision/adamatch), and departs from it where it is wrong (noted at each place).
The context-normalization experiment itself: Faye, Azzag, Lebbah and Bouchaffra, "Enhancing
Neural Network Representations with Prior Knowledge-Based Normalization", arXiv:2403.16798 v3
(2024), Sec. IV-A and Table VI (MNIST to SVHN, WRN, Adam at 0.03 with cosine decay, 100
epochs, K = 2 domains as contexts).

The pure functions below are the algorithm; :class:`AdaMatchModule` trains a model with them.
Notation (paper Sec. 3): ``n_s`` labelled source images and ``n_t = uratio * n_s`` unlabelled
target images per step, each weakly (``w``) and strongly (``s``) augmented; ``k`` classes.

Domains are the contexts of the context layers (K = 2): every sample carries its domain id,
:data:`SOURCE_DOMAIN` (0) or :data:`TARGET_DOMAIN` (1), and the model runs inside
``contextnorm.use_context(domain ids)``. What AdaMatch's passes mean for each layer:

* AdaMatch runs the model twice per step: once on the *combined* batch
  (source and target, weak and strong), once on the source alone, and interpolates the two
  source logits at random, so that the network stops depending on whether its batch
  statistics came from the source alone or from both domains.
* BatchNorm, ModeNorm, MixNorm, ACN: batch statistics are pooled over both domains in the
  combined pass and over the source alone in the second pass, so the two source logits differ
  and the interpolation acts as the paper intends. The running estimates used at test time come
  from the combined pass only (the second pass leaves every buffer as it was, as the AdaMatch
  authors' code does).
* CN: each domain is normalised with its own statistics in the combined pass, so the source
  samples see exactly the statistics of the source-only pass: with CN at every norm site the two
  source logits are equal and the interpolation does nothing (AdaMatch reduces to FixMatch with
  distribution alignment and the relative threshold). With CN on the input only (the
  context-normalization authors' released AdaMatch notebook) the BatchNorm layers behind it
  still pool, and the interpolation acts there.
  At test time each domain id selects its own running statistics.
* CN-X, CN-E, LayerNorm: no batch statistics, so both passes give the same source logits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import kornia.enhance
import torch
import torch.nn.functional as F
from kornia import augmentation
from kornia.augmentation.auto import RandAugment
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from contextnorm.config import TrainConfig
from contextnorm.data.mnist_m import SOURCE_DOMAIN, TARGET_DOMAIN
from contextnorm.metrics import classification_metrics
from contextnorm.training.module import ContextModule
from contextnorm.training.preprocess import BatchPreprocess

ADAMATCH = "adamatch"
SOURCE_ONLY = "source_only"
DA_METHODS = (ADAMATCH, SOURCE_ONLY)
NUM_DOMAINS = 2
DA_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}
DA_SCHEDULES = ("cosine", "constant")
# The RandAugment operations are kornia's default policy; the magnitude argument of its
# constructor does not matter here, since each operation is applied with magnitudes drawn from
# its own range (see WeakStrongAugment).
_KORNIA_MIDDLE_MAGNITUDE = 15
CUTOUT_FILL = 0.5
CUTOUT_MAX_AREA = 0.25

Batch = tuple[Tensor, Tensor, Tensor]


# --- the algorithm, as pure tensor functions ---------------------------------------------------


def interpolate_logits(combined: Tensor, source_only: Tensor, weights: Tensor) -> Tensor:
    """AdaMatch's random logit interpolation: ``Z = lambda Z' + (1 - lambda) Z''``.

    Args:
        combined: ``Z'``, the source logits (2 n_s, k) of the pass over source and target.
        source_only: ``Z''``, the same images' logits from the pass over the source alone.
        weights: ``lambda``, drawn ``U(0, 1)`` independently for every logit (same shape);
            the caller draws it (``torch.rand_like``) so that this function stays pure.
    """
    if not combined.shape == source_only.shape == weights.shape:
        raise ValueError(
            "combined, source_only and weights must have one shape (2 n_s, k); got "
            f"{tuple(combined.shape)}, {tuple(source_only.shape)} and {tuple(weights.shape)}"
        )
    return weights * combined + (1.0 - weights) * source_only


def align_distribution(
    target_probs: Tensor, source_marginal: Tensor, target_marginal: Tensor
) -> Tensor:
    """AdaMatch's distribution alignment: ``normalize(Y_T * E[Y_S] / E[Y_T])``.

    Each target row is reweighted class by class by the ratio of the source and target class
    marginals, then rescaled to sum to 1 (``normalize`` is the sum-to-one normalisation). The
    paper takes both marginals over the batch (``source_marginal = source_probs.mean(0)``); the
    AdaMatch authors' code uses moving averages; either can be passed. The Keras example
    instead takes a scalar ratio of the means over *all* entries (always 1) and an L2
    normalisation, which leaves rows off the simplex; that is not followed.

    Args:
        target_probs: (n_t, k) softmax of the weakly augmented target logits.
        source_marginal: (k,) expected source class distribution.
        target_marginal: (k,) expected target class distribution.

    Returns:
        (n_t, k) rows on the simplex.
    """
    classes = target_probs.shape[-1]
    if (
        target_probs.dim() != 2
        or source_marginal.shape != (classes,)
        or target_marginal.shape != (classes,)
    ):
        raise ValueError(
            f"target_probs must be (n_t, k) and both marginals (k,); got "
            f"{tuple(target_probs.shape)}, {tuple(source_marginal.shape)} and "
            f"{tuple(target_marginal.shape)}"
        )
    tiny = torch.finfo(target_probs.dtype).tiny
    # A class no target row gives any mass keeps zero mass: the clamps only stop 0/0.
    ratio = source_marginal / target_marginal.clamp_min(tiny)
    aligned = target_probs * ratio
    return aligned / aligned.sum(dim=1, keepdim=True).clamp_min(tiny)


def relative_confidence_threshold(source_probs: Tensor, tau: float) -> Tensor:
    """AdaMatch's relative confidence threshold: ``c_tau = tau * mean_i max_j Y_S[i, j]``.

    The threshold scales with the model's confidence on the weakly augmented source images,
    so that pseudo-labels are accepted on a target where the model is less sure overall.
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau!r}")
    return tau * source_probs.max(dim=1).values.mean()


def warmup_weight(step: float, total_steps: float) -> float:
    """Weight ``mu(t) = 1/2 - cos(min(pi, 2 pi t / T)) / 2`` of the target loss (AdaMatch's loss
    function paragraph; the Keras example's ``compute_mu``).

    Rises from 0 to 1 over the first half of training along a half cosine, then stays at 1.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps!r}")
    return 0.5 - math.cos(min(math.pi, 2.0 * math.pi * step / total_steps)) / 2.0


def source_loss(weak_logits: Tensor, strong_logits: Tensor, labels: Tensor) -> Tensor:
    """``L_source``: cross-entropy of the labels on both views, summed (AdaMatch's loss function;
    the AdaMatch authors' code averages the two instead, which halves the source term)."""
    return F.cross_entropy(weak_logits, labels) + F.cross_entropy(strong_logits, labels)


@dataclass(frozen=True)
class AdaMatchLoss:
    """The terms of one AdaMatch step.

    Attributes:
        total: ``source + target_weight * target``, the loss to minimise.
        source: ``L_source``.
        target: ``L_target``, unweighted.
        threshold: ``c_tau`` of the step.
        mask: (n_t,) bool, the target samples whose pseudo-label passed the threshold.
        pseudo_labels: (n_t,) arg max of the aligned target distribution.
    """

    total: Tensor
    source: Tensor
    target: Tensor
    threshold: Tensor
    mask: Tensor
    pseudo_labels: Tensor


def adamatch_loss(
    source_weak: Tensor,
    source_strong: Tensor,
    source_labels: Tensor,
    target_weak: Tensor,
    target_strong: Tensor,
    *,
    tau: float,
    target_weight: float,
) -> AdaMatchLoss:
    """AdaMatch's loss from the step's logits: alignment, threshold, ``L_source + mu L_target``.

    Args:
        source_weak, source_strong: (n_s, k) source logits, already interpolated.
        source_labels: (n_s,) class ids.
        target_weak, target_strong: (n_t, k) target logits of the combined pass.
        tau: the relative confidence ratio (0.9 in the paper).
        target_weight: ``mu(t)`` of :func:`warmup_weight`.

    ``L_target = 1/n_t sum_i mask_i * H(argmax Y~_T[i], Z_T^s[i])``: the pseudo-labels, the
    alignment and the threshold carry no gradient (stop-gradient, as in the paper), the loss is
    averaged over all n_t target samples, masked ones counting zero. The pseudo-label is the arg
    max of the aligned distribution, as in the AdaMatch authors' code and FixMatch (the Keras
    example uses the soft aligned rows as targets).
    """
    with torch.no_grad():
        source_probs = source_weak.float().softmax(dim=1)
        target_probs = target_weak.float().softmax(dim=1)
        aligned = align_distribution(target_probs, source_probs.mean(0), target_probs.mean(0))
        threshold = relative_confidence_threshold(source_probs, tau)
        confidence, pseudo_labels = aligned.max(dim=1)
        mask = confidence >= threshold
    supervised = source_loss(source_weak, source_strong, source_labels)
    per_sample = F.cross_entropy(target_strong, pseudo_labels, reduction="none")
    unsupervised = (per_sample * mask.to(per_sample.dtype)).mean()
    return AdaMatchLoss(
        total=supervised + target_weight * unsupervised,
        source=supervised,
        target=unsupervised,
        threshold=threshold,
        mask=mask,
        pseudo_labels=pseudo_labels,
    )


def cosine_decay(step: int, total_steps: int, final_fraction: float) -> float:
    """Learning-rate factor decaying along a half cosine from 1 to ``final_fraction`` at
    ``total_steps`` and staying there (Keras ``CosineDecay(lr, T, alpha=final_fraction)``, the
    papers' schedule with alpha 0.25, the same end point as the AdaMatch authors' code)."""
    progress = min(step, total_steps) / total_steps
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


@contextmanager
def buffers_restored(module: nn.Module) -> Iterator[None]:
    """Run a forward pass that leaves no trace in ``module``'s buffers (running statistics,
    batch counters, mixture estimates).

    Inside the block every buffer is a copy; on exit the original tensors are put back,
    untouched. Copying the old values back in place instead would break the backward pass of
    an earlier forward, which saved those very tensors (BatchNorm saves its running statistics).
    """
    originals = [
        (owner, name, buffer)
        for owner in module.modules()
        for name, buffer in owner.named_buffers(recurse=False)
    ]
    for owner, name, buffer in originals:
        setattr(owner, name, buffer.clone())
    try:
        yield
    finally:
        for owner, name, buffer in originals:
            setattr(owner, name, buffer)


# --- settings and augmentation ---------------------------------------------------------------


@dataclass(frozen=True)
class AdaMatchSettings:
    """What the domain-adaptation task needs beyond the shared training settings.

    Defaults are the papers' and the paper's values (with their sources):

    Attributes:
        method: ``"adamatch"`` or ``"source_only"``: the labelled-source loss alone; the
            target images still pass through the network with the source (their batch
            statistics count), as in the AdaMatch authors' baseline, but carry no loss.
        source_batch_size: ``n_s``, labelled source images per step (64: paper, Keras).
        uratio: ``n_t / n_s``, unlabelled target images per source image (3: paper,
            Keras).
        tau: relative confidence ratio (0.9: paper, AdaMatch authors' code, Keras).
        final_lr_fraction: the cosine schedule ends at this share of the initial learning rate
            (0.25: Keras ``CosineDecay(0.03, T, 0.25)``, AdaMatch authors' ``lr_decay``).
        translate: weak augmentation: random shift of up to this share of the image side,
            borders reflected (0.125: FixMatch/AdaMatch's weak flip-and-shift).
        flip: weak augmentation also flips horizontally with probability 0.5. Off for
            digits, where a mirror image is not the same digit; the Keras example flips (its
            random crop to the full size is a no-op, so its weak augmentation is a flip only).
        randaugment_ops: strong augmentation: RandAugment operations per image (2: Keras,
            FixMatch).
        cutout: strong augmentation ends with a grey square over up to a quarter of the image
            (the AdaMatch authors' code appends cutout to every strong augmentation; Keras
            does not).
    """

    method: str = ADAMATCH
    source_batch_size: int = 64
    uratio: int = 3
    tau: float = 0.9
    final_lr_fraction: float = 0.25
    translate: float = 0.125
    flip: bool = False
    randaugment_ops: int = 2
    cutout: bool = True

    def __post_init__(self) -> None:
        if self.method not in DA_METHODS:
            raise ValueError(f"method must be one of {DA_METHODS}, got {self.method!r}")
        for name in ("source_batch_size", "uratio", "randaugment_ops"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {self.tau!r}")
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ValueError(f"final_lr_fraction must be in [0, 1], got {self.final_lr_fraction!r}")
        if not 0.0 <= self.translate < 0.5:
            raise ValueError(f"translate must be in [0, 0.5), got {self.translate!r}")

    @property
    def target_batch_size(self) -> int:
        return self.source_batch_size * self.uratio

    @property
    def batch_size(self) -> int:
        """Images per training batch: the source part followed by the target part."""
        return self.source_batch_size + self.target_batch_size


class WeakStrongAugment(nn.Module):
    """The two views of AdaMatch, on float image batches in [0, 1] where they are (GPU).

    ``weak``: a random shift of up to ``translate`` of the side (reflected borders), and a
    horizontal flip if ``flip``. ``strong``: the weak view, then ``randaugment_ops`` RandAugment
    operations, then cutout.

    RandAugment here is per image, as in the TensorFlow implementations the Keras example and
    FixMatch use: each image draws its own operations (uniformly, with replacement) from kornia's
    default policy (auto-contrast, equalize, invert, rotate, posterize, solarize, solarize-add,
    saturation, contrast, brightness, sharpness, shear x/y, translate x/y), each applied with a
    magnitude drawn per image over the operation's range, as FixMatch's RandAugment variant does;
    on average that is the middle of the range, the Keras example's fixed magnitude 5 of 10.
    (kornia's own ``RandAugment`` draws one set of operations for a whole batch; calling it once
    per image is seven times slower than the grouped calls below.)
    """

    def __init__(self, image_size: tuple[int, int], settings: AdaMatchSettings) -> None:
        super().__init__()
        padding = round(settings.translate * max(image_size))
        weak: list[nn.Module] = []
        if padding:
            weak.append(
                augmentation.RandomCrop(image_size, padding=padding, padding_mode="reflect")
            )
        if settings.flip:
            weak.append(augmentation.RandomHorizontalFlip())
        self.weak_ops = augmentation.AugmentationSequential(*weak) if weak else nn.Identity()
        self.num_strong_ops = settings.randaugment_ops
        self.strong_ops = nn.ModuleList(RandAugment(n=1, m=_KORNIA_MIDDLE_MAGNITUDE).children())
        self.cutout = (
            augmentation.RandomErasing(
                p=1.0, scale=(0.02, CUTOUT_MAX_AREA), ratio=(1.0, 1.0), value=CUTOUT_FILL
            )
            if settings.cutout
            else nn.Identity()
        )

    def weak(self, images: Tensor) -> Tensor:
        return self.weak_ops(images)

    def strong(self, images: Tensor) -> Tensor:
        augmented = self.weak(images)
        for _ in range(self.num_strong_ops):
            choice = torch.randint(len(self.strong_ops), (len(augmented),), device=images.device)
            mixed = augmented.clone()
            for index, operation in enumerate(self.strong_ops):
                # Each operation runs once, on the images that drew it.
                chosen = torch.nonzero(choice == index).flatten()
                if len(chosen):
                    mixed[chosen] = operation(augmented[chosen])
            augmented = mixed.clamp(0.0, 1.0)
        return self.cutout(augmented)


def evaluation_metrics(num_classes: int) -> MetricCollection:
    """The classification metrics (accuracy, macro precision/recall/F1, top-5), plus precision,
    recall and F1 averaged with class-frequency weights: what the context-normalization authors'
    evaluation computed (scikit-learn ``average='weighted'``), so that their Table VI can be
    read against ours; weighted recall equals accuracy."""
    metrics = classification_metrics(num_classes)
    metrics.add_metrics(
        {
            "weighted_precision": MulticlassPrecision(num_classes, average="weighted"),
            "weighted_recall": MulticlassRecall(num_classes, average="weighted"),
            "weighted_f1": MulticlassF1Score(num_classes, average="weighted"),
        }
    )
    return metrics


# --- the Lightning module ----------------------------------------------------------------------


class AdaMatchModule(ContextModule):
    """Trains a classifier by AdaMatch (or on the source only) and evaluates it per domain view.

    Training batches are ``(uint8 images, labels, domain ids)`` holding
    ``settings.source_batch_size`` source samples followed by ``settings.target_batch_size``
    target samples (:class:`contextnorm.tasks.adamatch_data.PairedDomainBatches`). The target
    labels are never used by the loss; they only feed the logged pseudo-label accuracy.
    Evaluation batches are ``(images, labels, contexts)`` of a named view (see
    :func:`contextnorm.tasks.adamatch_data.evaluation_views`).

    Optimisation: ``optimization.optimizer`` ``"adam"`` (the papers: Adam, learning rate 0.03),
    ``"adamw"`` or ``"sgd"`` (Nesterov; the AdaMatch paper's choice), with
    ``optimization.weight_decay`` on conv and linear weights only (the Keras example's L2 kernel
    regularisers and the AdaMatch authors' code decay those alone; a decayed CN-X ``sigma`` or
    per-context gain would be pulled away from what it estimates). ``optimization.schedule``
    ``"cosine"`` decays the rate per step to ``settings.final_lr_fraction`` of it
    (:func:`cosine_decay`), ``"constant"`` keeps it.

    Logged: ``train/loss``, ``train/source_loss``, ``train/target_loss``, ``train/mask_rate``
    (share of target samples with a pseudo-label), ``train/threshold``, ``train/target_weight``,
    ``train/pseudo_label_accuracy``, and per evaluation view ``{val,test}/<view>/<metric>``
    (:func:`evaluation_metrics`) and ``.../loss``.

    Args:
        model: the classifier; its context layers, if any, must have 2 contexts (the domains).
        preprocess: uint8 -> normalised float, without augmentation (AdaMatch augments
            itself, between the two).
        optimization: learning rate, weight decay, optimiser, schedule, epochs.
        num_classes: number of classes.
        image_size: side of the (square) training images, for the random shifts.
        settings: the AdaMatch settings.
    """

    def __init__(
        self,
        model: nn.Module,
        preprocess: BatchPreprocess,
        optimization: TrainConfig,
        num_classes: int,
        image_size: int,
        settings: AdaMatchSettings,
    ) -> None:
        super().__init__(model, preprocess, optimization)
        if preprocess.augmentation is not None:
            raise ValueError(
                "AdaMatch applies its own weak and strong augmentation: build the BatchPreprocess "
                "with crop_flip=False"
            )
        if optimization.optimizer not in DA_OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {tuple(DA_OPTIMIZERS)} for domain adaptation, got "
                f"{optimization.optimizer!r}"
            )
        if optimization.schedule not in DA_SCHEDULES:
            raise ValueError(
                f"schedule must be one of {DA_SCHEDULES} for domain adaptation (the papers decay "
                f"per step along a cosine), got {optimization.schedule!r}"
            )
        _check_domain_layers(model)
        self.settings = settings
        self.num_classes = num_classes
        self.augment = WeakStrongAugment((image_size, image_size), settings)
        self.views: dict[str, list[str]] = {"val": [], "test": []}
        self.eval_metrics = nn.ModuleDict()
        # The per-domain loss terms and mu(t) of the latest step, for gradient diagnostics.
        self.domain_losses: dict[str, Tensor] = {}
        self.target_weight = 0.0

    def set_views(self, stage: str, views: Sequence[str]) -> None:
        """Name the ``stage`` ("val" or "test") dataloaders, in order; each view gets its own
        metrics under ``<stage>/<view>/``."""
        if stage not in self.views:
            raise ValueError(f"stage must be 'val' or 'test', got {stage!r}")
        self.views[stage] = list(views)
        for view in views:
            self.eval_metrics[f"{stage}_{view}"] = evaluation_metrics(self.num_classes).clone(
                prefix=f"{stage}/{view}/"
            )

    # -- training ---------------------------------------------------------------------------

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        # Training batches stay uint8: the two views are augmented in training_step.
        if self.trainer.training:
            return batch
        return super().on_after_batch_transfer(batch, dataloader_idx)

    def _normalised_views(self, images: Tensor) -> tuple[Tensor, Tensor]:
        scaled = images.float() / 255.0
        mean, std = self.preprocess.mean, self.preprocess.std
        return (
            kornia.enhance.normalize(self.augment.weak(scaled), mean, std),
            kornia.enhance.normalize(self.augment.strong(scaled), mean, std),
        )

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, labels, domains = batch
        n_source, n_target = self.settings.source_batch_size, self.settings.target_batch_size
        if images.shape[0] != n_source + n_target:
            raise ValueError(
                f"a training batch must hold source_batch_size + uratio * source_batch_size = "
                f"{n_source + n_target} images (source first), got {images.shape[0]}; build "
                "the loader with PairedDomainBatches from the same settings"
            )
        weak, strong = self._normalised_views(images)
        source_domains, target_domains = domains[:n_source], domains[n_source:]
        combined = torch.cat(
            [weak[:n_source], strong[:n_source], weak[n_source:], strong[n_source:]]
        )
        combined_domains = torch.cat(
            [source_domains, source_domains, target_domains, target_domains]
        )
        source_labels = labels[:n_source]

        if self.settings.method == SOURCE_ONLY:
            logits = self(combined, combined_domains)
            loss = source_loss(logits[:n_source], logits[n_source : 2 * n_source], source_labels)
            self.domain_losses = {"source": loss}
            self._log_train({"loss": loss, "source_loss": loss}, n_source)
            return loss

        source_images = combined[: 2 * n_source]
        with buffers_restored(self.model):
            source_only = self(source_images, combined_domains[: 2 * n_source])
        logits = self(combined, combined_domains)
        source_logits = interpolate_logits(
            logits[: 2 * n_source], source_only, torch.rand_like(source_only)
        )
        target_logits = logits[2 * n_source :]
        self.target_weight = warmup_weight(
            self.global_step, self.trainer.estimated_stepping_batches
        )
        terms = adamatch_loss(
            source_logits[:n_source],
            source_logits[n_source:],
            source_labels,
            target_logits[:n_target],
            target_logits[n_target:],
            tau=self.settings.tau,
            target_weight=self.target_weight,
        )
        self.domain_losses = {"source": terms.source, "target": terms.target}
        pseudo_correct = (terms.pseudo_labels == labels[n_source:]).float().mean()
        self._log_train(
            {
                "loss": terms.total,
                "source_loss": terms.source,
                "target_loss": terms.target,
                "mask_rate": terms.mask.float().mean(),
                "threshold": terms.threshold,
                "target_weight": self.target_weight,
                "pseudo_label_accuracy": pseudo_correct,
            },
            n_source,
        )
        return terms.total

    def _log_train(self, values: dict[str, Tensor | float], batch_size: int) -> None:
        for name, value in values.items():
            self.log(
                f"train/{name}",
                value.detach() if isinstance(value, Tensor) else value,
                on_step=False,
                on_epoch=True,
                batch_size=batch_size,
                sync_dist=True,
            )

    # -- evaluation -------------------------------------------------------------------------

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("val", batch, dataloader_idx)

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("test", batch, dataloader_idx)

    def _evaluate(self, stage: str, batch: Batch, dataloader_idx: int) -> None:
        images, labels, contexts = batch
        if dataloader_idx >= len(self.views[stage]):
            raise ValueError(
                f"{stage} dataloader {dataloader_idx} has no view name: call "
                f"set_views({stage!r}, names) with one name per {stage} dataloader"
            )
        view = self.views[stage][dataloader_idx]
        logits = self(images, contexts)
        metrics = self.eval_metrics[f"{stage}_{view}"]
        metrics(logits, labels)
        self.log(
            f"{stage}/{view}/loss",
            F.cross_entropy(logits, labels),
            batch_size=len(labels),
            add_dataloader_idx=False,
            sync_dist=True,
        )
        self.log_dict(metrics, batch_size=len(labels), add_dataloader_idx=False)

    # -- optimisation -----------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        settings = self.optimization
        decayed, kept = _split_decayed_parameters(self.model)
        groups = [
            {"params": decayed, "weight_decay": settings.weight_decay},
            {"params": kept, "weight_decay": 0.0},
        ]
        extra = (
            {"momentum": settings.momentum, "nesterov": settings.momentum > 0}
            if settings.optimizer == "sgd"
            else {}
        )
        optimizer = DA_OPTIMIZERS[settings.optimizer](groups, lr=settings.lr, **extra)
        if settings.schedule == "constant":
            return optimizer
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        final_fraction = self.settings.final_lr_fraction
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cosine_decay(step, total_steps, final_fraction)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def _split_decayed_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(conv and linear weights, every other trainable parameter)."""
    decayed_ids = {
        id(module.weight)
        for module in model.modules()
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.weight.requires_grad
    }
    parameters = [p for p in model.parameters() if p.requires_grad]
    return (
        [p for p in parameters if id(p) in decayed_ids],
        [p for p in parameters if id(p) not in decayed_ids],
    )


def _check_domain_layers(model: nn.Module) -> None:
    """Every context layer must have one context per domain (source, target)."""
    for name, module in model.named_modules():
        if getattr(module, "uses_context", False) and module.num_contexts != NUM_DOMAINS:
            raise ValueError(
                f"layer {name or type(module).__name__} has num_contexts={module.num_contexts}, "
                f"but domain adaptation has {NUM_DOMAINS} contexts: source (id {SOURCE_DOMAIN}) "
                f"and target (id {TARGET_DOMAIN}); build the context layers with num_contexts=2"
            )
