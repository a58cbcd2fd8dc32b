"""Image generation: a GAN trained with Lightning, scored by FID and KID during training.

:class:`GANModule` trains a generator (the norm under test inside) against a discriminator with
the standard non-saturating loss (Goodfellow et al., "Generative Adversarial Nets",
arXiv:1406.2661, 2014), one discriminator step then one generator step per batch, each network
with its own Adam optimizer at the papers' settings (lr 0.0002, betas (0, 0.9): Faye et al.,
arXiv:2403.16798, 2024, §IV-D in v2 and v3). Every ``evaluate_every`` epochs (the papers: 10)
and after the last one it scores a fixed set of generated images with
:class:`~contextnorm.tasks.gan_metrics.GenerationScores` and logs ``gen/fid``, ``gen/kid`` and
``gen/kid_std``; the records are kept in :attr:`GANModule.score_history` (and checkpoints) for
the FID-vs-epoch curves.

Contexts of generated samples. A generator whose norms are context layers (CN, CN-X, CN-E)
normalises each sample with the statistics of a context id, and a generated image has none of
its own: each is *generated for* a context drawn at random from the real data's context
distribution (``context_prior``, the share of each class or cluster among the training images),
and the ids are routed with :func:`contextnorm.use_context`. The discriminator never sees them;
the generator learns to use its per-context normalisation or not. The papers used only
context-free norms here (BN, MixNorm, ACN); context layers in a generator are this toolkit's
extension.

Batches are ``(uint8 images, ...)``: labels and contexts of real images, if any, are unused.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import contextnorm as cn
from contextnorm.tasks.gan_metrics import GenerationScores
from contextnorm.training.activations import MAX_CHANNEL_VALUES, ActivationSample

SCORE_NAMES = ("fid", "kid", "kid_std")
HISTORY_KEY = "generation_scores"
# Streams of the fixed-latent generator, one per use, so that neither depends on the other's size.
_GRID_STREAM, _EVALUATION_STREAM = 0, 1


@dataclass(frozen=True)
class GANSettings:
    """Optimisation, evaluation and sampling settings of a GAN run.

    Attributes:
        lr: Adam learning rate of both networks (the papers: 0.0002).
        betas: Adam's (beta1, beta2) for both networks (the papers: (0, 0.9)).
        evaluate_every: score FID and KID every this many epochs, and after the last epoch
            (the papers: every 10 epochs).
        grid_size: images in the fixed sample grid (:meth:`GANModule.grid_images`).
        sample_batch_size: batch size when generating images for scores and grids.
        seed: seed of the fixed latents (the sample grid and the scored images), the same for
            every method and run seed, so grids and scores compare across them.
    """

    lr: float = 2e-4
    betas: tuple[float, float] = (0.0, 0.9)
    evaluate_every: int = 10
    grid_size: int = 64
    sample_batch_size: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        for key in ("evaluate_every", "grid_size", "sample_batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] as floats in [-1, 1], the generator's tanh range."""
    return images.float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generated images in [-1, 1] as uint8 (rounded, clipped), the form real images have."""
    return ((images.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def empirical_prior(contexts: torch.Tensor, num_contexts: int) -> torch.Tensor:
    """The share of each context id among ``contexts`` (int64 ids (N,) in [0, K)), float (K,)."""
    if contexts.dtype != torch.int64 or contexts.dim() != 1 or len(contexts) == 0:
        raise ValueError(
            "contexts must be a non-empty int64 tensor (N,) of context ids; got "
            f"{contexts.dtype} {tuple(contexts.shape)}"
        )
    if int(contexts.min()) < 0 or int(contexts.max()) >= num_contexts:
        raise ValueError(
            f"context ids must lie in [0, {num_contexts}); got [{int(contexts.min())}, "
            f"{int(contexts.max())}]"
        )
    counts = torch.bincount(contexts, minlength=num_contexts).double()
    return (counts / counts.sum()).float()


def _seeded(seed: int, stream: int) -> torch.Generator:
    derived = int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])
    return torch.Generator().manual_seed(derived)


def grid_columns(count: int) -> int:
    """Columns of the sample grid: the grid is as square as ``count`` allows."""
    return math.ceil(math.sqrt(count))


class GANModule(L.LightningModule):
    """A GAN trained with manual optimization: two Adam optimizers, non-saturating loss.

    A LightningModule rather than a ``ContextModule``: what that base holds is classification's
    (one optimizer from ``TrainConfig``, with weight decay and a schedule; mean/std input
    normalisation and crop/flip augmentation), while a GAN needs two optimizers with betas and
    images in the generator's [-1, 1] range, unaugmented. It shares the library's context
    routing (:func:`contextnorm.use_context`).

    Everything a resumed run needs is in the checkpoint: both networks (spectral-norm vectors
    and running statistics included), both optimizers (Lightning), the fixed latents and the
    context prior (buffers) and :attr:`score_history`. The score objects hold no state between
    evaluations.

    Args:
        generator: maps latents (N, ``generator.latent_dim``) to images in [-1, 1]; its norms
            may be context layers.
        discriminator: maps images to real-vs-generated logits (N,).
        settings: learning rate, betas, evaluation cadence, fixed-latent seed.
        context_prior: for a generator with context layers, the probability of each context id
            (K,), e.g. :func:`empirical_prior` of the training contexts; generated samples draw
            their ids from it. Not used otherwise.
        scores: FID/KID of the generated images; ``None`` trains without scoring.

    Raises:
        ValueError: a generator without ``latent_dim``, a context generator without a prior,
            or a prior that does not fit its context layers.
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        settings: GANSettings = GANSettings(),
        *,
        context_prior: torch.Tensor | None = None,
        scores: GenerationScores | None = None,
    ) -> None:
        super().__init__()
        latent_dim = getattr(generator, "latent_dim", None)
        if not isinstance(latent_dim, int):
            raise ValueError(
                f"the generator ({type(generator).__name__}) must have an int attribute "
                "latent_dim, the size of its latent vectors"
            )
        self.automatic_optimization = False
        self.generator = generator
        self.discriminator = discriminator
        self.settings = settings
        self.latent_dim = latent_dim
        self.needs_context = cn.uses_context(generator)
        self.register_buffer("context_prior", self._checked_prior(context_prior))
        num_contexts = len(self.context_prior)
        grid_latents = torch.randn(
            settings.grid_size, latent_dim, generator=_seeded(settings.seed, _GRID_STREAM)
        )
        # Row r of the grid is generated for context r mod K.
        rows = torch.arange(settings.grid_size) // grid_columns(settings.grid_size)
        self.register_buffer("grid_latents", grid_latents)
        self.register_buffer("grid_contexts", rows % num_contexts)
        # A plain attribute, not a submodule: the extractor's weights stay out of checkpoints.
        self.scores = scores
        self.score_history: list[dict[str, float]] = []

    def _checked_prior(self, prior: torch.Tensor | None) -> torch.Tensor:
        if not self.needs_context:
            return torch.ones(1)
        if prior is None:
            raise ValueError(
                "the generator has context layers, so every generated sample needs a context id: "
                "pass context_prior, the share of each context among the training images "
                "(empirical_prior(train_contexts, K))"
            )
        prior = torch.as_tensor(prior, dtype=torch.float32)
        if prior.dim() != 1 or not bool(torch.isfinite(prior).all()) or bool((prior < 0).any()):
            raise ValueError(f"context_prior must be finite non-negative weights (K,); got {prior}")
        if float(prior.sum()) <= 0:
            raise ValueError("context_prior must give some context a positive weight")
        counts = {
            getattr(layer, "num_contexts", None)
            for layer in self.generator.modules()
            if getattr(layer, "uses_context", False)
        }
        if counts != {len(prior)}:
            raise ValueError(
                f"context_prior has {len(prior)} entries but the generator's context layers "
                f"have num_contexts {sorted(counts, key=str)}; they must match"
            )
        return prior / prior.sum()

    # --- generation ----------------------------------------------------------------------

    def forward(self, latents: torch.Tensor, contexts: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [-1, 1] generated from ``latents`` for the context ids ``contexts``."""
        with cn.use_context(contexts if self.needs_context else None):
            return self.generator(latents)

    def sample_contexts(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``count`` context ids drawn from the context prior (zeros for a context-free net):
        on the module's device from the global random state, or on the CPU from ``generator``."""
        prior = self.context_prior if generator is None else self.context_prior.cpu()
        return torch.multinomial(prior, count, replacement=True, generator=generator)

    @torch.no_grad()
    def generate(self, latents: torch.Tensor, contexts: torch.Tensor) -> Iterator[torch.Tensor]:
        """uint8 images for ``latents``/``contexts``, in batches, with the generator in eval mode
        (its norms use their running estimates: each image depends on its latent alone)."""
        was_training = self.generator.training
        self.generator.eval()
        try:
            for chunk in torch.arange(len(latents)).split(self.settings.sample_batch_size):
                yield to_uint8(
                    self(latents[chunk].to(self.device), contexts[chunk].to(self.device))
                )
        finally:
            self.generator.train(was_training)

    def grid_images(self) -> torch.Tensor:
        """The fixed sample grid: uint8 images (grid_size, C, H, W), row r for context r mod K.

        The latents are a buffer, so a reloaded checkpoint gives the same grid, and every method
        and run seed uses the same latents."""
        return torch.cat(list(self.generate(self.grid_latents, self.grid_contexts))).cpu()

    def evaluation_inputs(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed latents and context ids of the scored images (CPU), the same every time."""
        stream = _seeded(self.settings.seed, _EVALUATION_STREAM)
        latents = torch.randn(count, self.latent_dim, generator=stream)
        return latents, self.sample_contexts(count, stream)

    def evaluate(self) -> dict[str, float]:
        """FID, KID and KID spread of ``scores.num_generated`` images from the fixed latents."""
        if self.scores is None:
            raise RuntimeError("this GANModule was built without scores; pass scores=...")
        scores = self.scores.to(self.device)
        rank = self.global_rank
        world_size = self.trainer.world_size if self._trainer is not None else 1
        latents, contexts = self.evaluation_inputs(scores.num_generated)
        mine = torch.arange(rank, scores.num_generated, world_size)
        for images in self.generate(latents[mine], contexts[mine]):
            scores.update(images)
        return scores.compute(rank=rank, world_size=world_size)

    # --- training ------------------------------------------------------------------------

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        settings = self.settings
        return [
            torch.optim.Adam(self.generator.parameters(), lr=settings.lr, betas=settings.betas),
            torch.optim.Adam(self.discriminator.parameters(), lr=settings.lr, betas=settings.betas),
        ]

    def training_step(self, batch: Any, batch_idx: int) -> None:
        images = batch[0] if isinstance(batch, Sequence) else batch
        real = to_unit_range(images)
        count = len(real)
        optimizer_g, optimizer_d = self.optimizers()
        latents = torch.randn(count, self.latent_dim, device=self.device)
        fake = self(latents, self.sample_contexts(count))

        # Discriminator: real -> 1, generated -> 0 (softplus(-x) = -log sigmoid(x)).
        real_logits = self.discriminator(real)
        fake_logits = self.discriminator(fake.detach())
        loss_d = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
        optimizer_d.zero_grad()
        self.manual_backward(loss_d)
        optimizer_d.step()

        # Generator, non-saturating: maximise log D(G(z)) against the updated discriminator.
        with self.toggled_optimizer(optimizer_g):
            loss_g = F.softplus(-self.discriminator(fake)).mean()
            optimizer_g.zero_grad()
            self.manual_backward(loss_g)
            optimizer_g.step()

        values = {
            "train/loss_d": loss_d.detach(),
            "train/loss_g": loss_g.detach(),
            "train/d_real": torch.sigmoid(real_logits.detach()).mean(),
            "train/d_fake": torch.sigmoid(fake_logits.detach()).mean(),
        }
        self.log_dict(values, on_step=False, on_epoch=True, batch_size=count, sync_dist=True)

    def on_train_epoch_end(self) -> None:
        if self.scores is None or not self._evaluates(self.current_epoch):
            return
        record = {"epoch": self.current_epoch, **self.evaluate()}
        self.score_history.append(record)
        self.log_dict({f"gen/{name}": record[name] for name in SCORE_NAMES}, on_epoch=True)

    def _evaluates(self, epoch: int) -> bool:
        last_epoch = self.trainer.max_epochs is not None and epoch + 1 == self.trainer.max_epochs
        return (epoch + 1) % self.settings.evaluate_every == 0 or last_epoch

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[HISTORY_KEY] = [dict(record) for record in self.score_history]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.score_history = [dict(record) for record in checkpoint.get(HISTORY_KEY, [])]


@torch.no_grad()
def capture_generator_activations(
    module: GANModule, layer: nn.Module, *, samples: int, channel: int, seed: int
) -> ActivationSample:
    """What ``layer`` (a norm inside the generator) sees for ``samples`` fixed latents, in eval
    mode, for the activation histograms (``contextnorm.plots.plot_activation_histograms``).

    ``labels`` of the sample are -1 (generated images have none); ``contexts`` are the ids each
    image was generated for.
    """
    seen: list[torch.Tensor] = []
    produced: list[torch.Tensor] = []

    def hook(_: nn.Module, arguments: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen.append(arguments[0].detach().float().cpu())
        produced.append(output.detach().float().cpu())

    stream = _seeded(seed, _EVALUATION_STREAM)
    latents = torch.randn(samples, module.latent_dim, generator=stream)
    contexts = module.sample_contexts(samples, stream)
    handle = layer.register_forward_hook(hook)
    try:
        for _ in module.generate(latents, contexts):
            pass
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"{type(layer).__name__} did not run: it is not part of the generator")
    inputs, outputs = torch.cat(seen), torch.cat(produced)
    if not 0 <= channel < inputs.shape[1]:
        raise ValueError(f"channel={channel} but the layer has {inputs.shape[1]} channels")
    values = inputs[:, channel].reshape(-1).numpy()
    if len(values) > MAX_CHANNEL_VALUES:
        values = np.random.default_rng(seed).choice(values, MAX_CHANNEL_VALUES, replace=False)
    return ActivationSample(
        layer=type(layer).__name__,
        channel=channel,
        channel_values=values,
        features=outputs.flatten(2).mean(2).numpy(),
        contexts=contexts.numpy(),
        labels=np.full(samples, -1),
    )
