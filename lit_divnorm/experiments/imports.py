"""Runs made elsewhere, in the ``../shared/runs`` format (a folder per run: ``RUN.md``,
``config.yaml``, ``metrics.csv``, ``test_metrics.csv``), as records: every figure read from the
files and checked against what ``RUN.md`` states; a run made in parts (a folder that
``continues `../<run>``) becomes one record.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from lit_divnorm.experiments import metrics
from lit_divnorm.experiments.configs import (
    batch_facts,
    config_hash,
    normalized_config,
    resolved_config,
    schedule_steps,
)
from lit_divnorm.experiments.paper import metric_of
from lit_divnorm.experiments.records import (
    Record,
    _portable_or_none,
    file_sha256,
    load_records,
    portable_command,
    write_record,
)
from lit_divnorm.provenance import PACKAGES, REPOSITORY, full_commit
from lit_divnorm.runs import experiment_name

_BULLET = re.compile(r"^- ([^:]+):\s*(.*)$")


_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


_CONTINUES = re.compile(r"continues `\.\./([^`/]+)/?`")


def run_md_fields(text: str) -> dict[str, str]:
    """The ``- Key: text`` bullets of a ``RUN.md``: indented lines below a bullet (nested
    bullets, a code block, also after a blank line) join its text with spaces."""
    fields: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        match = _BULLET.match(line)
        if match:
            key = match.group(1).strip()
            fields[key] = match.group(2).strip()
        elif key is not None and line.startswith("  ") and line.strip():
            fields[key] = (fields[key] + " " + line.strip()).strip()
        elif line.strip():
            key = None
    return fields


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _field(fields: dict[str, str], prefix: str, run_md: Path) -> tuple[str, str]:
    for key, value in fields.items():
        if key.lower().startswith(prefix.lower()):
            return key, value
    raise ValueError(f"{run_md}: no '- {prefix}...:' line (found {sorted(fields)})")


def parse_test_log(path: Path) -> list[list[float]]:
    """``[[step, accuracy], ...]`` of a periodic test log (``step S test_acc A ...`` lines)."""
    points = []
    for line in path.read_text().splitlines():
        match = re.match(r"^step (\d+) test_acc ([\d.]+)\b", line.strip())
        if match:
            points.append([int(match.group(1)), float(match.group(2))])
    return points


def fit_flags(command: str) -> list[str]:
    """The flags of the ``lit-divnorm fit`` command in ``command`` (backquoted, or a code
    block ending at ``then``), without ``--config``: ``["--trainer.max_steps 32000", ...]``."""
    match = re.search(r"`(lit-divnorm fit [^`]*)`", command) or re.search(
        r"(lit-divnorm fit .*?)(?:\s+then\b|$)", command
    )
    if match is None:
        return []
    parts = re.split(r"\s+(?=--)", " ".join(match.group(1).split()))
    return [part for part in parts[1:] if not part.startswith("--config")]


def _stated_test_value(fields: dict[str, str], run_md: Path) -> str:
    """The test figure ``RUN.md`` states: the number right before ``(`test_metrics.csv```,
    else the first number of its ``Test ...`` line."""
    stated = [text for key, text in fields.items() if key.lower().startswith("test")]
    if not stated:
        raise ValueError(f"{run_md}: no '- Test ...:' line to compare with test_metrics.csv")
    beside = re.findall(r"(\d[\d,]*(?:\.\d+)?)\s*\(`test_metrics\.csv`", stated[0])
    figure = beside[-1] if beside else None
    if figure is None:
        found = _NUMBER.search(stated[0].split(":", 1)[-1])
        figure = found.group(0) if found else None
    if figure is None:
        raise ValueError(f"{run_md}: the test line states no number")
    return figure


def _check_stated_test_value(fields: dict[str, str], value: float | None, run_md: Path) -> None:
    if value is None:
        raise ValueError(f"{run_md}: test_metrics.csv holds no figure of the paper's metric")
    figure = _stated_test_value(fields, run_md)
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    if abs(_number(figure) - value) > 0.5 * 10.0**-decimals + 1e-12:
        raise ValueError(
            f"{run_md} states the test figure {figure}, but test_metrics.csv holds "
            f"{value}: the folder's files disagree"
        )


def _stated_steps(fields: dict[str, str], title: str, run_md: Path) -> dict[str, int]:
    """What ``RUN.md`` says of the steps: ``{"steps", "schedule"}`` (``N of M``), ``{"epochs"}``
    (``the whole schedule (E epochs)``), ``{"schedule"}`` (``the full schedule of N steps``)
    or ``{"start", "steps"}`` (``steps A to B``), from its Steps line, else its title."""
    text = next((v for k, v in fields.items() if k.lower().startswith("steps")), None)
    for source in (text, title):
        if source is None:
            continue
        of = re.search(r"(?:^|\s)([\d,]+) of (?:the schedule's )?([\d,]+)", source)
        if of:
            return {"steps": int(_number(of.group(1))), "schedule": int(_number(of.group(2)))}
        whole = re.search(r"whole schedule \((\d+) epochs\b", source)
        if whole:
            return {"epochs": int(whole.group(1))}
        full = re.search(r"full schedule of ([\d,]+) steps", source)
        if full:
            return {"schedule": int(_number(full.group(1)))}
        span = re.search(r"steps ([\d,]+) to ([\d,]+)", source)
        if span:
            return {"start": int(_number(span.group(1))), "steps": int(_number(span.group(2)))}
    raise ValueError(
        f"{run_md}: the Steps line or the title must read 'N of M', 'the whole schedule "
        "(E epochs)', 'the full schedule of N steps' or 'steps A to B'"
    )


def _check_stated_steps(
    stated: dict[str, int],
    steps: int,
    start: int,
    epochs: int,
    schedule: int | None,
    own_trainer: dict[str, Any],
    run_md: Path,
) -> None:
    found = {
        "steps": steps,
        "schedule": schedule,
        "start": start,
        "epochs": epochs,
    }
    wrong = {key: value for key, value in stated.items() if found[key] != value}
    if "epochs" in stated and own_trainer.get("max_epochs") != stated["epochs"]:
        wrong["epochs of the config"] = stated["epochs"]
    if wrong:
        if "epochs" in stated:
            said = f"the whole schedule of {stated['epochs']} epochs"
        elif "start" in stated:
            said = f"steps {stated['start']} to {stated['steps']}"
        elif "steps" in stated:
            said = f"{stated['steps']} of {stated['schedule']} steps"
        else:
            said = f"the full schedule of {stated['schedule']} steps"
        raise ValueError(
            f"{run_md} states {said}, but metrics.csv shows {steps} steps from step {start} "
            f"over {epochs} epochs and the config's schedule is {schedule} steps "
            f"({own_trainer.get('max_epochs')} epochs); disagreeing: {sorted(wrong)}"
        )


def import_run(folder: str | Path) -> dict[str, Any]:
    """The record of a run folder in the ``../shared/runs`` format (see its README.md).

    Reads ``RUN.md`` (config, commit, command, machine, steps, wall time), ``config.yaml``
    (seed, identity), ``metrics.csv`` (steps and epochs run, curves), ``test_metrics.csv``
    (the final test metrics) and ``test_every_*.log`` (a test curve). The steps, schedule and
    test figure that ``RUN.md`` states are checked against the files and the experiment
    config's own schedule (``ValueError`` naming the disagreement). A folder whose RUN.md says
    it ``continues `../<run>``` is one part of a run: ``source["continues"]`` names the earlier
    part, and :func:`import_runs` joins the parts into one record.
    """
    folder = Path(folder)
    run_md = folder / "RUN.md"
    if not run_md.is_file():
        raise ValueError(f"folder {str(folder)!r} holds no RUN.md: not a run in the shared format")
    text = run_md.read_text()
    title = text.splitlines()[0].lstrip("# ").strip()
    fields = run_md_fields(text)
    config_path, commit = _config_and_commit(fields, run_md)
    experiment_config = REPOSITORY / config_path
    experiment = experiment_name(experiment_config)
    metric = metric_of(experiment)
    rows = metrics.read_metric_rows(folder / "metrics.csv")
    steps, epochs = metrics.training_progress(rows)
    if steps == 0:
        raise ValueError(f"{folder}: metrics.csv holds no training rows")
    continues = _CONTINUES.search(text)
    train_steps = [int(float(r["step"])) for r in rows if r.get("step") not in (None, "")]
    start = min(train_steps) if continues else 0
    test_metrics = _final_test_metrics(folder)
    value = test_metrics.get(metric) if metric else None
    _check_stated_test_value(fields, value, run_md)
    own = resolved_config(experiment_config)["trainer"]
    schedule = schedule_steps(own, metrics.steps_per_epoch(steps, epochs))
    stated = _stated_steps(fields, title, run_md)
    _check_stated_steps(stated, steps, start, epochs, schedule, own, run_md)
    _, machine = _field(fields, "Machine", run_md)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    device = machine.split(", torch")[0].split(". ")[0]
    batch = batch_facts(config, 1 if "CPU" in device and "GPU" not in device else None)
    curves = metrics.curves_of(rows, metric)
    for log in sorted(folder.glob("test_every_*.log")):
        if metric == "test/acc" and parse_test_log(log):
            curves["test/acc"] = parse_test_log(log)
    command_key, command = _field(fields, "Command", run_md)
    metrics_files = [folder / "metrics.csv", folder / "test_metrics.csv"]
    source = {
        "kind": "import",
        "run_dir": folder.name,
        "metrics_sha256": file_sha256(*metrics_files),
        "run_md_sha256": file_sha256(run_md),
        "run_md_title": title,
        "run_md_steps": next((v for k, v in fields.items() if k.startswith("Steps")), title),
        "run_md_command_field": command_key,
        "config_file": config_path,
    }
    if continues:
        source["continues"] = continues.group(1)
        source["start_step"] = start
    return Record(
        experiment=experiment,
        seed=int(config["seed_everything"]),
        metric=metric,
        value=value,
        test_metrics=test_metrics,
        steps=steps,
        schedule_steps=schedule,
        wall_time_s=_wall_time(machine),
        device=device,
        threads=None,
        versions=_versions(machine),
        git_commit=full_commit(commit),
        git_dirty=None,  # RUN.md names the commit; local edits are not recorded
        config_sha256=config_hash(config, schedule, batch["global"]),
        config=normalized_config(config),
        batch=batch,
        command=_portable_or_none(config_path, fit_flags(command), experiment, schedule),
        overrides=fit_flags(command),
        curves=curves,
        source=source,
    ).as_dict()


def _config_and_commit(fields: dict[str, str], run_md: Path) -> tuple[str, str]:
    """(``configs/...yaml`` of this repository, the commit) that RUN.md's Config line names."""
    _, text = _field(fields, "Config", run_md)
    config = re.search(r"`(configs/[^`]+\.ya?ml)`", text)
    commit = re.search(r"commit ([0-9a-f]{7,40})\b", text)
    if config is None or commit is None:
        raise ValueError(f"{run_md}: the Config line must name `configs/...yaml` and a commit")
    if not (REPOSITORY / config.group(1)).is_file():
        raise ValueError(f"{run_md}: config {config.group(1)} is not in this repository")
    return config.group(1), commit.group(1)


def _final_test_metrics(folder: Path) -> dict[str, float]:
    """The ``test/*`` figures of the last row of ``folder/test_metrics.csv``."""
    rows = metrics.read_metric_rows(folder / "test_metrics.csv")
    if not rows:
        raise ValueError(f"{folder}: no test_metrics.csv with the final test metrics")
    return {
        key: float(value)
        for key, value in rows[-1].items()
        if key.startswith("test/") and value not in (None, "")
    }


def _versions(machine: str) -> dict[str, str | None]:
    """``{package: version}`` that a RUN.md machine line names (``torch 2.14.1``)."""
    versions: dict[str, str | None] = {"python": None}
    for name in PACKAGES:
        found = re.search(rf"\b{re.escape(name)} (\d+(?:\.\d+)+)", machine)
        versions[name] = found.group(1) if found else None
    return versions


def _wall_time(machine: str) -> float | None:
    """Seconds of ``Wall time X min`` or ``Fit X min, test Y s`` in a RUN.md machine line."""
    total = None
    for pattern, scale in ((r"(?:Wall time|Fit) ([\d.]+) min", 60.0), (r"test ([\d.]+) s", 1.0)):
        found = re.search(pattern, machine)
        if found:
            total = (total or 0.0) + float(found.group(1)) * scale
    return round(total, 1) if total is not None else None


def join_parts(first: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """One record of a run made in two parts: ``then`` continued ``first`` from the step
    where ``first`` stopped (its checkpoint). The joined record has ``then``'s final figures,
    steps and command, both parts' wall time, curves (each step once) and commits
    (``source["parts"]``: run folder, commit, steps, overrides of each); ``ValueError`` when
    the parts are not of one run (another experiment, seed or identity, or a gap)."""
    where = f"{then['source']['run_dir']} continues {first['source']['run_dir']}"
    for key in ("experiment", "seed", "config_sha256"):
        if first[key] != then[key]:
            raise ValueError(f"{where}, but their {key} differ: {first[key]!r}, {then[key]!r}")
    if then["source"]["start_step"] != first["steps"]:
        raise ValueError(
            f"{where}, but it starts at step {then['source']['start_step']} and the first part "
            f"stopped at step {first['steps']}"
        )
    curves = {}
    for name in sorted({*first["curves"], *then["curves"]}):
        points = {int(step): value for step, value in first["curves"].get(name, [])}
        points.update({int(step): value for step, value in then["curves"].get(name, [])})
        curves[name] = [[step, points[step]] for step in sorted(points)]
    parts = []
    for record in (first, then):
        start = record["source"].get("start_step", 0)
        parts += record["source"].get("parts") or [
            {
                "run_dir": record["source"]["run_dir"],
                "git_commit": record["git_commit"],
                "steps": [start, record["steps"]],
                "overrides": record["overrides"],
                "metrics_sha256": record["source"]["metrics_sha256"],
                "run_md_sha256": record["source"]["run_md_sha256"],
            }
        ]
    walls = [first["wall_time_s"], then["wall_time_s"]]
    source = {**then["source"], "parts": parts}
    source.pop("continues")
    source.pop("start_step")
    return {
        **then,
        "wall_time_s": None if None in walls else round(sum(walls), 1),
        "curves": curves,
        "source": source,
    }


def import_runs(folder: str | Path, results_dir: str | Path) -> list[Path]:
    """:func:`import_run` every subfolder of ``folder`` that holds a ``RUN.md``, join the
    parts of runs made in parts (:func:`join_parts`; a part never counts as a run of its own)
    and write the records into ``results_dir`` (none when any folder fails its checks);
    returns their paths. A record of a part that an earlier import wrote is removed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"the import folder must be an existing folder, got {str(folder)!r}")
    runs = sorted(path.parent for path in folder.glob("*/RUN.md"))
    if not runs:
        raise ValueError(f"the import folder {str(folder)!r} holds no <run>/RUN.md")
    records = {run.name: import_run(run) for run in runs}  # all checked before one is written
    joined = dict(records)
    for name, record in records.items():
        earlier = record["source"].get("continues")
        if earlier is None:
            continue
        if earlier not in records:
            raise ValueError(f"{name} continues {earlier}, which is not in {str(folder)!r}")
        first = joined.pop(earlier)
        joined[name] = join_parts(first, joined[name])
    parts = {earlier for r in records.values() if (earlier := r["source"].get("continues"))}
    for record in joined.values():
        if record["command"] is None:  # raises, naming the flag
            portable_command(
                record["source"]["config_file"],
                record["overrides"],
                record["experiment"],
                record["schedule_steps"],
            )
    results_dir = Path(results_dir)
    if results_dir.is_dir():
        for path, old in load_records(results_dir).items():
            if old["source"].get("kind") == "import" and old["source"]["run_dir"] in parts:
                path.unlink()
    return [write_record(record, results_dir) for record in joined.values()]
