"""Image generation, the papers' third experiment family: a GAN whose generator holds the norm
under test, scored by FID and KID while it trains.

Faye et al. 2024a (§IV-D, Fig. 10-11) and 2024b (§IV-B, Fig. 5-6) train a DCGAN on CIFAR-100
for 200 epochs with BatchNorm, MixNorm or ACN (K = 3) in the generator, Adam (lr 0.0002, betas
(0, 0.9)) for both networks, and draw the FID every 10 epochs. :class:`GenerationModule` trains
a generator against a discriminator with the non-saturating loss (Goodfellow et al. 2014), one
discriminator step then one generator step per batch; every ``evaluate_every`` epochs and after
the last it scores images generated from fixed latents (:class:`~contextnorm.tasks.fid.
GenerationScores`) and logs ``val/fid`` and ``val/kid``, which become the FID-vs-epoch curves.

Contexts of generated images. A context layer in the generator (CN, CN-X, CN-E) normalises
each image with the statistics of a context id, and a generated image has none of its own:
each is *generated for* an id drawn from the real data's context shares (the share of each
class or cluster among the training images). The discriminator never sees the ids, so nothing
ties an id to what the real images of that context look like: a context layer splits the
generated images into K groups, each with statistics of its own (CN: of its batch; CN-X:
learned), and class and cluster contexts differ only in K and the shares. The papers used
context-free norms only (BN, MixNorm, ACN); context layers in a generator are an extension.

Batches are ``(uint8 images, labels, contexts)``; labels and contexts of real images are unused.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

import contextnorm as cn
from contextnorm.config import (
    ConfigError,
    ContextConfig,
    DataConfig,
    ExperimentConfig,
    TrainConfig,
)
from contextnorm.data import DATASETS, ImageData
from contextnorm.io import atomic_write
from contextnorm.metrics import MetricSpec, ReportSpec, ViewSpec
from contextnorm.models import GENERATORS, DCGANDiscriminator
from contextnorm.registry import UnknownNameError
from contextnorm.tasks.base import TASKS, Probe, Selection, Task
from contextnorm.tasks.data import (
    ContextSplit,
    assign_contexts,
    context_names,
    fit_contexts,
    load_splits,
    split_loader,
)
from contextnorm.tasks.fid import (
    ClassifierRecipe,
    FeatureExtractor,
    GenerationScores,
    inception_features,
    local_classifier_features,
)
from contextnorm.tasks.module import TaskModule, build_optimizer, run_with_contexts
from contextnorm.tasks.network import build_generator_network, get_method, method_location
from contextnorm.tasks.preprocess import BatchPreprocess

SAMPLES_FILE = "samples.png"
REAL_SPLITS = ("test", "train")
DISCRIMINATOR_NORMS = ("spectral", "batch")
# Streams of the fixed latents, one per use, so that none depends on another's size.
_GRID_STREAM, _EVALUATION_STREAM, _PROBE_STREAM, _REAL_STREAM, _GAP_STREAM = 0, 1, 2, 3, 4
_GRID_GAP = 2
_GRID_SCALE = 2


@dataclass
class DiscriminatorOptions:
    """The DCGAN discriminator (``task.options.discriminator``).

    Attributes:
        norm: ``spectral`` (spectral normalization on every weight, no BatchNorm; the default,
            see :class:`~contextnorm.models.DCGANDiscriminator`) or ``batch`` (Radford et al.).
        widths: channels of its three convolutions.
    """

    norm: str = "spectral"
    widths: list[int] = field(default_factory=lambda: [64, 128, 256])


@dataclass
class GenerationOptions:
    """``task.options`` of the generation task.

    Attributes:
        betas: Adam's (beta1, beta2) for both networks (the papers: 0 and 0.9); the learning
            rate and weight decay are ``train.lr`` and ``train.weight_decay``.
        evaluate_every: score FID and KID every this many epochs, and after the last one (the
            papers: every 10 epochs).
        generated_images: images generated (from fixed latents) for each evaluation.
        real_images: real images every evaluation compares with (a fixed seeded subset of
            ``real_split``); ``null``: all of them.
        real_split: ``test`` (images neither the generator nor the local feature classifier
            trained on) or ``train``.
        kid_subsets, kid_subset_size: KID is the mean over this many random subsets of this
            many images of each side.
        grid_size: images of the sample grid drawn for each method, from fixed latents.
        latent_seed: seed of the fixed latents of the grid and of the scored images: the same
            for every method and run seed, so that grids and scores compare.
        inception_weights: a local file of the FID Inception-v3 weights
            (``pt_inception-2015-12-05-6726825d.pth`` of torch-fidelity) for the standard FID;
            ``null`` scores on the features of a classifier trained here on the real training
            images (named so in every table and figure: not comparable with Inception FID).
        classifier: how that local classifier is trained.
        discriminator: the discriminator.
    """

    betas: list[float] = field(default_factory=lambda: [0.0, 0.9])
    evaluate_every: int = 10
    generated_images: int = 10_000
    real_images: int | None = None
    real_split: str = "test"
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    grid_size: int = 64
    latent_seed: int = 0
    inception_weights: str | None = None
    classifier: ClassifierRecipe = field(default_factory=ClassifierRecipe)
    discriminator: DiscriminatorOptions = field(default_factory=DiscriminatorOptions)

    def check(self) -> None:
        where = "task.options"
        if len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ConfigError(f"{where}.betas must be two numbers in [0, 1); got {self.betas}")
        for key in ("evaluate_every", "generated_images", "kid_subsets", "grid_size"):
            if getattr(self, key) < 1:
                raise ConfigError(
                    f"{where}.{key} must be a positive integer; got {getattr(self, key)}"
                )
        if self.real_images is not None and self.real_images < 2:
            raise ConfigError(
                f"{where}.real_images must be at least 2, or null for the whole split; got "
                f"{self.real_images}"
            )
        if self.real_split not in REAL_SPLITS:
            raise ConfigError(
                f"{where}.real_split must be one of {', '.join(REAL_SPLITS)}; got "
                f"{self.real_split!r}"
            )
        if self.discriminator.norm not in DISCRIMINATOR_NORMS:
            raise ConfigError(
                f"{where}.discriminator.norm must be one of {', '.join(DISCRIMINATOR_NORMS)}; "
                f"got {self.discriminator.norm!r}"
            )
        self.classifier.check(f"{where}.classifier")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generated images in [-1, 1] as uint8 (rounded, clipped), the form real images have."""
    return ((images.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def unit_range(channels: int) -> BatchPreprocess:
    """uint8 images to the generator's tanh range [-1, 1], never augmented."""
    return BatchPreprocess([0.5] * channels, [0.5] * channels, (1, 1), crop_flip=False)


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


def tile_images(images: torch.Tensor, columns: int) -> np.ndarray:
    """uint8 images (N, C, H, W) as one (rows*H, columns*W[, C]) array, white gaps between."""
    if images.dtype != torch.uint8 or images.dim() != 4 or len(images) == 0:
        raise ValueError(
            f"images must be a non-empty uint8 tensor (N, C, H, W); got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    count, channels, height, width = images.shape
    rows = -(-count // columns)
    step_y, step_x = height + _GRID_GAP, width + _GRID_GAP
    canvas = np.full(
        (rows * step_y - _GRID_GAP, columns * step_x - _GRID_GAP, channels), 255, np.uint8
    )
    pixels = images.permute(0, 2, 3, 1).numpy()
    for index in range(count):
        row, column = divmod(index, columns)
        canvas[row * step_y : row * step_y + height, column * step_x : column * step_x + width] = (
            pixels[index]
        )
    return canvas[..., 0] if channels == 1 else canvas


def save_image_grid(images: torch.Tensor, path: str | Path) -> Path:
    """Write uint8 images (N, C, H, W) as one PNG grid, each pixel drawn 2x2, atomically."""
    tiled = Image.fromarray(tile_images(images, grid_columns(len(images))))
    enlarged = tiled.resize(
        (tiled.width * _GRID_SCALE, tiled.height * _GRID_SCALE), Image.Resampling.NEAREST
    )
    return atomic_write(path, lambda temporary: enlarged.save(temporary, format="PNG"))


class GenerationModule(TaskModule):
    """A GAN trained with manual optimization: two Adam optimizers, the non-saturating loss.

    ``model`` is the generator (the norms under test inside); ``forward(latents, contexts)``
    generates images in [-1, 1] for context ids. Logged per epoch: ``train/loss_d``,
    ``train/loss_g``, ``train/d_real``, ``train/d_fake`` (the discriminator's mean
    probability of "real" for real and generated images) and, in scored epochs, ``val/fid``
    and ``val/kid``.

    Everything a resumed run needs is in the checkpoint: both networks (spectral-norm vectors
    and running statistics included), both optimizers, and the fixed latents and the context
    prior (buffers). The scores hold no state between evaluations and stay out of it.

    Args:
        generator: maps latents (N, ``generator.latent_dim``) to images in [-1, 1].
        tested_layers: the norms under test inside the generator.
        discriminator: maps images in [-1, 1] to real-vs-generated logits (N,).
        preprocess: real uint8 batches to the generator's range (:func:`unit_range`).
        optimization: ``train:``: Adam's learning rate and weight decay for both networks.
        betas: Adam's betas for both networks.
        context_prior: for a generator with context layers, the probability of each context id
            (K,), e.g. :func:`empirical_prior` of the training contexts; generated images draw
            their ids from it. Not used otherwise.
        scores: FID/KID of the generated images; ``None`` trains without scoring.
        evaluate_every: score every this many epochs and after the last one.
        grid_size: images of the fixed sample grid (:meth:`grid_images`).
        latent_seed: seed of the fixed latents (grid and scored images).
        sample_batch_size: batch size when generating images in eval mode.

    Raises:
        ValueError: a generator without ``latent_dim``, a context generator without a prior,
            or a prior that does not fit its context layers.
    """

    def __init__(
        self,
        generator: nn.Module,
        tested_layers: Sequence[nn.Module],
        discriminator: nn.Module,
        preprocess: BatchPreprocess,
        optimization: TrainConfig,
        *,
        betas: Sequence[float] = (0.0, 0.9),
        context_prior: torch.Tensor | None = None,
        scores: GenerationScores | None = None,
        evaluate_every: int = 10,
        grid_size: int = 64,
        latent_seed: int = 0,
        sample_batch_size: int = 500,
    ) -> None:
        super().__init__(generator, tested_layers, optimization)
        latent_dim = getattr(generator, "latent_dim", None)
        if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(
                f"the generator ({type(generator).__name__}) must have an int attribute "
                "latent_dim, the size of its latent vectors"
            )
        self.automatic_optimization = False
        self.discriminator = discriminator
        self.preprocess = preprocess
        self.betas = tuple(float(beta) for beta in betas)
        self.latent_dim = latent_dim
        self.scores = scores
        self.evaluate_every = evaluate_every
        self.latent_seed = latent_seed
        self.sample_batch_size = sample_batch_size
        self.register_buffer("context_prior", self._checked_prior(context_prior))
        grid_latents = torch.randn(
            grid_size, latent_dim, generator=_seeded(latent_seed, _GRID_STREAM)
        )
        # Row r of the grid is generated for context r mod K.
        rows = torch.arange(grid_size) // grid_columns(grid_size)
        self.register_buffer("grid_latents", grid_latents)
        self.register_buffer("grid_contexts", rows % len(self.context_prior))

    @property
    def generator(self) -> nn.Module:
        return self.model

    def _checked_prior(self, prior: torch.Tensor | None) -> torch.Tensor:
        if not cn.uses_context(self.generator):
            return torch.ones(1)
        if prior is None:
            raise ValueError(
                "the generator has context layers, so every generated image needs a context id: "
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

    def sample_contexts(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``count`` context ids drawn from the context prior (zeros for a context-free net):
        on the module's device from the global random state, or on the CPU from ``generator``."""
        prior = self.context_prior if generator is None else self.context_prior.cpu()
        return torch.multinomial(prior, count, replacement=True, generator=generator)

    def fixed_inputs(self, count: int, seed: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` latents and context ids (CPU) that depend on ``seed`` and ``stream`` alone."""
        source = _seeded(seed, stream)
        latents = torch.randn(count, self.latent_dim, generator=source)
        return latents, self.sample_contexts(count, source)

    @torch.no_grad()
    def generate(
        self, latents: torch.Tensor, contexts: torch.Tensor, *, batch_statistics: bool = False
    ) -> Iterator[torch.Tensor]:
        """uint8 images for ``latents``/``contexts``, in batches.

        By default the generator runs in eval mode, in batches of ``sample_batch_size``: its
        norms use their running estimates, and each image depends on its latent alone. With
        ``batch_statistics``, a copy of it runs in training mode, in batches of the training
        batch size, so that each image is normalised with the statistics of its batch as in
        training (random draws inside the norms seeded from ``latent_seed``). The generator
        itself, running estimates included, is left unchanged either way.
        """
        was_training = self.generator.training
        if batch_statistics:
            generator = copy.deepcopy(self.generator).train()
            batch_size = self.optimization.batch_size
        else:
            generator = self.generator.eval()
            batch_size = self.sample_batch_size
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(self.latent_seed)
                for chunk in torch.arange(len(latents)).split(batch_size):
                    ids = contexts[chunk].to(self.device)
                    images = run_with_contexts(generator, latents[chunk].to(self.device), ids)
                    yield to_uint8(images)
        finally:
            self.generator.train(was_training)

    def grid_images(self) -> torch.Tensor:
        """The fixed sample grid: uint8 images (grid_size, C, H, W), row r for context r mod K.

        The latents are a buffer: a reloaded checkpoint gives the same grid, and every method
        and run seed uses the same latents."""
        return torch.cat(list(self.generate(self.grid_latents, self.grid_contexts))).cpu()

    def evaluate(self, *, batch_statistics: bool = False) -> dict[str, float]:
        """FID, KID and KID spread of ``scores.num_generated`` images from the fixed latents,
        generated as :meth:`generate` does."""
        if self.scores is None:
            raise RuntimeError("this module was built without scores; pass scores=...")
        scores = self.scores.to(self.device)
        rank = self.global_rank
        world_size = self.trainer.world_size if self._trainer is not None else 1
        latents, contexts = self.fixed_inputs(
            scores.num_generated, self.latent_seed, _EVALUATION_STREAM
        )
        mine = torch.arange(rank, scores.num_generated, world_size)
        for images in self.generate(
            latents[mine], contexts[mine], batch_statistics=batch_statistics
        ):
            scores.update(images)
        return scores.compute(rank=rank, world_size=world_size)

    # --- training ------------------------------------------------------------------------

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Adam for the generator, then for the discriminator, with the same settings."""
        return [
            build_optimizer(self.generator.parameters(), self.optimization, betas=self.betas),
            build_optimizer(self.discriminator.parameters(), self.optimization, betas=self.betas),
        ]

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, *rest = batch
        return (self.preprocess(images, augment=False), *rest)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real = batch[0]
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
        scores = self.evaluate()
        # Every process holds the scores of all images; nothing to reduce.
        self.log_dict({"val/fid": scores["fid"], "val/kid": scores["kid"]})

    def _evaluates(self, epoch: int) -> bool:
        last_epoch = self.trainer.max_epochs is not None and epoch + 1 == self.trainer.max_epochs
        return (epoch + 1) % self.evaluate_every == 0 or last_epoch


class GenerationData(L.LightningDataModule):
    """Shuffled training batches of (uint8 image, label, context); no validation or test loader:
    the module scores generated images itself."""

    def __init__(self, train: ContextSplit, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.train = train
        self.batch_size = batch_size
        self.num_workers = num_workers

    def train_dataloader(self) -> DataLoader:
        return split_loader(
            self.train,
            self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            trainer=self.trainer,
        )


@dataclass
class PreparedContexts:
    """The contexts of one or more methods: K, names, and the share of each id (the prior)."""

    config: ContextConfig
    num_contexts: int
    names: list[str]
    prior: torch.Tensor


@TASKS.register("generation")
class GenerationTask(Task):
    """Image generation with a GAN (the papers' DCGAN), scored by FID and KID every few epochs."""

    Options = GenerationOptions
    selection = Selection("val/fid", "min")

    def setup(self) -> None:
        config, options = self.config, self.options
        for index, method in enumerate(config.methods):
            get_method(method.name, method_location(config, index))
        _check_training(config)
        try:
            GENERATORS.get(config.model.name)
        except UnknownNameError as error:
            raise ConfigError(
                f"model.name: {error}; the generation task trains a generator (contextnorm list)"
            ) from None
        splits = load_splits(config.data)
        self.train = splits.train
        # Each kind of contexts once, however many methods use it.
        prepared: dict[str, PreparedContexts] = {}

        def prepare(contexts: ContextConfig) -> PreparedContexts:
            key = json.dumps(dataclasses.asdict(contexts), sort_keys=True, default=str)
            if key not in prepared:
                prepared[key] = _prepare_contexts(contexts, splits.train)
            return prepared[key]

        self.shared = prepare(config.contexts)
        self.contexts = [prepare(method.contexts or config.contexts) for method in config.methods]
        reference = splits.test if options.real_split == "test" else splits.train
        self.real = _real_images(reference.images, options)
        self.data_title = _data_title(config.data)
        self.extractor = self._feature_extractor()
        try:
            self.scores = GenerationScores(
                self.extractor,
                self.real,
                num_generated=options.generated_images,
                kid_subset_size=options.kid_subset_size,
                kid_subsets=options.kid_subsets,
                seed=options.latent_seed,
            )
        except ValueError as error:
            raise ConfigError(
                f"task.options (generated_images, real_images, kid_subset_size): {error}"
            ) from error

    def _feature_extractor(self) -> FeatureExtractor:
        options = self.options
        if options.inception_weights is not None:
            try:
                return inception_features(options.inception_weights)
            except (OSError, ValueError, ModuleNotFoundError) as error:
                raise ConfigError(f"task.options.inception_weights: {error}") from error
        try:
            return local_classifier_features(self.train, self.data_title, recipe=options.classifier)
        except ValueError as error:
            raise ConfigError(f"task.options.classifier: {error}") from error

    def describe(self) -> ReportSpec:
        config, options, train = self.config, self.options, self.config.train
        fid_title, kid_title = self.scores.title("FID"), self.scores.title("KID")
        shape = "x".join(map(str, self.train.images.shape[1:]))
        discriminator = options.discriminator
        features = self.extractor.summary()
        accuracy = features.get("held_out_accuracy")
        extractor = self.extractor.description + (
            f" (held-out accuracy {100 * accuracy:.1f} %)" if accuracy is not None else ""
        )
        own = [
            f"{method.display_name}: {_describe_contexts(contexts)}"
            for method, contexts in zip(config.methods, self.contexts, strict=True)
            if method.contexts is not None
        ]
        notes = [
            "FID and KID here are measured on "
            + extractor
            + (
                "; they rank the methods of this experiment against each other and are not "
                "comparable with published (Inception) FIDs."
                if not self.extractor.comparable
                else "."
            ),
            "Context layers in the generator normalise each generated image with the "
            "statistics of a context id drawn from the contexts' shares among the training "
            "images; the discriminator never sees the ids, so class and cluster contexts differ "
            "only in K and the shares. Methods without context layers ignore the ids.",
        ]
        if own:
            notes.append("Methods with contexts of their own: " + "; ".join(own) + ".")
        lower = {"lower": 0.0, "higher_is_better": False}
        share = {"lower": 0.0, "upper": 1.0}
        return ReportSpec(
            about=[
                f"data: {config.data.name}, {len(self.train)} training images of shape {shape}, "
                "not augmented",
                f"generator: {config.model.name} ({_options_text(config.model.options)}), "
                f"tested norm placement: {config.model.placement}; discriminator: DCGAN, "
                f"{discriminator.norm} norm, widths {discriminator.widths}",
                f"contexts: {_describe_contexts(self.shared)}",
                f"training: {train.epochs} epochs, batch {train.batch_size}, {train.optimizer} "
                f"lr {train.lr:g}, betas ({options.betas[0]:g}, {options.betas[1]:g}), weight "
                f"decay {train.weight_decay:g}, for both networks; one discriminator step per "
                "generator step, non-saturating loss",
                f"scores: every {options.evaluate_every} epochs and after the last, "
                f"{options.generated_images} generated images (fixed latents, seed "
                f"{options.latent_seed}) against {len(self.real)} real {options.real_split} "
                f"images; KID over {options.kid_subsets} subsets of {options.kid_subset_size}; "
                f"features: {extractor}",
            ],
            views={
                "running": ViewSpec(
                    "running estimates",
                    f"{options.generated_images} images generated from the fixed latents after "
                    f"the last epoch, scored against {len(self.real)} real "
                    f"{options.real_split} images; the generator in eval mode: its norms use "
                    "their running estimates (the per-epoch curves are measured this way)",
                ),
                "batch": ViewSpec(
                    "batch statistics",
                    "the same images generated in training mode: each normalised with the "
                    f"statistics of its batch of {config.train.batch_size} generated images, as "
                    "in training (a layer without batch statistics, CN-X, gives the same images)",
                ),
            },
            metrics=[MetricSpec("fid", fid_title, **lower), MetricSpec("kid", kid_title, **lower)],
            curves=[
                MetricSpec("val/fid", fid_title, **lower),
                MetricSpec("val/kid", kid_title, **lower),
                MetricSpec("train/loss_d", "discriminator loss", **lower),
                MetricSpec("train/loss_g", "generator loss", **lower),
                MetricSpec("train/d_real", "D(real): mean probability 'real'", **share),
                MetricSpec("train/d_fake", "D(generated): mean probability 'real'", **share),
            ],
            notes=notes,
            num_contexts=self.shared.num_contexts,
            context_names=self.shared.names,
            run_images={
                SAMPLES_FILE: f"Images generated after the last epoch from the same "
                f"{options.grid_size} fixed latents for every method; a generator with context "
                "layers makes row r for context r mod K"
            },
        )

    def info(self) -> dict[str, Any]:
        return {
            "scores": self.scores.summary(),
            "samples": {"train": len(self.train), "real": len(self.real)},
            "image_shape": list(self.train.images.shape[1:]),
            "contexts": [
                {
                    "method": method.display_name,
                    "kind": contexts.config.kind,
                    "num_contexts": contexts.num_contexts,
                    "prior": contexts.prior.tolist(),
                }
                for method, contexts in zip(self.config.methods, self.contexts, strict=True)
            ],
        }

    def build_module(self, index: int) -> GenerationModule:
        config, options = self.config, self.options
        contexts = self.contexts[index]
        channels, size = self.train.num_channels, self.train.image_size
        network = build_generator_network(
            config,
            index,
            num_contexts=contexts.num_contexts,
            out_channels=channels,
            image_size=size,
        )
        generator = network.model
        _check_generator(generator, (channels, size, size), config.model.name)
        discriminator = DCGANDiscriminator(
            channels, size, options.discriminator.widths, norm=options.discriminator.norm
        )
        return GenerationModule(
            generator,
            network.tested_layers,
            discriminator,
            unit_range(channels),
            config.train,
            betas=options.betas,
            context_prior=contexts.prior if cn.uses_context(generator) else None,
            scores=self.scores,
            evaluate_every=options.evaluate_every,
            grid_size=options.grid_size,
            latent_seed=options.latent_seed,
            sample_batch_size=config.train.eval_batch_size or config.train.batch_size,
        )

    def datamodule(self, index: int, module: TaskModule) -> GenerationData:
        train = self.config.train
        split = ContextSplit(self.train, torch.zeros(len(self.train), dtype=torch.int64))
        return GenerationData(split, train.batch_size, train.num_workers)

    def evaluate(
        self,
        index: int,
        trainer: L.Trainer,
        module: TaskModule,
        datamodule: L.LightningDataModule,
    ) -> dict[str, dict[str, float]]:
        assert isinstance(module, GenerationModule)
        return {
            "running": module.evaluate(),
            "batch": module.evaluate(batch_statistics=True),
        }

    def held_out_batch(
        self, index: int, module: TaskModule, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch of fresh latents and contexts for the generator (the norms under
        test are the generator's)."""
        assert isinstance(module, GenerationModule)
        latents, contexts = module.fixed_inputs(self.config.train.batch_size, seed, _GAP_STREAM)
        return latents.to(module.device), contexts.to(module.device)

    def probe(self, index: int, module: TaskModule, count: int, seed: int) -> Probe:
        assert isinstance(module, GenerationModule)
        latents, contexts = module.fixed_inputs(count, seed, _PROBE_STREAM)
        # One batch: the runner records the layer's input and output of this call.
        module(latents.to(module.device), contexts.to(module.device))
        # The figures name the experiment's contexts; other ids are not shown as theirs.
        named = module.uses_context and self.contexts[index] is self.shared
        shown = contexts if named else torch.full_like(contexts, -1)
        return Probe(contexts=shown, labels=torch.full_like(contexts, -1))

    def save_artifacts(self, index: int, module: TaskModule, run_dir: Path) -> None:
        assert isinstance(module, GenerationModule)
        save_image_grid(module.grid_images(), run_dir / SAMPLES_FILE)


def _check_training(config: ExperimentConfig) -> None:
    """Refuse the settings of classification that a GAN cannot honour, naming the key."""
    train, data = config.train, config.data
    if train.optimizer not in ("adam", "adamw"):
        raise ConfigError(
            f"train.optimizer={train.optimizer!r}: the generation task trains both networks with "
            "Adam (task.options.betas; the papers' (0, 0.9)); set train.optimizer: adam"
        )
    if train.schedule != "constant":
        raise ConfigError(
            f"train.schedule={train.schedule!r}: the generation task keeps Adam's learning rate "
            "constant, as the papers do; set train.schedule: constant"
        )
    if train.gradient_clip is not None:
        raise ConfigError(
            f"train.gradient_clip={train.gradient_clip:g}: the generation task steps each "
            "network's optimiser itself, so the trainer cannot clip its gradients; set "
            "train.gradient_clip: null"
        )
    if data.val_fraction != 0:
        raise ConfigError(
            f"data.val_fraction={data.val_fraction:g}: the generation task holds no training "
            "images out for validation (it scores generated images against "
            "task.options.real_split); set data.val_fraction: 0"
        )
    if data.augment == "crop_flip":
        raise ConfigError(
            "data.augment='crop_flip': augmenting the real images changes the distribution the "
            "generator learns and the FID compares with; set data.augment: none"
        )


def _prepare_contexts(contexts: ContextConfig, train: ImageData) -> PreparedContexts:
    builder = fit_contexts(contexts, train)
    ids = assign_contexts(builder, train, "train", contexts.kind)
    count = builder.num_contexts
    names = context_names(contexts.kind, train, count)
    return PreparedContexts(contexts, count, names, empirical_prior(ids, count))


def _describe_contexts(contexts: PreparedContexts) -> str:
    shares = ", ".join(f"{share:.2f}" for share in contexts.prior.tolist())
    return f"{contexts.config.kind}, K = {contexts.num_contexts} (shares {shares})"


def _real_images(images: torch.Tensor, options: GenerationOptions) -> torch.Tensor:
    """The real side of every evaluation: a fixed seeded subset of ``images``, or all."""
    count = options.real_images
    if count is None:
        return images
    if count > len(images):
        raise ConfigError(
            f"task.options.real_images={count} but the {options.real_split} split has "
            f"{len(images)} images; lower it, or set it to null for all of them"
        )
    order = torch.randperm(len(images), generator=_seeded(options.latent_seed, _REAL_STREAM))
    chosen = order[:count]
    return images[chosen.sort().values]


def _data_title(data: DataConfig) -> str:
    """The data set's name in titles: "MNIST", or an image folder's own folder name."""
    if data.name == "image-folder" and data.root is not None:
        return Path(data.root).expanduser().name
    return DATASETS.get(data.name).title if data.name in DATASETS else data.name


def _options_text(options: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in options.items()) or "default sizes"


def _check_generator(generator: nn.Module, shape: tuple[int, int, int], name: str) -> None:
    """Generate two images before training: the latent size and the image shape must fit."""
    latent_dim = getattr(generator, "latent_dim", None)
    if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
        raise ConfigError(
            f"model.name={name!r}: the generator has no int attribute latent_dim (got "
            f"{latent_dim!r}); a generator says the size of its latent vectors there"
        )
    was_training = generator.training
    generator.eval()
    try:
        with torch.no_grad(), cn.use_context(torch.zeros(2, dtype=torch.int64)):
            images = generator(torch.zeros(2, latent_dim))
    except (RuntimeError, ValueError) as error:
        raise ConfigError(
            f"model ({name}): the generator declares latent_dim={latent_dim} but cannot "
            f"generate from latents of that size ({error}); make latent_dim match the "
            "generator's first layer (model.options.latent_dim)"
        ) from error
    finally:
        generator.train(was_training)
    if tuple(images.shape[1:]) != shape:
        raise ConfigError(
            f"model ({name}) generates images of shape {tuple(images.shape[1:])}, but the real "
            f"images are {shape}; set data.image_size (and the generator's size) to match"
        )
