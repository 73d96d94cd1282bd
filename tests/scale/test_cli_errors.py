"""Every CLI mistake ends with one paragraph on stderr and exit code 2, not a traceback.

Each case drives ``lit_divnorm.cli.main`` in-process (as the ``lit-divnorm`` script does) on a
tiny CIFAR-10 fixture and checks the exit code, that the message is one line starting with
``lit-divnorm: error:``, and that it names what was wrong. One case runs the real entry point
in a subprocess.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_divnorm.cli import main
from tests.cifar.fixtures import write_cifar10
from tests.conftest import REPO_ROOT

pytestmark = [
    pytest.mark.filterwarnings("ignore:CIFAR-10. training on:UserWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:lightning.*"),
]


class RunsCode:
    """Unpickling this creates a folder: what a malicious checkpoint could do instead."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (os.mkdir, (self.target,))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_errors")
    data = write_cifar10(tmp / "data", batches=(1,), n=16)
    (tmp / "empty").mkdir()
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 1,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp / "run"),
            "callbacks": [
                {
                    "class_path": "lit_divnorm.callbacks.ResumeCheckpoint",
                    "init_args": {"dirpath": str(tmp / "ckpt")},
                }
            ],
        },
        "data": {
            "class_path": "datamodules.cifar.CIFAR10DataModule",
            "init_args": {"data_dir": str(data), "batch_size": 8, "download": False},
        },
        "model": {
            "class_path": "lit_divnorm.tasks.classification.ClassificationTask",
            "init_args": {"arch": "small_cnn", "norm": "dn*"},
        },
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    bad_key = tmp / "bad_key.yaml"
    bad_key.write_text(yaml.safe_dump({**config, "trainer": {"max_epochz": 3}}))
    main(["fit", "--config", str(path)])  # a real checkpoint of the dn* model
    checkpoint = tmp / "ckpt" / "last.ckpt"
    evil = tmp / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCode(tmp / "pwned")}, evil)
    truncated = tmp / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[:5000])
    return {
        "tmp": tmp,
        "config": path,
        "bad_key": bad_key,
        "ckpt": checkpoint,
        "evil": evil,
        "truncated": truncated,
    }


# (id, arguments after "fit --config <config>", substrings the message must hold)
CASES = [
    ("unknown norm", ["--model.init_args.norm", "dnx"], ["unknown norm 'dnx'", "dn*, dnms"]),
    (
        "window list too short",
        ["--model.init_args.layer_window", "[5, 3]"],
        ["layer_window needs 3 entries", "[5, 3]"],
    ),
    ("unknown model key", ["--model.init_args.nrom", "dn*"], ["'nrom' is not accepted"]),
    ("unknown trainer flag", ["--trainer.max_epochz", "3"], ["--trainer.max_epochz"]),
    ("unknown norm override", ["--model.init_args.norm", "{name: dn*, sigmaa: 1}"], ["sigmaa"]),
    ("negative sigma", ["--model.init_args.norm", "{name: dn*, sigma: -1}"], ["sigma", "-1"]),
    ("unknown architecture", ["--model.init_args.arch", "vgg"], ["arch", "'vgg'", "small_cnn"]),
    ("unknown model class", ["--model.class_path", "lit_divnorm.tasks.Nope"], ["Nope"]),
    ("batch size not an int", ["--data.init_args.batch_size", "abc"], ["batch_size", "abc"]),
    ("batch size zero", ["--data.init_args.batch_size", "0"], ["batch_size", ">= 1", "0"]),
    (
        "bad preprocessing",
        ["--data.init_args.preprocessing", "zca"],
        ["preprocessing", "zca"],
    ),
    (
        "data_dir does not exist",
        ["--data.init_args.data_dir", "<tmp>/nowhere"],
        ["FileNotFoundError", "nowhere/cifar-10-batches-py", "data_batch_1"],
    ),
    (
        "data_dir lacks the files",
        ["--data.init_args.data_dir", "<tmp>/empty"],
        ["FileNotFoundError", "empty/cifar-10-batches-py", "test_batch"],
    ),
    ("checkpoint does not exist", ["--ckpt_path", "<tmp>/none.ckpt"], ["none.ckpt", "not exist"]),
    (
        "checkpoint of another norm",
        ["--ckpt_path", "<ckpt>", "--model.init_args.norm", "bn"],
        ["different configuration", "norm: checkpoint 'dn*', this run 'bn'"],
    ),
    (
        "last checkpoint of another norm",
        ["--ckpt_path", "last", "--model.init_args.norm", "bn"],
        ["different configuration", "norm: checkpoint 'dn*', this run 'bn'", "running_mean"],
    ),
    (
        "checkpoint that would run code",
        ["--ckpt_path", "<evil>"],
        ["evil.ckpt", "weights-only", "will not run code"],
    ),
    ("truncated checkpoint", ["--ckpt_path", "<truncated>"], ["truncated.ckpt", "not a readable"]),
]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def _check_one_paragraph(err: str, expected: list[str]) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("lit-divnorm: error:")]
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(("argv", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_mistake_gives_one_paragraph_and_exit_code_2(setup, capsys, argv, expected):
    names = {k: str(v) for k, v in setup.items()}
    for key, value in names.items():
        argv = [a.replace(f"<{key}>", value) for a in argv]
    code, err = _run(["fit", "--config", names["config"], *argv], capsys)
    assert code == 2
    _check_one_paragraph(err, expected)
    assert not (setup["tmp"] / "pwned").exists()  # nothing in a checkpoint was executed


def test_unknown_key_in_a_config_file(setup, capsys):
    code, err = _run(["fit", "--config", str(setup["bad_key"])], capsys)
    assert code == 2
    _check_one_paragraph(err, ["max_epochz"])


def test_missing_config_file_and_unknown_subcommand(setup, capsys):
    code, err = _run(["fit", "--config", str(setup["tmp"] / "nope.yaml")], capsys)
    assert code == 2
    _check_one_paragraph(err, ["nope.yaml", "does not exist"])
    code, err = _run(["fitt"], capsys)
    assert code == 2
    _check_one_paragraph(err, ["invalid choice: 'fitt'", "'fit'"])


def test_weights_only_refusal_is_not_a_pickle_of_ours():
    """The evil fixture really would run code if loaded without weights_only (control)."""
    import io

    buffer = io.BytesIO()
    pickle.dump(RunsCode(Path("/nonexistent/dir/x")), buffer)
    with pytest.raises(FileNotFoundError):
        pickle.loads(buffer.getvalue())  # os.mkdir was called


def test_console_script_in_a_subprocess(setup):
    """The real entry point (a new interpreter): short stderr and exit code 2."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    for args, expected in ((["--model.init_args.norm", "dnx"], "unknown norm 'dnx'"),):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "lit_divnorm.cli",
                "fit",
                "--config",
                str(setup["config"]),
                *args,
            ],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2
        _check_one_paragraph(result.stderr, [expected])
        assert len(result.stderr.splitlines()) <= 5, result.stderr
