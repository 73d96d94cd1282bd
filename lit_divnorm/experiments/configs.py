"""Experiment configs: which files a folder holds, their resolved form, their schedule and
their identity (what a run computes, less how and where it ran), and whether a run is a row of
its config.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from lit_divnorm.provenance import REPOSITORY
from lit_divnorm.runs import experiment_area

MAX_SEED = 2**32 - 1  # seed_everything's range


def check_seeds(seeds: list[int] | tuple | None) -> list[int] | None:
    """``seeds`` if they are distinct ints in ``[0, 2**32 - 1]`` (or ``None``), else
    ``ValueError``."""
    if seeds is None:
        return None
    seeds = list(seeds)
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int)]
    bad += [s for s in seeds if isinstance(s, int) and not 0 <= s <= MAX_SEED]
    if not seeds or bad:
        raise ValueError(f"seeds must be ints from 0 to {MAX_SEED}, got {seeds}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must not repeat, got {seeds}")
    return seeds


def find_configs(config_dir: str | Path) -> list[Path]:
    """Every ``*.yaml``/``*.yml`` below ``config_dir`` whose path has no ``_``-prefixed part."""
    root = Path(config_dir)
    if not root.is_dir():
        raise ValueError(f"config_dir must be an existing folder, got {str(config_dir)!r}")
    configs = [
        path
        for path in sorted(root.rglob("*"))
        if path.suffix in (".yaml", ".yml")
        and path.is_file()
        and not any(part.startswith("_") for part in path.relative_to(root).parts)
    ]
    if not configs:
        raise ValueError(f"config_dir {str(config_dir)!r} holds no experiment config (*.yaml)")
    return configs


def area_of(config: Path, config_dir: Path) -> str:
    """``configs/ptb/lstm/dn.yaml`` -> ``"ptb/lstm"``; without a ``configs`` ancestor, the
    config's folder relative to the parent of the swept folder."""
    return experiment_area(config, Path(config_dir).resolve().parent)


def _check_overrides(overrides: list[str] | tuple, seeds: list[int] | None) -> None:
    if seeds is not None and any(o.startswith("--seed_everything") for o in overrides):
        raise ValueError(
            "give the seeds with --seeds, not --seed_everything in the overrides "
            f"(got {[o for o in overrides if o.startswith('--seed_everything')]})"
        )


# trainer settings that change what a run computes; the others say where and how it ran
TRAINER_KEYS = (
    "max_steps",
    "max_epochs",
    "precision",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "accumulate_grad_batches",
    "limit_train_batches",
    "val_check_interval",
    "check_val_every_n_epoch",
)


DATA_LOCATION_KEYS = ("data_dir", "num_workers", "pin_memory", "download", "persistent_workers")


# switches of how a run executes, not what it computes: left out of a run's identity (a new
# defaulted switch must not turn one experiment into two)
ENGINEERING_KEYS = ("compile", "device_resident", *DATA_LOCATION_KEYS, "prefetch_factor")


SCHEDULE_KEYS = ("max_steps", "max_epochs")  # a run's identity holds its config's own schedule


DATA_FOLDER_KEYS = ("val_dir", "test_dir", "train_dir")  # kept by their last part (Set14)


