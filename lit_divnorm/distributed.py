"""Multi-process training helpers for Lightning's strategies.

``NormSync`` is the ``LayerSync`` plugin that makes ``sync_batchnorm=True`` cover the
project's own batch-spanning norms: torch's conversion (``SyncBatchNorm``) only knows torch's
BatchNorm classes, so it also switches ``sync_batch`` on in every ``DivisiveNorm``, whose
batch statistics are then averaged over all ranks by a differentiable all-reduce. Fields that
do not span the batch (ln, dn, gn, ...) need no communication and are left alone.

``use_norm_sync(trainer)`` puts it in place of the ``TorchSyncBatchNorm`` that a plain
``Trainer(sync_batchnorm=True)`` installs; the project's tasks call it in ``setup``, which
runs before the strategy applies the plugin.
"""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn

from lit_divnorm.norm.layers import DivisiveNorm


class NormSync(TorchSyncBatchNorm):
    """Synchronize batch statistics of ``DivisiveNorm`` (and torch BatchNorm) across ranks."""

    def apply(self, model: nn.Module) -> nn.Module:
        _set_sync(model, True)
        return super().apply(model)

    def revert(self, model: nn.Module) -> nn.Module:
        _set_sync(model, False)
        return super().revert(model)


def _set_sync(model: nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if isinstance(module, DivisiveNorm):
            module.sync_batch = enabled


def use_norm_sync(trainer: Trainer) -> bool:
    """Replace the trainer's ``TorchSyncBatchNorm`` (what ``sync_batchnorm=True`` installs) by
    :class:`NormSync`, before the strategy applies it; ``True`` when it did.

    Any other layer-sync plugin (a ``NormSync`` already, or a user's own) is left alone, so
    the CLI, which installs ``NormSync`` itself, does not get it twice.
    """
    strategy = trainer.strategy
    if type(getattr(strategy, "_layer_sync", None)) is not TorchSyncBatchNorm:
        return False
    strategy._layer_sync = NormSync()
    return True
