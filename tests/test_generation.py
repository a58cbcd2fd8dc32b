"""The DCGAN networks, the GAN training module and its figures: shapes for every norm method,
context routing, training steps, fixed latents across a reload, exact resume, errors."""

from __future__ import annotations

import copy
import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import contextnorm as cn
from contextnorm.experiments.prepare import LayerRecorder
from contextnorm.models.dcgan import DCGANDiscriminator, DCGANGenerator
from contextnorm.plots import plot_activation_histograms
from contextnorm.tasks.gan import (
    GANModule,
    GANSettings,
    capture_generator_activations,
    empirical_prior,
    to_uint8,
    to_unit_range,
)
from contextnorm.tasks.gan_metrics import FeatureExtractor, GenerationScores
from contextnorm.tasks.gan_plots import plot_sample_grids, plot_score_curves, tile_images
from contextnorm.training.callbacks import EpochSeeding
from contextnorm.training.methods import METHODS

# Autouse: these small networks train many times faster on one thread than on two busy cores.
from test_gan_metrics import one_thread  # noqa: F401

K = 3
LATENT = 8
TINY_G = (16, 8, 8, 8)
TINY_D = (4, 8, 8)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def norm(method: str):
    return METHODS[method].norm_factory(K, {}, where=method)


def tiny_generator(method: str = "bn", channels: int = 1, **kwargs) -> DCGANGenerator:
    return DCGANGenerator(LATENT, channels, 32, TINY_G, norm_layer=norm(method), **kwargs)


def tiny_discriminator(channels: int = 1, **kwargs) -> DCGANDiscriminator:
    return DCGANDiscriminator(channels, 32, TINY_D, **kwargs)


def contexts_of(count: int) -> torch.Tensor:
    return torch.arange(count) % K


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


def module_for(method: str = "bn", *, scores: bool = False, seed: int = 0, **settings):
    images = real_images()
    gan_scores = (
        GenerationScores(
            PooledPixels(), images, num_generated=40, kid_subset_size=20, kid_subsets=5
        )
        if scores
        else None
    )
    generator = tiny_generator(method)
    prior = torch.tensor([0.5, 0.3, 0.2]) if cn.uses_context(generator) else None
    return GANModule(
        generator,
        tiny_discriminator(),
        GANSettings(grid_size=9, sample_batch_size=16, seed=seed, **settings),
        context_prior=prior,
        scores=gan_scores,
    )


