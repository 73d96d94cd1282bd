"""The CLI under ``--trainer.strategy=ddp --trainer.devices=2`` on this CPU (gloo).

One real 2-process run of ``ClassificationTask`` (per-rank batch B = 4) with a network that
holds a dn* layer (no communication needed) and a bn layer (synchronized by
``--trainer.sync_batchnorm=true``), compared with one process computing on the 2B batch:

(a) the ranks see disjoint training and validation samples that together are the whole split;
(b) the first step's loss (mean over ranks) and the all-reduced gradients equal the loss and
    gradients of ``cross_entropy + sparsity_penalty`` on the concatenated 2B batch;
(c) the logged validation accuracy (torchmetrics state, synced) and loss (``sync_dist``) equal
    the accuracy and loss of the final weights on the whole validation split.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from datamodules.cifar import CIFAR10DataModule
from tests.cifar.fixtures import write_cifar10
from tests.conftest import REPO_ROOT
from tests.scale.helpers import assert_first_step_equals_one_process, reference_model

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
BATCH = 4


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lightning_ddp")
    data = write_cifar10(tmp / "data", batches=(1,), n=32)
    data_args = {"data_dir": str(data), "batch_size": BATCH, "download": False, "val_size": 8}
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "strategy": "ddp",
            "devices": 2,
            "sync_batchnorm": True,
            "max_epochs": 1,
            "num_sanity_val_steps": 0,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp / "run"),
            "callbacks": [
                {
                    "class_path": "tests.scale.helpers.RecordRank",
                    "init_args": {"out_dir": str(tmp / "out")},
                }
            ],
        },
        "data": {"class_path": "datamodules.cifar.CIFAR10DataModule", "init_args": data_args},
        "model": {
            "class_path": "lit_divnorm.tasks.classification.ClassificationTask",
            "init_args": {
                "arch": {"class_path": "tests.scale.helpers.MixedNormNet"},
                "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}},
            },
        },
    }
    path = tmp / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("LOCAL_RANK", None)
    result = subprocess.run(
        [sys.executable, "-m", "lit_divnorm.cli", "fit", "--config", str(path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    records = [torch.load(tmp / "out" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    datamodule = CIFAR10DataModule(**data_args)
    datamodule.setup("fit")
    return records, datamodule


def _keys(images: torch.Tensor) -> list[bytes]:
    return [image.numpy().tobytes() for image in images]


@pytest.mark.parametrize("split", ["batches", "val_batches"])
def test_ranks_see_disjoint_samples_covering_the_split(ddp_run, split):
    records, datamodule = ddp_run
    assert [r["world_size"] for r in records] == [2, 2]
    dataset = datamodule.train_set if split == "batches" else datamodule.val_set
    everything = torch.stack([dataset[i][0] for i in range(len(dataset))])
    seen = [_keys(torch.cat([images for images, _ in r[split]])) for r in records]
    assert all(len(keys) == len(set(keys)) == len(dataset) // 2 for keys in seen)
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(_keys(everything))


def test_first_step_equals_one_process_with_batch_2b(ddp_run):
    records, _ = ddp_run
    assert_first_step_equals_one_process(records, BATCH)


def test_validation_metrics_are_reduced_over_both_ranks(ddp_run):
    records, datamodule = ddp_run
    model = reference_model(records[0]["final"]).eval()
    val = datamodule.val_set
    images = torch.stack([val[i][0] for i in range(len(val))])
    labels = torch.stack([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        logits = model(images)
    accuracy = (logits.argmax(1) == labels).float().mean()
    loss = F.cross_entropy(logits, labels)
    for record in records:
        torch.testing.assert_close(record["val_metrics"]["val/acc"], accuracy)
        torch.testing.assert_close(record["val_metrics"]["val/loss"], loss, rtol=1e-5, atol=1e-6)
        # control: one rank's own half gives another loss, so an unreduced value would fail
        own = torch.cat([images for images, _ in record["val_batches"]])
        own_labels = torch.cat([labels for _, labels in record["val_batches"]])
        with torch.no_grad():
            own_loss = F.cross_entropy(model(own), own_labels)
        assert not torch.isclose(own_loss, loss, rtol=1e-3)
