"""Training on several processes: Lightning's DDP with synchronised norm layers.

The slow test runs the README's multi-device command (two CPU processes, gloo) to its results
table, with uneven evaluation shards, and checks that the reported test metrics are those of
the saved model evaluated by one process on the whole test split: every sample counted once,
metrics reduced over processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from contextnorm.config import ConfigError, TrainConfig, load_config
from contextnorm.runner import prepare_experiment
from contextnorm.runner.callbacks import EpochSeeding
from contextnorm.runner.trainer import last_checkpoint, process_count
from contextnorm.tasks.data import data_loader, process_batch_size

SOURCE = Path(__file__).resolve().parents[1] / "src"


@pytest.mark.parametrize(
    ("devices", "num_nodes", "expected"),
    [
        (1, 1, 1),
        (2, 1, 2),
        ("2", 1, 2),
        ([0, 1, 2], 1, 3),
        ("0,1", 2, 4),
        ("auto", 1, 1),
        (2, 3, 6),
    ],
)
def test_process_count_follows_devices_and_nodes(devices, num_nodes, expected) -> None:
    settings = TrainConfig(accelerator="cpu", devices=devices, num_nodes=num_nodes)
    assert process_count(settings) == expected


def test_the_batch_is_the_whole_step_split_over_processes() -> None:
    assert process_batch_size(64, 2, "train.batch_size") == 32
    with pytest.raises(ConfigError, match=r"train.batch_size=63 .* multiple of 2"):
        process_batch_size(63, 2, "train.batch_size")


def test_an_uneven_split_is_refused_before_training(tmp_path) -> None:
    config = load_config(
        "demo", [f"output_dir={tmp_path}", "train.devices=2", "train.batch_size=63"]
    )
    with pytest.raises(ConfigError, match="train.batch_size=63"):
        prepare_experiment(config)


def test_a_method_that_cannot_synchronise_is_refused_before_training(tmp_path) -> None:
    config = load_config(
        "demo", [f"output_dir={tmp_path}", "train.devices=2", "methods=[bn,mixnorm]"]
    )
    with pytest.raises(ConfigError, match=r"methods\[1\] \(mixnorm\).*MixtureNorm.*devices=1"):
        prepare_experiment(config)


def fake_trainer(rank: int, world_size: int) -> SimpleNamespace:
    return SimpleNamespace(global_rank=rank, world_size=world_size)


def test_evaluation_shards_cover_every_sample_once_and_training_halves_the_batch() -> None:
    dataset = torch.utils.data.TensorDataset(torch.arange(11))
    seen = []
    for rank in range(2):
        loader = data_loader(
            dataset, 4, train=False, trainer=fake_trainer(rank, 2), key="train.eval_batch_size"
        )
        assert loader.batch_size == 2
        seen += [int(value) for (batch,) in loader for value in batch]
    assert sorted(seen) == list(range(11))
    train = data_loader(dataset, 4, train=True, trainer=fake_trainer(0, 2), key="train.batch_size")
    assert train.batch_size == 2 and train.drop_last


def test_each_process_draws_its_own_augmentation_with_a_shared_data_order(monkeypatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    draws = {}
    for rank in range(2):
        seeding = EpochSeeding(seed=7)
        seeding.on_train_epoch_start(SimpleNamespace(global_rank=rank, current_epoch=3), None)
        draws[rank] = torch.rand(3)
        # Lightning's DistributedSampler reads the seed when it makes a loader: the run's
        # seed on every process (disjoint shards), whatever the epoch (exact resume).
        assert os.environ["PL_GLOBAL_SEED"] == "7"
    assert not torch.equal(draws[0], draws[1])
    # Process 0 draws what a one-process run draws.
    single = EpochSeeding(seed=7)
    single.on_train_epoch_start(SimpleNamespace(global_rank=0, current_epoch=3), None)
    assert torch.equal(torch.rand(3), draws[0])


@pytest.mark.slow
def test_the_demo_trains_on_two_processes_and_reports_metrics_of_the_whole_test_split(
    tmp_path,
) -> None:
    overrides = ["train.devices=2", "train.seeds=[0]", "train.epochs=1", "methods=[bn,cn]"]
    # An odd test split (a padded shard would count a sample twice), and evaluation batches of
    # 67 per process: the validation shards (68 and 67 of 135 images) then differ by a batch.
    overrides += ["data.test_samples=449", "train.eval_batch_size=134"]
    environment = {
        **os.environ,
        "PYTHONPATH": f"{SOURCE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    finished = subprocess.run(
        [sys.executable, "-m", "contextnorm", "run", "demo", *overrides, f"output_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    output = finished.stdout
    # One process reports: one table, each run announced once.
    assert output.count("| method |") == 1 and output.count("[2/2] cn") == 1, output
    assert "| bn | 1 |" in output and "| cn | 1 |" in output, output
    # The saved model of the last run, tested by one process, gives the reported metrics.
    config = load_config("demo", [*overrides[1:], f"output_dir={tmp_path}", "plots.enabled=false"])
    task = prepare_experiment(config)
    module = task.build_module(1)
    run_dir = tmp_path / "runs" / "cn" / "seed-0"
    checkpoint = torch.load(last_checkpoint(run_dir), map_location="cpu", weights_only=False)
    module.load_state_dict(checkpoint["state_dict"])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    tested = task.evaluate(1, trainer, module, task.datamodule(1, module))
    reported = json.loads((run_dir / "result.json").read_text())["test"]
    for view, metrics in tested.items():
        for name, value in metrics.items():
            assert reported[view][name] == pytest.approx(value, rel=1e-6, abs=1e-7), (view, name)
