"""Which runs become table cells: ``fit`` then ``test`` fills one; a smoke run leaves results/
and RESULTS.md byte for byte; the sweep continues only folders it made; an empty folder of a
failed start is no run."""

from __future__ import annotations

import shutil

import pytest
import yaml

from lit_divnorm.cli import main as cli_main
from lit_divnorm.experiments.report import write_report
from lit_divnorm.runs import SWEEP_MARKER, TESTED_MARKER
from tests.conftest import REPO_ROOT
from tests.results.tiny_configs import write_tiny_sweep

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
]


def _dn_star_row(markdown: str) -> list[str]:
    row = next(line for line in markdown.splitlines() if line.startswith("| DN* |"))  # CIFAR-10
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def test_fit_then_test_fills_the_cell(tmp_path, monkeypatch):
    folder = write_tiny_sweep(tmp_path, {"dn_star": {"name": "dn*", "sigma": 0.5}})
    monkeypatch.chdir(tmp_path)  # the README's commands, run from a project folder
    config = str(folder / "dn_star.yaml")
    cli_main(["fit", "--config", config])
    tested = cli_main(["test", "--config", config, "--ckpt_path", "last"])
    accuracy = float(tested.trainer.callback_metrics["test/acc"])
    run_dir = tmp_path / "runs" / "cifar10" / "dn_star" / "version_0"
    assert (run_dir / TESTED_MARKER).is_file()
    # the empty folder of a start that failed before its first step is no run
    (tmp_path / "runs" / "cifar10" / "dn_star" / "version_1").mkdir()
    (tmp_path / "runs" / "cifar10" / "dn_star" / "version_1" / "metrics.csv").write_text("")
    markdown = write_report(None, [tmp_path / "runs"], tmp_path / "R.md", plots=False).read_text()
    cells = _dn_star_row(markdown)
    # 6 of the config's 6 steps, tested: a complete cell with its diff (paper: 0.8122)
    assert cells[1:5] == [f"{accuracy:.4f}", "1", "0.8122", f"{accuracy - 0.8122:+.4f}"]
    assert cells[5] == ""  # no "untested", no "unfinished" note
    assert "0 failed, 0 unfinished run(s)" in markdown


def test_a_smoke_run_leaves_results_and_results_md_byte_identical(tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(REPO_ROOT / "results", results, ignore=shutil.ignore_patterns("*.png"))
    out = tmp_path / "RESULTS.md"
    write_report(results, (), out, plots=False)
    before = {path: path.read_bytes() for path in [out, *results.rglob("*.json")]}
    folder = write_tiny_sweep(tmp_path, {"dn_star": {"name": "dn*", "sigma": 0.5}})
    runs = tmp_path / "runs"
    smoke = ["sweep", str(folder), "--runs-dir", str(runs), "--results-dir", str(results)]
    cli_main([*smoke, "--in-process", "--", "--trainer.max_steps=2"])  # cifar10/dn_star!
    said = capsys.readouterr().out
    assert "not recorded in" in said and "it ran 2 of the config's 6 steps" in said
    assert (runs / "cifar10" / "dn_star" / "version_0" / "record.json").is_file()
    write_report(results, (), out, plots=False)
    after = {path: path.read_bytes() for path in [out, *results.rglob("*.json")]}
    assert after == before
    # marked partial on purpose, the same finished run becomes a (partial) row
    cli_main([*smoke, "--in-process", "--partial", "--", "--trainer.max_steps=2"])
    assert len(list(results.rglob("*.json"))) == len(before)  # the 4 records and this one
    write_report(results, (), out, plots=False)
    listed = out.read_text().split("## Runs", 1)[1]
    assert "| cifar10/dn_star | 0 | partial |" in listed and "| 2 of 6 |" in listed


def test_the_sweep_continues_only_folders_it_made(tmp_path, monkeypatch, capsys):
    folder = write_tiny_sweep(tmp_path, {"bn": "bn"})
    monkeypatch.chdir(tmp_path)
    config = folder / "bn.yaml"
    cli_main(["fit", "--config", str(config), "--trainer.max_steps=3"])  # the user's own run
    users = tmp_path / "runs" / "cifar10" / "bn" / "version_0"
    assert (users / "checkpoints" / "last.ckpt").is_file() and not (users / SWEEP_MARKER).exists()
    capsys.readouterr()
    (planned,) = cli_main(["sweep", str(folder), "--dry-run", "--dry-run-steps", "0"])
    assert (planned.resume, planned.log_dir.name) == (False, "version_1")
    assert "would run cifar10/bn -> " in capsys.readouterr().out
    # a folder the sweep made, stopped with a checkpoint, is continued
    data = yaml.safe_load(config.read_text())
    assert data["trainer"]["max_steps"] == 6
    cli_main(["sweep", str(folder), "--in-process", "--", "--trainer.max_steps=3"])
    made = tmp_path / "runs" / "cifar10" / "bn" / "version_1"
    assert (made / SWEEP_MARKER).is_file()
    (made / "DONE").unlink()  # as if killed after its checkpoint
    (again,) = cli_main(["sweep", str(folder), "--dry-run", "--dry-run-steps", "0"])
    assert (again.resume, again.log_dir.resolve()) == (True, made)
