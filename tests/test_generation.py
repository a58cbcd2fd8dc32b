"""Image generation: the DCGAN networks for every norm, the GAN module (training steps, fixed
latents, scores, exact resume), the task's checks before training, and a run end to end."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import contextnorm as cn
from contextnorm.cli import main
from contextnorm.config import ConfigError, TrainConfig, dump_config, load_config
from contextnorm.methods import METHODS
from contextnorm.models import GENERATORS, DCGANDiscriminator, DCGANGenerator
from contextnorm.runner import load_results, prepare_experiment, run_experiment
from contextnorm.runner.callbacks import EpochHistory
from contextnorm.runner.trainer import build_trainer, last_checkpoint
from contextnorm.tasks import TASKS, Selection, build_task
from contextnorm.tasks.fid import FeatureExtractor, GenerationScores
from contextnorm.tasks.generation import (
    GenerationModule,
    GenerationTask,
    empirical_prior,
    save_image_grid,
    tile_images,
    to_uint8,
    unit_range,
)
from contextnorm.tasks.network import LayerRecorder

from tiny import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

K = 3
LATENT = 8
TINY_G = (16, 8, 8, 8)
TINY_D = (4, 8, 8)


def norm(method: str):
    return METHODS[method].norm_factory(K, {}, where=method)


def tiny_generator(method: str = "bn", channels: int = 1, **kwargs) -> DCGANGenerator:
    return DCGANGenerator(LATENT, channels, 32, TINY_G, norm_layer=norm(method), **kwargs)


def tiny_discriminator(channels: int = 1, **kwargs) -> DCGANDiscriminator:
    return DCGANDiscriminator(channels, 32, TINY_D, **kwargs)


class PooledPixels(FeatureExtractor):
    """Cheap deterministic features for module tests: 4x4 average-pooled pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.num_features, self.description, self.comparable = 16, "pooled pixels", False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)


def real_images(count: int = 64, seed: int = 0) -> torch.Tensor:
    """Blobs at random places: images with some structure to learn."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij"))
    centres = torch.rand(count, 2, 1, 1, generator=generator) * 20 + 6
    blobs = torch.exp(-((grid - centres) ** 2).sum(1) / 18)
    return (blobs * 255).round().to(torch.uint8).unsqueeze(1)


def loader(images: torch.Tensor, batch_size: int = 16) -> DataLoader:
    labels = torch.zeros(len(images), dtype=torch.int64)
    return DataLoader(TensorDataset(images, labels, labels), batch_size=batch_size, shuffle=True)


ADAM = TrainConfig(optimizer="adam", lr=2e-4, weight_decay=0.0)


def module_for(method: str = "bn", *, scores: bool = False, seed: int = 0, **settings):
    gan_scores = (
        GenerationScores(
            PooledPixels(), real_images(), num_generated=40, kid_subset_size=20, kid_subsets=5
        )
        if scores
        else None
    )
    recorder = LayerRecorder(norm(method))
    generator = DCGANGenerator(LATENT, 1, 32, TINY_G, norm_layer=recorder)
    prior = torch.tensor([0.5, 0.3, 0.2]) if cn.uses_context(generator) else None
    return GenerationModule(
        generator,
        recorder.layers,
        tiny_discriminator(),
        unit_range(1),
        ADAM,
        context_prior=prior,
        scores=gan_scores,
        grid_size=9,
        latent_seed=seed,
        sample_batch_size=16,
        **settings,
    )


def fit(module, folder: Path, epochs: int, *, resume: bool = False, batches: int = 2):
    """Fit with the runner's Trainer (its history and checkpoint), for ``batches`` per epoch."""
    history = EpochHistory()
    trainer = build_trainer(
        TrainConfig(epochs=epochs, accelerator="cpu", devices=1, progress="none"),
        folder,
        seed=7,
        selection=Selection("val/fid", "min"),
        history=history,
        callbacks=[],
        progress_bar=False,
    )
    trainer.limit_train_batches = batches
    trainer.fit(
        module, loader(real_images()), ckpt_path=last_checkpoint(folder) if resume else None
    )
    return history


# --- the networks ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_generator_shapes_for_every_norm_method(method):
    torch.manual_seed(0)
    generator = tiny_generator(method, channels=3)
    assert cn.uses_context(generator) == METHODS[method].uses_context
    latents = torch.randn(6, LATENT)
    for training in (True, False):
        generator.train(training)
        with cn.use_context(torch.arange(6) % K):
            images = generator(latents)
        assert images.shape == (6, 3, 32, 32)
        assert torch.isfinite(images).all()
        assert images.abs().max() <= 1


