"""The experiment engine: checks before training, end-to-end runs, resume, aggregation, views."""

from __future__ import annotations

import csv
import json
import math
import statistics

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import contextnorm as cn
from contextnorm.config import ConfigError, ExperimentConfig
from contextnorm.methods import METHODS, BatchNorm
from contextnorm.metrics import summarize
from contextnorm.runner import load_results, prepare_experiment, run_experiment
from contextnorm.tasks.data import check_contexts
from contextnorm.tasks.preprocess import BatchPreprocess, channel_statistics

from tiny import tiny_config

# Digits below 5 form superclass 0, the others superclass 1: a label-derived context.
LOW_HIGH_DIGITS = "{0: 0, 1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 6: 1, 7: 1, 8: 1, 9: 1}"


def read_result(config: ExperimentConfig, method: str, seed: int) -> dict:
    path = config.results_dir / "runs" / method / f"seed-{seed}" / "result.json"
    return json.loads(path.read_text(encoding="utf-8"))


# --- bad input is caught before any training ---------------------------------------------


class _FixedContexts:
    """A context builder that assigns the same given column to every split."""

    title = "fixed context"
    description = "a fixed column"

    def __init__(self, column: torch.Tensor, num_contexts: int) -> None:
        self.column = column
        self.num_contexts = num_contexts

    def fit(self, train: object) -> _FixedContexts:
        return self

    def assign(self, data: object) -> torch.Tensor:
        return self.column


@pytest.mark.parametrize(
    ("column", "message"),
    [
        (torch.zeros(5, dtype=torch.int64), "has 5 samples|have 5 entries"),
        (None, r"must lie in \[0, 2\)"),
    ],
    ids=["wrong-length", "out-of-range"],
)
def test_a_bad_context_column_fails_before_training(tmp_path, monkeypatch, column, message) -> None:
    config = tiny_config(tmp_path)

    def fake_build_contexts(kind, num_contexts, train, **options):
        ids = column if column is not None else torch.full((len(train),), 2, dtype=torch.int64)
        return _FixedContexts(ids, 2)

    monkeypatch.setattr("contextnorm.tasks.data.build_contexts", fake_build_contexts)
    with pytest.raises(ConfigError, match=message):
        run_experiment(config)
    assert not config.results_dir.exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["methods=[bn, cnn]"],
            r"methods\[1\] \(cnn\): unknown method 'cnn'; registered methods: bn",
        ),
        (
            ["methods=[{name: cn, options: {num_contexts: 3}}]"],
            "num_contexts=3 disagrees with contexts.num_contexts=2",
        ),
        (
            ["methods=[{name: cn, options: {momentun: 0.1}}]"],
            "no option 'momentun'; valid options: .*momentum",
        ),
        (["contexts.num_contexts=3"], r"contexts \(domain\): num_contexts=3"),
        (["contexts.kind=clusters"], "unknown context kind 'clusters'"),
        (["model.options.depth=3"], "does not take depth"),
        (["model.placement=patch"], "does not support placement mode 'patch'"),
        (
            ["plots.enabled=true", "plots.channel=4"],
            "plots.channel=4 but the recorded norm layer has 4 channels",
        ),
    ],
    ids=[
        "method",
        "layer-k",
        "option",
        "context-k",
        "kind",
        "model-option",
        "placement",
        "channel",
    ],
)
def test_config_mistakes_fail_before_training(tmp_path, overrides, message) -> None:
    config = tiny_config(tmp_path, *overrides)
    with pytest.raises(ConfigError, match=message):
        run_experiment(config)
    assert not config.results_dir.exists()


def test_a_missing_data_set_reports_the_loader_message(tmp_path) -> None:
    config = tiny_config(tmp_path, "data.name=mnist", f"data.root={tmp_path / 'empty'}")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        run_experiment(config)
    assert not config.results_dir.exists()


