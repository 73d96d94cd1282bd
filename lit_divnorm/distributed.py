"""Multi-process training helpers for Lightning's strategies.

``NormSync`` is the ``LayerSync`` plugin that makes ``--trainer.sync_batchnorm=true`` cover the
project's own batch-spanning norms: torch's conversion (``SyncBatchNorm``) only knows torch's
BatchNorm classes, so it also switches ``sync_batch`` on in every ``DivisiveNorm``, whose
batch statistics are then averaged over all ranks by a differentiable all-reduce. Fields that
do not span the batch (ln, dn, gn, ...) need no communication and are left alone.
"""

from __future__ import annotations

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
