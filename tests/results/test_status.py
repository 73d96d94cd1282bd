"""``lit-divnorm status``: each (config, seed) of a sweep as done, running, stopped, failed or
not started, with its step and schedule; every command is listed by ``lit-divnorm --help``;
``analyze`` names the tasks it supports."""

from __future__ import annotations

import json
import os
import shutil
import socket

import pytest

from lit_divnorm.analysis import analyze_checkpoint
from lit_divnorm.cli import TOOL_COMMANDS
from lit_divnorm.cli import main as cli_main
from lit_divnorm.runs import FAILED_MARKER, RUNNING_MARKER, SWEEP_MARKER
from lit_divnorm.stopping import write_stopped_marker
from tests.conftest import REPO_ROOT
from tests.results.tiny_configs import write_tiny_sweep

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
]


def test_status_names_each_run_of_a_sweep(tmp_path, capsys):
    folder = write_tiny_sweep(tmp_path, {"bn": "bn"})
    runs = tmp_path / "runs"
    sweep = ["sweep", str(folder), "--runs-dir", str(runs), "--results-dir", "none"]
    cli_main([*sweep, "--seeds", "0", "--in-process"])
    experiment = runs / "cifar10" / "bn"
    done = experiment / "seed0_version_0"
    stopped, failed, running = (experiment / f"seed{s}_version_0" for s in (1, 2, 3))
    shutil.copytree(done, stopped)
    (stopped / "DONE").unlink()
    write_stopped_marker(stopped, 15, 6)
    failed.mkdir()
    (failed / SWEEP_MARKER).write_text("{}")
    (failed / FAILED_MARKER).write_text("Traceback ...\nValueError: norm must be one of ...\n")
    running.mkdir()
    (running / SWEEP_MARKER).write_text("{}")
    here = {"pid": os.getpid(), "host": socket.gethostname()}
    (running / RUNNING_MARKER).write_text(json.dumps(here))
    (experiment / "seed5_version_0").mkdir()  # a folder the sweep did not make: ignored
    capsys.readouterr()
    statuses = cli_main(["status", str(folder), "--runs-dir", str(runs), "--seeds", *"012345"])
    states = {status.seed: (status.state, status.step, status.schedule) for status in statuses}
    assert states == {
        0: ("done", 6, 6),
        1: ("stopped", 6, 6),
        2: ("failed", 0, 6),
        3: ("running", 0, 6),
        4: ("not started", 0, 6),
        5: ("not started", 0, 6),
    }
    out = capsys.readouterr().out
    assert "ValueError: norm must be one of" in out and "by SIGTERM" in out
    assert "[status] 1 done, 1 failed, 2 not started, 1 running, 1 stopped" in out
    (running / RUNNING_MARKER).write_text(json.dumps({**here, "pid": 2**22 + 17}))  # dead
    (status,) = [
        s for s in cli_main(["status", str(folder), "--runs-dir", str(runs), "--seeds", "3"])
    ]
    assert (status.state, status.detail) == ("stopped", "killed")


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", *TOOL_COMMANDS):
        assert f"  {command}" in out, command


def test_analyze_names_the_tasks_it_supports():
    config = REPO_ROOT / "configs" / "ptb" / "lstm" / "dn_star.yaml"
    with pytest.raises(ValueError, match="analyze supports classification checkpoints"):
        analyze_checkpoint(None, config, ["--data.data_dir=/nowhere"])
