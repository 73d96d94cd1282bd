"""RESULTS.md from records alone: mean and sample std over seeds computed independently, the
seed count, partial runs only when no run finished its schedule, empty cells, the plots."""

from __future__ import annotations

import json
from hashlib import sha256

import numpy as np
import pytest
from PIL import Image

from lit_divnorm.cli import main as cli_main
from lit_divnorm.experiments.records import SCHEMA, write_record


def record(experiment, seed, value, steps=80000, schedule=80000, config="c0", run=None, **extra):
    """A record as the sweep writes it (test data: the numbers are the test's inputs)."""
    metric = "test/ppl" if experiment.startswith("ptb/") else "test/acc"
    return {
        "schema": SCHEMA,
        "experiment": experiment,
        "seed": seed,
        "metric": metric,
        "value": value,
        "test_metrics": {metric: value},
        "steps": steps,
        "schedule_steps": schedule,
        "complete": steps >= schedule,
        "wall_time_s": 60.0,
        "device": "cuda: NVIDIA H200",
        "threads": 4,
        "versions": {"torch": "2.14.1"},
        "git_commit": "0123456789abcdef" * 2 + "01234567",
        "git_dirty": False,
        "config_sha256": config,
        "config": {},
        "batch": extra.pop("batch", {"world_size": 1, "per_device": 100, "global": 100}),
        "command": "lit-divnorm fit ...",
        "overrides": [f"--seed_everything={seed}"],
        "curves": extra.pop("curves", {}),
        "source": {
            "kind": "sweep",
            "run_dir": f"runs/{experiment}/seed{seed}",
            "metrics_sha256": run
            or sha256(f"{experiment} {seed} {steps} {value}".encode()).hexdigest(),
        },
        **extra,
    }


def _rows(markdown, title, column):
    section = markdown.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    block = section.split(f"### {column}\n", 1)[1].split("\n### ", 1)[0]
    return {
        cells[0]: cells[1:]
        for line in block.splitlines()
        if line.startswith("| ") and not line.startswith("| Model")
        for cells in [[c.strip() for c in line.strip().strip("|").split("|")]]
    }


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "results"
    dn_star = [0.8101, 0.8143, 0.8090]
    for seed, value in enumerate(dn_star):
        write_record(record("cifar10/dn_star", seed, value), folder)
    # a partial run of seed 0 beside its complete one: the complete run is the cell
    write_record(record("cifar10/dn_star", 0, 0.7000, steps=32000), folder)
    # BN: seed 0 twice complete (the run with more steps counts), seed 1 only partial
    write_record(record("cifar10/bn", 0, 0.7800, steps=80000, schedule=80000), folder)
    write_record(record("cifar10/bn", 0, 0.7700, steps=70000, schedule=70000), folder)
    write_record(record("cifar10/bn", 1, 0.7600, steps=1000), folder)
    # LN: only partial runs, two seeds, from two different configs
    write_record(record("cifar10/ln", 0, 0.70, steps=30000, config="a"), folder)
    write_record(record("cifar10/ln", 1, 0.72, steps=32000, config="b"), folder)
    curve = {"test/ppl": [[1000, 180.0], [2000, 140.0], [3000, 120.0]]}
    write_record(record("ptb/lstm/dn_star", 1234, 102.785, 30212, 30212, curves=curve), folder)
    return folder


