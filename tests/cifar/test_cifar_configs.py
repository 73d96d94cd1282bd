"""Every CIFAR config runs ``fit --trainer.fast_dev_run=true`` and builds the paper's model.

The expected settings below are copied from the paper (PAPER.md section 2, Table 3) and the
released code's ResNet configs, not from the YAML files, so a wrong config fails here; the
torchvision rows reuse the released code's ResNet-32 DN* settings.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torchvision
import yaml
from torch import nn

from lit_divnorm.cli import main
from lit_divnorm.norm import DivisiveNorm
from tests.cifar.fixtures import write_cifar10, write_cifar100
from tests.conftest import REPO_ROOT

pytestmark = [
    pytest.mark.filterwarnings("ignore:CIFAR-10. training on:UserWarning"),
    pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning"),
]

# row: (field, sigma C10/C100, l1 C10/C100, affine, baseline schedule)
PAPER_ROWS = {
    "baseline": (None, None, (0, 0), False, True),
    "baseline_wd_dropout": (None, None, (0, 0), False, True),
    "baseline_l1": ("raw", None, (0.01, 0.01), False, True),
    "bn": ("batch", (1e-2, 1e-2), (0, 0), True, False),
    "bn_l1": ("batch", (1e-2, 1e-2), (0.005, 0.01), True, False),
    "bn_s": ("batch", (1.0, 0.25), (0, 0), True, False),
    "bn_star": ("batch", (1.0, 0.25), (0.005, 0.01), True, False),
    "ln": ("layer", (1e-2, 1e-2), (0, 0), True, False),
    "ln_l1": ("layer", (1e-2, 1e-2), (0.005, 0.005), True, False),
    "ln_s": ("layer", (0.5, 0.5), (0, 0), False, False),
    "ln_star": ("layer", (0.5, 0.5), (0.005, 0.005), False, False),
    "dn": ("local", (0.5, 0.5), (0, 0), False, False),
    "dn_star": ("local", (0.5, 0.5), (0.005, 0.001), False, False),
}
# ResNet-32 (released code): (field, sigma C10/C100, learned, l1 C10/C100, affine, lr)
RESNET_ROWS = {
    "resnet32_none": (None, None, False, (0, 0), False, 0.005),
    "resnet32_bn": ("batch", (0.0, 0.0), False, (0, 0), True, 0.1),
    "resnet32_ln": ("layer", (0.5, 0.5), False, (0, 0), False, 0.1),
    "resnet32_dn": ("local", (0.5, 2.0), True, (0, 0), False, 0.1),
    "resnet32_dn_star": ("local", (0.5, 2.0), True, (1e-3, 1e-2), False, 0.1),
}
# torchvision models with converted norms (not paper rows; the ResNet-32 DN* settings):
# (arch, number of norm layers, field, sigma C10/C100, learned, l1 C10/C100, affine, window)
TORCHVISION_ROWS = {
    "resnet18_dn_star": ("resnet18", 20, "local", (0.5, 2.0), True, (1e-3, 1e-2), False, 3),
}
DATASETS = ("cifar10", "cifar100")
CONFIGS = [
    f"{ds}/{name}" for ds in DATASETS for name in (*PAPER_ROWS, *RESNET_ROWS, *TORCHVISION_ROWS)
]


def test_config_folders_hold_exactly_the_expected_files():
    found = {
        f"{p.parent.name}/{p.stem}"
        for ds in DATASETS
        for p in (REPO_ROOT / "configs" / ds).glob("*.yaml")
        if not p.name.startswith("_")
    }
    assert found == set(CONFIGS)


@pytest.fixture(scope="module")
def fixture_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cifar_fixtures")
    return {
        "cifar10": write_cifar10(root / "c10", batches=(1,), n=32),
        "cifar100": write_cifar100(root / "c100", n_train=32, n_test=16),
    }


def _field_kind(norm: nn.Module) -> str | None:
    if not isinstance(norm, DivisiveNorm):
        assert type(norm).__name__ == "Identity"
        return None
    if norm.sum_field is None and norm.sup_field is None:
        return "raw"
    field = norm.sum_field
    assert field == norm.sup_field
    if field.batch:
        return "batch"
    return "local" if field.is_local else "layer"


def _check_norms(norms, kind, sigma, learned, l1, affine, windows):
    for norm, window in zip(norms, windows, strict=True):
        assert _field_kind(norm) == kind
        if kind is None:
            continue
        assert norm.l1 == pytest.approx(l1)
        if kind != "raw":
            assert norm.learn_sigma == learned
            assert float(norm.sigma) == pytest.approx(sigma, rel=1e-2 if learned else 1e-6)
            assert norm.affine == affine
        if kind == "local":
            assert norm.sum_field.window == window and norm.sup_field.window == window


@pytest.mark.parametrize("config", CONFIGS)
def test_config_runs_fast_dev_run_and_builds_the_paper_model(config, fixture_dirs, tmp_path):
    dataset, name = config.split("/")
    index = DATASETS.index(dataset)
    cli = main(
        [
            "fit",
            "--config",
            str(REPO_ROOT / "configs" / f"{config}.yaml"),
            "--data.data_dir",
            str(fixture_dirs[dataset]),
            "--data.num_workers=0",
            "--data.batch_size=8",
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
    )
    assert cli.trainer.global_step == 1
    config_ns = cli.config["fit"]
    model = cli.model.model
    num_classes = 10 if dataset == "cifar10" else 100
    optimizer = cli.trainer.optimizers[0].param_groups[0]
    milestones = sorted(cli.trainer.lr_scheduler_configs[0].scheduler.milestones)
    assert optimizer["momentum"] == 0.9
    assert config_ns["seed_everything"] == 0
    data_file = Path(config_ns["data"]["__path__"].absolute)
    assert yaml.safe_load(data_file.read_text())["init_args"]["batch_size"] == 100
    norms = [
        m for m in model.modules() if isinstance(m, DivisiveNorm) or "Identity" in type(m).__name__
    ]
    if name in TORCHVISION_ROWS:
        arch, count, kind, sigma, learned, l1, affine, window = TORCHVISION_ROWS[name]
        assert isinstance(model, torchvision.models.ResNet) and model.fc.out_features == num_classes
        assert config_ns["model"]["init_args"]["arch"] == f"torchvision:{arch}"
        assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())
        assert len(norms) == count
        _check_norms(norms, kind, sigma[index], learned, l1[index], affine, [window] * count)
        assert optimizer["lr"] == pytest.approx(0.1)
        assert optimizer["weight_decay"] == pytest.approx(2e-4)
        assert milestones == [40000, 60000]
        assert config_ns["trainer"]["max_steps"] == 80000
        assert cli.datamodule.preprocessing == "resnet"
        return
    if name in PAPER_ROWS:
        kind, sigma, l1, affine, baseline = PAPER_ROWS[name]
        assert model.classifier[-1].out_features == num_classes
        _check_norms(norms, kind, sigma and sigma[index], False, l1[index], affine, (5, 3, 3))
        assert optimizer["lr"] == pytest.approx(1e-3)
        assert milestones == ([5000, 30000] if baseline else [30000, 50000])
        assert config_ns["trainer"]["max_steps"] == (50000 if baseline else 80000)
        assert cli.datamodule.preprocessing == "paper"
        dropout = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
        if name == "baseline_wd_dropout":
            assert dropout == [0.5, 0.5] and optimizer["weight_decay"] == pytest.approx(5e-4)
        else:
            assert set(dropout) == {0.0} and optimizer["weight_decay"] == 0
    else:
        kind, sigma, learned, l1, affine, lr = RESNET_ROWS[name]
        assert model.fc.out_features == num_classes and model.depth == 32
        windows = [7] * 10 + [5] * 20 + [5]
        _check_norms(norms, kind, sigma and sigma[index], learned, l1[index], affine, windows)
        assert optimizer["lr"] == pytest.approx(lr)
        assert optimizer["weight_decay"] == pytest.approx(2e-4)
        assert milestones == [40000, 60000]
        assert config_ns["trainer"]["max_steps"] == 80000
        assert cli.datamodule.preprocessing == "resnet"
    assert len(norms) == (3 if name in PAPER_ROWS else 31)
