"""How long a sweep will take: a few timed training steps per config, times its schedule.

    python -m lit_divnorm.experiments.timing --time-one CONFIG --out FILE
        [--steps 3] [--warmup 2] [-- OVERRIDES]

:func:`time_config` builds one experiment through the CLI (its data, model and trainer, with
the given overrides), trains ``warmup + steps`` optimizer steps with validation off and a
:class:`StepTimer`, and returns a :class:`ConfigTiming`: the median step time (wall clock from
one batch end to the next, data loading included; on a GPU each step ends with a
synchronize), the steps of the config's schedule (``max_steps``, or ``max_epochs`` x batches
per epoch) and the device. Everything it writes goes to a temporary folder. The planned device
time of a run is ``schedule steps x step time``; evaluation passes are not included.
``lit-divnorm sweep --dry-run`` and ``benchmarks/table_plan.py`` time configs this way, each in
a process of its own, as many at a time as the sweep would run them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lit_divnorm.experiments.configs import schedule_steps
from lit_divnorm.experiments.launch import Job, Slot, run_jobs
from lit_divnorm.provenance import describe_device


class StepTimer(Callback):
    """Times optimizer steps and stops training after ``warmup + steps`` of them.

    ``intervals``: seconds between consecutive batch ends after the ``warmup`` first steps
    (at least 1: the first step has no batch end before it to time from); on a CUDA device
    each batch end synchronizes first.
    """

    def __init__(self, steps: int = 3, warmup: int = 2) -> None:
        for name, value, least in (("steps", steps, 1), ("warmup", warmup, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        self.steps, self.warmup = steps, warmup
        self.intervals: list[float] = []
        self._seen = 0
        self._last: float | None = None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        self._seen += 1
        if self._seen > self.warmup and self._last is not None:
            self.intervals.append(now - self._last)
        self._last = now
        if self._seen >= self.warmup + self.steps:
            trainer.should_stop = True


@dataclass
class ConfigTiming:
    """One config's measured step time and its schedule.

    ``step_seconds``: median of ``intervals``; ``schedule_steps``: ``None`` when the schedule
    has no known end; ``error``: why timing failed (then the numbers are ``None``).
    """

    config: str
    step_seconds: float | None
    schedule_steps: int | None
    steps_per_epoch: int | None
    intervals: list[float]
    device: str | None
    threads: int
    error: str | None = None

    @property
    def hours(self) -> float | None:
        """``schedule_steps x step_seconds`` in hours (``None`` when either is unknown)."""
        if self.step_seconds is None or self.schedule_steps is None:
            return None
        return self.schedule_steps * self.step_seconds / 3600.0


def time_config(
    config: str | Path, overrides: list[str] | tuple = (), steps: int = 3, warmup: int = 2
) -> ConfigTiming:
    """Train ``warmup + steps`` steps of ``config`` (with ``overrides``) and time them."""
    from lit_divnorm.cli import run_cli
    from lit_divnorm.runs import logger_override

    timer = StepTimer(steps, warmup)
    with tempfile.TemporaryDirectory(prefix="lit-divnorm-timing-") as folder:
        log_dir = Path(folder) / "timing" / "version_0"
        args = ["--config", str(config), *overrides, logger_override(log_dir)]
        args += [
            f"--trainer.default_root_dir={log_dir}",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "LightningCLI's args parameter")
            cli = run_cli(args, run=False)
        trainer = cli.trainer
        trainer.callbacks.append(timer)
        trainer.fit(cli.model, datamodule=cli.datamodule)
        per_epoch = trainer.num_training_batches
        per_epoch = int(per_epoch) if per_epoch not in (None, float("inf")) else None
        device = describe_device(trainer.strategy.root_device)
        limits = {"max_steps": trainer.max_steps, "max_epochs": trainer.max_epochs}
    if not timer.intervals:
        raise ValueError(
            f"config {str(config)!r}: its schedule ended before {warmup + 1} steps, nothing to "
            "time (lower --dry-run-warmup)"
        )
    return ConfigTiming(
        config=str(config),
        step_seconds=statistics.median(timer.intervals),
        schedule_steps=schedule_steps(limits, per_epoch),
        steps_per_epoch=per_epoch,
        intervals=timer.intervals,
        device=device,
        threads=torch.get_num_threads(),
    )


def time_configs(
    configs: list[tuple[Path, list[str]]],
    slots: list[Slot] | None = None,
    steps: int = 3,
    warmup: int = 2,
) -> list[ConfigTiming]:
    """:func:`time_config` each ``(config, overrides)``: in this process one after another
    (``slots`` ``None``), or each in a ``--time-one`` process, ``len(slots)`` at a time with
    the slots' threads and devices (as a sweep would run them). A config that cannot be
    timed gets a :class:`ConfigTiming` with its ``error``."""
    if slots is None:
        timings = []
        for config, overrides in configs:
            try:
                timings.append(time_config(config, overrides, steps, warmup))
            except Exception as error:  # say why beside the other configs
                timings.append(failed_timing(config, f"{type(error).__name__}: {error}"))
        return timings
    found: dict[int, ConfigTiming] = {}
    with tempfile.TemporaryDirectory(prefix="lit-divnorm-plan-") as folder:
        jobs = []
        for number, (config, overrides) in enumerate(configs):
            out, log = Path(folder) / f"{number}.json", Path(folder) / f"{number}.log"
            command = [
                sys.executable,
                "-m",
                "lit_divnorm.experiments.timing",
                "--time-one",
                str(config),
            ]
            command += ["--out", str(out), "--steps", str(steps), "--warmup", str(warmup)]

            def on_exit(code: int, slot: Slot, number=number, config=config, out=out, log=log):
                if out.is_file():
                    found[number] = read_timing(out)
                else:
                    tail = log.read_text()[-800:] if log.is_file() else ""
                    found[number] = failed_timing(config, f"exit code {code}: {tail}")

            jobs.append(Job([*command, "--", *overrides], on_exit, log_file=log))
        run_jobs(jobs, slots)
    return [found[number] for number in range(len(configs))]


def failed_timing(config: str | Path, error: str) -> ConfigTiming:
    """A :class:`ConfigTiming` that says why ``config`` could not be timed."""
    return ConfigTiming(str(config), None, None, None, [], None, torch.get_num_threads(), error)


def read_timing(path: str | Path) -> ConfigTiming:
    """The :class:`ConfigTiming` a ``--time-one`` process wrote to ``path``."""
    return ConfigTiming(**json.loads(Path(path).read_text()))


def format_hours(hours: float | None) -> str:
    """``"12.5 s"``, ``"3.5 min"`` or ``"2.25 h"`` (``"?"`` for ``None``)."""
    if hours is None:
        return "?"
    if hours < 1 / 60:
        return f"{hours * 3600:.1f} s"
    return f"{hours * 60:.1f} min" if hours < 1 else f"{hours:.2f} h"


def main(argv: list[str] | None = None) -> ConfigTiming:
    parser = argparse.ArgumentParser(prog="python -m lit_divnorm.experiments.timing")
    parser.add_argument("--time-one", metavar="CONFIG", required=True, help="config to time")
    parser.add_argument("--out", required=True, help="JSON file for the timing")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (2)")
    argv = list(sys.argv[1:] if argv is None else argv)
    own, overrides = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    options = parser.parse_args(own)
    try:
        timing = time_config(options.time_one, overrides, options.steps, options.warmup)
    except Exception as error:  # the parent prints it beside the other configs
        timing = failed_timing(options.time_one, f"{type(error).__name__}: {error}")
    Path(options.out).write_text(json.dumps(asdict(timing)))
    return timing


if __name__ == "__main__":
    main()
