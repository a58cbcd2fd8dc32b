"""What every run records about its norm layers: mixture usage per epoch, the train/eval gap at
the end, and how the report shows them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from contextnorm.cli import main
from contextnorm.layers.diagnostics import train_eval_gap
from contextnorm.metrics import mixture_layer_key, mixture_summary_key
from contextnorm.runner import load_results, run_experiment, write_report
from contextnorm.runner.folder import RESULT_FILE, run_directory
from contextnorm.runner.trainer import last_checkpoint
from contextnorm.tasks import build_task

from tiny import tiny_config

pytestmark = pytest.mark.slow


def headline_rows(markdown: str) -> dict[str, str]:
    """Method -> its row of the headline table (the first table of results.md)."""
    rows: dict[str, str] = {}
    for line in markdown.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0].strip("| "), line)
    return rows


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny experiment with BatchNorm and ACN, 2 epochs, one seed."""
    config = tiny_config(
        tmp_path_factory.mktemp("diagnostics"), "methods=[bn, acn]", "train.epochs=2"
    )
    run_experiment(config)
    return config


def test_acn_epochs_record_mixture_usage_and_batchnorm_epochs_do_not(finished) -> None:
    results = load_results(finished.results_dir)
    bn, acn = (method.finished()[0] for method in results.methods)
    assert len(acn.history) == 2
    for record in acn.history:
        assert 1.0 <= record[mixture_summary_key("components", "median")] <= 2.0 + 1e-6
        assert 0.0 <= record[mixture_summary_key("entropy", "median")] <= math.log(2) + 1e-6
    layers = [layer["layer"] for layer in acn.mixture]
    assert len(layers) == 4  # the Shallow CNN's four norm sites
    last = acn.history[-1]
    # The per-epoch values are the layers' diagnostics: the last epoch's are the final ones.
    for layer in acn.mixture:
        assert last[mixture_layer_key(layer["layer"], "components")] == pytest.approx(
            layer["used_components"]
        )
        assert last[mixture_layer_key(layer["layer"], "entropy")] == pytest.approx(
            layer["posterior_entropy"]
        )
    assert sum(acn.mixture[0]["weights"]) == pytest.approx(1.0, abs=1e-4)
    assert not any(key.startswith("mixture/") for record in bn.history for key in record)
    assert bn.mixture is None


def test_the_stored_gap_is_train_eval_gap_on_the_tasks_held_out_batch(finished) -> None:
    task = build_task(finished)
    task.setup()
    for index, method in enumerate(finished.methods):
        seed = finished.train.seeds[0]
        run_dir = run_directory(finished.results_dir, method.display_name, seed)
        stored = json.loads((run_dir / RESULT_FILE).read_text())["train_eval_gap"]
        module = task.build_module(index)
        checkpoint = torch.load(last_checkpoint(run_dir), map_location="cpu", weights_only=False)
        module.load_state_dict(checkpoint["state_dict"])
        batch = task.held_out_batch(index, module, seed)
        assert stored["samples"] == len(batch[0]) == finished.train.batch_size
        # Held out: validation images with their contexts, not training or test images.
        validation = task.contexts[index].val
        chosen = validation.choose(finished.train.batch_size, seed)
        images = module.preprocess(validation.data.images[chosen], augment=False)
        assert torch.equal(batch[0], images)
        assert torch.equal(batch[1], validation.contexts[chosen])
        torch.manual_seed(seed)
        expected = train_eval_gap(module, *batch)
        assert set(stored["layers"]) == set(expected)
        for name, gap in expected.items():
            assert stored["layers"][name]["absolute"] == pytest.approx(gap.absolute, rel=1e-5)
            assert stored["layers"][name]["relative"] == pytest.approx(gap.relative, rel=1e-5)
        relative = sorted(gap.relative for gap in expected.values())
        assert stored["max"] == pytest.approx(relative[-1], rel=1e-5)
        assert stored["median"] == pytest.approx((relative[1] + relative[2]) / 2, rel=1e-5)
        assert stored["max"] > 0


def test_the_table_shows_the_gap_and_na_for_a_result_of_an_earlier_version(finished) -> None:
    folder = finished.results_dir
    results = load_results(folder)
    header = "train/eval gap, median (max)"
    markdown = write_report(folder).read_text()
    rows = headline_rows(markdown)
    bn_gap = results.methods[0].finished()[0].train_eval_gap
    assert header in markdown
    assert f"{bn_gap['median']:.3g} ({bn_gap['max']:.3g})" in rows["bn"]
    assert (folder / "mixture_usage.png").is_file()
    assert "mixture_usage.png" in markdown

    # A result written before the gap was measured: the run is reused, the table says n/a.
    path = run_directory(folder, "bn", finished.train.seeds[0]) / RESULT_FILE
    original = path.read_text()
    try:
        old = json.loads(original)
        for key in ("train_eval_gap", "mixture"):
            del old[key]
        path.write_text(json.dumps(old))
        markdown = write_report(folder).read_text()
        rows = headline_rows(markdown)
        bn_row = rows["bn"].split(" | ")
        assert bn_row[-2] == "n/a"
        assert rows["acn"].split(" | ")[-2] != "n/a"
        csv = (folder / "results.csv").read_text().splitlines()
        columns = csv[0].split(",")
        bn_csv = dict(zip(columns, csv[1].split(","), strict=True))
        assert bn_csv["train_eval_gap_median_mean"] == ""
        # Such a result is not trained again.
        run_experiment(finished)
        assert "train_eval_gap" not in json.loads(path.read_text())
        # `report --measure-layers` measures it from the checkpoint as training's end did; the
        # runs that have it are left alone.
        acn_path = run_directory(folder, "acn", finished.train.seeds[0]) / RESULT_FILE
        acn_before = acn_path.read_text()
        assert main(["report", str(folder), "--measure-layers"]) == 0
        restored, expected = json.loads(path.read_text()), json.loads(original)
        assert restored["train_eval_gap"]["median"] == pytest.approx(
            expected["train_eval_gap"]["median"], rel=1e-5
        )
        assert (
            restored["train_eval_gap"]["layers"].keys()
            == expected["train_eval_gap"]["layers"].keys()
        )
        assert acn_path.read_text() == acn_before
        assert headline_rows(write_report(folder).read_text())["bn"].split(" | ")[-2] != "n/a"
    finally:
        path.write_text(original)