@pytest.mark.parametrize("size", [8, 16, 32, 64])
def test_generator_and_discriminator_at_every_supported_size(size):
    generator = DCGANGenerator(LATENT, 1, size, TINY_G)
    images = generator(torch.randn(2, LATENT))
    assert images.shape == (2, 1, size, size)
    assert DCGANDiscriminator(1, size, TINY_D)(images).shape == (2,)


def test_papers_architecture_at_default_size():
    generator = DCGANGenerator()
    assert generator.project.out_features == 512 * 4 * 4
    deconvs = [m for m in generator.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels) for m in deconvs] == [
        (512, 256),
        (256, 128),
        (128, 64),
        (64, 3),
    ]
    assert [type(m) for m in generator.norm_sites()] == [nn.BatchNorm2d] * 3
    activations = [m for m in generator.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(activations) == 3 and all(m.negative_slope == 0.2 for m in activations)
    # Radford et al.'s initialisation: N(0, 0.02) weights.
    assert deconvs[0].weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_placements_of_the_two_papers():
    recorder = LayerRecorder(norm("acn"))
    all_sites = DCGANGenerator(LATENT, 1, 32, TINY_G, norm_layer=recorder)
    assert len(recorder.layers) == 3 and all_sites.norm_sites() == recorder.layers
    recorder = LayerRecorder(norm("acn"))
    first_two = DCGANGenerator(LATENT, 1, 32, TINY_G, norm_layer=recorder, placement="index:0,1")
    assert first_two.norm_sites()[:2] == recorder.layers
    assert isinstance(first_two.norm_sites()[2], nn.BatchNorm2d)
    with pytest.raises(ValueError, match="does not support placement mode 'input'"):
        DCGANGenerator(LATENT, 1, 32, TINY_G, norm_layer=norm("acn"), placement="input")


def test_generator_errors():
    generator = DCGANGenerator(LATENT, 1, 32, TINY_G)
    with pytest.raises(ValueError, match=r"latents must have shape \(N, 8\).*got \(4, 100\)"):
        generator(torch.randn(4, 100))
    with pytest.raises(ValueError, match="image_size=28 is not supported.*data.image_size"):
        DCGANGenerator(image_size=28)
    with pytest.raises(ValueError, match="widths must be a sequence of 4 channel counts"):
        DCGANGenerator(widths=(64, 32, 16))
    with pytest.raises(ValueError, match="latent_dim must be a positive integer"):
        DCGANGenerator(latent_dim=0)


def test_discriminator_norms():
    spectral = tiny_discriminator()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in spectral.modules())
    parametrized = [m for m in spectral.modules() if hasattr(m, "parametrizations")]
    assert len(parametrized) == 4  # three convolutions and the linear layer
    batch = tiny_discriminator(norm="batch")
    layers = list(batch.features)
    assert not isinstance(layers[1], nn.BatchNorm2d)  # none after the first convolution
    assert sum(isinstance(m, nn.BatchNorm2d) for m in layers) == 2
    with pytest.raises(ValueError, match="norm must be one of"):
        tiny_discriminator(norm="layer")
    with pytest.raises(ValueError, match=r"images must have shape \(N, 1, 32, 32\)"):
        spectral(torch.zeros(2, 3, 32, 32))


def test_context_ids_reach_the_context_layers_of_the_generator():
    torch.manual_seed(0)
    generator = tiny_generator("cnx").eval()
    for layer in generator.norm_sites():
        nn.init.normal_(layer.mean)  # distinct learned statistics per context
    latents = torch.randn(1, LATENT).expand(K, -1)
    with cn.use_context(torch.arange(K)):
        per_context = generator(latents)
    assert not torch.allclose(per_context[0], per_context[1])
    assert not torch.allclose(per_context[1], per_context[2])
    baseline = tiny_generator("bn").eval()
    with cn.use_context(torch.arange(K)):
        same = baseline(latents)
    assert torch.equal(same[0], same[1])


# --- the module -----------------------------------------------------------------------------


def test_image_ranges_round_trip():
    images = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    unit = unit_range(1)(images, augment=False)
    assert unit.min() == -1 and unit.max() == 1
    assert torch.equal(to_uint8(unit), images)
    assert torch.equal(
        to_uint8(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8)
    )


