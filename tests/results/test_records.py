"""Run records: the config hash, the checks, and the import of runs in the ../shared/runs format
(a fixture folder always; the real shared runs and the committed results/ when present)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from lit_divnorm.cli import main as cli_main
from lit_divnorm.experiments.configs import (
    batch_facts,
    config_hash,
    normalized_config,
    resolved_config,
)
from lit_divnorm.experiments.imports import import_run, import_runs
from lit_divnorm.experiments.paper import PAPER_TABLES
from lit_divnorm.experiments.records import RECORD_FIELDS, check_record, load_records
from tests.conftest import REPO_ROOT

SHARED_RUNS = REPO_ROOT.parent / "shared" / "runs"

CIFAR_RUN_MD = """# CIFAR-10, DN* (Table 3), seed 0: the first 200 of the schedule's 80,000 steps

- Config: `configs/cifar10/dn_star.yaml` at project commit f80f94f (unchanged).
- Command: `lit-divnorm fit --config configs/cifar10/dn_star.yaml --data.data_dir <CIFAR-10>
  --trainer.max_steps 200 --trainer.callbacks+=lit_divnorm.callbacks.PeriodicTest`, then
  `lit-divnorm test --config configs/cifar10/dn_star.yaml --ckpt_path last.ckpt`.
- Machine: 2-core CPU, float32, torch 2.14.1, lightning 2.6.6. Wall time 1.5 min (about 0.4 s/step).
- Steps: 200 of 80,000 (not a finished row).
- Test accuracy at step 200: {stated} (`test_metrics.csv`).
"""

PTB_RUN_MD = """# Penn Treebank, LSTM DN* (Table 4), seed 1234: the full 13-epoch schedule

- Config: `configs/ptb/lstm/dn_star.yaml` at project commit f80f94f (unchanged).
- Commands: `lit-divnorm fit --config configs/ptb/lstm/dn_star.yaml --data.data_dir ptb`,
  then `lit-divnorm test` with the same config and the final checkpoint.
