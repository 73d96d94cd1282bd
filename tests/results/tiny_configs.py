"""Tiny self-contained CIFAR-10 configs (a few steps on the CIFAR fixture) for sweep tests."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.cifar.fixtures import write_cifar10


def tiny_config(data_dir: Path, norm: object, max_steps: int = 6) -> dict:
    """The small CNN with ``norm`` on 24 train / 8 val / 32 test fixture images, batch 8."""
    return {
        "seed_everything": 0,
        "trainer": {
            "max_steps": max_steps,
            "max_epochs": -1,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {
                    "class_path": "lit_divnorm.callbacks.ResumeCheckpoint",
                    "init_args": {"every_n_train_steps": 0},  # last.ckpt after every epoch
                }
            ],
        },
        "data": {
            "class_path": "datamodules.cifar.CIFAR10DataModule",
            "init_args": {
                "data_dir": str(data_dir),
                "batch_size": 8,
                "num_workers": 0,
                "val_size": 8,
                "preprocessing": "paper",
                "download": False,
            },
        },
        "model": {
            "class_path": "lit_divnorm.tasks.classification.ClassificationTask",
            "init_args": {
                "arch": "small_cnn",
                "num_classes": 10,
                "norm": norm,
                "layer_window": [5, 3, 3],
            },
        },
    }


def write_tiny_sweep(root: Path, names: dict[str, object]) -> Path:
    """``root/configs/cifar10/<name>.yaml`` per ``{name: norm}`` (a norm of ``"BROKEN"`` makes
    a config that fails), a shared fragment ``_data.yaml`` to skip, and the fixture data."""
    data_dir = write_cifar10(root / "data", batches=(1,), n=32)
    folder = root / "configs" / "cifar10"
    folder.mkdir(parents=True)
    for name, norm in names.items():
        config = tiny_config(data_dir, norm)
        if norm == "BROKEN":
            config["model"]["init_args"]["norm"] = "no-such-norm"
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))
    (folder / "_data.yaml").write_text("not: an experiment\n")
    return folder