@pytest.mark.parametrize("method", ["bn", "cn", "cnx", "acn", "mixnorm", "modenorm"])
def test_two_training_steps_update_both_networks_with_adam(method, tmp_path):
    torch.manual_seed(0)
    module = module_for(method)
    before = copy.deepcopy(module.state_dict())
    history = fit(module, tmp_path, epochs=1)
    (record,) = history.records
    assert set(record) >= {"train/loss_d", "train/loss_g", "train/d_real", "train/d_fake"}
    assert all(math.isfinite(value) for value in record.values())
    for network in ("model", "discriminator"):
        changed = [
            key
            for key, value in module.state_dict().items()
            if key.startswith(network)
            and value.is_floating_point()
            and not torch.equal(value, before[key])
        ]
        assert any(".weight" in key for key in changed), network
    assert module.trainer.global_step == 4  # two batches, two optimizer steps each
    generator_adam, discriminator_adam = module.trainer.optimizers
    assert generator_adam.param_groups[0]["betas"] == (0.0, 0.9)
    assert discriminator_adam.param_groups[0]["lr"] == 2e-4


def test_fixed_latents_give_identical_grids_after_reload(tmp_path):
    torch.manual_seed(0)
    module = module_for("cn")
    fit(module, tmp_path, epochs=1)
    grid = module.grid_images()
    assert grid.shape == (9, 1, 32, 32) and grid.dtype == torch.uint8
    # Each row of the 3x3 grid is generated for one context.
    assert module.grid_contexts.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]

    torch.manual_seed(1)
    reloaded = module_for("cn", seed=5)  # other weights, other fixed latents
    assert not torch.equal(reloaded.grid_latents, module.grid_latents)
    checkpoint = torch.load(last_checkpoint(tmp_path), weights_only=False)
    reloaded.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(reloaded.grid_images(), grid)
    assert torch.equal(module.grid_images(), grid)  # sampling leaves the model unchanged


def test_generation_leaves_running_statistics_and_mode_alone():
    module = module_for("bn", scores=True)
    module.train()
    before = copy.deepcopy(module.generator.state_dict())
    module.grid_images()
    module.evaluate(batch_statistics=True)
    assert module.generator.training
    for key, value in module.generator.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_scores_with_running_estimates_and_with_batch_statistics(tmp_path):
    torch.manual_seed(0)
    scores = {}
    for method in ("bn", "cnx"):
        module = module_for(method, scores=True)
        fit(module, tmp_path / method, epochs=1)
        scores[method] = (module.evaluate(), module.evaluate(batch_statistics=True))
        # Deterministic: the same images again, in either mode.
        assert module.evaluate(batch_statistics=True) == scores[method][1]
    running, batch = scores["bn"]
    assert running["fid"] != pytest.approx(batch["fid"], rel=1e-3)
    # CN-X normalises with learned statistics in both modes: the same images, the same scores
    # (up to float rounding: the two modes generate in batches of other sizes).
    running, batch = scores["cnx"]
    assert batch["fid"] == pytest.approx(running["fid"], rel=1e-5)


def test_scores_every_n_epochs_and_after_the_last_in_their_epochs_records(tmp_path):
    torch.manual_seed(0)
    module = module_for("bn", scores=True, evaluate_every=2)
    history = fit(module, tmp_path, epochs=3, batches=1)
    assert [("val/fid" in record, "val/kid" in record) for record in history.records] == [
        (False, False),
        (True, True),
        (True, True),
    ]
    # The record of the last epoch holds the final generator's scores, not the previous ones.
    last = history.records[-1]
    final = module.evaluate()
    assert last["val/fid"] == pytest.approx(final["fid"], rel=1e-6) and final["fid"] > 0
    assert last["val/kid"] == pytest.approx(final["kid"], rel=1e-6)


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    torch.manual_seed(0)
    straight = module_for("cn", scores=True, evaluate_every=1)
    uninterrupted = fit(straight, tmp_path / "straight", epochs=2, batches=3)

    torch.manual_seed(0)
    fit(module_for("cn", scores=True, evaluate_every=1), tmp_path / "split", epochs=1, batches=3)
    torch.manual_seed(3)
    resumed = module_for("cn", scores=True, evaluate_every=1)
    continued = fit(resumed, tmp_path / "split", epochs=2, batches=3, resume=True)

    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    scores = [(record["val/fid"], record["val/kid"]) for record in uninterrupted.records]
    assert [(record["val/fid"], record["val/kid"]) for record in continued.records] == scores
    assert continued.resumed_after_epochs == 1


