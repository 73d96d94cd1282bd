"""``NormalizedTask``: what every task of the project shares.

* the wrapped ``self.model`` (a plain ``nn.Module`` whose norm slots come from the registry);
* the loss ``task_loss + sparsity_penalty(model)`` (the paper's L1 on centred activations);
* logging of the L1 term and of every learned ``sigma``;
* the optimizer and LR schedule injected from the CLI (``OptimizerCallable`` /
  ``LRSchedulerCallable``), with the schedule stepped per iteration by default, since the
  paper counts its step boundaries in iterations;
* under ``Trainer(sync_batchnorm=True)``, with or without the CLI, the batch fields of the
  model's own norms are synchronized over the ranks too (``setup`` installs
  :class:`~lit_divnorm.distributed.NormSync`; a subclass that overrides ``setup`` calls
  ``super().setup(stage)``).

Subclasses implement ``_shared_step(batch, stage)`` returning the task loss; the base class
adds the penalty in training and logs it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import IO, Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lit_divnorm.checkpoint import check_compatible, load_checkpoint_safely
from lit_divnorm.distributed import use_norm_sync
from lit_divnorm.norm.layers import DivisiveNorm
from lit_divnorm.norm.sparsity import clear_sparsity, records_sparsity, sparsity_penalty

Stage = Literal["train", "val", "test"]


def _default_optimizer(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9)


class NormalizedTask(LightningModule):
    """Base LightningModule of the project's tasks.

    Args:
        optimizer: builds the optimizer from the parameters (default SGD, lr 1e-3,
            momentum 0.9, the paper's CIFAR setting).
        lr_scheduler: builds the LR schedule from the optimizer, or ``None``.
        scheduler_interval: ``"step"`` (default; the paper's boundaries are iterations) or
            ``"epoch"``.
    """

    model: nn.Module

    def __init__(
        self,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
    ) -> None:
        super().__init__()
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(
                f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}"
            )
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.scheduler_interval = scheduler_interval

    def setup(self, stage: str) -> None:
        """Make ``Trainer(sync_batchnorm=True)`` synchronize the batch statistics of the
        model's ``DivisiveNorm`` layers, not only torch's BatchNorm (see
        :func:`~lit_divnorm.distributed.use_norm_sync`)."""
        if self._trainer is not None:
            use_norm_sync(self._trainer)

    def _shared_step(self, batch: Any, stage: Stage) -> Tensor:
        """Compute and log the task loss of one batch (without the sparsity penalty)."""
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        clear_sparsity(self.model)
        loss = self._shared_step(batch, "train")
        penalty = sparsity_penalty(self.model)
        self.log_sparsity(penalty)
        self.log_sigmas()
        return loss + penalty

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint saved from another configuration (before any weight is loaded).

        Raises :class:`~lit_divnorm.checkpoint.CheckpointMismatchError` naming the differing
        hyper-parameters and weights, instead of a silent or partial load.
        """
        check_compatible(checkpoint, self.hparams, self.state_dict(), type(self).__name__)

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | os.PathLike | IO,
        map_location: Any = None,
        hparams_file: str | os.PathLike | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Lightning's ``load_from_checkpoint``, always weights-only and config-checked.

        The file is first read with :func:`~lit_divnorm.checkpoint.load_checkpoint_safely`
        (``ValueError`` naming what it holds when it is not plain tensors and containers:
        nothing in it runs), then Lightning builds the task with ``weights_only=True``, and
        :meth:`on_load_checkpoint` refuses weights of another configuration (e.g. a ``kwargs``
        override of a hyper-parameter). ``weights_only=False`` is refused.
        """
        if weights_only is False:
            raise ValueError(
                "weights_only=False is refused: lit-divnorm reads checkpoints weights-only so "
                "that no code stored in a file runs; leave weights_only out"
            )
        if isinstance(checkpoint_path, (str, os.PathLike)):
            load_checkpoint_safely(checkpoint_path)
        return super().load_from_checkpoint(
            checkpoint_path,
            map_location=map_location,
            hparams_file=hparams_file,
            strict=strict,
            weights_only=True,
            **kwargs,
        )

    def log_loss(self, stage: Stage, loss: Tensor, batch_size: int) -> None:
        """Log ``<stage>/loss``: per step and per epoch in training; per epoch, averaged over
        every rank's samples, in validation and test."""
        self.log(
            f"{stage}/loss",
            loss,
            on_step=stage == "train",
            on_epoch=True,
            batch_size=batch_size,
            sync_dist=stage != "train",
        )

    def log_sparsity(self, penalty: Tensor) -> None:
        """Log ``train/l1``, the step's sparsity penalty, for a model that has one (a model
        without any ``l1`` weight skips it: a column of zeros, and a log call per step)."""
        if records_sparsity(self.model):
            self.log("train/l1", penalty.detach(), on_step=True, on_epoch=True, batch_size=1)

    def learned_sigmas(self) -> dict[str, Tensor]:
        """``{module name: sigma}`` for every norm layer of the model with a learned sigma."""
        return {
            name: module.sigma
            for name, module in self.model.named_modules()
            if isinstance(module, DivisiveNorm) and module.learn_sigma
        }

    def log_sigmas(self) -> None:
        for name, sigma in self.learned_sigmas().items():
            self.log(f"sigma/{name}", sigma.detach(), on_step=True, on_epoch=False)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }
