"""The runner's promises: results folders keep what they hold, diverged runs are recorded and the
experiment goes on, Ctrl-C keeps what was saved, settings differences are named, progress."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from contextnorm.cli import main
from contextnorm.config import ConfigError, TrainConfig
from contextnorm.io import atomic_write_json
from contextnorm.methods import METHODS, BatchNorm, NormMethod
from contextnorm.metrics import MetricSpec, ReportSpec, ViewSpec, paired_difference
from contextnorm.runner import load_results, run_experiment
from contextnorm.runner.callbacks import EpochHistory
from contextnorm.runner.fingerprint import code_version, differences, run_settings
from contextnorm.runner.progress import Progress, RunProgressBar
from contextnorm.runner.trainer import build_trainer, last_checkpoint
from contextnorm.tasks import Selection

from tiny import tiny_config

BATCHES_PER_EPOCH = 18  # digits: 1,212 training images in batches of 64, the last one dropped


class PoisonedNorm(BatchNorm):
    """BatchNorm that returns NaN from its 21st training batch on: it diverges in epoch 2."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.calls = 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
        outputs = super().forward(inputs)
        return outputs * float("nan") if self.calls > BATCHES_PER_EPOCH + 2 else outputs


METHODS.register("poisoned", NormMethod(PoisonedNorm), summary="BatchNorm that turns to NaN")


def methods_in_folder(results_dir: Path) -> list[str]:
    return [method.label for method in load_results(results_dir).present()]


# --- settings ----------------------------------------------------------------------------------


def test_run_settings_come_from_the_schema_and_differences_name_both_values(tmp_path) -> None:
    config = tiny_config(tmp_path, "methods=[bn, {name: cn, options: {momentum: 0.2}}]")
    checkpoint, continuation = run_settings(config, 1, 0)
    assert checkpoint["method.name"] == "cn" and checkpoint["method.options.momentum"] == 0.2
    assert checkpoint["seed"] == 0 and checkpoint["train.lr"] == 0.001
    # Execution settings are never part of a run's settings; neither are other methods.
    for key in ("train.progress", "train.cpu_threads", "name", "output_dir", "plots.channel"):
        assert key not in checkpoint and key not in continuation
    assert continuation == {"train.epochs": 1, "train.early_stopping_patience": None}
    # With a schedule laid out over the epochs, the epoch count is part of the checkpoint.
    cosine, _ = run_settings(tiny_config(tmp_path, "train.schedule=cosine"), 0, 0)
    assert cosine["train.epochs"] == 1

    other, _ = run_settings(tiny_config(tmp_path, "train.lr=1e-2", "data.seed=3"), 0, 0)
    assert differences(run_settings(config, 0, 0)[0], other) == [
        "data.seed: 0 -> 3",
        "train.lr: 0.001 -> 0.01",
    ]
    # An optional setting at its default is left out: the runs made before it existed match.
    assert "train.gradient_clip" not in checkpoint
    clipped, _ = run_settings(tiny_config(tmp_path, "train.gradient_clip=5"), 0, 0)
    assert differences(run_settings(config, 0, 0)[0], clipped) == [
        "train.gradient_clip: (not set) -> 5.0"
    ]


# --- the history of a run ---------------------------------------------------------------------


class ScoredEveryOtherEpoch(L.LightningModule):
    """Logs a score at the end of every other epoch, as a GAN logs its FID every few epochs."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).square().mean()
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=len(batch[0]))
        return loss

    def on_train_epoch_end(self) -> None:
        if self.current_epoch % 2 == 0:
            self.log("val/score", 10.0 + self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_each_epoch_record_holds_what_that_epoch_logged_and_the_checkpoint_holds_it(
    tmp_path,
) -> None:
    history = EpochHistory()
    trainer = build_trainer(
        TrainConfig(epochs=3, accelerator="cpu", devices=1, progress="none"),
        tmp_path,
        seed=0,
        selection=Selection("val/score", "min"),
        history=history,
        callbacks=[],
        progress_bar=False,
    )
    data = DataLoader(TensorDataset(torch.randn(8, 1)), batch_size=4)
    trainer.fit(ScoredEveryOtherEpoch(), data)
    # Values logged in the module's on_train_epoch_end belong to that epoch, not the next, and
    # an epoch that logged no score has none (not the previous epoch's).
    assert [record.get("val/score") for record in history.records] == [10.0, None, 12.0]
    assert [record["epoch"] for record in history.records] == [0, 1, 2]
    assert all("train/loss" in record for record in history.records)
    # The checkpoint written after the last epoch holds that epoch's complete record.
    checkpoint = torch.load(last_checkpoint(tmp_path), map_location="cpu", weights_only=False)
    assert checkpoint["callbacks"]["EpochHistory"]["records"] == history.records


class FixedGradient(L.LightningModule):
    """One parameter whose gradient is 3 in each of its 4 entries (norm 6), at every step."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(4))

    def training_step(self, batch, batch_idx):
        return 3.0 * self.weight.sum() + 0.0 * batch[0].sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