def test_train_and_test_splits_with_different_classes_are_refused(tmp_path) -> None:
    pixels = np.zeros((4, 4), dtype=np.uint8)
    for split, classes in (("train", ("cat", "dog", "owl")), ("test", ("cat", "dog"))):
        for name in classes:
            (tmp_path / "images" / split / name).mkdir(parents=True)
            Image.fromarray(pixels).save(tmp_path / "images" / split / name / "1.png")
    config = tiny_config(tmp_path, "data.name=image-folder", f"data.root={tmp_path / 'images'}")
    with pytest.raises(ConfigError, match=r"class\(es\) \['owl'\] have train images but no test"):
        run_experiment(config)
    assert not config.results_dir.exists()


def test_check_contexts_accepts_a_valid_column_and_names_the_split() -> None:
    valid = torch.tensor([0, 1, 1, 0])
    assert check_contexts(valid, "test", 4, 2) is valid
    with pytest.raises(ConfigError, match="test split must be an int64 tensor"):
        check_contexts(valid.float(), "test", 4, 2)
    with pytest.raises(ConfigError, match=r"validation split must lie in \[0, 2\).*\[-1, 1\]"):
        check_contexts(torch.tensor([0, -1, 1, 0]), "validation", 4, 2)


# --- training end to end -----------------------------------------------------------------


@pytest.mark.slow
def test_tiny_experiment_writes_results_tables_and_figures(tmp_path) -> None:
    config = tiny_config(
        tmp_path,
        "train.seeds=[0, 1]",
        "plots.enabled=true",
        "plots.samples=64",
        "train.progress=run",
    )
    lines: list[str] = []
    results_dir = run_experiment(config, echo=lines.append)

    for name in (
        "results.md",
        "results.csv",
        "curves.png",
        "test_accuracy.png",
        "activations.png",
        "features_pca.png",
    ):
        assert (results_dir / name).stat().st_size > 0, name
    assert (results_dir / "runs" / "bn" / "seed-0" / "activations.npz").is_file()

    rows = {row["method"]: row for row in csv.DictReader((results_dir / "results.csv").open())}
    assert set(rows) == {"bn", "cn"}
    for method in ("bn", "cn"):
        accuracies = [
            read_result(config, method, seed)["test"]["input"]["accuracy"] for seed in (0, 1)
        ]
        assert int(rows[method]["seeds"]) == 2
        assert float(rows[method]["input_accuracy_mean"]) == pytest.approx(
            statistics.fmean(accuracies)
        )
        assert float(rows[method]["input_accuracy_std"]) == pytest.approx(
            statistics.stdev(accuracies)
        )
        record = read_result(config, method, 0)
        assert record["epochs"] == 1 and len(record["history"]) == 1
        assert {"train/loss", "val/loss", "train/accuracy", "val/accuracy"} <= set(
            record["history"][0]
        )
        assert set(record["test"]["input"]) == {
            "accuracy",
            "top5",
            "precision",
            "recall",
            "f1",
            "loss",
        }
    assert (
        read_result(config, "cn", 0)["uses_context"]
        and not read_result(config, "bn", 0)["uses_context"]
    )

    markdown = (results_dir / "results.md").read_text(encoding="utf-8")
    assert "| bn | 2 |" in markdown and "![curves](curves.png)" in markdown
    assert sum("test accuracy" in line for line in lines) == 4


@pytest.mark.slow
def test_a_resumed_run_continues_its_checkpoint_exactly_and_finished_runs_are_reused(
    tmp_path,
) -> None:
    uninterrupted = tiny_config(tmp_path / "a", "methods=[cn]", "train.epochs=2")
    run_experiment(uninterrupted)

    # A run stopped after its first epoch: its checkpoint is the resume point of the longer run.
    interrupted = tiny_config(tmp_path / "b", "methods=[cn]", "train.epochs=1")
    run_experiment(interrupted)
    resumed = tiny_config(tmp_path / "b", "methods=[cn]", "train.epochs=2")
    run_experiment(resumed)

    record = read_result(resumed, "cn", 0)
    assert record["resumed_after_epochs"] == 1
    # One checkpoint file per run: its latest epoch, rewritten in place.
    checkpoints = resumed.results_dir / "runs" / "cn" / "seed-0" / "checkpoints"
    assert [path.name for path in checkpoints.iterdir()] == ["last.ckpt"]
    assert [entry["epoch"] for entry in record["history"]] == [0, 1]
    reference = read_result(uninterrupted, "cn", 0)
    assert record["test"] == reference["test"]
    assert [entry["train/loss"] for entry in record["history"]] == [
        entry["train/loss"] for entry in reference["history"]
    ]

    result_file = resumed.results_dir / "runs" / "cn" / "seed-0" / "result.json"
    before = result_file.stat().st_mtime_ns
    lines: list[str] = []
    run_experiment(
        tiny_config(tmp_path / "b", "methods=[cn]", "train.epochs=2", "train.progress=run"),
        echo=lines.append,
    )
    assert result_file.stat().st_mtime_ns == before
    assert any("reused" in line for line in lines)


