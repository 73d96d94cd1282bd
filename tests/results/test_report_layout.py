"""Report layout on hand-written run folders: PTB / SR tables, statuses, other runs."""

from __future__ import annotations

import json

import yaml

from lit_divnorm.report import collect_runs, write_report
from lit_divnorm.sweep import DONE_MARKER, FAILED_MARKER


def _run(runs, area, name, version, rows, *, done=True, failed=False, config=None):
    log_dir = runs / area / name / f"version_{version}"
    log_dir.mkdir(parents=True)
    columns = sorted({key for row in rows for key in row} - {"step"})
    lines = [",".join(["step", *columns])]
    lines += [",".join([str(row["step"]), *(str(row.get(c, "")) for c in columns)]) for row in rows]
    (log_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    if done:
        (log_dir / DONE_MARKER).write_text(json.dumps({}))
    if failed:
        (log_dir / FAILED_MARKER).write_text("Traceback ...")
    if config is not None:
        (log_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return log_dir


def _rows(markdown, title):
    section = markdown.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    return {
        cells[0]: cells[1:]
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith("| Model")
        for cells in [[c.strip() for c in line.strip().strip("|").split("|")]]
    }


def test_ptb_and_sr_tables(tmp_path):
    runs = tmp_path / "runs"
    _run(
        runs,
        "ptb/lstm",
        "dn_star",
        0,
        [{"step": 5, "val/ppl": 130.0}, {"step": 9, "test/ppl": 100.0}],
    )
    # an older failed version and a newer finished one: the finished one is read
    _run(runs, "ptb/lstm", "ln", 0, [{"step": 1, "test/ppl": 999.0}], done=False, failed=True)
    _run(runs, "ptb/lstm", "ln", 1, [{"step": 9, "test/ppl": 120.5}])
    _run(runs, "ptb/relu_rnn", "bn", 0, [{"step": 3, "val/ppl": 500.0}], done=False)  # running
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
    _run(runs, "other", "thing", 0, [{"step": 2, "val/loss": 0.25}])
    # a named version (a SLURM job name) is a run too; a test_<N> folder of `test` is not
    named = _run(runs, "ptb/tanh_rnn", "dn", 0, [{"step": 9, "test/ppl": 125.0}])
    named.rename(named.with_name("job-4711"))
    _run(runs, "ptb/tanh_rnn", "dn", 0, [{"step": 1, "test/ppl": 1.0}], done=False).rename(
        runs / "ptb/tanh_rnn/dn/test_0"
    )
    found = {(r.area, r.name): (r.status, r.log_dir.name) for r in collect_runs(runs)}
    assert found == {
        ("ptb/lstm", "dn_star"): ("done", "version_0"),
        ("ptb/lstm", "ln"): ("done", "version_1"),
        ("ptb/relu_rnn", "bn"): ("unfinished", "version_0"),
        ("sr/x3", "dn_star"): ("done", "version_0"),
        ("sr/x4", "dn_star"): ("done", "version_0"),
        ("other", "thing"): ("done", "version_0"),
        ("ptb/tanh_rnn", "dn"): ("done", "job-4711"),
    }

    markdown = write_report(runs, tmp_path / "out").read_text()
    ptb = _rows(markdown, "Table 4: Penn Treebank test perplexity")
    assert ptb["DN*"][:3] == ["100.000", "102.238", "-2.238"]
    assert ptb["LN"][:3] == ["120.500", "119.247", "+1.253"]
    assert ptb["DN"][3:6] == ["125.000", "132.143", "-7.143"]  # tanh RNN, the named version
    assert ptb["BN"][6] == "unfinished" and ptb["BN"][7] == "164.977"
    assert ptb["Baseline"][0] == "missing"
    psnr = _rows(markdown, "Table 5: super-resolution PSNR (dB)")
    assert psnr["DN*"][:3] == ["29.00", "29.34", "-0.34"]  # column "Set14 x3": test_dir
    assert psnr["DN*"][9:12] == ["missing", "26.96", "—"]  # BSD200 x4: no run chosen on val
    assert "BSD200 x4 (val = test) ours" in markdown
    assert psnr["Bicubic"][:3] == ["27.50", "27.54", "-0.04"]
    assert psnr["A+"][0] == "not run" and psnr["SRCNN"][0] == "missing"
    ssim = _rows(markdown, "Table 6: super-resolution SSIM")
    assert ssim["DN*"][:3] == ["0.8200", "0.8219", "-0.0019"]
    assert "| other/thing | done | val/loss 0.25 |" in markdown
    assert "Table 3" not in markdown
    for name in ("bars_ptb.png", "bars_sr_psnr.png", "curves_ptb_lstm.png", "curves_other.png"):
        assert (tmp_path / "out" / name).stat().st_size > 5000