@pytest.mark.parametrize(("clip", "step"), [(None, 6.0), (6.5, 6.0), (0.5, 0.5)])
def test_gradient_clip_bounds_the_norm_of_each_step(tmp_path, clip, step) -> None:
    trainer = build_trainer(
        TrainConfig(epochs=1, gradient_clip=clip, accelerator="cpu", devices=1, progress="none"),
        tmp_path,
        seed=0,
        selection=Selection("train/loss", "min"),
        history=EpochHistory(),
        callbacks=[],
        progress_bar=False,
    )
    module = FixedGradient()
    trainer.fit(module, DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=1))
    # One SGD step of lr 1: the parameter moved by the (clipped) gradient's norm, and only
    # a gradient above the bound is touched.
    assert float(module.weight.detach().norm()) == pytest.approx(step)


# --- results folders keep what they hold -------------------------------------------------------


@pytest.mark.slow
def test_a_rerun_with_some_of_the_methods_keeps_the_others_in_the_tables(tmp_path) -> None:
    run_experiment(tiny_config(tmp_path))
    results_dir = tmp_path / "results"
    lines: list[str] = []
    run_experiment(tiny_config(tmp_path, "methods=[cn]", "train.progress=run"), echo=lines.append)
    assert any("reused" in line for line in lines)
    assert methods_in_folder(results_dir) == ["cn", "bn"]
    table = (results_dir / "results.md").read_text(encoding="utf-8")
    assert "| bn | 1 |" in table
    # The folder keeps its baseline: cn, the first method of this run, is compared with bn.
    assert "Δ vs bn" in table and "Δ vs cn" not in table

    run_experiment(tiny_config(tmp_path, "methods=[cne]", "report.baseline=cne"))
    assert methods_in_folder(results_dir) == ["cne", "cn", "bn"]

    # Runs of other shared settings cannot share a table: they are left out, and the user told.
    lines.clear()
    run_experiment(
        tiny_config(
            tmp_path,
            "methods=[ln]",
            "train.lr=0.002",
            "report.baseline=ln",
            "train.progress=run",
        ),
        echo=lines.append,
    )
    assert methods_in_folder(results_dir) == ["ln"]
    assert any(
        "runs of cne, cn, bn" in line and "train.lr: 0.001 -> 0.002" in line for line in lines
    )


@pytest.mark.slow
def test_a_diverging_method_is_recorded_with_its_epoch_and_the_experiment_goes_on(
    tmp_path,
) -> None:
    config = tiny_config(tmp_path, "methods=[poisoned, bn]", "train.epochs=3", "train.progress=run")
    lines: list[str] = []
    results_dir = run_experiment(config, echo=lines.append)

    record = json.loads((results_dir / "runs/poisoned/seed-0/result.json").read_text())
    assert record["status"] == "diverged" and record["diverged_at"] == 2
    assert "train/loss" in record["divergence"] and record["test"] == {}
    assert [epoch["epoch"] for epoch in record["history"]] == [0, 1]
    assert any("poisoned" in line and "diverged in epoch 2" in line for line in lines)
    bn = json.loads((results_dir / "runs/bn/seed-0/result.json").read_text())
    assert bn["status"] == "finished" and bn["epochs"] == 3
    markdown = (results_dir / "results.md").read_text(encoding="utf-8")
    assert "| poisoned | 0 of 1 (1 diverged) |" in markdown
    assert "poisoned seed 0 in epoch 2" in markdown

    # A re-run reuses the diverged result: divergence is a result, not a failure.
    lines.clear()
    run_experiment(config, echo=lines.append)
    assert any("poisoned" in line and "diverged in epoch 2" in line for line in lines)