@pytest.mark.slow
def test_figures_turned_on_later_come_from_the_saved_checkpoint(tmp_path) -> None:
    config = tiny_config(tmp_path, "methods=[cn]")
    run_experiment(config)
    run_dir = config.results_dir / "runs" / "cn" / "seed-0"
    finished_at = (run_dir / "result.json").stat().st_mtime_ns

    run_experiment(tiny_config(tmp_path, "methods=[cn]", "plots.enabled=true", "plots.samples=32"))
    assert (run_dir / "result.json").stat().st_mtime_ns == finished_at
    assert (run_dir / "activations.npz").is_file()
    assert (config.results_dir / "activations.png").stat().st_size > 0


@pytest.mark.slow
def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path) -> None:
    run_experiment(tiny_config(tmp_path, "methods=[bn]"))
    (tmp_path / "results" / "runs" / "bn" / "seed-0" / "result.json").unlink()
    with pytest.raises(
        ConfigError,
        match=r"holds a checkpoint trained with other settings.*train\.lr: 0\.001 -> 0\.01",
    ):
        run_experiment(tiny_config(tmp_path, "methods=[bn]", "train.lr=0.01"))


@pytest.mark.slow
def test_label_derived_contexts_report_oracle_predicted_and_unknown_views(tmp_path) -> None:
    config = tiny_config(
        tmp_path,
        "contexts.kind=superclass",
        "contexts.num_contexts=2",
        f"contexts.options={{mapping: {LOW_HIGH_DIGITS}}}",
    )
    results_dir = run_experiment(config)

    info = json.loads((results_dir / "experiment.json").read_text(encoding="utf-8"))
    assert [view["name"] for view in info["report"]["views"]] == ["oracle", "predicted", "unknown"]
    assert 0.5 <= info["context_prediction_accuracy"] <= 1.0
    header = next(csv.reader((results_dir / "results.csv").open()))
    for view in ("oracle", "predicted", "unknown"):
        assert f"{view}_accuracy_mean" in header
    markdown = (results_dir / "results.md").read_text(encoding="utf-8")
    assert (
        "accuracy, oracle context | Δ vs bn | accuracy, predicted context | Δ vs bn | "
        "accuracy, unknown context | Δ vs bn" in markdown
    )

    context_free = read_result(config, "bn", 0)["test"]
    assert context_free["oracle"] == context_free["predicted"] == context_free["unknown"]
    with_context = read_result(config, "cn", 0)["test"]
    assert all(
        0.0 <= with_context[view]["accuracy"] <= 1.0 for view in ("oracle", "predicted", "unknown")
    )


def test_input_derived_contexts_have_a_single_view(tmp_path) -> None:
    task = prepare_experiment(tiny_config(tmp_path))
    assert list(task.test_splits) == ["input"]
    test_split = task.test_splits["input"]
    assert torch.equal(test_split.contexts, test_split.data.domains)
    assert task.describe().views["input"].title == "stored domain"


def test_validation_is_a_stratified_hold_out_of_the_training_split(tmp_path) -> None:
    prepared = prepare_experiment(tiny_config(tmp_path, "data.val_fraction=0.2"))
    train, val = prepared.shared.train.data, prepared.shared.val.data
    total = len(train) + len(val)
    assert len(val) == round(0.2 * total)
    assert torch.bincount(val.labels).min() > 0
    assert not set(map(bytes, train.images.numpy())) & set(map(bytes, val.images.numpy()))


