"""The ``lit-divnorm`` command: LightningCLI over every task and datamodule of the project.

    lit-divnorm fit --config configs/cifar10/dn_star.yaml
    lit-divnorm fit --config configs/cifar10/bn.yaml --model.norm dn*
    lit-divnorm test --config configs/cifar10/dn_star.yaml --ckpt_path path/to/last.ckpt

Models and datamodules are chosen by ``class_path`` in the YAML (subclass mode), so a user's
own ``LightningModule`` subclass works the same way.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.layer_sync import LayerSync

from lit_divnorm.checkpoint import AtomicCheckpointIO
from lit_divnorm.cli_errors import friendly_errors
from lit_divnorm.distributed import NormSync


class DivNormCLI(LightningCLI):
    """LightningCLI with the project's defaults (subclass mode for models and data).

    ``--trainer.sync_batchnorm=true`` synchronizes the batch statistics of the project's own
    norms too (:class:`~lit_divnorm.distributed.NormSync`), not only torch's BatchNorm.
    Checkpoints are written atomically and read weights-only
    (:class:`~lit_divnorm.checkpoint.AtomicCheckpointIO`) unless a ``CheckpointIO`` plugin
    is given.
    """

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        if "plugins" not in kwargs:
            trainer_config = self._get(self.config_init, "trainer", default={})
            plugins = trainer_config.get("plugins") or []
            plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
            if trainer_config.get("sync_batchnorm") and not any(
                isinstance(plugin, LayerSync) for plugin in plugins
            ):
                plugins.append(NormSync())
            if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
                plugins.append(AtomicCheckpointIO())
            kwargs["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)


def main(args: list[str] | None = None) -> DivNormCLI:
    """Run the CLI; a user mistake ends with one paragraph on stderr and exit code 2."""
    with friendly_errors():
        return DivNormCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
        )


if __name__ == "__main__":
    main()