@pytest.mark.slow
def test_changed_figure_settings_redraw_the_figures_from_the_checkpoint(tmp_path) -> None:
    config = tiny_config(tmp_path, "methods=[cn]", "plots.enabled=true", "plots.samples=32")
    results_dir = run_experiment(config)
    run_dir = results_dir / "runs/cn/seed-0"
    finished_at = (run_dir / "result.json").stat().st_mtime_ns
    with np.load(run_dir / "activations.npz") as arrays:
        assert int(arrays["channel"]) == 0

    run_experiment(
        tiny_config(
            tmp_path, "methods=[cn]", "plots.enabled=true", "plots.samples=32", "plots.channel=3"
        )
    )
    assert (run_dir / "result.json").stat().st_mtime_ns == finished_at
    with np.load(run_dir / "activations.npz") as arrays:
        assert int(arrays["channel"]) == 3
    assert load_results(results_dir).config.plots.channel == 3


@pytest.mark.slow
def test_runs_record_their_code_and_reuse_code_trains_runs_of_other_code_again(tmp_path) -> None:
    results_dir = tmp_path / "results"
    run_dir = results_dir / "runs" / "bn" / "seed-0"
    run_experiment(tiny_config(tmp_path, "methods=[bn]"))
    current = code_version()
    assert json.loads((run_dir / "result.json").read_text(encoding="utf-8"))["code"] == current
    assert json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["code"] == current
    assert f"contextnorm {current}, every run (1)" in (results_dir / "results.md").read_text(
        encoding="utf-8"
    )
    # The run as an earlier version of the code would have left it.
    for name in ("result.json", "run.json"):
        stored = json.loads((run_dir / name).read_text(encoding="utf-8"))
        atomic_write_json(run_dir / name, {**stored, "code": "0.0.9+earlier"})
    old = (run_dir / "result.json").read_text(encoding="utf-8")

    lines: list[str] = []
    run_experiment(tiny_config(tmp_path, "methods=[bn]", "train.progress=run"), echo=lines.append)
    assert any(f"reused, made with code 0.0.9+earlier, not {current}" in line for line in lines)
    assert (run_dir / "result.json").read_text(encoding="utf-8") == old

    lines.clear()
    run_experiment(
        tiny_config(tmp_path, "methods=[bn]", "train.progress=run", "reuse=code"),
        echo=lines.append,
    )
    aside = results_dir / "stale" / "0.0.9+earlier" / "bn" / "seed-0"
    assert (aside / "result.json").read_text(encoding="utf-8") == old  # kept, not deleted
    assert any("made with code 0.0.9+earlier" in line and str(aside) in line for line in lines)
    record = json.loads((run_dir / "result.json").read_text(encoding="utf-8"))
    assert record["code"] == current and record["resumed_after_epochs"] == 0
    assert not any("reused" in line for line in lines)


def test_reuse_names_its_choices() -> None:
    with pytest.raises(ConfigError, match="reuse.*settings, code"):
        tiny_config(Path("unused"), "reuse=always").check()


# --- interrupts and resumes --------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_keeps_the_saved_epochs_says_how_to_resume_and_exits_130(
    tmp_path, monkeypatch, capsys
) -> None:
    overrides = [f"output_dir={tmp_path / 'results'}", "train.epochs=2", "train.seeds=[0]"]
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(
        "name: tiny\nmodel: {options: {widths: [4, 8, 8, 8]}}\nmethods: [bn]\n"
        "train: {batch_size: 64, cpu_threads: 1, accelerator: cpu, progress: run}\n"
        "plots: {enabled: false}\n",
        encoding="utf-8",
    )
    original = EpochHistory.on_train_epoch_start

    def press_ctrl_c_in_epoch_2(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise KeyboardInterrupt
        original(self, trainer, pl_module)

    monkeypatch.setattr(EpochHistory, "on_train_epoch_start", press_ctrl_c_in_epoch_2)
    assert main(["run", str(config_file), *overrides]) == 130
    message = capsys.readouterr().err
    assert "0 of 1 runs finished" in message
    assert "checkpoint after epoch 1 is kept" in message
    resume = shlex.join(["contextnorm", "run", str(config_file), *overrides])
    assert f"Resume with: {resume}" in message
    # Lightning ignores Ctrl-C while it shuts a fit down; the user gets it back.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    monkeypatch.setattr(EpochHistory, "on_train_epoch_start", original)
    assert main(["run", str(config_file), *overrides]) == 0
    output = capsys.readouterr().out
    assert "bn seed 0: resumed from epoch 1" in output
    record = json.loads((tmp_path / "results/runs/bn/seed-0/result.json").read_text())
    assert record["epochs"] == 2 and record["resumed_after_epochs"] == 1


@pytest.mark.slow
def test_a_real_ctrl_c_on_the_command_exits_130(tmp_path) -> None:
    command = [
        sys.executable,
        "-m",
        "contextnorm",
        "demo",
        f"output_dir={tmp_path / 'results'}",
        "methods=[bn]",
        "train.seeds=[0]",
        "train.epochs=200",
        "train.progress=epoch",
        "plots.enabled=false",
    ]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment
    )
    try:
        deadline = time.monotonic() + 300
        for line in process.stdout:
            if "epoch 2/200" in line or time.monotonic() > deadline:
                break
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, errors
    assert "Interrupted." in errors and "Resume with: contextnorm demo" in errors
    assert "is kept" in errors


