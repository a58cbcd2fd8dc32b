"""AdaMatch (Berthelot et al. 2022) and the source-only baseline: the algorithm and its module.

The functions below are the algorithm as pure tensor functions, each citing the paragraph of
the AdaMatch paper's Section 3 it implements (random logit interpolation, distribution
alignment, relative confidence threshold, loss function), with the formulas written out. Where
the paper is silent this follows the Keras example the context-normalization papers trained
(Paul 2021), and departs from it where it is wrong (noted at each place). :class:`AdaMatchModule`
trains a classifier with them; :mod:`contextnorm.tasks.adaptation` is the task around it.

Notation (paper Sec. 3): ``n_s`` labelled source images and ``n_t = uratio * n_s`` unlabelled
target images per step, each weakly (``w``) and strongly (``s``) augmented; ``k`` classes.

Every sample carries its context: for CN, CN-X and CN-E the domain id (source 0, target 1),
or the ablation's random or single context. What AdaMatch's passes mean for each layer:

* AdaMatch runs the model twice per step: once on the *combined* batch (source and target,
  weak and strong), once on the source alone, and interpolates the two source logits at
  random, so that the network stops depending on whether its batch statistics came from the
  source alone or from both domains. The second pass normalises with the statistics of the
  source batch, as the paper describes it; the Keras example runs it in inference mode, with
  the running statistics, which makes the interpolation mix in the running estimates instead.
* BatchNorm, ModeNorm, MixNorm, ACN: batch statistics are pooled over both domains in the
  combined pass and over the source alone in the second pass, so the two source logits differ
  and the interpolation acts as the paper intends. The running estimates used at test time
  come from the combined pass only (the second pass leaves every buffer as it was, as the
  AdaMatch authors' code does).
* CN with domain contexts: each domain is normalised with its own statistics in the combined
  pass, so the source samples see exactly the statistics of the source-only pass: with CN at
  every norm site the two source logits are equal and the interpolation does nothing (AdaMatch
  reduces to FixMatch with distribution alignment and the relative threshold). With CN on the
  input only (the context-normalization authors' released AdaMatch code) the BatchNorm layers
  behind it still pool, and the interpolation acts there. At test time each domain id selects
  its own running statistics.
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

from contextnorm.config import TrainConfig
from contextnorm.tasks.classification import ClassificationModule
from contextnorm.tasks.module import build_optimizer, build_scheduler
from contextnorm.tasks.preprocess import BatchPreprocess

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


# --- augmentation -----------------------------------------------------------------------------


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

    Args:
        image_size: (height, width) of the images.
        translate: the weak view's largest shift, as a share of the image side.
        flip: the weak view also flips horizontally with probability 0.5.
        randaugment_ops: RandAugment operations per image in the strong view.
        cutout: the strong view ends with a grey square over up to a quarter of the image.
    """

    def __init__(
        self,
        image_size: tuple[int, int],
        *,
        translate: float,
        flip: bool,
        randaugment_ops: int,
        cutout: bool,
    ) -> None:
        super().__init__()
        padding = round(translate * max(image_size))
        weak: list[nn.Module] = []
        if padding:
            weak.append(
                augmentation.RandomCrop(image_size, padding=padding, padding_mode="reflect")
            )
        if flip:
            weak.append(augmentation.RandomHorizontalFlip())
        self.weak_ops = augmentation.AugmentationSequential(*weak) if weak else nn.Identity()
        self.num_strong_ops = randaugment_ops
        self.strong_ops = nn.ModuleList(RandAugment(n=1, m=_KORNIA_MIDDLE_MAGNITUDE).children())
        self.cutout = (
            augmentation.RandomErasing(
                p=1.0, scale=(0.02, CUTOUT_MAX_AREA), ratio=(1.0, 1.0), value=CUTOUT_FILL
            )
            if cutout
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


# --- the Lightning module ----------------------------------------------------------------------


class AdaMatchModule(ClassificationModule):
    """A classifier trained by AdaMatch, or on the labelled source alone, and tested per view.

    Training batches are ``(uint8 images, labels, contexts)`` holding ``n_s =
    optimization.batch_size`` source samples followed by ``n_t = uratio * n_s`` target
    samples (:class:`contextnorm.tasks.adaptation_data.PairedDomainBatches`). The target labels
    never reach a loss; they only feed the logged pseudo-label accuracy. Validation and test
    are those of :class:`~contextnorm.tasks.classification.ClassificationModule`, one set of
    metrics per named view.

    Optimisation: the optimiser of ``train.optimizer`` (the papers: Adam, learning rate 0.03)
    with ``train.weight_decay`` on conv and linear weights only (the Keras example's L2 kernel
    regularisers and the AdaMatch authors' code decay those alone; a decayed CN-X ``sigma`` or
    per-context gain would be pulled away from what it estimates). ``train.schedule: cosine``
    decays the rate at every step along a half cosine to ``final_lr_fraction`` of it (Keras
    ``CosineDecay(lr, T, alpha)``, the papers' schedule with alpha 0.25); the other schedules
    are those of ``train:``.

    Logged per epoch, besides the classification metrics: ``train/source_loss``,
    ``train/target_loss``, ``train/mask_rate`` (share of target samples with a pseudo-label),
    ``train/threshold``, ``train/target_weight`` and ``train/pseudo_label_accuracy``.

    Args:
        model: the classifier.
        tested_layers: the norm layers under test inside it.
        preprocess: uint8 -> normalised float, without augmentation (AdaMatch augments
            itself, between the two).
        augment: the weak and strong views.
        optimization: the ``train:`` settings; ``batch_size`` is n_s.
        num_classes: number of classes.
        test_views, val_views: as for :class:`ClassificationModule`.
        uratio: target images per source image in a batch.
        tau: the relative confidence ratio.
        final_lr_fraction: where the cosine schedule ends, as a share of the learning rate.
        source_only: train on the source loss alone (the target images still share the
            forward pass, so their batch statistics count, as in the AdaMatch authors'
            baseline).
    """

    def __init__(
        self,
        model: nn.Module,
        tested_layers: Sequence[nn.Module],
        preprocess: BatchPreprocess,
        augment: WeakStrongAugment,
        optimization: TrainConfig,
        num_classes: int,
        test_views: Sequence[str],
        val_views: Sequence[str] = (),
        *,
        uratio: int,
        tau: float,
        final_lr_fraction: float,
        source_only: bool,
    ) -> None:
        super().__init__(
            model,
            tested_layers,
            preprocess,
            optimization,
            num_classes,
            test_views,
            val_views,
            weighted=True,
        )
        if preprocess.augmentation is not None:
            raise ValueError(
                "AdaMatch applies its own weak and strong augmentation: build the BatchPreprocess "
                "with crop_flip=False"
            )
        self.augment = augment
        self.source_batch_size = optimization.batch_size
        self.target_batch_size = uratio * optimization.batch_size
        self.tau = tau
        self.final_lr_fraction = final_lr_fraction
        self.source_only = source_only
        # The per-domain loss terms and mu(t) of the latest step, for gradient measurements
        # (contextnorm.tasks.gradient_variance).
        self.domain_losses: dict[str, Tensor] = {}
        self.target_weight = 0.0

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
        images, labels, contexts = batch
        n_source, n_target = self.source_batch_size, self.target_batch_size
        if images.shape[0] != n_source + n_target:
            raise ValueError(
                f"a training batch must hold batch_size + uratio * batch_size = "
                f"{n_source + n_target} images (source first), got {images.shape[0]}; build "
                "the loader with PairedDomainBatches from the same settings"
            )
        weak, strong = self._normalised_views(images)
        source_contexts, target_contexts = contexts[:n_source], contexts[n_source:]
        combined = torch.cat(
            [weak[:n_source], strong[:n_source], weak[n_source:], strong[n_source:]]
        )
        combined_contexts = torch.cat(
            [source_contexts, source_contexts, target_contexts, target_contexts]
        )
        source_labels = labels[:n_source]

        if self.source_only:
            logits = self(combined, combined_contexts)
            loss = source_loss(logits[:n_source], logits[n_source : 2 * n_source], source_labels)
            self.domain_losses = {"source": loss}
            self._log_training(loss, logits[:n_source], source_labels)
            self._log_terms({"source_loss": loss}, n_source)
            return loss

        with buffers_restored(self.model):
            source_alone = self(combined[: 2 * n_source], combined_contexts[: 2 * n_source])
        logits = self(combined, combined_contexts)
        source_logits = interpolate_logits(
            logits[: 2 * n_source], source_alone, torch.rand_like(source_alone)
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
            tau=self.tau,
            target_weight=self.target_weight,
        )
        self.domain_losses = {"source": terms.source, "target": terms.target}
        # Accuracy on the weak source view.
        self._log_training(terms.total, source_logits[:n_source], source_labels)
        self._log_terms(
            {
                "source_loss": terms.source,
                "target_loss": terms.target,
                "mask_rate": terms.mask.float().mean(),
                "threshold": terms.threshold,
                "target_weight": self.target_weight,
                "pseudo_label_accuracy": (terms.pseudo_labels == labels[n_source:]).float().mean(),
            },
            n_source,
        )
        return terms.total

    def _log_terms(self, values: dict[str, Tensor | float], batch_size: int) -> None:
        """Log the step's loss terms and pseudo-label statistics, averaged over the epoch."""
        for name, value in values.items():
            self.log(
                f"train/{name}",
                value.detach() if isinstance(value, Tensor) else value,
                on_step=False,
                on_epoch=True,
                batch_size=batch_size,
                sync_dist=True,
            )

    def configure_optimizers(self) -> Any:
        settings = self.optimization
        decayed, kept = _split_decayed_parameters(self.model)
        optimizer = build_optimizer(
            [{"params": decayed}, {"params": kept, "weight_decay": 0.0}], settings
        )
        if settings.schedule == "cosine":
            # Per step from lr down to final_lr_fraction * lr: Keras CosineDecay(lr, T, alpha).
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer,
                T_max=max(1, int(self.trainer.estimated_stepping_batches)),
                eta_min=self.final_lr_fraction * settings.lr,
            )
            interval = "step"
        else:
            scheduler, interval = build_scheduler(optimizer, settings), "epoch"
        if scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval},
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
