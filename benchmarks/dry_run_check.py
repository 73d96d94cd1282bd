"""How honest is ``sweep --dry-run``? Its step time against a measured run of ``--steps``.

    python benchmarks/dry_run_check.py [--steps 300] [--data ../shared/data]
        [--configs configs/ptb/lstm/dn_star.yaml configs/cifar10/dn_star.yaml]

Per config, one after the other, each in a process of its own with the threads a one-at-a-time
sweep gives its runs (:func:`lit_divnorm.experiments.launch.make_slots`):

* the dry run's estimate, exactly as ``lit-divnorm sweep --dry-run`` times it (3 timed steps
  after 2 untimed, :func:`lit_divnorm.experiments.timing.time_configs`);
* a measured run of ``--steps`` steps of the same config (the same timer over every step
  after the first 2), its median and its mean step (the mean holds the logging, the
  checkpoint writes and the epoch ends a real run has).

Prints a table: ms/step of both, and the ratio estimate / measured (the goal: within 25%).
The data folders are ``<data>/ptb`` and ``<data>/cifar10`` (``../shared/data`` by default).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_divnorm.experiments.launch import make_slots  # noqa: E402
from lit_divnorm.experiments.timing import time_configs  # noqa: E402

DEFAULT_CONFIGS = ("configs/ptb/lstm/dn_star.yaml", "configs/cifar10/dn_star.yaml")


def data_override(config: str, data: Path) -> list[str]:
    """``--data.data_dir`` for the config's area (``ptb``, ``cifar10``, ``cifar100``)."""
    area = Path(config).relative_to("configs").parts[0]
    return [f"--data.data_dir={data / area}"]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="steps of the measured run")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    options = parser.parse_args(argv)
    slots = make_slots(1)  # a sweep of one run at a time on this machine
    rows = []
    for config in options.configs:
        jobs = [(ROOT / config, data_override(config, options.data))]
        (estimate,) = time_configs(jobs, slots, steps=3, warmup=2)
        (measured,) = time_configs(jobs, slots, steps=options.steps - 2, warmup=2)
        for timing in (estimate, measured):
            if timing.step_seconds is None:
                raise SystemExit(f"{config}: could not be timed: {timing.error}")
        mean = statistics.fmean(measured.intervals)
        rows.append(
            {
                "config": config,
                "threads": estimate.threads,
                "estimate_ms": estimate.step_seconds * 1e3,
                "median_ms": measured.step_seconds * 1e3,
                "mean_ms": mean * 1e3,
            }
        )
    print(f"threads per run: {rows[0]['threads']}; measured run: {options.steps} steps")
    print(
        "| config | dry run ms/step | measured median | measured mean | dry / median | dry / mean |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['config']} | {row['estimate_ms']:.1f} | {row['median_ms']:.1f} | "
            f"{row['mean_ms']:.1f} | {row['estimate_ms'] / row['median_ms']:.2f} | "
            f"{row['estimate_ms'] / row['mean_ms']:.2f} |"
        )
    return rows


if __name__ == "__main__":
    main()
