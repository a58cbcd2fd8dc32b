"""FID and KID of generated images (torchmetrics), on features named honestly.

The Fréchet Inception Distance (Heusel et al. 2017) and the Kernel Inception Distance
(Bińkowski et al. 2018) compare feature statistics of generated and real images. Published
numbers use the features of one particular Inception-v3; the values depend on the feature
extractor, so every score here carries the name of its extractor, and only Inception scores
are comparable with published ones.

Two extractors:

* :func:`inception_features`: the standard FID Inception-v3 (torch-fidelity's port of the
  TensorFlow graph, 2048 features) from a weights file the user supplies
  (``pt_inception-2015-12-05-6726825d.pth``); needs the ``torch-fidelity`` package.
* :func:`local_classifier_features` (the default where no Inception weights are at hand): the
  pooled features of a small classifier trained on the real data set itself, deterministically
  from a seed and cached by a fingerprint of the data and the recipe, so it works for any data
  set, the user's own included. Its scores are titled "FID, local <data> classifier features;
  not comparable with Inception FID".

:class:`GenerationScores` computes both metrics for a fixed set of real images against the
generated images of one evaluation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

from contextnorm.config import ConfigError
from contextnorm.data import ImageData, default_data_root
from contextnorm.io import atomic_write
from contextnorm.models import ShallowCNN
from contextnorm.tasks.preprocess import BatchPreprocess, channel_statistics

INCEPTION_FEATURES = 2048
INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
# torch-fidelity's FID Inception keeps the TensorFlow graph's 1008-way classifier over its 2048
# pooled features; a weights file whose classifier reads another width gives other features.
_INCEPTION_CLASSIFIER_KEY = "fc.weight"
_CACHE_FORMAT = 1
_FEATURE_BATCH = 500


class FeatureExtractor(nn.Module):
    """A frozen map from uint8 images (N, C, H, W) to features (N, num_features).

    It stays in eval mode whatever ``train()`` asks (a trainer switching its parent module to
    training must not turn its BatchNorms to batch statistics) and has no trainable parameters.

    Attributes:
        num_features: the feature size (torchmetrics reads this name).
        description: what the features are, for titles: "local MNIST classifier features".
        comparable: whether scores on these features compare with published Inception scores.
    """

    num_features: int
    description: str
    comparable: bool

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    def summary(self) -> dict[str, Any]:
        """What a results reader needs to know about the features (JSON-serialisable)."""
        return {
            "description": self.description,
            "num_features": self.num_features,
            "comparable_with_inception": self.comparable,
        }


# --- the local classifier ------------------------------------------------------------------


@dataclass
class ClassifierRecipe:
    """How the local feature classifier is trained (every field enters the cache fingerprint).

    It is ``task.options.classifier`` of a generation config.

    Attributes:
        widths: channels of its four conv blocks (a Shallow CNN); the last is the feature size.
        epochs: passes over the training images.
        batch_size: training batch size.
        lr: AdamW learning rate.
        train_samples: train on at most this many images (a seeded random subset), ``None``: all.
        held_out: share of the images kept out of training to measure its accuracy.
        seed: seed of the subset, the split, the initialisation and the batch order.
    """

    # Measured on MNIST at 32x32 (one CPU thread, a busy machine): 98.4 % held-out accuracy
    # in 90 s; the same recipe with widths (32, 64, 64, 128) and 10,000 images reached 90.6 %.
    widths: list[int] = field(default_factory=lambda: [16, 32, 32, 64])
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    train_samples: int | None = 20_000
    held_out: float = 0.1
    seed: int = 0

    def check(self, where: str = "classifier") -> None:
        """Raise a ConfigError naming ``where.<key>`` for a setting out of range."""
        problems = {
            "widths": (len(self.widths) == 4 and min(self.widths) >= 1, "four positive counts"),
            "epochs": (self.epochs >= 1, "a positive integer"),
            "batch_size": (self.batch_size >= 2, "at least 2 (BatchNorm)"),
            "lr": (self.lr > 0, "positive"),
            "train_samples": (
                self.train_samples is None or self.train_samples >= 2,
                "at least 2, or null for every image",
            ),
            "held_out": (0.0 < self.held_out < 1.0, "in (0, 1)"),
        }
        for key, (valid, rule) in problems.items():
            if not valid:
                raise ConfigError(f"{where}.{key} must be {rule}; got {getattr(self, key)!r}")


class ClassifierFeatures(FeatureExtractor):
    """The pooled features of a trained :class:`ShallowCNN` (after the last conv block's ReLU
    and global average pooling, as Inception's pool3 features are for FID).

    Args:
        classifier: the trained network.
        mean, std: per-channel statistics it was trained with (on the [0, 1] scale).
        image_size: side of the square images it was trained on.
        data_name: the data set's name, for titles.
        details: the training record (fingerprint, held-out accuracy, recipe).
    """

    def __init__(
        self,
        classifier: ShallowCNN,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: int,
        data_name: str,
        details: Mapping[str, Any],
    ) -> None:
        super().__init__()
        self.classifier = classifier
        self.preprocess = _preprocess(mean, std, image_size)
        self.num_features = classifier.classifier.in_features
        self.description = f"local {data_name} classifier features"
        self.comparable = False
        self.details = dict(details)
        self._freeze()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return _pooled_features(self.classifier, self.preprocess(images, augment=False))

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), **self.details}


def _pooled_features(network: ShallowCNN, images: torch.Tensor) -> torch.Tensor:
    return network.pool(network.features(network.input_norm(images))).flatten(1)


def local_classifier_features(
    data: ImageData,
    data_name: str,
    *,
    recipe: ClassifierRecipe | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ClassifierFeatures:
    """The local feature extractor for ``data``: loaded from the cache, or trained and cached.

    The classifier is trained on the images and labels of ``data`` (the real training split)
    with ``recipe``, deterministically from ``recipe.seed`` on one device, and cached under
    ``cache_dir`` by a fingerprint of the images, labels and recipe: any run that scores the
    same data with the same recipe uses the very same features, while a changed data set or
    recipe gets a new classifier instead of stale features.

    Args:
        data: the real training images (uint8, any channels and square size) with labels.
        data_name: the data set's name, shown in every title ("MNIST", "CIFAR-10").
        recipe: how the classifier is trained (default: :class:`ClassifierRecipe`).
        cache_dir: where trained classifiers are kept; default
            ``default_data_root() / "feature-extractors"``.

    Raises:
        ValueError: data with fewer than two classes present, too few images for the recipe, or
            a recipe setting out of range.
    """
    recipe = recipe or ClassifierRecipe()
    recipe.check("recipe")
    if len(torch.unique(data.labels)) < 2:
        raise ValueError(
            "the local feature classifier needs labelled images of at least two classes; "
            "this data has one. Supply Inception weights instead (inception_features)"
        )
    fingerprint = _fingerprint(data, recipe)
    folder = (
        Path(cache_dir) if cache_dir is not None else default_data_root() / "feature-extractors"
    )
    path = folder / f"{_slug(data_name)}-{fingerprint}.pt"
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
    else:
        stored = _train_classifier(data, recipe, fingerprint)
        atomic_write(path, lambda temporary: torch.save(stored, temporary))
    classifier = _classifier(stored["num_classes"], stored["in_channels"], recipe)
    classifier.load_state_dict(stored["state_dict"])
    details = {
        "fingerprint": fingerprint,
        "held_out_accuracy": stored["held_out_accuracy"],
        "recipe": asdict(recipe),
    }
    return ClassifierFeatures(
        classifier, stored["mean"], stored["std"], stored["image_size"], data_name, details
    )


def _classifier(num_classes: int, in_channels: int, recipe: ClassifierRecipe) -> ShallowCNN:
    return ShallowCNN(num_classes, in_channels, widths=recipe.widths)


def _fingerprint(data: ImageData, recipe: ClassifierRecipe) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([_CACHE_FORMAT, asdict(recipe), list(data.images.shape)]).encode())
    digest.update(data.images.contiguous().numpy().tobytes())
    digest.update(data.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "data"


def _train_classifier(data: ImageData, recipe: ClassifierRecipe, fingerprint: str) -> dict:
    """Train the feature classifier; everything random comes from ``recipe.seed``."""
    generator = np.random.default_rng(recipe.seed)
    order = generator.permutation(len(data))
    held_out = max(1, round(recipe.held_out * len(data)))
    test_index, train_index = order[:held_out], order[held_out:]
    if recipe.train_samples is not None:
        train_index = train_index[: recipe.train_samples]
    if len(train_index) < 2:
        raise ValueError(
            f"the local feature classifier needs at least 2 training images; {len(data)} images "
            f"with held_out={recipe.held_out} leave {len(train_index)}"
        )
    train_images = data.images[torch.from_numpy(np.sort(train_index))]
    train_labels = data.labels[torch.from_numpy(np.sort(train_index))]
    mean, std = channel_statistics(train_images)
    preprocess = _preprocess(mean, std, data.image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        network = _classifier(data.num_classes, data.num_channels, recipe)
        optimizer = torch.optim.AdamW(network.parameters(), lr=recipe.lr)
        network.train()
        for _ in range(recipe.epochs):
            for batch in torch.randperm(len(train_images)).split(recipe.batch_size):
                if len(batch) < 2:
                    continue  # BatchNorm cannot train on a batch of one
                logits = network(preprocess(train_images[batch], augment=False))
                loss = F.cross_entropy(logits, train_labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    network.eval()
    test_images = data.images[torch.from_numpy(test_index)]
    test_labels = data.labels[torch.from_numpy(test_index)]
    with torch.no_grad():
        predictions = torch.cat(
            [
                network(preprocess(chunk, augment=False)).argmax(1)
                for chunk in test_images.split(_FEATURE_BATCH)
            ]
        )
    return {
        "format": _CACHE_FORMAT,
        "fingerprint": fingerprint,
        "state_dict": network.state_dict(),
        "num_classes": data.num_classes,
        "in_channels": data.num_channels,
        "image_size": data.image_size,
        "mean": mean,
        "std": std,
        "held_out_accuracy": float((predictions == test_labels).double().mean()),
    }


def _preprocess(mean: Sequence[float], std: Sequence[float], size: int) -> BatchPreprocess:
    """uint8 images to the classifier's input: scaled to [0, 1], normalised, never augmented."""
    return BatchPreprocess(mean, std, (size, size), crop_flip=False)


# --- Inception ------------------------------------------------------------------------------


class InceptionFeatures(FeatureExtractor):
    """The FID Inception-v3's 2048 pool features (torch-fidelity, through torchmetrics).

    Grey images are repeated to three channels; the network resizes to 299x299 itself.
    """

    def __init__(self, network: nn.Module, weights_name: str) -> None:
        super().__init__()
        self.network = network
        self.num_features = INCEPTION_FEATURES
        self.description = f"Inception-v3 features ({weights_name})"
        self.comparable = True
        self._freeze()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.network(images)


def inception_features(weights: str | os.PathLike) -> InceptionFeatures:
    """The standard FID feature extractor, with its weights read from a local file.

    The file is torch-fidelity's ``pt_inception-2015-12-05-6726825d.pth`` (the PyTorch port of
    the TensorFlow Inception graph that published FIDs use), downloaded once wherever the
    internet is reachable. It is checked here, before any training: it must exist, load, hold
    the Inception state dict and give 2048 features per image.

    Raises:
        FileNotFoundError: no file at ``weights``.
        ValueError: the file does not load, is not that state dict, or gives another feature
            size; the message names the file and the fix.
        ModuleNotFoundError: torch-fidelity (which needs torchvision) is not installed.
    """
    path = Path(weights).expanduser()
    fix = (
        f"point it at torch-fidelity's FID Inception weights, {INCEPTION_WEIGHTS_FILE}, or "
        "leave the Inception weights unset to score on local classifier features"
    )
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file {path} does not exist; {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a foreign file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"Inception weights file {path} does not load with torch.load ({reason}); {fix}"
        ) from error
    classifier = state.get(_INCEPTION_CLASSIFIER_KEY) if isinstance(state, Mapping) else None
    if not isinstance(classifier, torch.Tensor) or classifier.dim() != 2:
        raise ValueError(
            f"Inception weights file {path} is not an Inception-v3 state dict (no "
            f"{_INCEPTION_CLASSIFIER_KEY!r} matrix); {fix}"
        )
    if classifier.shape[1] != INCEPTION_FEATURES:
        raise ValueError(
            f"Inception weights file {path} gives {classifier.shape[1]} features per image; the "
            f"FID Inception-v3 gives {INCEPTION_FEATURES}; {fix}"
        )
    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModuleNotFoundError(
            "Inception features need the torch-fidelity package (and torchvision): "
            "pip install torch-fidelity; or leave the Inception weights unset to score on local "
            "classifier features"
        )
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        network = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(INCEPTION_FEATURES)],
            feature_extractor_weights_path=str(path),
        )
    except RuntimeError as error:  # load_state_dict: missing, unexpected or misshapen tensors
        raise ValueError(
            f"Inception weights file {path} does not fit the FID Inception-v3 ({error}); {fix}"
        ) from error
    extractor = InceptionFeatures(network, path.name)
    probe = extractor(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    if tuple(probe.shape) != (2, INCEPTION_FEATURES):
        raise ValueError(
            f"Inception weights file {path} gives features of shape {tuple(probe.shape[1:])} "
            f"per image, not ({INCEPTION_FEATURES},); {fix}"
        )
    return extractor


# --- the scores -----------------------------------------------------------------------------


class _Precomputed(nn.Identity):
    """Tells a torchmetrics metric that it receives features, not images: the extractor runs
    once per image for both metrics instead of once per metric."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features


class GenerationScores:
    """FID and KID of generated images against a fixed set of real images.

    The real images' features are computed at the first evaluation and kept (``reset`` clears
    the generated side only); they are not part of any checkpoint, since they follow from the
    real images and the extractor, and a resumed run recomputes them. Generated images are fed
    per batch with :meth:`update`, then :meth:`compute` returns the scores and clears them.

    Under ``torch.distributed``, each process passes its share of the generated images and
    ``rank``/``world_size`` to :meth:`compute`, which feeds it its share of the real ones; the
    metrics add up their states across processes (torchmetrics), so every process gets the
    scores of all images.

    Args:
        extractor: the feature extractor (named in every title).
        real_images: uint8 (N, C, H, W), the real side of every evaluation.
        num_generated: how many generated images each evaluation scores (the same count at
            every evaluation: FID is biased by the sample size, so scores of different counts do
            not compare).
        kid_subset_size: images per KID subset (at most the smaller of the two counts).
        kid_subsets: number of KID subsets (the KID is their mean; ``kid_std`` their spread).
        seed: seed of the KID subsets, so a score does not depend on the random state.

    Raises:
        ValueError: a count too small for the feature size or the KID subsets, real images
            that are not uint8 (N, C, H, W), or an extractor that cannot read them or gives
            another feature size than it declares.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        real_images: torch.Tensor,
        *,
        num_generated: int,
        kid_subset_size: int = 1000,
        kid_subsets: int = 100,
        seed: int = 0,
    ) -> None:
        if real_images.dtype != torch.uint8 or real_images.dim() != 4:
            raise ValueError(
                "real_images must be a uint8 tensor (N, C, H, W), as the data sets store them; "
                f"got {real_images.dtype} {tuple(real_images.shape)}"
            )
        dimension = extractor.num_features
        for name, count in (("real images", len(real_images)), ("num_generated", num_generated)):
            if count <= dimension:
                raise ValueError(
                    f"{name}: {count} images for {dimension} features; the FID needs more images "
                    f"than features for a full-rank covariance: use at least {dimension + 1} "
                    "(published FIDs use 10,000 or more)"
                )
        if not 1 <= kid_subset_size <= min(len(real_images), num_generated):
            raise ValueError(
                f"kid_subset_size={kid_subset_size} must be in "
                f"[1, {min(len(real_images), num_generated)}]: at most the number of real and of "
                "generated images"
            )
        try:
            with torch.no_grad():
                probe = extractor(real_images[:2])
        except RuntimeError as error:
            raise ValueError(
                f"the feature extractor ({extractor.description}) cannot read the real images "
                f"{tuple(real_images.shape[1:])}: {error}"
            ) from error
        if tuple(probe.shape) != (len(real_images[:2]), dimension):
            raise ValueError(
                f"the feature extractor ({extractor.description}) declares {dimension} features "
                f"but gives shape {tuple(probe.shape)} for {len(real_images[:2])} images"
            )
        self.extractor = extractor
        self.real_images = real_images
        self.num_generated = num_generated
        self.seed = seed
        self.fid = FrechetInceptionDistance(_Precomputed(dimension), reset_real_features=False)
        with warnings.catch_warnings():
            # KID keeps every feature vector; the counts above bound that memory.
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            self.kid = KernelInceptionDistance(
                _Precomputed(dimension),
                subsets=kid_subsets,
                subset_size=kid_subset_size,
                reset_real_features=False,
            )
        self._generated = 0

    @property
    def device(self) -> torch.device:
        return self.fid.real_features_sum.device

    def to(self, device: torch.device | str) -> GenerationScores:
        """Move the extractor and the metric states to ``device``; returns ``self``."""
        for module in (self.extractor, self.fid, self.kid):
            module.to(device)
        return self

    def title(self, metric: str = "FID") -> str:
        """The name a table or plot gives ``metric`` on these features.

        "FID, local MNIST classifier features; not comparable with Inception FID", or
        "FID, Inception-v3 features (<weights file>)".
        """
        title = f"{metric}, {self.extractor.description}"
        if not self.extractor.comparable:
            title += f"; not comparable with Inception {metric}"
        return title

    @torch.no_grad()
    def _add(self, images: torch.Tensor, real: bool) -> None:
        features = self.extractor(images.to(self.device)).double()
        self.fid.update(features, real=real)
        self.kid.update(features, real=real)

    def update(self, images: torch.Tensor) -> None:
        """Add a batch of generated uint8 images (N, C, H, W) of the real images' shape."""
        shape = tuple(self.real_images.shape[1:])
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != shape:
            raise ValueError(
                f"generated images must be uint8 (N, {', '.join(map(str, shape))}) like the real "
                f"ones; got {images.dtype} {tuple(images.shape)}"
            )
        self._add(images, real=False)
        self._generated += len(images)

    def compute(self, *, rank: int = 0, world_size: int = 1) -> dict[str, float]:
        """``{"fid", "kid", "kid_std"}`` of the generated images added since the last call.

        Scores are NaN when a generated image gave non-finite features (a diverged generator):
        the run goes on and its record says so.

        Args:
            rank, world_size: this process and the number of processes; each one added the
                generated images ``rank::world_size`` of the evaluation.

        Raises:
            ValueError: a number of generated images other than this process's share of
                ``num_generated``.
        """
        expected = len(range(rank, self.num_generated, world_size))
        if self._generated != expected:
            raise ValueError(
                f"an evaluation scores num_generated={self.num_generated} images, {expected} of "
                f"them in process {rank} of {world_size}; {self._generated} were added"
            )
        if int(self.fid.real_features_num_samples) == 0:
            for chunk in self.real_images[rank::world_size].split(_FEATURE_BATCH):
                self._add(chunk, real=True)
        scores = {"fid": math.nan, "kid": math.nan, "kid_std": math.nan}
        if bool(torch.isfinite(self.fid.fake_features_sum).all()):
            scores["fid"] = float(self.fid.compute())
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                scores["kid"], scores["kid_std"] = (float(value) for value in self.kid.compute())
        self.fid.reset()
        self.kid.reset()
        self._generated = 0
        return scores

    def measure(self, generated: Iterable[torch.Tensor]) -> dict[str, float]:
        """:meth:`update` with every batch of ``generated``, then :meth:`compute`."""
        for images in generated:
            self.update(images)
        return self.compute()

    def summary(self) -> dict[str, Any]:
        """The protocol of these scores, for a results file (JSON-serialisable)."""
        return {
            "features": self.extractor.summary(),
            "real_images": len(self.real_images),
            "generated_images": self.num_generated,
            "kid_subsets": self.kid.subsets,
            "kid_subset_size": self.kid.subset_size,
            "titles": {"fid": self.title("FID"), "kid": self.title("KID")},
        }
