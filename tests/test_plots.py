"""Figures: every plot writes a non-empty PNG; activations are recorded where the layer runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from contextnorm.config import PlotConfig, TrainConfig
from contextnorm.methods import BatchNorm
from contextnorm.metrics import MetricSpec, ReportSpec, ViewSpec, paired_difference, summarize
from contextnorm.runner.activations import ActivationSample, capture_activations
from contextnorm.runner.plots import (
    plot_activation_histograms,
    plot_curves,
    plot_feature_projection,
    plot_metric_summary,
    plot_mixture_usage,
)
from contextnorm.tasks import Probe, TaskModule

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 1000


def synthetic_sample(seed: int, num_contexts: int = 2) -> ActivationSample:
    generator = np.random.default_rng(seed)
    contexts = generator.integers(0, num_contexts, 60)
    # Two well separated modes, as an input channel of two visual domains would show.
    values = np.concatenate([generator.normal(-2, 0.5, 400), generator.normal(2, 0.7, 600)])
    value_contexts = np.repeat([0, 1], [400, 600]) % num_contexts
    features = generator.normal(size=(60, 8)) + contexts[:, None] * 3.0
    return ActivationSample(
        layer="BatchNorm",
        layer_index=0,
        channel=0,
        samples=60,
        channel_values=values,
        channel_contexts=value_contexts,
        features=features,
        contexts=contexts,
        labels=generator.integers(0, 10, 60),
    )


CURVES = [
    MetricSpec("train/loss", "training loss", lower=0.0, higher_is_better=False),
    MetricSpec("val/loss", "validation loss", lower=0.0, higher_is_better=False),
    MetricSpec("train/accuracy", "training accuracy", lower=0.0, upper=1.0),
    MetricSpec("val/accuracy", "validation accuracy", lower=0.0, upper=1.0),
]


def history(losses: list[float]) -> list[dict[str, float]]:
    return [
        {
            "epoch": epoch,
            "train/loss": loss,
            "val/loss": loss + 0.1,
            "train/accuracy": 1 - loss / 3,
            "val/accuracy": 0.9 - loss / 3,
        }
        for epoch, loss in enumerate(losses)
    ]


def test_curves_average_seeds_of_different_lengths(tmp_path) -> None:
    histories = {
        "bn": [history([2.0, 1.0, 0.5]), history([2.2, 1.1, 0.4])],
        "cn": [history([1.5, 0.7]), history([1.4, 0.6, 0.3])],
    }
    assert_png(plot_curves(histories, CURVES, tmp_path / "curves.png"))


def test_activation_histogram_and_projections(tmp_path) -> None:
    samples = {"bn": synthetic_sample(0), "cn": synthetic_sample(1)}
    assert_png(
        plot_activation_histograms(samples, 2, ["original", "inverted"], tmp_path / "act.png")
    )
    assert_png(plot_feature_projection(samples, ["original", "inverted"], tmp_path / "pca.png"))
    # OpenMP threads that spin while waiting for each other make t-SNE crawl on busy cores.
    with threadpool_limits(1):
        tsne = plot_feature_projection(
            samples, ["original", "inverted"], tmp_path / "tsne.png", method="tsne"
        )
    assert_png(tsne)
    with pytest.raises(ValueError, match="'pca' or 'tsne'"):
        plot_feature_projection(samples, ["a", "b"], tmp_path / "x.png", method="umap")


def test_diverged_run_gets_a_labelled_panel_not_a_crash(tmp_path) -> None:
    diverged = synthetic_sample(2)
    diverged.channel_values[:] = np.nan
    diverged.features[:] = np.nan
    samples = {"bn": synthetic_sample(0), "cnx": diverged}
    assert_png(plot_activation_histograms(samples, 2, ["a", "b"], tmp_path / "activations.png"))
    assert_png(plot_feature_projection(samples, ["a", "b"], tmp_path / "pca.png"))


def test_metric_summary_with_one_seed_and_several_views(tmp_path) -> None:
    summaries = {
        "bn": {"oracle": summarize([0.8, 0.82]), "predicted": summarize([0.8, 0.82])},
        "cn": {"oracle": summarize([0.9]), "predicted": summarize([0.7])},
    }
    differences = {
        "cn": {
            "oracle": paired_difference({0: 0.9}, {0: 0.8, 1: 0.82}),
            "predicted": paired_difference({0: 0.7}, {0: 0.8, 1: 0.82}),
        }
    }
    titles = {"oracle": "oracle context", "predicted": "predicted context"}
    accuracy = MetricSpec("accuracy", "accuracy", lower=0.0, upper=1.0, percent=True)
    assert_png(
        plot_metric_summary(summaries, differences, titles, accuracy, "bn", tmp_path / "a.png")
    )
    assert_png(plot_metric_summary(summaries, {}, titles, accuracy, None, tmp_path / "b.png"))


def test_activation_sample_round_trips_through_npz(tmp_path) -> None:
    sample = synthetic_sample(3)
    loaded = ActivationSample.load(sample.save(tmp_path / "sample.npz"))
    assert (loaded.layer, loaded.channel) == (sample.layer, sample.channel)
    for name in ("channel_values", "channel_contexts", "features", "contexts", "labels"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(sample, name))
    assert loaded.matches(PlotConfig(layer=0, channel=0, samples=60))
    assert not loaded.matches(PlotConfig(layer=0, channel=1, samples=60))


def fixed_images_probe(module: TaskModule, images: torch.Tensor, contexts: torch.Tensor):
    """What a task's probe does: run the module on held-out samples chosen with the seed."""

    def probe(count: int, seed: int) -> Probe:
        chosen = torch.from_numpy(np.sort(np.random.default_rng(seed).permutation(20)[:count]))
        module(images[chosen], contexts[chosen])
        return Probe(contexts[chosen], torch.arange(20)[chosen] % 3)

    return probe


