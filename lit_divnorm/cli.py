"""The ``lit-divnorm`` command: LightningCLI over every task and datamodule of the project.

    lit-divnorm fit --config configs/cifar10/dn_star.yaml        (logs to runs/cifar10/dn_star/)
    lit-divnorm fit --config configs/cifar10/dn_star.yaml --ckpt_path last    (continues it)
    lit-divnorm fit --config configs/cifar10/bn.yaml --model.norm dn*
    lit-divnorm test --config configs/cifar10/dn_star.yaml --ckpt_path last
    lit-divnorm sweep configs/cifar10/        (every config of a folder, per seed, K at a time)
    lit-divnorm status configs/cifar10/       (where that sweep stands)
    lit-divnorm report runs/                  (the paper's tables beside ours)
    lit-divnorm analyze CKPT --config CONFIG  (decorrelation, sparsity)

(the last four: :mod:`lit_divnorm.experiments`, and :mod:`lit_divnorm.analysis`).

Models and datamodules are chosen by ``class_path`` in the YAML (subclass mode), so a user's
own ``LightningModule`` subclass works the same way. Runs are named after the first
``--config`` file (:mod:`lit_divnorm.runs`); ``--ckpt_path last`` continues that
experiment's latest run and prints one line saying which checkpoint (step, path) it took, or
that there was none and training starts at step 0. Every checkpoint is read weights-only.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.layer_sync import LayerSync

from lit_divnorm.checkpoint import (
    AtomicCheckpointIO,
    CheckpointMismatchError,
    atomic_write_text,
    load_checkpoint_safely,
)
from lit_divnorm.cli_errors import friendly_errors
from lit_divnorm.distributed import NormSync
from lit_divnorm.provenance import environment_facts
from lit_divnorm.runs import (
    HPC_CHECKPOINT_GLOB,
    RUN_DIR_VARIABLE,
    TESTED_MARKER,
    RunCSVLogger,
    checkpoint_step,
    experiment_name,
    holds_files,
    is_rank_zero,
    latest_resumable,
    newest,
    next_version,
    run_checkpoints,
)
from lit_divnorm.stopping import install_stop_handlers

DEFAULT_SAVE_DIR = "runs"
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")  # resolved by Lightning or here
MANAGED_LOGGERS = (CSVLogger, TensorBoardLogger)


class DivNormCLI(LightningCLI):
    """LightningCLI with the project's defaults (subclass mode for models and data).

    ``--trainer.sync_batchnorm=true`` synchronizes the batch statistics of the project's own
    norms too (:class:`~lit_divnorm.distributed.NormSync`), not only torch's BatchNorm, for
    any LightningModule (the project's tasks, which would install it themselves, then find it
    in place and leave it).
    Checkpoints are written atomically and read weights-only
    (:class:`~lit_divnorm.checkpoint.AtomicCheckpointIO`) unless a ``CheckpointIO`` plugin
    is given.

    Run folders (:meth:`before_instantiate_classes`): with a CSV or TensorBoard logger, or
    none configured (then a :class:`~lit_divnorm.runs.RunCSVLogger` in ``default_root_dir``,
    ``runs/`` when that is not set either), the
    logger's ``name`` defaults to the experiment (``<area>/<config stem>``) and its
    ``version`` to the next free ``version_<N>`` (``fit``), the latest one with a checkpoint
    (``fit --ckpt_path last``) or ``<subcommand>_<N>`` (``test``, ...: then a named version
    says which run ``--ckpt_path last`` takes the checkpoint of); ``default_root_dir``
    (where Lightning's SLURM requeue checkpoints go) defaults to the run folder. A ``fit``
    that does not continue a folder's own run (``--ckpt_path last`` or a checkpoint inside
    it) refuses a run folder that already holds files.
    """

    _run_dir: Path | None = None  # the folder this run logs to, when managed
    _source_dir: Path | None = None  # the run folder whose checkpoints "last" may take
    _last: tuple[str, int] | None = None  # what "last" resolved to: (path, step)

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
        if not ckpt_path or ckpt_path in SPECIAL_CKPT_PATHS:
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

    def before_instantiate_classes(self) -> None:
        """Name the run folder after the experiment (see the class docstring)."""
        self._run_dir = self._source_dir = self._last = None
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        section = self.config[subcommand]
        trainer = section.get("trainer") or {}
        logger = trainer.get("logger")
        configs = section.get("config") or []
        experiment = experiment_name(os.fspath(configs[0])) if configs else None
        if logger is None or logger is True:
            if experiment is None:
                return
            save_dir = trainer.get("default_root_dir") or DEFAULT_SAVE_DIR
            logger = {
                "class_path": f"{RunCSVLogger.__module__}.{RunCSVLogger.__name__}",
                "init_args": {"save_dir": str(save_dir)},
            }
        elif hasattr(logger, "as_dict"):
            logger = logger.as_dict()
        logger_class = _logger_class(logger.get("class_path")) if isinstance(logger, dict) else None
        if logger_class is None or not issubclass(logger_class, MANAGED_LOGGERS):
            return
        if logger_class is CSVLogger:  # the same logger, minus the deletion of metrics.csv
            logger["class_path"] = f"{RunCSVLogger.__module__}.{RunCSVLogger.__name__}"
        init_args = dict(logger.get("init_args") or {})
        name = init_args.get("name")
        if name in (None, "", "lightning_logs"):
            if experiment is None:
                return
            name = experiment
        experiment_dir = Path(init_args.get("save_dir") or DEFAULT_SAVE_DIR) / name
        version = init_args.get("version")
        ckpt_path = section.get("ckpt_path")
        run_dir = self._choose_run_dir(subcommand, experiment_dir, version, ckpt_path)
        init_args.update(name=name, version=run_dir.name)
        updates: dict[str, Any] = {"logger": {**logger, "init_args": init_args}}
        if trainer.get("default_root_dir") is None:
            updates["default_root_dir"] = str(run_dir)
        self.config = self.parser.parse_object({subcommand: {"trainer": updates}}, self.config)
        self._run_dir = run_dir

    def _choose_run_dir(
        self, subcommand: str, experiment_dir: Path, version: Any, ckpt_path: str | None
    ) -> Path:
        """The run folder of this command (see the class docstring); remembers in
        ``_source_dir`` the folder whose checkpoints ``--ckpt_path last`` may take."""
        if subcommand != "fit":  # logs apart; "last" is the named or latest fitted run's
            named = experiment_dir / _version_name(version) if version is not None else None
            self._source_dir = named or latest_resumable(experiment_dir)
            return next_version(experiment_dir, prefix=subcommand)
        run_of_checkpoint = (
            _run_of_checkpoint(Path(ckpt_path), experiment_dir)
            if ckpt_path and ckpt_path not in SPECIAL_CKPT_PATHS
            else None
        )
        if version is not None:
            run_dir = experiment_dir / _version_name(version)
        elif not is_rank_zero() and os.environ.get(RUN_DIR_VARIABLE):
            run_dir = Path(os.environ[RUN_DIR_VARIABLE])  # the folder rank 0 chose
        elif ckpt_path == "last":
            run_dir = latest_resumable(experiment_dir) or next_version(experiment_dir)
        else:
            run_dir = run_of_checkpoint or next_version(experiment_dir)
        if is_rank_zero():
            os.environ[RUN_DIR_VARIABLE] = str(run_dir)  # inherited by the ranks it launches
            present = holds_files(run_dir)
            continues = ckpt_path in ("last", "hpc") or run_of_checkpoint == run_dir
            if present and not continues:
                raise ValueError(
                    f"run folder {str(run_dir)!r} already holds a run ({', '.join(present[:5])}); "
                    "a new run never writes into another run's folder. Continue it with "
                    "--ckpt_path last, or name another version "
                    "(--trainer.logger.init_args.version=...)."
                )
        self._source_dir = run_dir
        return run_dir

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """Lightning's keyword arguments, with ``ckpt_path="last"`` resolved here (one line
        says which checkpoint, or that there is none); a resumed ``RunCSVLogger`` moves the
        rows logged after the checkpoint aside."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("ckpt_path") == "last":
            kwargs["ckpt_path"] = self._resolve_last(subcommand)
        logger = self.trainer.logger
        if subcommand == "fit" and isinstance(logger, RunCSVLogger) and self._run_dir:
            ckpt_path = kwargs.get("ckpt_path")
            if ckpt_path is None or ckpt_path in SPECIAL_CKPT_PATHS:
                step = 0
            elif self._last is not None and self._last[0] == ckpt_path:
                step = self._last[1]
            elif _run_of_checkpoint(Path(ckpt_path), self._run_dir.parent) == self._run_dir:
                step = checkpoint_step(ckpt_path)
            else:
                step = 0  # another run's weights: this folder's history starts over
            logger.supersede_from(step)
        return kwargs

    def _resolve_last(self, subcommand: str) -> str | None:
        """The newest resumable checkpoint of this run (its ``ModelCheckpoint`` folders'
        ``last.ckpt``, Lightning's SLURM ``hpc_ckpt_*.ckpt``), or of the experiment's latest
        fitted run for ``test``/``validate``/``predict`` (which refuse to run without one)."""
        trainer = self.trainer
        candidates = [] if self._source_dir is None else run_checkpoints(self._source_dir)
        if subcommand == "fit" or self._run_dir is None:
            default_dir = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint):
                    folder = Path(callback.dirpath) if callback.dirpath else default_dir
                    last = callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION
                    candidates.append(folder / last)
            candidates += sorted(Path(trainer.default_root_dir).glob(HPC_CHECKPOINT_GLOB))
        chosen = newest(candidates)
        where = self._source_dir or self._run_dir or Path(trainer.default_root_dir)
        if chosen is None:
            if subcommand != "fit":
                raise FileNotFoundError(
                    f"--ckpt_path last: no checkpoint of this experiment to {subcommand} "
                    f"(looked in {where}); pass the checkpoint file with --ckpt_path PATH"
                )
            _say(f"--ckpt_path last: no checkpoint in {where}; starting at step 0")
            return None
        step = checkpoint_step(chosen)
        action = "resuming from" if subcommand == "fit" else f"{subcommand} with"
        _say(f"{action} {chosen} (step {step})")
        self._last = (str(chosen), step)
        return str(chosen)

    def after_test(self) -> None:
        """Link a test to the fit run it tested: when the checkpoint lies in a run folder,
        write ``<run>/TESTED`` (JSON: the test metrics, the checkpoint and its step, the
        config, the test's log folder, the machine), so that ``lit-divnorm report runs/``
        shows the run's cell (:func:`lit_divnorm.experiments.records.build_record`)."""
        trainer = self.trainer
        ckpt_path = trainer.ckpt_path
        if not ckpt_path or not trainer.is_global_zero:
            return
        configs = self.config["test"].get("config") or []
        if not configs:
            return
        config_file = Path(os.fspath(configs[0]))
        experiment = experiment_name(config_file)
        run_dir = _run_of_checkpoint(Path(ckpt_path), self._experiment_dir(experiment))
        if run_dir is None:
            return
        seed = self.config["test"].get("seed_everything")
        summary = {
            "experiment": experiment,
            "config": str(config_file.resolve()),
            "overrides": [],
            "seed": seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
            "global_step": checkpoint_step(ckpt_path),
            "tested_checkpoint": str(ckpt_path),
            "test_dir": str(self._run_dir) if self._run_dir else None,
            "test_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "world_size": int(trainer.world_size),
            "per_device_batch": getattr(self.datamodule, "batch_size", None),
            **environment_facts(trainer.strategy.root_device),
        }
        atomic_write_text(run_dir / TESTED_MARKER, json.dumps(summary, indent=2) + "\n")
        _say(f"test linked to its fit run: {run_dir / TESTED_MARKER}")

    def _experiment_dir(self, experiment: str) -> Path:
        """``<save_dir>/<experiment>`` of this command's logger (``runs/<experiment>``)."""
        if self._run_dir is not None:
            return self._run_dir.parent
        return Path(DEFAULT_SAVE_DIR) / experiment

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
    "sweep": "lit_divnorm.experiments.sweep",
    "report": "lit_divnorm.experiments.report",
    "analyze": "lit_divnorm.analysis",
    "status": "lit_divnorm.experiments.status",
}
COMMANDS_HELP = """
every lit-divnorm command (each has its own --help):
  fit, validate, test, predict  LightningCLI: train or evaluate one config
                                (lit-divnorm fit --config configs/cifar10/dn_star.yaml)
  sweep    every config of a folder, once per seed, K at a time, or as a SLURM array job
  status   each (config, seed) of a sweep's runs: done, running, stopped, failed, not started
  report   RESULTS.md: the paper's tables from results/ records or run folders
  analyze  Table 10: decorrelation of a classification checkpoint's first-layer responses
"""