def trainer(epochs: int, tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


# --- the networks ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_generator_shapes_for_every_norm_method(method):
    torch.manual_seed(0)
    generator = tiny_generator(method, channels=3)
    assert cn.uses_context(generator) == METHODS[method].uses_context
    latents = torch.randn(6, LATENT)
    for training in (True, False):
        generator.train(training)
        with cn.use_context(contexts_of(6)):
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
    with pytest.raises(ValueError, match="image_size=28 is not supported.*image_size=32"):
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
    unit = to_unit_range(images)
    assert unit.min() == -1 and unit.max() == 1
    assert torch.equal(to_uint8(unit), images)
    assert torch.equal(
        to_uint8(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8)
    )


@pytest.mark.parametrize("method", ["bn", "cn", "cnx", "acn", "mixnorm", "modenorm"])
def test_two_training_steps_update_both_networks(method, tmp_path):
    torch.manual_seed(0)
    module = module_for(method)
    before = copy.deepcopy(module.state_dict())
    run = trainer(1, tmp_path, limit_train_batches=2)
    run.fit(module, loader(real_images()))
    losses = {key: float(value) for key, value in run.callback_metrics.items()}
    assert set(losses) >= {"train/loss_d", "train/loss_g", "train/d_real", "train/d_fake"}
    assert all(math.isfinite(value) for value in losses.values())
    for network in ("generator", "discriminator"):
        changed = [
            key
            for key, value in module.state_dict().items()
            if key.startswith(network)
            and value.is_floating_point()
            and not torch.equal(value, before[key])
        ]
        assert any(".weight" in key for key in changed), network
    assert run.global_step == 4  # two batches, two optimizer steps each


def test_fixed_latents_give_identical_grids_after_reload(tmp_path):
    torch.manual_seed(0)
    module = module_for("cn")
    run = trainer(1, tmp_path, limit_train_batches=2)
    run.fit(module, loader(real_images()))
    grid = module.grid_images()
    assert grid.shape == (9, 1, 32, 32) and grid.dtype == torch.uint8
    # Each row of the 3x3 grid is generated for one context.
    assert module.grid_contexts.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    checkpoint = tmp_path / "gan.ckpt"
    run.save_checkpoint(checkpoint)

    torch.manual_seed(1)
    reloaded = module_for("cn", seed=5)  # other weights, other fixed latents
    assert not torch.equal(reloaded.grid_latents, module.grid_latents)
    reloaded.load_state_dict(torch.load(checkpoint, weights_only=False)["state_dict"])
    assert torch.equal(reloaded.grid_images(), grid)
    assert torch.equal(module.grid_images(), grid)  # sampling leaves the model unchanged


def test_generation_leaves_running_statistics_and_mode_alone():
    module = module_for("bn")
    module.train()
    before = copy.deepcopy(module.generator.state_dict())
    module.grid_images()
    assert module.generator.training
    for key, value in module.generator.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_scores_every_n_epochs_and_after_the_last(tmp_path):
    module = module_for("bn", scores=True, evaluate_every=2)
    trainer(3, tmp_path, limit_train_batches=1).fit(module, loader(real_images()))
    assert [record["epoch"] for record in module.score_history] == [1, 2]
    for record in module.score_history:
        assert set(record) == {"epoch", "fid", "kid", "kid_std"}
        assert record["fid"] > 0 and math.isfinite(record["kid"])


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    def fit(epochs: int, module: GANModule, checkpoint=None) -> L.Trainer:
        run = trainer(epochs, tmp_path, limit_train_batches=3, callbacks=[EpochSeeding(7)])
        run.fit(module, loader(real_images()), ckpt_path=checkpoint)
        return run

    torch.manual_seed(0)
    straight = module_for("cn", scores=True, evaluate_every=1)
    fit(2, straight)

    torch.manual_seed(0)
    first = module_for("cn", scores=True, evaluate_every=1)
    checkpoint = tmp_path / "epoch1.ckpt"
    fit(1, first).save_checkpoint(checkpoint)
    torch.manual_seed(3)
    resumed = module_for("cn", scores=True, evaluate_every=1)
    fit(2, resumed, checkpoint)

    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert resumed.score_history == straight.score_history
    assert len(straight.score_history) == 2


def test_context_prior_and_its_errors():
    prior = empirical_prior(torch.tensor([0, 0, 1, 2]), 4)
    assert prior.tolist() == [0.5, 0.25, 0.25, 0.0]
    with pytest.raises(ValueError, match=r"context ids must lie in \[0, 2\)"):
        empirical_prior(torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="non-empty int64 tensor"):
        empirical_prior(torch.tensor([0.0, 1.0]), 2)

    settings = GANSettings()
    with pytest.raises(ValueError, match="needs a context id: pass context_prior"):
        GANModule(tiny_generator("cn"), tiny_discriminator(), settings)
    with pytest.raises(ValueError, match="context_prior has 2 entries.*num_contexts"):
        GANModule(tiny_generator("cn"), tiny_discriminator(), settings, context_prior=torch.ones(2))
    with pytest.raises(ValueError, match="non-negative"):
        GANModule(
            tiny_generator("cnx"),
            tiny_discriminator(),
            settings,
            context_prior=torch.tensor([1.0, -1.0, 1.0]),
        )
    module = GANModule(
        tiny_generator("cn"),
        tiny_discriminator(),
        settings,
        context_prior=torch.tensor([2.0, 0, 2]),
    )
    assert module.context_prior.tolist() == [0.5, 0.0, 0.5]
    drawn = module.sample_contexts(2000, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 2}
    assert abs((drawn == 0).double().mean().item() - 0.5) < 0.05


def test_module_and_settings_errors():
    with pytest.raises(ValueError, match="int attribute latent_dim"):
        GANModule(nn.Linear(2, 2), tiny_discriminator())
    with pytest.raises(ValueError, match="betas must be two numbers in"):
        GANSettings(betas=(0.0, 1.0))
    with pytest.raises(ValueError, match="evaluate_every must be a positive integer"):
        GANSettings(evaluate_every=0)
    with pytest.raises(RuntimeError, match="without scores"):
        module_for("bn").evaluate()


def test_capture_generator_activations():
    recorder = LayerRecorder(norm("acn"))
    generator = DCGANGenerator(LATENT, 1, 32, TINY_G, norm_layer=recorder)
    module = GANModule(generator, tiny_discriminator(), GANSettings(sample_batch_size=16))
    sample = capture_generator_activations(
        module, recorder.layers[0], samples=40, channel=2, seed=0
    )
    # 40 images (three generation batches) at 8x8 positions of the first norm site.
    assert sample.channel_values.shape == (40 * 8 * 8,)
    assert sample.features.shape == (40, TINY_G[1])
    assert sample.labels.tolist() == [-1] * 40 and sample.layer == "AdaptiveContextNorm"
    again = capture_generator_activations(module, recorder.layers[0], samples=40, channel=2, seed=0)
    assert np.array_equal(sample.channel_values, again.channel_values)
    with pytest.raises(ValueError, match="not part of the generator"):
        capture_generator_activations(module, nn.BatchNorm2d(4), samples=4, channel=0, seed=0)
    with pytest.raises(ValueError, match="channel=9 but the layer has 8 channels"):
        capture_generator_activations(module, recorder.layers[0], samples=4, channel=9, seed=0)


# --- figures --------------------------------------------------------------------------------


def assert_png(path, min_size: tuple[int, int] = (300, 200)) -> None:
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(path) as image:
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]


def test_tile_images_places_each_image_in_its_cell():
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


def test_score_curve_and_grid_figures(tmp_path):
    def history(offset: float) -> list[dict[str, float]]:
        return [
            {
                "epoch": epoch,
                "fid": 30 / (epoch + 1) + offset,
                "kid": 0.3 / (epoch + 1) + offset / 100,
            }
            for epoch in range(4)
        ]

    histories = {
        "bn": [history(0.0), history(2.0), history(4.0)],
        "acn": [history(-1.0), history(1.0), history(math.nan)],
    }
    titles = {"fid": "FID, local MNIST classifier features; not comparable with Inception FID"}
    assert_png(plot_score_curves(histories, titles, tmp_path / "scores.png"))
    grids = {"bn": real_images(16), "acn": real_images(16, seed=1)}
    assert_png(plot_sample_grids(grids, tmp_path / "grids.png", subtitle="epoch 4, seed 0"))


def test_generator_activation_histograms(tmp_path):
    recorder = LayerRecorder(norm("mixnorm"))
    module = GANModule(
        DCGANGenerator(LATENT, 1, 32, TINY_G, norm_layer=recorder), tiny_discriminator()
    )
    sample = capture_generator_activations(
        module, recorder.layers[1], samples=16, channel=0, seed=0
    )
    assert_png(plot_activation_histograms({"mixnorm": sample}, K, tmp_path / "activations.png"))
