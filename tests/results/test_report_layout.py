"""Report layout on hand-written run folders: PTB / SR tables, statuses, named versions."""

from __future__ import annotations

import json

import pytest
import yaml

from lit_divnorm.experiments.report import write_report
from lit_divnorm.experiments.tables import collect_results
from lit_divnorm.runs import DONE_MARKER, FAILED_MARKER


def _run(runs, area, name, version, rows, *, done=True, failed=False, config=None, steps=9):
    """A run folder: ``metrics.csv`` from ``rows``, and a ``DONE`` summary whose test metrics
    are the last test/* values of ``rows`` and whose schedule is ``steps`` (so it is whole)."""
    log_dir = runs / area / name / f"version_{version}"
    log_dir.mkdir(parents=True)
    columns = sorted({key for row in rows for key in row} - {"step"})
    lines = [",".join(["step", *columns])]
    lines += [",".join([str(row["step"]), *(str(row.get(c, "")) for c in columns)]) for row in rows]
    (log_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    tests = {k: v for row in rows for k, v in row.items() if k.startswith("test/")}
    if done:
        summary = {"global_step": steps, "schedule_steps": steps, "test_metrics": tests}
        (log_dir / DONE_MARKER).write_text(json.dumps(summary))
    if failed:
        (log_dir / FAILED_MARKER).write_text("Traceback ...")
    if config is not None:
        (log_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return log_dir


def _rows(markdown, title, column):
    section = markdown.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    block = section.split(f"### {column}\n", 1)[1].split("\n### ", 1)[0]
    return {
        cells[0]: cells[1:]
        for line in block.splitlines()
        if line.startswith("| ") and not line.startswith("| Model")
        for cells in [[c.strip() for c in line.strip().strip("|").split("|")]]
    }


def test_ptb_and_sr_tables(tmp_path):
    pytest.importorskip("matplotlib", reason="the report's plots need matplotlib")
    runs = tmp_path / "runs"
    _run(
        runs,
        "ptb/lstm",
        "dn_star",
        0,
        [{"step": 5, "val/ppl": 130.0}, {"step": 9, "test/ppl": 100.0}],
    )
    # an older failed version and a newer finished one of the same seed: the finished one
    _run(runs, "ptb/lstm", "ln", 0, [{"step": 1, "test/ppl": 999.0}], done=False, failed=True)
    _run(runs, "ptb/lstm", "ln", 1, [{"step": 9, "test/ppl": 120.5}])
    running = [{"step": 3, "train/loss_step": 6.0}]
    _run(runs, "ptb/relu_rnn", "bn", 0, running, done=False, config={"trainer": {"max_steps": 40}})
    # a plain fit that ran its schedule (4 steps) and was never tested in its folder
    fitted = [{"step": 3, "train/loss_step": 5.0, "epoch": 0}]
    config = {"trainer": {"max_steps": -1, "max_epochs": 1}}
    _run(runs, "ptb/relu_rnn", "dn", 0, fitted, done=False, config=config)
    sr = {"data": {"init_args": {"val_dir": "Set5", "test_dir": "/data/sr/Set14", "scale": 3}}}
    metrics = {
        "test/psnr": 29.0,
        "test/ssim": 0.82,
        "test/psnr_bicubic": 27.5,
        "test/ssim_bicubic": 0.77,
    }
    _run(runs, "sr/x3", "dn_star", 0, [{"step": 7, **metrics}], config=sr)
    # validated on its own test set (allow_same_val_test): never beside the paper's figure
    chosen_on_test = {
        "data": {"init_args": {"val_dir": "BSD200", "test_dir": "BSD200", "scale": 4}}
    }
    _run(runs, "sr/x4", "dn_star", 0, [{"step": 7, **metrics}], config=chosen_on_test)
    _run(runs, "other", "thing", 0, [{"step": 2, "test/loss": 0.25}])
    # a named version (a SLURM job name) is a run too; a test_<N> folder of `test` is not
    named = _run(runs, "ptb/tanh_rnn", "dn", 0, [{"step": 9, "test/ppl": 125.0}])
    named.rename(named.with_name("job-4711"))
    _run(runs, "ptb/tanh_rnn", "dn", 0, [{"step": 1, "test/ppl": 1.0}], done=False).rename(
        runs / "ptb/tanh_rnn/dn/test_0"
    )
    found = sorted((r.experiment, r.status, r.log_dir.name) for r in collect_results(None, [runs]))
    assert found == [
        ("other/thing", "done", "version_0"),
        ("ptb/lstm/dn_star", "done", "version_0"),
        ("ptb/lstm/ln", "done", "version_1"),
        ("ptb/lstm/ln", "failed", "version_0"),
        ("ptb/relu_rnn/bn", "unfinished", "version_0"),
        ("ptb/relu_rnn/dn", "untested", "version_0"),
        ("ptb/tanh_rnn/dn", "done", "job-4711"),
        ("sr/x3/dn_star", "done", "version_0"),
        ("sr/x4/dn_star", "done", "version_0"),
    ]

    markdown = write_report(None, [runs], tmp_path / "out" / "report.md").read_text()
    title = "Table 4: Penn Treebank test perplexity"
    lstm = _rows(markdown, title, "LSTM")
    assert lstm["DN*"] == ["100.000", "1", "102.238", "-2.238", ""]
    assert lstm["LN"] == ["120.500", "1", "119.247", "+1.253", ""]  # its seed finished later
    assert lstm["Baseline"] == ["", "0", "115.720", "", ""]
    assert _rows(markdown, title, "tanh RNN")["DN"][:4] == ["125.000", "1", "132.143", "-7.143"]
    relu = _rows(markdown, title, "ReLU RNN")
    unfinished = "1 unfinished (4/40 steps)"  # a training row at step 3: 4 steps run
    assert relu["BN"] == ["", "0", "164.977", "", unfinished]
    assert relu["DN"] == ["", "0", "118.789", "", "1 untested (4/4 steps)"]  # 1 epoch of 4
    psnr_title = "Table 5: super-resolution PSNR (dB)"
    psnr = _rows(markdown, psnr_title, "Set14 x3")  # the column of test_dir
    assert psnr["DN*"] == ["29.00", "1", "29.34", "-0.34", ""]
    assert psnr["Bicubic"] == ["27.50", "1", "27.54", "-0.04", ""]
    assert psnr["A+"][0] == "not run (another method)" and psnr["SRCNN"][:2] == ["", "0"]
    assert "### BSD200 x4 (val = test)" in markdown  # no run chosen on its test set beside it
    no_runs = markdown.split(psnr_title)[1].split("No runs yet: ")[1].split(".\n")[0]
    assert no_runs.split(", ") == ["Set14 x4", "BSD200 x3", "BSD200 x4"]
    ssim = _rows(markdown, "Table 6: super-resolution SSIM", "Set14 x3")
    assert ssim["DN*"][:4] == ["0.8200", "1", "0.8219", "-0.0019"]
    assert "| other/thing | None | done | test/loss 0.25 |" in markdown
    # every table of the paper appears; one without runs says so
    table_3 = markdown.split("## Table 3: CIFAR test accuracy", 1)[1].split("\n## ", 1)[0]
    assert "No runs yet: CIFAR-10, CIFAR-100." in table_3 and "| Model |" not in table_3
    for name in ("diff_ptb.png", "diff_sr_psnr.png", "curves_ptb_lstm.png"):
        assert (tmp_path / "out" / name).stat().st_size > 5000
