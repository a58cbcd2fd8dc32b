"""FID and KID on local classifier features: properties, the reference formula, caching, the
Inception weights checks, and the same scores from two processes as from one."""

from __future__ import annotations

import datetime
import itertools
import math
import os
import socket
from pathlib import Path

import kornia
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import linalg

from contextnorm.config import ConfigError
from contextnorm.data import ImageData, load_dataset
from contextnorm.tasks import fid
from contextnorm.tasks.fid import (
    INCEPTION_FEATURES,
    ClassifierRecipe,
    FeatureExtractor,
    GenerationScores,
    inception_features,
    local_classifier_features,
)

PROCESS_GROUP_TIMEOUT = datetime.timedelta(seconds=60)
TINY_RECIPE = ClassifierRecipe(
    widths=[8, 16, 16, 32], epochs=3, batch_size=64, train_samples=None, seed=0
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> ImageData:
    return load_dataset("digits", None, "train", image_size=32)


@pytest.fixture(scope="module")
def extractor(digits: ImageData, tmp_path_factory: pytest.TempPathFactory) -> FeatureExtractor:
    return local_classifier_features(
        digits, "digits", recipe=TINY_RECIPE, cache_dir=tmp_path_factory.mktemp("features")
    )


@pytest.fixture(scope="module")
def halves(digits: ImageData) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint random samples of 600 real images each."""
    order = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))
    return digits.images[order[:600]], digits.images[order[600:1200]]


def scores_for(extractor: FeatureExtractor, real: torch.Tensor, **kwargs) -> GenerationScores:
    options = {"num_generated": 600, "kid_subset_size": 200, "kid_subsets": 20, **kwargs}
    return GenerationScores(extractor, real, **options)


def noisy(images: torch.Tensor, level: float) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    return (images.float() + level * 255 * noise).round().clamp(0, 255).to(torch.uint8)


def blurred(images: torch.Tensor, kernel: int) -> torch.Tensor:
    sigma = kernel / 3
    smooth = kornia.filters.gaussian_blur2d(images.float(), (kernel, kernel), (sigma, sigma))
    return smooth.round().clamp(0, 255).to(torch.uint8)


# --- properties -----------------------------------------------------------------------------


def test_scores_near_zero_for_two_samples_of_the_same_data_and_grow_with_noise(extractor, halves):
    real, other = halves
    scores = scores_for(extractor, real)
    same = scores.measure([other])
    distorted = [scores.measure([noisy(other, level)]) for level in (0.05, 0.1, 0.2, 0.4)]
    fids = [same["fid"]] + [result["fid"] for result in distorted]
    kids = [same["kid"]] + [result["kid"] for result in distorted]
    # Two samples of one distribution differ by sampling alone: a small fraction of the
    # mildest distortion, and a KID within its spread of zero.
    assert 0 <= same["fid"] < 0.2 * distorted[0]["fid"]
    assert abs(same["kid"]) < 2 * same["kid_std"] + 1e-3
    assert all(a < b for a, b in itertools.pairwise(fids)), fids
    assert all(a < b for a, b in itertools.pairwise(kids)), kids


def test_scores_grow_with_blur(extractor, halves):
    real, other = halves
    scores = scores_for(extractor, real)
    fids = [scores.measure([other])["fid"]]
    fids += [scores.measure([blurred(other, kernel)])["fid"] for kernel in (3, 5, 9)]
    assert all(a < b for a, b in itertools.pairwise(fids)), fids


def test_fid_equals_the_reference_formula_on_the_same_features(extractor, halves):
    real, other = halves
    fake = noisy(other, 0.1)
    with torch.no_grad():
        real_features = extractor(real).double().numpy()
        fake_features = extractor(fake).double().numpy()
    mean_real, mean_fake = real_features.mean(0), fake_features.mean(0)
    cov_real, cov_fake = np.cov(real_features, rowvar=False), np.cov(fake_features, rowvar=False)
    root = linalg.sqrtm(cov_real @ cov_fake).real
    reference = np.sum((mean_real - mean_fake) ** 2) + np.trace(cov_real + cov_fake - 2 * root)
    measured = scores_for(extractor, real).measure(fake.split(128))
    assert measured["fid"] == pytest.approx(reference, rel=1e-6)


def test_an_evaluation_starts_from_a_clean_state(extractor, halves):
    """Scores reset between evaluations; a fresh object (a resumed run) gives the same ones."""
    real, other = halves
    scores = scores_for(extractor, real)
    first = scores.measure([noisy(other, 0.1)])
    again = scores.measure([noisy(other, 0.1)])
    fresh = scores_for(extractor, real).measure([noisy(other, 0.1)])
    assert first == again == fresh
    assert int(scores.fid.fake_features_num_samples) == 0
    assert int(scores.fid.real_features_num_samples) == len(real)


def test_non_finite_generated_features_give_nan_scores(halves):
    class Constant(FeatureExtractor):
        def __init__(self) -> None:
            super().__init__()
            self.num_features, self.description, self.comparable = 2, "test features", False

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            values = images.float().flatten(1)[:, :2]
            return torch.where(images[:, :1, 0, 0] == 7, math.nan, values)

    real, _ = halves
    scores = GenerationScores(Constant(), real, num_generated=10, kid_subset_size=5, kid_subsets=2)
    result = scores.measure([torch.full((10, *real.shape[1:]), 7, dtype=torch.uint8)])
    assert all(math.isnan(value) for value in result.values())
    # The next evaluation is unaffected.
    assert math.isfinite(scores.measure([real[:10]])["fid"])


def test_titles_name_the_features_and_the_comparability(extractor, halves):
    scores = scores_for(extractor, halves[0])
    assert scores.title("FID") == (
        "FID, local digits classifier features; not comparable with Inception FID"
    )
    summary = scores.summary()
    assert summary["features"]["comparable_with_inception"] is False
    assert summary["features"]["fingerprint"] == extractor.details["fingerprint"]


# --- the local classifier -------------------------------------------------------------------


def test_the_classifier_is_cached_by_fingerprint(digits, extractor, tmp_path):
    first = local_classifier_features(digits, "digits", recipe=TINY_RECIPE, cache_dir=tmp_path)
    (cached,) = tmp_path.iterdir()
    stamp = cached.stat().st_mtime_ns
    second = local_classifier_features(digits, "digits", recipe=TINY_RECIPE, cache_dir=tmp_path)
    assert cached.stat().st_mtime_ns == stamp  # loaded, not trained again
    images = digits.images[:64]
    assert torch.equal(first(images), second(images))
    # Training is deterministic: a classifier trained in another folder is the same one.
    assert torch.equal(first(images), extractor(images))
    assert first.details["held_out_accuracy"] > 0.3  # well above chance (0.1)

    other_data = digits.subset(torch.arange(1000))
    changed = [
        local_classifier_features(
            digits,
            "digits",
            recipe=ClassifierRecipe(
                widths=TINY_RECIPE.widths, epochs=1, batch_size=64, train_samples=None
            ),
            cache_dir=tmp_path,
        ),
        local_classifier_features(other_data, "digits", recipe=TINY_RECIPE, cache_dir=tmp_path),
    ]
    fingerprints = {first.details["fingerprint"]} | {e.details["fingerprint"] for e in changed}
    assert len(fingerprints) == 3
    assert len(list(tmp_path.iterdir())) == 3


def test_the_extractor_stays_frozen_in_eval_mode(extractor):
    extractor.train()
    assert not extractor.training
    assert not any(module.training for module in extractor.modules())
    assert not any(parameter.requires_grad for parameter in extractor.parameters())


def test_classifier_needs_two_classes(digits, tmp_path):
    one_class = digits.subset(digits.labels == 3)
    with pytest.raises(ValueError, match="at least two classes"):
        local_classifier_features(one_class, "digits", recipe=TINY_RECIPE, cache_dir=tmp_path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"epochs": 0}, r"classifier.epochs must be a positive integer; got 0"),
        ({"held_out": 1.0}, r"classifier.held_out must be in \(0, 1\)"),
        ({"train_samples": 1}, "classifier.train_samples must be at least 2"),
        ({"lr": 0.0}, "classifier.lr must be positive"),
        ({"widths": [8, 8]}, "classifier.widths must be four positive counts"),
    ],
)
def test_recipe_errors(options, message, digits, tmp_path):
    recipe = ClassifierRecipe(**options)
    with pytest.raises(ConfigError, match=message):
        recipe.check()
    with pytest.raises(ValueError, match=message.replace("classifier", "recipe")):
        local_classifier_features(digits, "digits", recipe=recipe, cache_dir=tmp_path)


# --- errors of the scores -------------------------------------------------------------------


def test_score_errors_before_any_work(extractor, halves):
    real, other = halves
    dimension = extractor.num_features
    with pytest.raises(ValueError, match=f"real images: {dimension} images for {dimension}"):
        scores_for(extractor, real[:dimension], kid_subset_size=10)
    with pytest.raises(ValueError, match=f"use at least {dimension + 1}"):
        scores_for(extractor, real, num_generated=10, kid_subset_size=5)
    with pytest.raises(ValueError, match="kid_subset_size=601 must be in"):
        scores_for(extractor, real, kid_subset_size=601)
    with pytest.raises(ValueError, match="real_images must be a uint8 tensor"):
        scores_for(extractor, real.float())
    with pytest.raises(ValueError, match=r"cannot read the real images \(3, 32, 32\)"):
        scores_for(extractor, real.expand(-1, 3, -1, -1))

    class Liar(FeatureExtractor):
        def __init__(self) -> None:
            super().__init__()
            self.num_features, self.description, self.comparable = 8, "liar", False

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return images.float().flatten(1)[:, :5]

    with pytest.raises(ValueError, match=r"\(liar\) declares 8 features but gives shape \(2, 5\)"):
        scores_for(Liar(), real)
    scores = scores_for(extractor, real)
    with pytest.raises(ValueError, match=r"generated images must be uint8 \(N, 1, 32, 32\)"):
        scores.update(other[:, :, :28, :28])
    with pytest.raises(ValueError, match="generated images must be uint8"):
        scores.update(other.float())
    scores.update(other[:100])
    with pytest.raises(ValueError, match="num_generated=600 images.*100 were added"):
        scores.compute()


# --- Inception weights ----------------------------------------------------------------------


def test_inception_weights_file_must_exist(tmp_path):
    missing = tmp_path / "pt_inception.pth"
    with pytest.raises(
        FileNotFoundError, match=f"{missing} does not exist.*{fid.INCEPTION_WEIGHTS_FILE}"
    ):
        inception_features(missing)


def test_inception_weights_file_that_does_not_load(tmp_path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"{broken} does not load with torch.load.*local"):
        inception_features(broken)


def test_inception_weights_file_of_another_network(tmp_path):
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, other)
    with pytest.raises(ValueError, match=f"{other} is not an Inception-v3 state dict"):
        inception_features(other)


def test_inception_weights_file_with_the_wrong_feature_size(tmp_path):
    narrow = tmp_path / "narrow.pth"
    torch.save({"fc.weight": torch.zeros(1008, 1024), "fc.bias": torch.zeros(1008)}, narrow)
    with pytest.raises(
        ValueError, match=f"{narrow} gives 1024 features.*gives {INCEPTION_FEATURES}"
    ):
        inception_features(narrow)


def test_inception_features_need_torch_fidelity(tmp_path, monkeypatch):
    weights = tmp_path / "inception.pth"
    torch.save({"fc.weight": torch.zeros(1008, INCEPTION_FEATURES)}, weights)
    monkeypatch.setattr(fid, "_TORCH_FIDELITY_AVAILABLE", False)
    with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity"):
        inception_features(weights)


# --- two processes --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _score_in_process(rank: int, port: int, folder: str, real, fake) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=PROCESS_GROUP_TIMEOUT)
    try:
        torch.set_num_threads(1)
        extractor = torch.load(Path(folder) / "extractor.pt", weights_only=False)
        scores = scores_for(extractor, real)
        scores.update(fake[rank::2])
        torch.save(scores.compute(rank=rank, world_size=2), Path(folder) / f"scores{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_give_the_scores_of_one(extractor, halves, tmp_path):
    real, other = halves
    fake = noisy(other, 0.1)
    single = scores_for(extractor, real).measure([fake])
    torch.save(extractor, tmp_path / "extractor.pt")
    mp.start_processes(
        _score_in_process,
        args=(_free_port(), str(tmp_path), real, fake),
        nprocs=2,
        start_method="spawn",
        join=True,
    )
    for rank in range(2):
        both = torch.load(tmp_path / f"scores{rank}.pt")
        assert both["fid"] == pytest.approx(single["fid"], rel=1e-9)
        # KID subsets are drawn from the gathered features, in process order rather than in
        # the single process's order, so it agrees up to the subset sampling.
        assert both["kid"] == pytest.approx(single["kid"], abs=3 * single["kid_std"])
