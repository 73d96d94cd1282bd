"""Every PTB config runs ``fit`` with ``fast_dev_run`` and holds the paper's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from lit_divnorm.cli import main
from lit_divnorm.norm.layers import DivisiveNorm
from tests.conftest import REPO_ROOT

CONFIGS = sorted((REPO_ROOT / "configs" / "ptb").glob("*/*.yaml"))
CELLS = {"lstm": "lstm", "tanh_rnn": "tanh", "relu_rnn": "relu"}
VARIANTS = {
    "baseline": "baseline",
    "baseline_l1": "baseline-l1",
    "bn": "bn",
    "bn_l1": "bn-l1",
    "bn_s": "bn-s",
    "bn_star": "bn*",
    "ln": "ln",
    "ln_l1": "ln-l1",
    "ln_s": "ln-s",
    "ln_star": "ln*",
    "dn": "dn",
    "dn_star": "dn*",
}
# PAPER.md section 2: L1 weights per (variant, cell)
L1 = {
    "bn-l1": {"lstm": 1e-2, "tanh": 1e-1, "relu": 1e-4},
    "bn*": {"lstm": 1e-1, "tanh": 1e-4, "relu": 1e-1},
    "ln-l1": {"lstm": 1e-2, "tanh": 1e-2, "relu": 1e-2},
    "ln*": {"lstm": 1e-3, "tanh": 1e-2, "relu": 1e-2},
    "dn*": {"lstm": 1e-4, "tanh": 1e-2, "relu": 1e-2},
}


def test_every_table4_cell_has_a_config() -> None:
    names = {(path.parent.name, path.stem) for path in CONFIGS}
    assert names == {(cell, variant) for cell in CELLS for variant in VARIANTS}


def _expected_lr(variant: str, cell: str) -> float:
    """The authors' rule: 0.1 for base-tanh, base-relu and bn-relu, 1.0 for all others."""
    unnormalized = variant in ("baseline", "baseline-l1")
    return 0.1 if (unnormalized and cell != "lstm") or (variant, cell) == ("bn", "relu") else 1.0


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_runs_fast_dev_run(config: Path, tiny_ptb: Path, tmp_path: Path) -> None:
    cli = main(
        args=[
            "fit",
            "--config",
            str(config),
            "--trainer.fast_dev_run=true",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--data.data_dir={tiny_ptb}",
            "--model.vocab_size=41",
        ]
    )
    variant, cell = VARIANTS[config.stem], CELLS[config.parent.name]
    task = cli.model
    assert task.hparams.cell == cell and list(task.hparams.hidden_sizes) == [200, 200]
    assert cli.trainer.gradient_clip_val == 5.0
    assert cli.config["fit"]["trainer"]["max_epochs"] == 13  # fast_dev_run runs 1
    assert cli.datamodule.batch_size == 20 and cli.datamodule.bptt == 20
    assert cli.datamodule.test_batch_size == 1
    optimizer = cli.trainer.optimizers[0]
    assert optimizer.defaults["lr"] == _expected_lr(variant, cell)
    assert optimizer.defaults["momentum"] == 0

    norms = [m for m in task.model.modules() if isinstance(m, DivisiveNorm)]
    assert bool(norms) == (variant != "baseline")
    for norm in norms:
        assert norm.l1 == pytest.approx(
            L1.get(variant, {}).get(cell, 0.01 * (variant == "baseline-l1"))
        )
        if variant.startswith(("bn", "ln", "dn")):
            sigma = 1.0 if variant.endswith(("-s", "*")) else 1e-2
            assert norm.fixed_sigma == sigma
        if variant.startswith("dn"):
            assert norm.sum_field.window == norm.sup_field.window == (30 if cell == "lstm" else 60)
    # train loss of the single step is finite
    assert cli.trainer.callback_metrics["train/loss"].isfinite()
