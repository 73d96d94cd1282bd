"""Every configs/sr experiment runs one fast_dev_run fit on a tiny image folder."""

from __future__ import annotations

import pytest
import yaml

from lit_divnorm.cli import main
from lit_divnorm.norm.layers import DivisiveNorm
from tests.conftest import REPO_ROOT

CONFIGS = sorted(
    p for p in (REPO_ROOT / "configs" / "sr").rglob("*.yaml") if not p.name.startswith("_")
)


def test_every_scale_has_baseline_bn_and_dn_star():
    names = {str(p.relative_to(REPO_ROOT / "configs" / "sr")) for p in CONFIGS}
    expected = {f"x{s}/{m}.yaml" for s in (2, 3, 4) for m in ("baseline", "bn", "dn_star")}
    assert expected <= names


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_checkpoints_are_chosen_on_validation_and_reported_on_a_paper_test_set(scale):
    """Validate on Set5 (the released code's set), test on Set14 (PAPER.md Tables 5-6), and
    choose the checkpoint on val/psnr: the test figure is never selected on the test set."""
    folder = REPO_ROOT / "configs" / "sr"
    data = yaml.safe_load((folder / f"x{scale}" / "_data.yaml").read_text())["init_args"]
    assert (data["val_dir"], data["test_dir"]) == ("Set5", "Set14")
    assert not data.get("allow_same_val_test", False)
    callbacks = yaml.safe_load((folder / "_trainer.yaml").read_text())["callbacks"]
    first = callbacks[0]  # the trainer's checkpoint_callback: what the sweep tests ("best")
    assert first["class_path"] == "lightning.pytorch.callbacks.ModelCheckpoint"
    assert (first["init_args"]["monitor"], first["init_args"]["mode"]) == ("val/psnr", "max")
    assert any(c["class_path"] == "lit_divnorm.callbacks.ResumeCheckpoint" for c in callbacks)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_runs_fast_dev_run(config, sr_folders, tmp_path):
    cli = main(
        args=[
            "fit",
            "--config",
            str(config),
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            f"--data.data_dir={sr_folders}",
            "--data.train_dir=train",
            "--data.val_dir=eval",
            "--data.test_dir=test",
        ]
    )
    scale = int(config.parent.name[1:])
    assert cli.datamodule.scale == scale
    assert cli.trainer.state.finished
    metrics = cli.trainer.callback_metrics
    assert {"val/psnr", "val/psnr_bicubic", "val/ssim", "val/ssim_bicubic"} <= set(metrics)
    norms = list(cli.model.model.norms)
    if config.stem == "baseline":
        assert not any(isinstance(n, DivisiveNorm) for n in norms)
    elif config.stem == "dn_star":
        assert all(n.sum_field.window == 5 and n.sup_field.window == 7 for n in norms)
        assert all(n.sigma == 1.0 and n.l1 == 0.1 for n in norms)
        assert cli.model.add_l1_to_loss
    optimizer = cli.trainer.optimizers[0]
    assert optimizer.defaults["lr"] == 1e-4 and optimizer.defaults["momentum"] == 0.9