def test_context_prior_and_its_errors():
    prior = empirical_prior(torch.tensor([0, 0, 1, 2]), 4)
    assert prior.tolist() == [0.5, 0.25, 0.25, 0.0]
    with pytest.raises(ValueError, match=r"context ids must lie in \[0, 2\)"):
        empirical_prior(torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="non-empty int64 tensor"):
        empirical_prior(torch.tensor([0.0, 1.0]), 2)

    def build(method: str, prior=None) -> GenerationModule:
        generator = tiny_generator(method)
        return GenerationModule(
            generator, [], tiny_discriminator(), unit_range(1), ADAM, context_prior=prior
        )

    with pytest.raises(ValueError, match="needs a context id: pass context_prior"):
        build("cn")
    with pytest.raises(ValueError, match="context_prior has 2 entries.*num_contexts"):
        build("cn", torch.ones(2))
    with pytest.raises(ValueError, match="non-negative"):
        build("cnx", torch.tensor([1.0, -1.0, 1.0]))
    module = build("cn", torch.tensor([2.0, 0, 2]))
    assert module.context_prior.tolist() == [0.5, 0.0, 0.5]
    drawn = module.sample_contexts(2000, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 2}
    assert abs((drawn == 0).double().mean().item() - 0.5) < 0.05
    # A context-free generator has one context: every image is generated for id 0.
    assert build("bn").context_prior.tolist() == [1.0]


def test_module_errors():
    with pytest.raises(ValueError, match="int attribute latent_dim"):
        GenerationModule(nn.Linear(2, 2), [], tiny_discriminator(), unit_range(1), ADAM)
    with pytest.raises(RuntimeError, match="without scores"):
        module_for("bn").evaluate()


def test_tile_images_places_each_image_in_its_cell(tmp_path):
    images = torch.stack([torch.full((1, 3, 2), value, dtype=torch.uint8) for value in range(5)])
    tiled = tile_images(images, columns=3)
    # Two rows of three 3x2 cells with 2-pixel white gaps; the sixth cell stays white.
    assert tiled.shape == (3 * 2 + 2, 2 * 3 + 2 * 2)
    assert (tiled[0:3, 0:2] == 0).all() and (tiled[0:3, 4:6] == 1).all()
    assert (tiled[5:8, 0:2] == 3).all() and (tiled[5:8, 4:6] == 4).all()
    assert (tiled[5:8, 8:10] == 255).all() and (tiled[3:5] == 255).all()
    colour = tile_images(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), columns=2)
    assert colour.shape == (6, 6, 3)
    with pytest.raises(ValueError, match="non-empty uint8 tensor"):
        tile_images(torch.zeros(4, 1, 2, 2), columns=2)
    # The saved grid (3 columns for 5 images), each pixel drawn 2x2.
    with Image.open(save_image_grid(images, tmp_path / "grid.png")) as saved:
        assert saved.size == (2 * tiled.shape[1], 2 * tiled.shape[0])
        assert np.array_equal(np.asarray(saved)[::2, ::2], tiled)


# --- the task -------------------------------------------------------------------------------

TINY_OPTIONS = (
    "{evaluate_every: 1, generated_images: 120, kid_subsets: 4, kid_subset_size: 50, "
    "grid_size: 16, classifier: {widths: [8, 8, 8, 16], epochs: 2, batch_size: 64}, "
    "discriminator: {widths: [8, 8, 8]}}"
)


def generation_config(tmp_path, *overrides: str):
    """Two-domain digits at 8x8, a tiny DCGAN, k-means contexts (K = 3), bn and cn."""
    return tiny_config(
        tmp_path,
        "task.name=generation",
        f"task.options={TINY_OPTIONS}",
        "data.val_fraction=0",
        "data.image_size=8",
        "contexts.kind=kmeans",
        "contexts.num_contexts=3",
        "model.name=dcgan",
        "model.options={latent_dim: 8, widths: [16, 8, 8, 8]}",
        "train.optimizer=adam",
        "train.lr=2e-4",
        "train.weight_decay=0",
        *overrides,
    )


@pytest.fixture(scope="module", autouse=True)
def data_root(tmp_path_factory) -> Path:
    """The local feature classifier is cached under the data root: one per test module."""
    root = tmp_path_factory.mktemp("data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONTEXTNORM_DATA", str(root))
        yield root