# --- progress ----------------------------------------------------------------------------------


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere() -> None:
    lines: list[str] = []
    assert Progress("auto", lines.append, is_terminal=False).mode == "epoch"
    terminal = Progress("auto", lines.append, is_terminal=True)
    assert terminal.mode == "bar"
    (bar,) = terminal.callbacks("cn seed 0", ["train/loss", "val/loss"])
    assert isinstance(bar, RunProgressBar)
    printer = Progress("auto", lines.append, is_terminal=False).epoch_printer(
        "cn seed 0", 12, ["train/loss", "val/accuracy"]
    )
    printer({"epoch": 2, "time_s": 0.5, "train/loss": 0.25, "val/accuracy": 0.9})
    assert lines == ["    cn seed 0 epoch 3/12: train/loss 0.2500, val/accuracy 0.9000 (0.5 s)"]
    assert Progress("none", lines.append).callbacks("x", []) == []


@pytest.mark.slow
def test_the_bar_shows_the_method_seed_epoch_and_metrics(tmp_path, capsys) -> None:
    run_experiment(tiny_config(tmp_path, "methods=[bn]", "train.progress=bar"))
    output = capsys.readouterr().out
    assert "bn seed 0 · epoch 1/1" in output and "val/loss=" in output


# --- the pieces of the tables ------------------------------------------------------------------


def test_a_report_description_keeps_the_order_of_its_views_through_a_sorted_json_file(
    tmp_path,
) -> None:
    spec = ReportSpec(
        about=["data"],
        views={"running": ViewSpec("running", "r"), "batch": ViewSpec("batch", "b")},
        metrics=[MetricSpec("fid", "FID", lower=0.0, higher_is_better=False)],
        curves=[],
        run_images={"samples.png": "what the grid shows"},
    )
    atomic_write_json(tmp_path / "spec.json", spec.to_json())
    stored = json.loads((tmp_path / "spec.json").read_text(encoding="utf-8"))
    assert ReportSpec.from_json(stored) == spec
    assert list(ReportSpec.from_json(stored).views) == ["running", "batch"]
    # A folder written by an earlier version: views as a mapping, run images as a list.
    stored.update(views={"a": {"title": "A", "description": "a"}}, run_images=["samples.png"])
    earlier = ReportSpec.from_json(stored)
    assert earlier.views == {"a": ViewSpec("A", "a")}
    assert earlier.run_images == {"samples.png": ""}


def test_paired_differences_use_the_seeds_both_finished() -> None:
    difference = paired_difference({0: 0.9, 1: 0.8, 2: float("nan")}, {0: 0.7, 1: 0.7, 3: 0.5})
    assert difference.count == 2 and difference.mean == pytest.approx(0.15)
    # t(0.975, 1) = 12.706; the per-seed differences 0.2 and 0.1 have std 0.0707.
    assert difference.high - difference.mean == pytest.approx(12.7062 * 0.070711 / 2**0.5, 1e-4)
    assert not difference.supported
    clear = paired_difference({0: 0.9, 1: 0.91, 2: 0.92}, {0: 0.7, 1: 0.7, 2: 0.71})
    # Differences 0.20, 0.21, 0.21: sd 0.00577, t(0.975, 2) = 4.303, half-width 0.0143.
    assert clear.supported and clear.format(scale=100) == "+20.67 [+19.23, +22.10] *"
    single = paired_difference({0: 0.9}, {0: 0.7})
    assert single.format(scale=100) == "+20.00 (n = 1)" and not single.supported


def test_a_run_settings_mismatch_is_a_config_error_naming_the_folder(tmp_path) -> None:
    run_dir = tmp_path / "results/runs/bn/seed-0"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints/last.ckpt").write_bytes(b"")
    (run_dir / "run.json").write_text(json.dumps({"settings": {"train.lr": 0.5}}))
    with pytest.raises(ConfigError, match=r"seed-0 holds a checkpoint.*train\.lr: 0\.5 -> 0\.001"):
        run_experiment(tiny_config(tmp_path, "methods=[bn]"))
