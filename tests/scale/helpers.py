"""Helpers the scale tests load into CLI runs by ``class_path`` (in-process or subprocess)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from lit_divnorm.norm import build_norm, sparsity_penalty


class PauseAt(Callback):
    """After optimizer step ``step``: write ``marker`` and wait (up to ``seconds``) to be killed.

    The wait ends early when Lightning has received SIGTERM, so its own SIGTERM handling
    (stop at the next batch boundary) runs.
    """

    def __init__(self, step: int, marker: str, seconds: float = 120.0) -> None:
        self.step = step
        self.marker = Path(marker)
        self.seconds = seconds

    def on_train_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.global_step != self.step:
            return
        from lit_divnorm.stopping import stop_requested

        self.marker.write_text(str(trainer.global_step))
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline and not trainer.received_sigterm:
            if stop_requested() is not None:
                break
            time.sleep(0.02)


class WaitForStop(Callback):
    """With ``$LIT_DIVNORM_TEST_PAUSE`` set to a folder: after optimizer step ``step``, write
    ``<folder>/<run folder name>.paused`` and wait (up to ``seconds``) for a stop request
    (:mod:`lit_divnorm.stopping`), so a test can signal a run at a known step. Without the
    variable it does nothing, so the same config also makes the uninterrupted reference."""

    def __init__(self, step: int, seconds: float = 120.0) -> None:
        self.step = step
        self.seconds = seconds

    def on_train_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        from lit_divnorm.stopping import stop_requested

        folder = os.environ.get("LIT_DIVNORM_TEST_PAUSE")
        if not folder or trainer.global_step != self.step:
            return
        Path(folder, Path(trainer.log_dir).name + ".paused").write_text(str(self.step))
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline and stop_requested() is None:
            time.sleep(0.02)


class MixedNormNet(nn.Module):
    """conv -> dn* -> ReLU -> conv -> bn -> ReLU -> mean pool -> linear, for (N, 3, 32, 32).

    One batch-spanning norm (bn, synchronized under ``sync_batchnorm``) and one local norm
    (dn*, needs no communication) in the same network, so one DDP run checks both.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, stride=2, padding=1),
            build_norm({"name": "dn*", "sigma": 0.5, "l1": 0.01}, 4, layer_window=3),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, stride=2, padding=1),
            build_norm("bn", 6),
            nn.ReLU(),
        )
        self.head = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class RecordRank(Callback):
    """Save, per rank, every training batch, the first step's loss and gradients, the initial
    weights and the final validation metrics to ``out_dir/rank<r>.pt``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.record: dict[str, Any] = {"batches": [], "val_batches": []}

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record["initial"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.record["world_size"] = trainer.world_size

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.record["batches"].append([t.clone() for t in batch])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, *args) -> None:
        if not trainer.sanity_checking:
            self.record["val_batches"].append([t.clone() for t in batch])

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "grads" not in self.record:  # after DDP's all-reduce: the mean over ranks
            self.record["grads"] = {
                name: p.grad.clone() for name, p in pl_module.named_parameters()
            }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if "loss" not in self.record:
            self.record["loss"] = outputs["loss"].detach().clone()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.record["val_metrics"] = {
            k: v.clone() for k, v in trainer.callback_metrics.items() if k.startswith("val/")
        }
        self.record["final"] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.record, self.out_dir / f"rank{trainer.global_rank}.pt")


def reference_model(state: dict) -> MixedNormNet:
    """A :class:`MixedNormNet` with a task's weights (``state`` keys ``model.*``)."""
    model = MixedNormNet()
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    return model


def assert_first_step_equals_one_process(records: list[dict], batch_size: int) -> None:
    """The ranks' first step (``RecordRank`` records of 2 ranks with batch B): their mean loss
    and their all-reduced gradients equal ``cross_entropy + sparsity_penalty`` of one
    process on the concatenated 2B batch."""
    torch.testing.assert_close(records[0]["initial"], records[1]["initial"])
    model = reference_model(records[0]["initial"]).train()
    images = torch.cat([r["batches"][0][0] for r in records])
    labels = torch.cat([r["batches"][0][1] for r in records])
    assert images.shape[0] == 2 * batch_size
    loss = F.cross_entropy(model(images), labels) + sparsity_penalty(model)
    loss.backward()
    mean_rank_loss = (records[0]["loss"] + records[1]["loss"]) / 2
    torch.testing.assert_close(mean_rank_loss, loss.detach(), rtol=1e-5, atol=1e-6)
    for name, parameter in model.named_parameters():
        for record in records:
            torch.testing.assert_close(
                record["grads"][f"model.{name}"], parameter.grad, rtol=1e-4, atol=1e-6, msg=name
            )


class PoisonAfter(nn.Module):
    """Identity for the first ``calls - 1`` training forwards, then ``x * inf`` (inf/NaN)."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.calls = calls
        self.count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.count += 1
        if self.training and self.count >= self.calls:
            return x * float("inf")
        return x


class SqrtOfZero(nn.Module):
    """``x + sqrt(0 * x)``: the output is ``x`` (finite), the gradient is NaN (inf * 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.sqrt(x * 0.0)


class KillAt(Callback):
    """SIGKILL this process at the start of the batch after optimizer step ``step`` (after any
    checkpoint of that step was written): a crash with no chance to clean up."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