def test_the_task_and_the_generator_are_registered(capsys):
    assert TASKS.get("generation") is GenerationTask
    assert GENERATORS.get("dcgan") is DCGANGenerator
    assert main(["list"]) == 0
    output = capsys.readouterr().out
    assert "  generation " in output and "generators (`model.name`" in output
    assert "  dcgan " in output


@pytest.mark.parametrize("name", ["dcgan_paper", "dcgan_mnist_reduced"])
def test_the_shipped_configs_hold_the_papers_settings(name):
    config = load_config(name)
    task = build_task(config)
    assert isinstance(task, GenerationTask) and task.options.betas == [0.0, 0.9]
    train = config.train
    assert (train.optimizer, train.lr, train.weight_decay, train.schedule) == (
        "adam",
        2e-4,
        0.0,
        "constant",
    )
    assert train.early_stopping_patience is None and len(train.seeds) >= 3
    assert [method.name for method in config.methods][:3] == ["bn", "mixnorm", "acn"]
    assert config.contexts.num_contexts == 3  # the mixtures' K = 3 of the papers
    assert (config.data.val_fraction, config.data.augment) == (0.0, "none")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.optimizer=sgd"], r"train.optimizer='sgd'.*set train.optimizer: adam"),
        (["train.schedule=cosine"], r"train.schedule='cosine'.*set train.schedule: constant"),
        (["data.val_fraction=0.1"], r"data.val_fraction=0.1.*set data.val_fraction: 0"),
        (["train.gradient_clip=5"], r"train.gradient_clip=5.*set train.gradient_clip: null"),
        (["data.augment=crop_flip"], r"data.augment='crop_flip'.*set data.augment: none"),
        (["model.name=shallow_cnn"], r"model.name: unknown generator 'shallow_cnn'.*dcgan"),
        (["model.placement=input"], r"does not support placement mode 'input'"),
        (["data.image_size=12"], r"image_size=12 is not supported"),
        (["model.options.depth=3"], r"generator 'dcgan' does not take depth"),
        (["task.options.betas=[0.5]"], r"task.options.betas must be two numbers"),
        (["task.options.real_split=val"], r"task.options.real_split must be one of test, train"),
        (["task.options.real_images=1000"], r"real_images=1000 but the test split has 450"),
        (["task.options.classifier.epochs=0"], r"task.options.classifier.epochs must be"),
        (["task.options.discriminator.norm=layer"], r"discriminator.norm must be one of"),
        (["task.options.kid_subset_size=500"], r"kid_subset_size=500 must be in \[1, 120\]"),
        (["task.options.generated_images=10"], r"num_generated: 10 images for 16 features"),
        (["task.options.evaluate_evry=2"], r"unknown config key 'task.options.evaluate_evry'"),
        (["methods=[bn, {name: cn, options: {num_contexts: 5}}]"], r"disagrees with"),
    ],
)
def test_bad_input_fails_before_training_naming_the_key(tmp_path, overrides, message):
    config = generation_config(tmp_path, *overrides)
    with pytest.raises(ConfigError, match=message):
        run_experiment(config)
    assert not config.results_dir.exists()


class LatentMismatch(nn.Module):
    """A generator that says it takes latents of 16 values but its first layer reads 8."""

    def __init__(self, out_channels: int, image_size: int, norm_layer, placement="all") -> None:
        super().__init__()
        self.latent_dim = 16
        self.shape = (out_channels, image_size, image_size)
        self.project = nn.Linear(8, out_channels * image_size * image_size)
        self.norm = norm_layer(out_channels)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.norm(self.project(latents).view(-1, *self.shape)).tanh()


GENERATORS.register("latent-mismatch", LatentMismatch, summary="a broken generator (tests)")