def _logger_class(class_path: Any) -> type | None:
    """The class ``class_path`` names (``None`` if it names none)."""
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return found if isinstance(found, type) else None


def _version_name(version: Any) -> str:
    """The folder name Lightning's loggers give a version: ``version_<N>`` for an int."""
    return f"version_{version}" if isinstance(version, int) else str(version)


def _run_of_checkpoint(ckpt_path: Path, experiment_dir: Path) -> Path | None:
    """The run folder of ``experiment_dir`` that holds ``ckpt_path`` (directly, or in its
    ``checkpoints/``), else ``None``."""
    try:
        relative = ckpt_path.resolve().relative_to(experiment_dir.resolve())
    except ValueError:
        return None
    if len(relative.parts) < 2:
        return None
    return experiment_dir / relative.parts[0]


def _say(message: str) -> None:
    """One line on stdout, from rank 0 only."""
    if is_rank_zero():
        print(f"lit-divnorm: {message}", flush=True)


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
    if not argv or argv[0] in ("-h", "--help"):
        try:
            run_cli(["--help"])
        finally:
            print(COMMANDS_HELP, end="")
    with friendly_errors():
        if argv and argv[0] in TOOL_COMMANDS:
            return importlib.import_module(TOOL_COMMANDS[argv[0]]).main(argv[1:])
        if argv and argv[0] == "fit":
            install_stop_handlers()  # a signal ends the run resumable (lit_divnorm.stopping)
        return run_cli(args)


def run_cli(args: list[str] | None = None, run: bool = True) -> DivNormCLI:
    """The LightningCLI run itself, errors propagating as exceptions (for callers such as the
    sweep that record them); ``run=False`` only builds the trainer, model and datamodule from
    ``args`` (a config and overrides, no subcommand), for tools that drive them."""
    return DivNormCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        run=run,
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
