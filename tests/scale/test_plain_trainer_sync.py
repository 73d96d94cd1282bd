"""``Trainer(sync_batchnorm=True)`` without the CLI synchronizes the project's own bn layers.

The task installs :class:`~lit_divnorm.distributed.NormSync` in ``setup`` in place of the
``TorchSyncBatchNorm`` a plain trainer holds (and leaves the CLI's ``NormSync`` alone); a real
2-process gloo run of a plain script then equals one process on the 2B batch.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm

from lit_divnorm.distributed import NormSync
from lit_divnorm.tasks.classification import ClassificationTask
from tests.cifar.fixtures import write_cifar10
from tests.conftest import REPO_ROOT
from tests.scale.helpers import MixedNormNet, assert_first_step_equals_one_process

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
    pytest.mark.filterwarnings("ignore:CIFAR-10. training on:UserWarning"),
]
BATCH = 4


def _trainer(**kwargs) -> Trainer:
    return Trainer(accelerator="cpu", strategy="ddp", devices=2, logger=False, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"sync_batchnorm": True}, NormSync),
        ({"sync_batchnorm": True, "plugins": [NormSync()]}, "same"),  # the CLI's
        ({}, type(None)),
    ],
)
def test_setup_puts_norm_sync_in_place_of_torch_sync_batchnorm(kwargs, expected):
    trainer = _trainer(**kwargs)
    before = trainer.strategy._layer_sync
    task = ClassificationTask(arch=MixedNormNet())
    task.trainer = trainer
    task.setup("fit")
    after = trainer.strategy._layer_sync
    if expected == "same":
        assert after is before
    else:
        assert type(after) is expected
    if expected is NormSync:
        assert type(before) is TorchSyncBatchNorm


def test_plain_ddp_trainer_with_sync_batchnorm_equals_one_process_with_batch_2b(tmp_path):
    data = write_cifar10(tmp_path / "data", batches=(1,), n=16)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("LOCAL_RANK", None)
    command = [sys.executable, "-m", "tests.scale.plain_trainer_fit", str(data), str(out)]
    result = subprocess.run(
        [*command, str(BATCH)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    records = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert_first_step_equals_one_process(records, BATCH)
