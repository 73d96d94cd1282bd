"""How long the paper's tables take: Table 3 (CIFAR-10 column), Table 4 (LSTM column), SR rows.

    python benchmarks/table_plan.py [--tables cifar10 lstm sr] [--rows dn_star bn] [--steps 3]
        [--warmup 2] [--seeds 3] [--data ../shared/data] [--gpu-table FILE] [--gpu-loop lightning]
        [--gpu-path fast|loader] [-- OVERRIDES]

The configs of a table are the paper's rows: ``configs/cifar10/<row>.yaml`` (13),
``configs/ptb/lstm/<row>.yaml`` (12) and ``configs/sr/x3|x4/{baseline,bn,dn_star}.yaml`` (the
SR models trained for the x3 and x4 columns; the Set14 and BSD200 columns test the same models).
``--rows`` keeps a subset (config stems). Each config trains ``--warmup`` untimed and
``--steps`` timed steps in this process with this CPU's threads, through the CLI with the
config's own data, model and trainer plus ``OVERRIDES`` (e.g. the fast-path switches)
(:func:`lit_divnorm.experiments.timing.time_config`); its time is the schedule's steps
(``max_steps``, or
``max_epochs`` x batches per epoch) x the median step time, training steps only. Per config it
prints steps, ms/step and the time of one run; per table the total for one seed and for
``--seeds`` seeds. The step times are this machine's as it is at the time: on a machine that
other jobs share, OpenMP threads waiting for busy cores make steps many times slower, so
``OMP_NUM_THREADS=1`` gives steadier figures there.

The fast path of issue 17 (device-resident batches, the compiled step) is two overrides:
``-- --data.device_resident=true --model.compile=true``.

``--gpu-table FILE`` reads the output of ``python benchmarks/train.py --device cuda --norms
...`` (the small CIFAR CNN's step per norm through Lightning: ``--gpu-loop``'s rows, of the
``--gpu-path`` data path, ``fast`` when the table has one) and gives the CIFAR rows a one-GPU
time: schedule steps x the GPU step of the row's norm; a row whose norm the file lacks is
counted at the slowest norm it has and marked ``~``. No GPU benchmark times the PTB LSTM or
SRCNN, so their GPU column stays empty.

Data: ``--data DIR`` holding ``cifar10/``, ``ptb/`` and ``sr/`` (default ``../shared/data``
beside the repository when present, else the configs' own folders); SR configs whose test set
(Set14) is absent there are timed with BSD100 as the test folder (only training is timed).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from lit_divnorm.experiments.paper import PAPER_TABLES  # noqa: E402
from lit_divnorm.experiments.timing import ConfigTiming, format_hours, time_config  # noqa: E402

SR_ROWS = ("baseline", "bn", "dn_star")
TABLES = {
    "cifar10": [("configs/cifar10", tuple(PAPER_TABLES["cifar"]["rows"]))],
    "lstm": [("configs/ptb/lstm", tuple(PAPER_TABLES["ptb"]["rows"]))],
    "sr": [("configs/sr/x3", SR_ROWS), ("configs/sr/x4", SR_ROWS)],
}
TITLES = {
    "cifar10": "Table 3, CIFAR-10 column",
    "lstm": "Table 4, LSTM column",
    "sr": "Tables 5-6, SR rows (x3, x4)",
}
DATA_FOLDERS = {"cifar10": "cifar10", "lstm": "ptb", "sr": "sr"}
# a row of benchmarks/train.py: norm, [path: fast | loader,] loop, ms/step, images/s, ...
GPU_ROW = re.compile(
    r"^(?P<norm>\S+?)\s*(?P<path>fast|loader)?\s+(?P<loop>lightning|bare loop|bare \+ metric)"
    r"\s+(?P<ms>\d+(?:\.\d+)?)\s+\d+(?:\s|$)"
)


def table_configs(table: str, rows: list[str] | None = None) -> list[Path]:
    """The experiment configs of ``table`` (``cifar10``, ``lstm``, ``sr``), in the paper's
    row order, those of ``rows`` only when given."""
    if table not in TABLES:
        raise ValueError(f"table must be one of {sorted(TABLES)}, got {table!r}")
    configs = []
    for folder, names in TABLES[table]:
        for name in names:
            path = REPOSITORY / folder / f"{name}.yaml"
            if (rows is None or name in rows) and path.is_file():
                configs.append(path)
    return configs


def data_overrides(table: str, data: Path | None) -> list[str]:
    """``--data.data_dir`` (and for SR without Set14 ``--data.test_dir=BSD100``)."""
    if data is None:
        return []
    folder = data / DATA_FOLDERS[table]
    overrides = [f"--data.data_dir={folder}"]
    if table == "sr" and not (folder / "Set14").is_dir() and (folder / "BSD100").is_dir():
        overrides.append("--data.test_dir=BSD100")
    return overrides


def config_norm(config: Path) -> str:
    """The registry name of the norm ``config`` trains with (``"none"`` when it names none)."""
    import yaml

    model = (yaml.safe_load(config.read_text()).get("model") or {}).get("init_args") or {}
    norm = model.get("norm", "none")
    return str(norm.get("name") if isinstance(norm, dict) else norm)


def read_gpu_table(
    path: str | Path, loop: str = "lightning", data_path: str | None = None
) -> tuple[str, dict[str, float]]:
    """(the device line, ``{norm: ms per step}``) of ``benchmarks/train.py``'s output for the
    rows of ``loop`` and of the data path ``data_path`` (``fast`` or ``loader``; default
    ``fast`` when the table has it, else its only rows)."""
    lines = Path(path).read_text().splitlines()
    if not lines:
        raise ValueError(f"gpu table {str(path)!r} is empty")
    rows = [m for line in lines[1:] if (m := GPU_ROW.match(line.strip()))]
    paths = {m.group("path") for m in rows}
    chosen = data_path or ("fast" if "fast" in paths else None)
    steps = {
        m.group("norm"): float(m.group("ms"))
        for m in rows
        if m.group("loop") == loop and (chosen is None or m.group("path") == chosen)
    }
    if not steps:
        raise ValueError(
            f"gpu table {str(path)!r} has no '{loop}' rows"
            + (f" of the {chosen!r} path" if chosen else "")
            + " (norm, [path,] loop, ms/step, images/s): give the output of benchmarks/train.py "
            "--device cuda"
        )
    return lines[0].strip(), steps


@dataclass
class PlannedRow:
    config: Path
    norm: str
    timing: ConfigTiming
    gpu_ms: float | None = None
    gpu_estimated: bool = False

    @property
    def cpu_hours(self) -> float | None:
        return self.timing.hours

    @property
    def gpu_hours(self) -> float | None:
        steps = self.timing.schedule_steps
        return None if self.gpu_ms is None or steps is None else steps * self.gpu_ms / 3.6e6


def plan_table(
    table: str,
    rows: list[str] | None,
    data: Path | None,
    overrides: list[str],
    steps: int,
    warmup: int,
    gpu: dict[str, float] | None,
) -> list[PlannedRow]:
    """Time every config of ``table`` (see the module docstring)."""
    planned = []
    for config in table_configs(table, rows):
        try:
            timing = time_config(config, [*data_overrides(table, data), *overrides], steps, warmup)
        except Exception as error:  # one config that cannot run does not hide the others
            from lit_divnorm.experiments.timing import failed_timing

            timing = failed_timing(config, f"{type(error).__name__}: {error}")
        norm = config_norm(config)
        row = PlannedRow(config, norm, timing)
        if gpu and table == "cifar10":
            row.gpu_ms = gpu.get(norm, max(gpu.values()))
            row.gpu_estimated = norm not in gpu
        planned.append(row)
        print(_row_line(row), flush=True)
    return planned


def _row_line(row: PlannedRow) -> str:
    name = row.config.relative_to(REPOSITORY / "configs").with_suffix("").as_posix()
    timing = row.timing
    if timing.step_seconds is None:
        return (
            f"  {name:<24} {row.norm:<12} not timed: {(timing.error or '').splitlines()[0][:160]}"
        )
    gpu = ""
    if row.gpu_ms is not None:
        mark = "~" if row.gpu_estimated else " "
        gpu = f" {mark}{row.gpu_ms:8.2f} {format_hours(row.gpu_hours):>10}"
    return (
        f"  {name:<24} {row.norm:<12} {timing.schedule_steps or '?':>9} "
        f"{timing.step_seconds * 1e3:9.1f} {format_hours(row.cpu_hours):>10}" + gpu
    )


def _total(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known and len(known) == len(values) else None


def main(argv: list[str] | None = None) -> dict[str, list[PlannedRow]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, overrides = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", nargs="+", default=list(TABLES), choices=list(TABLES))
    parser.add_argument("--rows", nargs="+", metavar="STEM", help="only these config stems")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per config (3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (2)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per cell for the totals (3)")
    parser.add_argument("--data", type=Path, help="folder with cifar10/, ptb/, sr/")
    parser.add_argument(
        "--gpu-table", type=Path, help="output of benchmarks/train.py --device cuda"
    )
    parser.add_argument("--gpu-loop", default="lightning", help="its rows to use (lightning)")
    parser.add_argument(
        "--gpu-path", choices=["fast", "loader"], help="its data path (fast when it has one)"
    )
    options = parser.parse_args(own)
    if options.steps < 1 or options.warmup < 1 or options.seeds < 1:
        parser.error("--steps, --warmup and --seeds must be >= 1")
    data = options.data
    if data is None and (REPOSITORY.parent / "shared" / "data").is_dir():
        data = REPOSITORY.parent / "shared" / "data"
    gpu = None
    if options.gpu_table is not None:
        try:
            device, gpu = read_gpu_table(options.gpu_table, options.gpu_loop, options.gpu_path)
        except (OSError, ValueError) as error:
            parser.error(str(error))
        print(f"GPU steps from {options.gpu_table}: {device}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        return _plan_tables(options, data, overrides, gpu)


def _plan_tables(
    options: argparse.Namespace,
    data: Path | None,
    overrides: list[str],
    gpu: dict[str, float] | None,
) -> dict[str, list[PlannedRow]]:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(
        f"training steps only; {options.warmup} untimed + {options.steps} timed steps per "
        f"config; data {data or 'of the configs'}"
    )
    planned = {}
    for table in options.tables:
        print(f"\n{TITLES[table]}")
        header = f"  {'config':<24} {'norm':<12} {'steps':>9} {'ms/step':>9} {'CPU time':>10}"
        print(header + (f" {'GPU ms':>9} {'GPU time':>10}" if gpu and table == "cifar10" else ""))
        rows = plan_table(table, options.rows, data, overrides, options.steps, options.warmup, gpu)
        planned[table] = rows
        cpu = _total([row.cpu_hours for row in rows])
        line = f"  total, 1 seed: CPU {format_hours(cpu)}"
        line += f", {options.seeds} seeds: CPU {format_hours(cpu and cpu * options.seeds)}"
        if gpu and table == "cifar10":
            one = _total([row.gpu_hours for row in rows])
            many = one and one * options.seeds
            line += f"; one GPU: {format_hours(one)}, {options.seeds} seeds {format_hours(many)}"
            if any(row.gpu_estimated for row in rows):
                line += " (~: norm not in the GPU table, counted at its slowest norm)"
        elif gpu:
            line += "; GPU: no benchmark covers this model"
        print(line, flush=True)
    return planned


if __name__ == "__main__":
    main()