def test_a_latent_size_that_does_not_fit_the_generator_fails_before_training(tmp_path):
    config = generation_config(tmp_path, "model.name=latent-mismatch", "model.options={}")
    with pytest.raises(ConfigError, match=r"declares latent_dim=16 but cannot generate"):
        prepare_experiment(config)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ("missing", r"missing.pth does not exist"),
        ("broken", r"broken.pth does not load with torch.load"),
        ("narrow", r"narrow.pth gives 1024 features per image; the FID Inception-v3 gives 2048"),
    ],
)
def test_inception_weights_errors_reach_the_command_line(tmp_path, capsys, weights, message):
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    torch.save({"fc.weight": torch.zeros(1008, 1024)}, tmp_path / "narrow.pth")
    config_file = tmp_path / "generation.yaml"
    config_file.write_text(dump_config(generation_config(tmp_path)), encoding="utf-8")
    weights_file = tmp_path / f"{weights}.pth"
    status = main(["run", str(config_file), f"task.options.inception_weights={weights_file}"])
    assert status == 2
    error = capsys.readouterr().err
    assert "contextnorm: error: task.options.inception_weights:" in error
    assert re.search(message, error), error
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_a_generation_experiment_runs_end_to_end(tmp_path):
    config = generation_config(
        tmp_path,
        "methods=[bn, cn, {name: acn, label: acn-k2, options: {num_contexts: 2}}, "
        "{name: cnx, label: cnx-class, contexts: {kind: class}}]",
        "train.epochs=2",
        "train.seeds=[0, 1]",
        "plots.enabled=true",
        "plots.samples=40",
    )
    results_dir = run_experiment(config)
    results = load_results(results_dir)
    title = "FID, local two-domain digits classifier features; not comparable with Inception FID"
    assert results.spec.headline.title == title
    for method in results.methods:
        assert len(method.finished()) == 2
        for record in method.finished():
            assert [epoch["epoch"] for epoch in record.history] == [0, 1]
            # The test scores are those of the final generator, measured again after training.
            assert set(record.test) == {"running", "batch"}
            final = record.test["running"]
            assert final["fid"] == pytest.approx(record.history[-1]["val/fid"], rel=1e-6)
            fids = [epoch["val/fid"] for epoch in record.history]
            assert record.best["metric"] == "val/fid" and record.best["value"] == min(fids)
    markdown = (results_dir / "results.md").read_text(encoding="utf-8")
    assert f"## Test {title}" in markdown and "not comparable with Inception KID" in markdown
    assert "| cn | 2 |" in markdown and "Δ vs bn" in markdown
    for figure in ("curves.png", "test_fid.png", "activations.png", "samples.png"):
        assert (results_dir / figure).stat().st_size > 0, figure
    assert (results_dir / "runs/cn/seed-1/samples.png").is_file()
    info = json.loads((results_dir / "experiment.json").read_text(encoding="utf-8"))
    assert info["task"] == "generation" and info["samples"]["real"] == 450
    assert info["scores"]["features"]["comparable_with_inception"] is False
    # 16 images in a 4x4 grid of 8x8 images with 2-pixel gaps, each pixel drawn 2x2.
    with Image.open(results_dir / "runs/bn/seed-0/samples.png") as grid:
        assert grid.size == (2 * (4 * 8 + 3 * 2), 2 * (4 * 8 + 3 * 2))
    # Context generators record the ids each probed image was generated for; others none.
    with np.load(results_dir / "runs/cn/seed-0/activations.npz") as arrays:
        assert set(np.unique(arrays["contexts"])) <= {0, 1, 2}
        assert arrays["labels"].tolist() == [-1] * 40
    for method in ("bn", "cnx-class"):  # no context, or contexts other than the experiment's
        with np.load(results_dir / f"runs/{method}/seed-0/activations.npz") as arrays:
            assert set(np.unique(arrays["contexts"])) == {-1}
    # Class contexts: one id per class, drawn with the classes' shares.
    (own,) = [entry for entry in info["contexts"] if entry["method"] == "cnx-class"]
    assert own["kind"] == "class" and own["num_contexts"] == 10
    assert sum(own["prior"]) == pytest.approx(1.0) and min(own["prior"]) > 0.05
    assert "cnx-class: class, K = 10" in markdown


@pytest.mark.slow
def test_early_stopping_when_asked_counts_the_epochs_that_measured_the_fid(tmp_path):
    config = generation_config(
        tmp_path,
        "methods=[bn]",
        "train.epochs=4",
        "train.early_stopping_patience=1",
        "task.options.evaluate_every=2",
    )
    (method,) = load_results(run_experiment(config)).methods
    (record,) = method.finished()
    assert [("val/fid" in epoch) for epoch in record.history] == [False, True, False, True]
    # The train/eval gap is the generator's: every measured layer lies in it.
    assert record.train_eval_gap["layers"]
    assert all(name.startswith("model.") for name in record.train_eval_gap["layers"])
    assert record.train_eval_gap["samples"] == config.train.batch_size
    assert record.best["epoch"] in (2, 4)