def test_capture_records_the_hooked_layer_input_and_pooled_output() -> None:
    torch.manual_seed(0)
    norm = BatchNorm(5)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 5, 3, padding=1), norm, torch.nn.Flatten(), torch.nn.Linear(5 * 36, 3)
    )
    images = torch.randn(20, 1, 6, 6)
    module = TaskModule(model, [norm], TrainConfig())
    probe = fixed_images_probe(module, images, torch.arange(20) % 2)
    plots = PlotConfig(layer=0, channel=2, samples=8)

    sample = capture_activations(probe, module, norm, plots=plots, seed=0)
    assert sample.channel_values.shape == sample.channel_contexts.shape == (8 * 6 * 6,)
    assert sample.features.shape == (8, 5)
    assert sample.contexts.shape == sample.labels.shape == (8,)
    # Eval-mode BatchNorm at initialisation is the identity: pooled output = pooled input.
    chosen = np.sort(np.random.default_rng(0).permutation(20)[:8])
    with torch.no_grad():
        convolved = model[0](images[chosen])
    np.testing.assert_allclose(sample.features, convolved.mean(dim=(2, 3)).numpy(), atol=1e-5)
    np.testing.assert_allclose(
        np.sort(sample.channel_values), np.sort(convolved[:, 2].flatten().numpy()), atol=1e-5
    )
    # Each value carries the context of the image it came from.
    np.testing.assert_array_equal(sample.channel_contexts, np.repeat(chosen % 2, 36))
    assert module.training, "capture restores the module's training mode"
    with pytest.raises(ValueError, match=r"plots\.channel=7"):
        capture_activations(probe, module, norm, plots=PlotConfig(channel=7, samples=8), seed=0)


def test_a_report_spec_with_further_curve_figures_round_trips() -> None:
    spec = ReportSpec(
        about=["data"],
        views={"test": ViewSpec("test", "the test images")},
        metrics=[MetricSpec("accuracy", "accuracy", 0.0, 1.0)],
        curves=[MetricSpec("train/loss", "training loss", lower=0.0)],
        curve_figures={"gradients": [MetricSpec("grad/max", "max gradient", lower=0.0)]},
    )
    assert ReportSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


def test_mixture_usage_of_runs_without_per_epoch_records_draws_the_final_weights(tmp_path) -> None:
    # Runs saved before the usage was logged per epoch: the weights panels alone, no crash.
    histories = {"acn": [[{"epoch": 0, "train/loss": 1.0}], [{"epoch": 0, "train/loss": 0.9}]]}
    weights = {"acn": (0, {"layer1": [0.2, 0.8], "layer2": [0.5, 0.5]})}
    path = plot_mixture_usage(histories, {"acn": 2}, weights, tmp_path / "mixture_usage.png")
    assert path.is_file() and path.stat().st_size > 0
