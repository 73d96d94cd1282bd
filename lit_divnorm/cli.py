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

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.layer_sync import LayerSync

from lit_divnorm.checkpoint import (
    AtomicCheckpointIO,
    CheckpointMismatchError,
    load_checkpoint_safely,
)
from lit_divnorm.cli_errors import friendly_errors
from lit_divnorm.distributed import NormSync


class DivNormCLI(LightningCLI):
    """LightningCLI with the project's defaults (subclass mode for models and data).

    ``--trainer.sync_batchnorm=true`` synchronizes the batch statistics of the project's own
    norms too (:class:`~lit_divnorm.distributed.NormSync`), not only torch's BatchNorm, for
    any LightningModule (the project's tasks, which would install it themselves, then find it
    in place and leave it).
    Checkpoints are written atomically and read weights-only
    (:class:`~lit_divnorm.checkpoint.AtomicCheckpointIO`) unless a ``CheckpointIO`` plugin
    is given.
    """

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # raise parsing errors (friendly_errors prints them in one paragraph) instead of
        # printing the whole usage text
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def _parse_ckpt_path(self) -> None:
        """Read ``--ckpt_path``'s hyper-parameters weights-only and refuse a mismatch.

        Lightning fills the model config from the checkpoint's hyper-parameters, silently
        replacing what the command line or config file said. Here a model given by the user
        must agree with the checkpoint (else :class:`CheckpointMismatchError` names each
        differing argument); without a model config the checkpoint's is used, as in Lightning.
        ``last``/``best`` are resolved later by the trainer, where ``NormalizedTask`` checks.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
            return
        hparams = dict(load_checkpoint_safely(ckpt_path).get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        given = self.config[subcommand].get("model")
        merged = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        if given is not None:
            differences = _model_differences(given, merged[subcommand].get("model"))
            if differences:
                raise CheckpointMismatchError(
                    f"checkpoint {ckpt_path!r} was saved from a model with a different "
                    f"configuration: {'; '.join(differences)}. Use the config it was trained "
                    "with, or leave the model out to take the checkpoint's."
                )
        self.config = merged

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


# subcommands of ours, dispatched before LightningCLI: name -> module with a main(argv)
TOOL_COMMANDS = {
    "sweep": "lit_divnorm.sweep",
    "report": "lit_divnorm.report",
    "analyze": "lit_divnorm.analysis",
}


def _model_differences(given: Any, saved: Any) -> list[str]:
    """``"key: checkpoint X, this run Y"`` for each model argument that differs."""

    def as_dict(namespace: Any) -> dict[str, Any]:
        if namespace is None:
            return {}
        return namespace.as_dict() if hasattr(namespace, "as_dict") else dict(namespace)

    given_dict, saved_dict = as_dict(given), as_dict(saved)
    differences = []
    if given_dict.get("class_path") != saved_dict.get("class_path"):
        differences.append(
            f"class_path: checkpoint {saved_dict.get('class_path')!r}, this run "
            f"{given_dict.get('class_path')!r}"
        )
    given_args = given_dict.get("init_args") or {}
    saved_args = saved_dict.get("init_args") or {}
    for key in sorted(set(given_args) | set(saved_args)):
        if given_args.get(key) != saved_args.get(key):
            differences.append(
                f"{key}: checkpoint {saved_args.get(key)!r}, this run {given_args.get(key)!r}"
            )
    return differences


def main(args: list[str] | None = None) -> Any:
    """Run the CLI (or one of our tool subcommands); a user mistake ends with one paragraph on
    stderr and exit code 2."""
    argv = sys.argv[1:] if args is None else list(args)
    with friendly_errors():
        if argv and argv[0] in TOOL_COMMANDS:
            return importlib.import_module(TOOL_COMMANDS[argv[0]]).main(argv[1:])
        return run_cli(args)


def run_cli(args: list[str] | None = None) -> DivNormCLI:
    """The LightningCLI run itself, errors propagating as exceptions (for callers such as the
    sweep that record them)."""
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