def resolved_config(config: str | Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The full ``fit`` config LightningCLI resolves from ``config`` (fragments and defaults
    included), as ``--print_config`` prints it; nothing is instantiated."""
    from lit_divnorm.cli import run_cli

    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "LightningCLI's args parameter")
            run_cli(["fit", "--config", str(config), *overrides, "--print_config"])
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise ValueError(f"config {str(config)!r} could not be parsed") from stop
    parsed = yaml.safe_load(output.getvalue())
    if not isinstance(parsed, dict) or "trainer" not in parsed:
        raise ValueError(f"config {str(config)!r} did not resolve to a fit config")
    return parsed


def schedule_steps(trainer: dict[str, Any], steps_per_epoch: int | None) -> int | None:
    """Steps of a schedule: ``max_steps`` when set (> 0), else ``max_epochs`` x
    ``steps_per_epoch`` (``None`` when that is unknown or the schedule has no end)."""
    max_steps = trainer.get("max_steps")
    if isinstance(max_steps, int) and max_steps > 0:
        return max_steps
    max_epochs = trainer.get("max_epochs")
    if isinstance(max_epochs, int) and max_epochs > 0 and steps_per_epoch:
        return max_epochs * steps_per_epoch
    return None


def normalized_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved LightningCLI config that decides what a run computes.

    Keeps ``model`` and ``data`` less the engineering switches of :data:`ENGINEERING_KEYS`
    (``compile``, ``device_resident``, ``data_dir``, ``num_workers``, ...; image folders by
    their last part; a data ``seed`` of ``None``, which follows ``seed_everything``) and the
    trainer settings of :data:`TRAINER_KEYS`; drops ``seed_everything``, loggers, callbacks,
    devices and paths, so the runs of one experiment share it whatever their seed or machine.
    """
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict (a parsed config.yaml), got {type(config)}")
    trainer = config.get("trainer") or {}
    model = json.loads(json.dumps(config.get("model"), default=str))
    data = json.loads(json.dumps(config.get("data") or {}, default=str))
    for part in (model, data):
        arguments = _init_args(part)
        for key in ENGINEERING_KEYS:
            arguments.pop(key, None)
    arguments = _init_args(data)
    if "seed" in arguments and arguments["seed"] is None:
        del arguments["seed"]
    for key in DATA_FOLDER_KEYS:
        if arguments.get(key):
            arguments[key] = Path(str(arguments[key])).name
    return {
        "model": model,
        "data": data,
        "trainer": {key: trainer.get(key) for key in TRAINER_KEYS},
    }


def _init_args(part: Any) -> dict[str, Any]:
    """The ``init_args`` of a ``class_path`` mapping, the mapping itself without one (``{}``
    for anything else)."""
    if not isinstance(part, dict):
        return {}
    return part["init_args"] if isinstance(part.get("init_args"), dict) else part


def batch_facts(
    config: dict[str, Any], world_size: int | None = None, per_device: int | None = None
) -> dict[str, Any]:
    """The effective batch of a run: ``world_size`` (processes: given, else ``num_nodes`` x
    ``devices`` when the config fixes them, ``None`` when it does not: ``devices: auto`` on a
    machine not known), ``devices``, ``num_nodes``, ``accumulate_grad_batches``,
    ``per_device`` (given: what the run trained on, e.g. after
    :class:`~lit_divnorm.global_batch.GlobalBatch` divided it; else the data's ``batch_size``)
    and ``global`` = per_device x world_size x accumulate_grad_batches."""
    trainer = config.get("trainer") or {}
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
    if world_size is None:
        if isinstance(devices, list):
            world_size = len(devices) * nodes
        elif isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
            world_size = devices * nodes
        elif isinstance(devices, str) and devices.strip().isdigit() and int(devices) > 0:
            world_size = int(devices) * nodes
        elif trainer.get("accelerator") == "cpu":
            world_size = nodes  # Lightning's CPU accelerator runs one process per node
    accumulate = trainer.get("accumulate_grad_batches") or 1
    if per_device is None:
        per_device = _init_args(config.get("data")).get("batch_size")
    per_device = per_device if isinstance(per_device, int) else None
    known = world_size is not None and per_device is not None
    return {
        "world_size": world_size,
        "devices": devices,
        "num_nodes": nodes,
        "accumulate_grad_batches": accumulate,
        "per_device": per_device,
        "global": per_device * world_size * accumulate if known else None,
    }


def config_hash(
    config: dict[str, Any], schedule: int | None = None, global_batch: int | None = None
) -> str:
    """The identity of an experiment: SHA-256 (canonical JSON) of :func:`normalized_config`
    with the trainer's ``max_steps``/``max_epochs`` replaced by ``schedule`` (the steps of the
    experiment config's own schedule: a run stopped early is a partial run of the same
    experiment, not another one) and the ``global_batch`` (per-device batch x processes x
    accumulation: 4 GPUs at the paper's batch each are another experiment)."""
    identity = normalized_config(config)
    for key in SCHEDULE_KEYS:
        identity["trainer"].pop(key, None)
    identity["schedule_steps"] = schedule
    identity["global_batch"] = global_batch
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model.init_args.norm": ..., ...}``: the leaves of nested dicts by dotted path."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def row_problem(
    record: dict[str, Any], own_config: dict[str, Any], allow_partial: bool = False
) -> str | None:
    """Why a run's ``record`` is not a row of its experiment config (``own_config``: the config
    file resolved alone, no overrides), ``None`` when it is.

    A row runs the config's own model, data and trainer settings at its own global batch
    (one process at ``data.batch_size``, or :class:`~lit_divnorm.global_batch.GlobalBatch`
    over several) for its own schedule. A run stopped early by a shorter ``max_steps`` or
    ``max_epochs`` (a smoke run) is a row only with ``allow_partial`` (the user marked it
    partial); a run of a longer schedule never is.
    """
    own = normalized_config(own_config)
    ran = record["config"]
    own_trainer, ran_trainer = own["trainer"], ran.get("trainer") or {}
    own_flat = _flat({k: v for k, v in own.items() if k != "trainer"})
    ran_flat = _flat({k: v for k, v in ran.items() if k != "trainer"})
    for key in TRAINER_KEYS:
        if key not in SCHEDULE_KEYS:
            own_flat[f"trainer.{key}"] = own_trainer.get(key)
            ran_flat[f"trainer.{key}"] = ran_trainer.get(key)
    changed = sorted(
        k for k in own_flat.keys() | ran_flat.keys() if own_flat.get(k) != ran_flat.get(k)
    )
    if changed:
        shown = ", ".join(
            f"{k} {ran_flat.get(k)!r} (config: {own_flat.get(k)!r})" for k in changed[:4]
        )
        return f"its settings differ from the config's: {shown}"
    own_global = batch_facts(own_config, 1 if _devices_unset(own_config) else None)["global"]
    ran_global = (record.get("batch") or {}).get("global")
    if own_global is not None and ran_global != own_global:
        return f"its global batch is {ran_global}, the config's {own_global}"
    schedule = record["schedule_steps"]
    ran_schedule = schedule_steps(ran_trainer, _steps_per_epoch(record))
    if schedule is not None and ran_schedule is not None and ran_schedule > schedule:
        return f"it ran a longer schedule ({ran_schedule} steps) than the config's {schedule}"
    if not record["complete"] and not allow_partial:
        return (
            f"it ran {record['steps']} of the config's {schedule} steps (a smoke run or a run "
            "stopped early; mark a partial row on purpose with sweep --partial)"
        )
    return None


def _devices_unset(config: dict[str, Any]) -> bool:
    devices = (config.get("trainer") or {}).get("devices")
    return devices in (None, "auto")


def _steps_per_epoch(record: dict[str, Any]) -> int | None:
    per_epoch = (record.get("source") or {}).get("steps_per_epoch")
    return per_epoch if isinstance(per_epoch, int) else None


def repository_path(path: str | None) -> str:
    """``path`` relative to this repository when it lies inside it (``configs/...``), else
    as given (``"?"`` for none)."""
    if not path:
        return "?"
    with contextlib.suppress(ValueError):
        return Path(path).resolve().relative_to(REPOSITORY).as_posix()
    return str(path)
