"""The ``lit-divnorm`` command: LightningCLI over every task and datamodule of the project.

    lit-divnorm fit --config configs/cifar10/dn_star.yaml
    lit-divnorm fit --config configs/cifar10/bn.yaml --model.norm dn*
    lit-divnorm test --config configs/cifar10/dn_star.yaml --ckpt_path path/to/last.ckpt

Models and datamodules are chosen by ``class_path`` in the YAML (subclass mode), so a user's
own ``LightningModule`` subclass works the same way.
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


class DivNormCLI(LightningCLI):
    """LightningCLI with the project's defaults (subclass mode for models and data)."""


def main(args: list[str] | None = None) -> DivNormCLI:
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