@pytest.mark.slow
def test_context_ablations_sit_in_the_same_table(tmp_path) -> None:
    config = tiny_config(
        tmp_path,
        "methods=[bn, cn, {name: cn, label: cn-random, contexts: {kind: random, seed: 4}}, "
        "{name: cn, label: cn-one, contexts: {kind: random, num_contexts: 1}}]",
    )
    task = prepare_experiment(config)
    domains = task.contexts[1].train.contexts
    randomised = task.contexts[2].train.contexts
    assert torch.equal(torch.bincount(randomised), torch.bincount(domains))
    assert not torch.equal(randomised, domains)
    assert task.contexts[3].train.contexts.unique().tolist() == [0]
    assert task.build_module(3).tested_layers[0].num_contexts == 1

    results_dir = run_experiment(config)
    markdown = (results_dir / "results.md").read_text(encoding="utf-8")
    for label in ("cn-random", "cn-one"):
        assert f"| {label} | 1 |" in markdown
    assert "cn-random: random, K = 2, drawn once per sample (seed 4) with the group sizes" in (
        markdown
    )
    assert "cn-one: random, K = 1" in markdown


def test_random_contexts_are_a_kind_for_any_config(tmp_path) -> None:
    task = prepare_experiment(
        tiny_config(tmp_path, "contexts.kind=random", "contexts.options={like: domain}")
    )
    assert task.describe().views["input"].title == "random context"
    assert torch.equal(torch.bincount(task.train.contexts), torch.bincount(task.train.data.domains))


# --- pieces --------------------------------------------------------------------------------


def test_summary_is_the_mean_and_sample_standard_deviation() -> None:
    summary = summarize([0.9, 0.8, 1.0])
    assert summary.mean == pytest.approx(0.9)
    assert summary.std == pytest.approx(0.1)
    assert summary.count == 3
    assert summary.format(scale=100) == "90.00 ± 10.00"
    single = summarize([0.5])
    assert math.isnan(single.std) and single.format() == "0.50"
    assert summarize([float("nan"), 0.2]).count == 1


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_builds_a_norm_for_any_layout(name: str) -> None:
    factory = METHODS[name].norm_factory(2, {}, where="test")
    layer = factory(6)
    contexts = torch.tensor([0, 1, 0, 1])
    for shape in ((4, 6, 5, 5), (4, 6, 7)):
        inputs = torch.randn(shape)
        with cn.use_context(contexts):
            outputs = layer(inputs)
        assert outputs.shape == inputs.shape
        assert torch.isfinite(outputs).all()
    assert METHODS[name].uses_context == cn.uses_context(layer)


def test_batchnorm_of_any_rank_matches_batchnorm2d_on_images() -> None:
    torch.manual_seed(0)
    images = torch.randn(8, 3, 4, 4)
    assert torch.allclose(BatchNorm(3)(images), nn.BatchNorm2d(3)(images), atol=1e-6)
    tokens = torch.randn(8, 3, 10)
    assert torch.allclose(BatchNorm(3)(tokens), nn.BatchNorm1d(3)(tokens), atol=1e-6)


def test_preprocessing_normalises_with_the_training_statistics() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=generator)
    mean, std = channel_statistics(images)
    reference = images.double() / 255
    assert mean == pytest.approx(reference.mean(dim=(0, 2, 3)).tolist())
    assert std == pytest.approx(reference.std(dim=(0, 2, 3), unbiased=False).tolist())

    preprocess = BatchPreprocess(mean, std, (8, 8), crop_flip=True)
    plain = preprocess(images, augment=False)
    assert plain.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (plain.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2
    augmented = preprocess(images, augment=True)
    assert augmented.shape == plain.shape and not torch.equal(augmented, plain)
    with pytest.raises(TypeError, match="uint8"):
        preprocess(images.float(), augment=False)


def test_load_results_rejects_a_folder_that_holds_no_experiment(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not a results folder"):
        load_results(tmp_path)