def test_cells_are_mean_and_sample_std_over_seeds_with_their_count(results, tmp_path):
    out = tmp_path / "RESULTS.md"
    cli_main(["report", "--results", str(results), "--out", str(out), "--no-plots"])
    markdown = out.read_text()
    cifar = _rows(markdown, "Table 3: CIFAR test accuracy", "CIFAR-10")
    values = np.array([0.8101, 0.8143, 0.8090], dtype=np.float64)
    mean, std = values.mean(), values.std(ddof=1)  # the sample standard deviation
    assert cifar["DN*"] == [f"{mean:.4f} ± {std:.4f}", "3", "0.8122", f"{mean - 0.8122:+.4f}", ""]
    assert cifar["BN"] == ["0.7800", "1", "0.7807", "-0.0007", ""]  # seed 1 only partial
    # LN: two configs are never averaged into one cell (the one with more steps is the cell);
    # partial runs carry no diff
    assert cifar["LN"][:4] == ["0.7200", "1", "0.7211", ""]
    assert cifar["LN"][4] == (
        "1 run(s) of another setting not averaged in (config a); partial: 32000 of 80000 steps"
    )
    for row in ("Baseline", "BN*", "LN*", "DN"):  # no run: nothing in the cell, 0 seeds
        assert cifar[row][:2] == ["", "0"] and cifar[row][3:] == ["", ""]
    assert "No runs yet: CIFAR-100." in markdown
    lstm = _rows(markdown, "Table 4: Penn Treebank test perplexity", "LSTM")
    assert lstm["DN*"] == ["102.785", "1", "102.238", "+0.547", ""]
    assert "No runs yet: tanh RNN, ReLU RNN." in markdown
    runs = markdown.split("## Runs", 1)[1]
    assert runs.count("| cifar10/dn_star |") == 4  # every record listed, the partial one too
    assert "| cifar10/dn_star | 0 | partial | test/acc 0.7 | 32000 of 80000 |" in runs


def test_default_paths_and_plots(results, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="the report's plots need matplotlib")
    monkeypatch.chdir(tmp_path)  # results/ here: lit-divnorm report writes RESULTS.md beside it
    report = cli_main(["report"])
    assert report.name == "RESULTS.md" and report.parent.resolve() == tmp_path.resolve()
    markdown = report.read_text()
    for name in ("diff_cifar.png", "diff_ptb.png", "curves_ptb_lstm.png"):
        path = results / "plots" / name
        assert f"![{path.stem}](results/plots/{name})" in markdown
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
            assert image.width >= 600 and colours is not None and len(colours) > 20
    # no CIFAR run logged a test curve, but each has its final test: a CIFAR curve plot
    assert (results / "plots" / "curves_cifar_cifar-10.png").is_file()


def test_the_difference_plot_is_centred_on_zero_with_the_seeds_spread(
    results, tmp_path, monkeypatch
):
    """The plot's numbers, read back from the figure the report draws (matplotlib objects)."""
    pytest.importorskip("matplotlib", reason="the report's plots need matplotlib")
    from lit_divnorm.experiments import plots
    from lit_divnorm.experiments.report import write_report

    drawn = {}
    real = plots.save_figure

    def keep(figure, path):
        drawn[path.name] = figure
        return real(figure, path)

    monkeypatch.setattr(plots, "save_figure", keep)
    write_report(results, (), tmp_path / "R.md", tmp_path / "plots")
    (axis,) = drawn["diff_cifar.png"].axes
    labels = [tick.get_text() for tick in axis.get_yticklabels()]
    assert labels == ["BN", "DN*"]  # complete rows with runs, in the paper's order (LN: partial)
    left, right = axis.get_xlim()
    assert left == pytest.approx(-right) and right < 0.05  # around 0, not bars from 0
    values = np.array([0.8101, 0.8143, 0.8090])
    bn, dn_star = axis.containers  # one errorbar per row, top to bottom
    marker, _, bars = dn_star.lines
    assert marker.get_xdata()[0] == pytest.approx(values.mean() - 0.8122)
    ((start, _), (end, _)) = bars[0].get_segments()[0]
    assert end - start == pytest.approx(2 * values.std(ddof=1))  # +- one std over seeds
    assert bn.lines[0].get_xdata()[0] == pytest.approx(0.7800 - 0.7807)
    assert not bn.has_xerr or not bn.lines[2]  # one seed: no spread to show


def test_a_report_with_nothing_to_read_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        cli_main(["report"])
    assert stop.value.code == 2
    assert "results_dir must be an existing folder, got 'results'" in capsys.readouterr().err
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "x.json").write_text(json.dumps({"schema": 2}))
    with pytest.raises(SystemExit):
        cli_main(["report"])
    assert "the record lacks the fields" in capsys.readouterr().err
    assert not (tmp_path / "RESULTS.md").exists()
