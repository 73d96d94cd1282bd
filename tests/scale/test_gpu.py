"""On a CUDA GPU: a DDP fit on one device with bfloat16 mixed precision and DN* (the Triton
kernels inside a Lightning step). Skips without a GPU."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

from lit_divnorm.tasks.classification import ClassificationTask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_ddp_on_one_gpu_with_bf16_mixed_and_dn_star(tmp_path):
    torch.manual_seed(0)
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    task = ClassificationTask("small_cnn", num_classes=10, norm="dn*")
    before = [p.detach().clone() for p in task.parameters()]
    trainer = Trainer(
        accelerator="gpu",
        devices=1,
        strategy="ddp",
        precision="bf16-mixed",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(task, train_dataloaders=loader)
    loss = trainer.callback_metrics["train/loss_epoch"]
    assert torch.isfinite(loss)
    after = list(task.parameters())
    assert after[0].device.type == "cuda"
    assert any(not torch.equal(a.cpu(), b) for a, b in zip(after, before, strict=True))