- Machine: 2-core CPU, float32, torch 2.14.1, lightning 2.6.6. Fit 2.0 min, test 30 s.
- Steps: the whole schedule (13 epochs; lr halved every epoch from the 5th). A finished cell.
- Test perplexity: 102.78 (`test_metrics.csv`).
"""


def _config(seed: int, norm: object, max_steps: int = 200) -> dict:
    return {
        "seed_everything": seed,
        "trainer": {"max_steps": max_steps, "max_epochs": -1, "logger": {"save_dir": "runs"}},
        "model": {"class_path": "ClassificationTask", "init_args": {"norm": norm}},
        "data": {"class_path": "CIFAR10DataModule", "init_args": {"data_dir": "/x", "seed": None}},
    }


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_cifar_run(folder: Path, stated: str = "0.5000", test_acc: float = 0.5) -> Path:
    """A partial CIFAR run in the shared format: 200 steps (2 epochs of 100), a test log."""
    folder.mkdir(parents=True)
    (folder / "RUN.md").write_text(CIFAR_RUN_MD.format(stated=stated))
    (folder / "config.yaml").write_text(yaml.safe_dump(_config(0, {"name": "dn*"})))
    rows = [["", 0.001, 99, "", "", ""], [0, "", 99, 0.3, 1.8, ""], [1, "", 199, 0.4, 1.5, ""]]
    header = ["epoch", "lr-SGD", "step", "train/acc_step", "train/loss_step", "train/acc_epoch"]
    _write_csv(folder / "metrics.csv", header, rows)
    _write_csv(
        folder / "test_metrics.csv",
        ["epoch", "step", "test/acc", "test/loss"],
        [[0, 0, test_acc, 1.25]],
    )
    (folder / "test_every_100.log").write_text(
        "step 100 test_acc 0.4100 n 10000 loss 1.4 min 0.7\nstep 200 test_acc 0.5000 n 10000\n"
    )
    return folder


def write_ptb_run(folder: Path) -> Path:
    """A whole PTB run: 13 epochs of 10 steps, validation every epoch, the final test."""
    folder.mkdir(parents=True)
    (folder / "RUN.md").write_text(PTB_RUN_MD)
    config = _config(1234, {"name": "dn*"})
    config["trainer"].update(max_steps=-1, max_epochs=13)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    rows = []
    for epoch in range(13):
        last = epoch * 10 + 9
        rows += [[epoch, last, 5.0 - epoch * 0.1, ""], [epoch, last, "", 200.0 - epoch]]
    _write_csv(folder / "metrics.csv", ["epoch", "step", "train/loss_step", "val/ppl"], rows)
    _write_csv(
        folder / "test_metrics.csv",
        ["epoch", "step", "test/loss", "test/ppl"],
        [[0, 0, 92.6, 102.7849]],
    )
    return folder


def test_config_hash_ignores_where_and_how_a_run_ran_not_what_it_computes():
    base = _config(0, "bn")
    moved = _config(7, "bn")  # another seed
    moved["trainer"]["logger"] = {"save_dir": "elsewhere"}
    moved["data"]["init_args"]["data_dir"] = "/data/cifar10"
    assert config_hash(moved, 80000, 100) == config_hash(base, 80000, 100)
    assert config_hash(_config(0, "dn"), 80000, 100) != config_hash(base, 80000, 100)  # model
    # the identity holds the config's own schedule: a run stopped early (its max_steps) is a
    # partial run of the same experiment; another schedule is another experiment
    stopped = _config(0, "bn", max_steps=32000)
    assert config_hash(stopped, 80000, 100) == config_hash(base, 80000, 100)
    assert config_hash(base, 50000, 100) != config_hash(base, 80000, 100)
    assert config_hash(base, 80000, 400) != config_hash(base, 80000, 100)  # global batch
    # engineering switches, given or left at their defaults, are not part of it
    switched = _config(0, "bn")
    switched["model"]["init_args"]["compile"] = True
    switched["data"]["init_args"].update(device_resident=None, num_workers=8)
    assert config_hash(switched, 80000, 100) == config_hash(base, 80000, 100)
    sr = {"data": {"init_args": {"test_dir": "/a/b/Set14", "num_workers": 4}}}
    assert normalized_config(sr)["data"] == {"init_args": {"test_dir": "Set14"}}
    with pytest.raises(TypeError, match="config must be a dict"):
        normalized_config(["trainer"])


def test_batch_facts_give_the_global_batch_of_a_run():
    config = _config(0, "bn")
    config["data"]["init_args"]["batch_size"] = 25
    config["trainer"].update(devices=4, num_nodes=2, accumulate_grad_batches=2)
    facts = batch_facts(config)
    assert (facts["world_size"], facts["per_device"], facts["global"]) == (8, 25, 400)
    config["trainer"].update(devices="auto", num_nodes=1, accumulate_grad_batches=1)
    assert batch_facts(config)["global"] is None  # not known from the config alone
    assert batch_facts(config, world_size=2)["global"] == 50  # what the run reported


def test_records_are_checked_field_by_field(tmp_path):
    record = import_run(write_cifar_run(tmp_path / "run"))
    assert check_record(record, "r") is record
    for change, message in (
        ({"schema": 1}, "schema must be 2, got 1"),
        ({"seed": "0"}, "seed must be an int"),
    ):
        with pytest.raises(ValueError, match=message):
            check_record({**record, **change}, "r")
    incomplete = {k: v for k, v in record.items() if k != "steps"}
    with pytest.raises(ValueError, match=r"r: the record lacks the fields \['steps'\]"):
        check_record(incomplete, "r")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not JSON"):
        load_records(tmp_path / "results")


def test_import_reads_every_figure_from_the_run_files(tmp_path):
    shared = tmp_path / "shared_runs"
    write_cifar_run(shared / "cifar10_dn_star_seed0_200")
    write_ptb_run(shared / "ptb_lstm_dn_star_seed1234")
    paths = import_runs(shared, tmp_path / "results")
    records = {
        path.parent.relative_to(tmp_path / "results").as_posix(): json.loads(path.read_text())
        for path in paths
    }
    assert sorted(records) == ["cifar10/dn_star", "ptb/lstm/dn_star"]
    cifar = records["cifar10/dn_star"]
    assert set(cifar) == set(RECORD_FIELDS)
    assert (cifar["experiment"], cifar["seed"], cifar["metric"]) == (
        "cifar10/dn_star",
        0,
        "test/acc",
    )
    assert cifar["value"] == 0.5 and cifar["test_metrics"] == {"test/acc": 0.5, "test/loss": 1.25}
    # 200 steps run (train rows at steps 99 and 199) of the repository config's 80,000
    assert (cifar["steps"], cifar["schedule_steps"], cifar["complete"]) == (200, 80000, False)
    assert cifar["curves"] == {"test/acc": [[100, 0.41], [200, 0.5]]}  # the test log
    assert cifar["wall_time_s"] == 90.0 and cifar["device"] == "2-core CPU, float32"
    assert cifar["versions"]["torch"] == "2.14.1" and cifar["versions"]["lightning"] == "2.6.6"
    assert cifar["git_commit"].startswith("f80f94f")
    assert cifar["overrides"] == [
        "--data.data_dir <CIFAR-10>",
        "--trainer.max_steps 200",
        "--trainer.callbacks+=lit_divnorm.callbacks.PeriodicTest",
    ]
    # re-runnable: the data folder as a variable, the smoke schedule kept, then the test
    assert cifar["command"] == (
        "lit-divnorm fit --config configs/cifar10/dn_star.yaml --data.data_dir $CIFAR10_DIR "
        "--trainer.max_steps 200 --trainer.callbacks+=lit_divnorm.callbacks.PeriodicTest && "
        "lit-divnorm test --config configs/cifar10/dn_star.yaml --data.data_dir $CIFAR10_DIR "
        "--ckpt_path last"
    )
    assert (
        cifar["source"]["kind"] == "import"
        and cifar["source"]["run_dir"] == "cifar10_dn_star_seed0_200"
    )
    assert cifar["config_sha256"] == config_hash(_config(0, {"name": "dn*"}), 80000, None)
    ptb = records["ptb/lstm/dn_star"]
    assert (ptb["seed"], ptb["value"], ptb["metric"]) == (1234, 102.7849, "test/ppl")
    assert (ptb["steps"], ptb["schedule_steps"], ptb["complete"]) == (130, 130, True)  # 13 x 10
    assert ptb["curves"]["val/ppl"][:2] == [[9, 200.0], [19, 199.0]]
    assert ptb["wall_time_s"] == 150.0  # fit 2 min + test 30 s
    # importing again replaces the same files: one record per run
    assert import_runs(shared, tmp_path / "results") == paths
    assert len(list((tmp_path / "results").rglob("*.json"))) == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda run: write_cifar_run(run, stated="0.6000"), "states the test figure 0.6000"),
        (
            lambda run: (
                write_cifar_run(run),
                (run / "RUN.md").write_text(
                    CIFAR_RUN_MD.format(stated="0.5").replace("200 of", "300 of")
                ),
            ),
            "states 300 of 80000 steps, but metrics.csv shows 200",
        ),
        (
            lambda run: (write_cifar_run(run), (run / "test_metrics.csv").unlink()),
            "no test_metrics.csv",
        ),
    ],
)
def test_an_import_whose_files_disagree_is_refused_and_writes_nothing(tmp_path, change, message):
    shared = tmp_path / "shared_runs"
    write_ptb_run(shared / "a_good_run")
    change(shared / "b_bad_run")
    with pytest.raises(ValueError, match=message):
        import_runs(shared, tmp_path / "results")
    assert not (tmp_path / "results").exists()  # the good run is not written either


def _committed_records() -> dict[str, dict]:
    return {
        record["source"]["run_dir"]: record
        for record in load_records(REPO_ROOT / "results").values()
        if record["source"]["kind"] == "import"
    }


def test_shared_runs_import_to_the_committed_records(tmp_path):
    if not SHARED_RUNS.is_dir():
        pytest.skip(f"the shared runs folder {SHARED_RUNS} is absent")
    fresh = {
        json.loads(path.read_text())["source"]["run_dir"]: json.loads(path.read_text())
        for path in import_runs(SHARED_RUNS, tmp_path / "results")
    }
    for name, record in fresh.items():
        with (SHARED_RUNS / name / "test_metrics.csv").open(newline="") as handle:
            (row,) = list(csv.DictReader(handle))
        assert record["value"] == float(row[record["metric"]])
        assert "<" not in record["command"]  # every command can be re-run
    # the 80k folder continues the 32k one: one complete run in two parts, counted once
    assert "cifar10_dn_star_seed0_32k" not in fresh
    cifar = fresh["cifar10_dn_star_seed0_80k"]
    assert (cifar["steps"], cifar["schedule_steps"], cifar["complete"]) == (80000, 80000, True)
    parts = cifar["source"]["parts"]
    assert [part["run_dir"] for part in parts] == [
        "cifar10_dn_star_seed0_32k",
        "cifar10_dn_star_seed0_80k",
    ]
    assert [part["steps"] for part in parts] == [[0, 32000], [32000, 80000]]
    assert parts[0]["git_commit"].startswith("f80f94f")
    assert parts[1]["git_commit"].startswith("75490c3")
    steps = [step for step, _ in cifar["curves"]["test/acc"]]
    assert steps == list(range(2000, 80001, 2000))  # both parts' test points, each step once
    assert cifar["batch"]["global"] == 100
    baseline = fresh["cifar10_baseline_seed0"]
    assert (baseline["steps"], baseline["schedule_steps"], baseline["complete"]) == (
        50000,
        50000,
        True,
    )
    for name in ("ptb_lstm_baseline_seed1234", "ptb_lstm_dn_star_seed1234"):
        ptb = fresh[name]
        assert (ptb["steps"], ptb["schedule_steps"], ptb["complete"]) == (30212, 30212, True)
        assert ptb["batch"]["global"] == 20
    assert _committed_records() == fresh  # results/ holds exactly what the files say


def test_a_run_made_in_two_parts_imports_as_one_record(tmp_path):
    shared = tmp_path / "shared_runs"
    first = write_cifar_run(shared / "cifar10_dn_star_seed0_200")
    # an earlier import wrote the first part alone: the joined import replaces it
    import_runs(shared, tmp_path / "results")
    second = shared / "cifar10_dn_star_seed0_400"
    second.mkdir()
    (second / "RUN.md").write_text(
        "# CIFAR-10, DN* (Table 3), seed 0: steps 200 to 400\n\n"
        "This folder continues `../cifar10_dn_star_seed0_200` from its `last.ckpt`.\n\n"
        "- Config: `configs/cifar10/dn_star.yaml` at project commit 75490c3 (unchanged).\n"
        "- Command:\n\n"
        "      lit-divnorm fit --config configs/cifar10/dn_star.yaml --data.data_dir <CIFAR>\n"
        "          --trainer.max_steps 400 --ckpt_path <the first part's last.ckpt>\n\n"
        "  then `lit-divnorm test`.\n"
        "- Machine: 2-core CPU, float32, torch 2.14.1. Wall time 2.0 min.\n"
        "- Test accuracy:\n"
        "  - at step 300: 0.55;\n"
        "  - at step 400: 0.6000 (`test_metrics.csv`).\n"
    )
    (second / "config.yaml").write_text((first / "config.yaml").read_text())
    rows = [[2, "", 299, 0.5, 1.2, ""], [3, "", 399, 0.6, 1.1, ""], ["", "", 400, "", "", ""]]
    header = ["epoch", "lr-SGD", "step", "train/acc_step", "train/loss_step", "train/acc_epoch"]
    _write_csv(second / "metrics.csv", header, [["", "", 200, "", "", ""], *rows])
    _write_csv(second / "test_metrics.csv", ["epoch", "step", "test/acc"], [[0, 0, 0.6]])
    paths = import_runs(shared, tmp_path / "results")
    (record,) = [json.loads(path.read_text()) for path in paths]
    assert len(list((tmp_path / "results").rglob("*.json"))) == 1  # the part alone is gone
    assert (record["steps"], record["value"], record["wall_time_s"]) == (400, 0.6, 210.0)
    assert [part["steps"] for part in record["source"]["parts"]] == [[0, 200], [200, 400]]
    assert record["curves"]["test/acc"] == [[100, 0.41], [200, 0.5]]
    # a continuation that does not start where the first part stopped is refused
    _write_csv(second / "metrics.csv", header, rows)
    with pytest.raises(ValueError, match=r"states steps 200 to 400, but .* from step 299"):
        import_runs(shared, tmp_path / "other")


def test_committed_results_md_cells_are_the_committed_records():
    """Each RESULTS.md cell with runs is the numpy mean over seeds of the committed records
    (complete runs when any, else the partial ones, then without a diff; per seed the run
    with the most steps)."""
    markdown = (REPO_ROOT / "RESULTS.md").read_text()
    records = list(load_records(REPO_ROOT / "results").values())
    assert records, "results/ holds no record"
    cells: dict[str, list[dict]] = {}
    for record in records:
        cells.setdefault(record["experiment"], []).append(record)
    for experiment, found in cells.items():
        area, name = experiment.rsplit("/", 1)
        table = PAPER_TABLES["ptb" if area.startswith("ptb/") else "cifar"]
        used = [r for r in found if r["complete"]] or found
        per_seed = {}
        for record in sorted(used, key=lambda r: r["steps"]):
            per_seed[record["seed"]] = record["value"]
        mean = float(np.mean(list(per_seed.values())))
        digits = table["digits"]
        shown = f"{mean:.{digits}f}"
        if len(per_seed) > 1:
            shown += f" ± {float(np.std(list(per_seed.values()), ddof=1)):.{digits}f}"
        paper = table["values"][name][area]
        complete = any(r["complete"] for r in found)
        diff = f"{mean - paper:+.{digits}f}" if complete else ""
        row = f"| {table['rows'][name]} | {shown} | {len(per_seed)} | {paper:.{digits}f} | {diff} |"
        assert row in markdown, f"{experiment}: no row {row!r} in RESULTS.md"
        if not complete:
            assert f"{row} partial: " in markdown
    complete = sum(r["complete"] for r in records)
    assert f"{complete} complete, {len(records) - complete} partial, 0 failed" in markdown


def test_report_import_writes_records_then_the_markdown(tmp_path):
    shared = tmp_path / "shared_runs"
    write_cifar_run(shared / "cifar10_dn_star_seed0_200")
    out = tmp_path / "RESULTS.md"
    cli_main(
        [
            "report",
            "--import",
            str(shared),
            "--results",
            str(tmp_path / "results"),
            "--out",
            str(out),
            "--no-plots",
        ]
    )
    markdown = out.read_text()
    # a partial cell has no diff: 200 steps are not the paper's experiment
    assert "| DN* | 0.5000 | 1 | 0.8122 |  | partial: 200 of 80000 steps |" in markdown
    assert "| cifar10/dn_star | 0 | partial | test/acc 0.5 | 200 of 80000 |" in markdown


def test_every_config_keeps_its_identity_when_an_engineering_switch_is_added():
    """The identity of each repository config (resolved as a run resolves it) is unchanged by
    the engineering switches a task or datamodule may gain with a default (compile,
    device_resident, workers, ...), and changed by what changes the experiment: the lr."""
    root = REPO_ROOT / "configs"
    configs = [
        path
        for path in sorted(root.rglob("*.yaml"))
        if not any(part.startswith("_") for part in path.relative_to(root).parts)
        and path.relative_to(root).parts[0] != "trainer"
    ]
    assert len(configs) > 60
    switches = {"compile": False, "device_resident": None, "num_workers": 4, "pin_memory": True}
    for path in configs:
        config = resolved_config(path)
        facts = batch_facts(config)
        assert facts["world_size"] == 1 and facts["global"], path  # devices: 1 everywhere
        schedule = config["trainer"]["max_steps"]
        schedule = schedule if schedule and schedule > 0 else config["trainer"]["max_epochs"]
        identity = config_hash(config, schedule, facts["global"])
        switched = json.loads(json.dumps(config))
        for part in ("model", "data"):
            switched[part]["init_args"].update(switches)
        assert config_hash(switched, schedule, facts["global"]) == identity, path
        optimizer = switched["model"]["init_args"].get("optimizer") or {}
        if isinstance(optimizer, dict) and "lr" in (optimizer.get("init_args") or {}):
            optimizer["init_args"]["lr"] *= 2
            assert config_hash(switched, schedule, facts["global"]) != identity, path
