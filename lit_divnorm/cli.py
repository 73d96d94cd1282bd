"""The ``lit-divnorm`` command: LightningCLI over every task and datamodule of the project.

    lit-divnorm fit --config configs/cifar10/dn_star.yaml
    lit-divnorm fit --config configs/cifar10/bn.yaml --model.norm dn*
    lit-divnorm test --config configs/cifar10/dn_star.yaml --ckpt_path path/to/last.ckpt
    lit-divnorm sweep configs/cifar10/          (lit_divnorm.sweep: every config of a folder)
    lit-divnorm report runs/                    (lit_divnorm.report: tables beside the paper)
    lit-divnorm analyze CKPT --config CONFIG    (lit_divnorm.analysis: decorrelation, sparsity)

Models and datamodules are chosen by ``class_path`` in the YAML (subclass mode), so a user's
own ``LightningModule`` subclass works the same way.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.layer_sync import LayerSync

from lit_divnorm.distributed import NormSync


class DivNormCLI(LightningCLI):
    """LightningCLI with the project's defaults (subclass mode for models and data).

    ``--trainer.sync_batchnorm=true`` synchronizes the batch statistics of the project's own
    norms too (:class:`~lit_divnorm.distributed.NormSync`), not only torch's BatchNorm.
    """

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("sync_batchnorm") and "plugins" not in kwargs:
            plugins = trainer_config.get("plugins") or []
            plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
            if not any(isinstance(plugin, LayerSync) for plugin in plugins):
                kwargs["plugins"] = [*plugins, NormSync()]
        return super().instantiate_trainer(**kwargs)


# subcommands of ours, dispatched before LightningCLI: name -> module with a main(argv)
TOOL_COMMANDS = {
    "sweep": "lit_divnorm.sweep",
    "report": "lit_divnorm.report",
    "analyze": "lit_divnorm.analysis",
}


def main(args: list[str] | None = None) -> Any:
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in TOOL_COMMANDS:
        return importlib.import_module(TOOL_COMMANDS[argv[0]]).main(argv[1:])
    return DivNormCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def console_main() -> int:
    """The ``lit-divnorm`` console script: :func:`main` as a process exit status (1 when a
    sweep had a failed run)."""
    result = main()
    if isinstance(result, int):
        return result
    if isinstance(result, list) and any(getattr(run, "status", "") == "failed" for run in result):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(console_main())
