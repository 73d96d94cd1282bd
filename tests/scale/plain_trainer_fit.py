"""A user's own Lightning script, no lit_divnorm CLI: ``ClassificationTask`` with a dn* and a
bn layer under ``Trainer(strategy="ddp", devices=2, sync_batchnorm=True)`` on the CPU.

    python -m tests.scale.plain_trainer_fit DATA_DIR OUT_DIR BATCH_SIZE

Lightning re-launches this module for rank 1; each rank saves its ``RecordRank`` record.
"""

from __future__ import annotations

import functools
import sys

import torch
from lightning.pytorch import Trainer, seed_everything

from datamodules.cifar import CIFAR10DataModule
from lit_divnorm.tasks.classification import ClassificationTask
from tests.scale.helpers import MixedNormNet, RecordRank


def main(data_dir: str, out_dir: str, batch_size: int) -> None:
    torch.set_num_threads(1)
    seed_everything(0)
    task = ClassificationTask(
        arch=MixedNormNet(), optimizer=functools.partial(torch.optim.SGD, lr=0.1)
    )
    data = CIFAR10DataModule(data_dir=data_dir, batch_size=batch_size, download=False)
    trainer = Trainer(
        accelerator="cpu",
        strategy="ddp",
        devices=2,
        sync_batchnorm=True,
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
        callbacks=[RecordRank(out_dir)],
    )
    trainer.fit(task, data)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
