"""Decorrelation measures against direct computations, response capture, sigma history, CLI."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lit_divnorm.analysis import (
    first_norm_responses,
    mean_pairwise_correlation,
    mean_pairwise_mutual_information,
    mutual_information,
    sigma_history,
    units_matrix,
)
from lit_divnorm.checkpoint import load_checkpoint_safely
from lit_divnorm.cli import main as cli_main
from lit_divnorm.norm import build_norm
from tests.results.tiny_configs import write_tiny_sweep

FIXED = torch.tensor(
    [
        [[[1.0, 2.0], [0.0, 5.0]], [[2.0, 1.0], [3.0, 3.0]], [[0.5, -1.0], [4.0, 2.0]]],
        [[[3.0, -2.0], [1.0, 0.0]], [[1.0, 4.0], [2.0, -1.0]], [[2.5, 0.0], [-3.0, 1.0]]],
    ]
)  # (N=2, C=3, H=2, W=2)


def _direct_unit_samples(responses: torch.Tensor) -> list[list[float]]:
    """Channel c's samples: its value at every (n, h, w), by explicit loops."""
    n, c, h, w = responses.shape
    return [
        [float(responses[i, k, y, x]) for i in range(n) for y in range(h) for x in range(w)]
        for k in range(c)
    ]


def _pearson(a: list[float], b: list[float]) -> float:
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b))
    var_a = sum((x - mean_a) ** 2 for x in a)
    var_b = sum((y - mean_b) ** 2 for y in b)
    return cov / math.sqrt(var_a * var_b)


def test_mean_correlation_equals_a_direct_computation():
    units = _direct_unit_samples(FIXED)
    pairs = [(0, 1), (0, 2), (1, 2)]
    rhos = [_pearson(units[i], units[j]) for i, j in pairs]
    assert mean_pairwise_correlation(FIXED) == pytest.approx(np.mean(np.abs(rhos)), abs=1e-12)
    signed = mean_pairwise_correlation(FIXED.numpy(), absolute=False)
    assert signed == pytest.approx(np.mean(rhos), abs=1e-12)
    assert units_matrix(FIXED).shape == (8, 3)


def test_correlation_of_perfectly_dependent_units_and_dead_units():
    x = torch.randn(4, 1, 3, 3)
    responses = torch.cat([x, -2 * x + 1, torch.zeros_like(x)], dim=1)  # dead 3rd channel
    assert mean_pairwise_correlation(responses) == pytest.approx(1.0)
    assert mean_pairwise_correlation(responses, absolute=False) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="at least 2 units"):
        mean_pairwise_correlation(torch.zeros(2, 3, 2, 2))


def _histogram_mi(x: np.ndarray, y: np.ndarray, bins: int) -> float:
    """MI from numpy's own 2-D histogram on the same equal-width edges, by a double loop."""
    edges_x = np.linspace(x.min(), x.max(), bins + 1)
    edges_y = np.linspace(y.min(), y.max(), bins + 1)
    joint, _, _ = np.histogram2d(x, y, bins=[edges_x, edges_y])
    p = joint / joint.sum()
    total = 0.0
    for a in range(bins):
        for b in range(bins):
            if p[a, b] > 0:
                total += p[a, b] * math.log(p[a, b] / (p[a, :].sum() * p[:, b].sum()))
    return total


def test_mutual_information_matches_a_direct_histogram_loop():
    rng = np.random.default_rng(0)
    x = rng.normal(size=500)
    y = 0.6 * x + rng.standard_t(3, size=500)
    for bins in (2, 7, 20):
        assert mutual_information(x, y, bins) == pytest.approx(_histogram_mi(x, y, bins), abs=1e-12)


def test_mutual_information_of_known_gaussians():
    rng = np.random.default_rng(1)
    rho = 0.8
    x = rng.normal(size=200_000)
    y = rho * x + math.sqrt(1 - rho**2) * rng.normal(size=200_000)
    exact = -0.5 * math.log(1 - rho**2)  # 0.5108 nats
    assert mutual_information(x, y, bins=40) == pytest.approx(exact, abs=0.03)
    assert mutual_information(x, rng.normal(size=200_000), bins=40) < 0.01


def test_mean_pairwise_mi_averages_the_pairs():
    rng = np.random.default_rng(2)
    responses = rng.normal(size=(6, 4, 5, 5))
    responses[:, 1] += 2 * responses[:, 0]
    units = units_matrix(responses)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    expected = np.mean([_histogram_mi(units[:, i], units[:, j], 10) for i, j in pairs])
    assert mean_pairwise_mutual_information(responses, bins=10) == pytest.approx(expected)
    sampled = mean_pairwise_mutual_information(responses, bins=10, max_pairs=2)
    values = [_histogram_mi(units[:, i], units[:, j], 10) for i, j in pairs]
    assert any(abs(sampled - (a + b) / 2) < 1e-12 for a in values for b in values)


@pytest.mark.parametrize("norm", ["bn", "dn*", "none"])
def test_first_norm_responses_are_the_normalized_first_conv(norm):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    model = nn.Sequential(
        conv,
        build_norm(norm, 4, layer_window=3),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        build_norm("ln", 4),
        nn.ReLU(),
    )
    model.train()
    x = torch.randn(5, 3, 8, 8)
    model(x)  # move bn running stats
    captured = first_norm_responses(model, x)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        expected = model[1](conv(x))
    torch.testing.assert_close(captured, expected)
    assert (captured < 0).any()  # before the ReLU
    second = first_norm_responses(model, x, layer="4")
    with torch.no_grad():
        torch.testing.assert_close(second, model[4](model[3](model[2](expected))))
    with pytest.raises(ValueError, match="layer"):
        first_norm_responses(model, x, layer="nope")


def test_sigma_history_reads_the_sigma_columns(tmp_path):
    (tmp_path / "metrics.csv").write_text(
        "epoch,sigma/blocks.0.norm,step,train/loss_step\n0,0.5,0,2.3\n0,,0,\n0,0.48,1,2.2\n"
    )
    assert sigma_history(tmp_path) == {"blocks.0.norm": [(0, 0.5), (1, 0.48)]}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_analyze_cli_on_a_swept_checkpoint_and_report_table_10(tmp_path, capsys):
    norm = {"name": "dn", "sigma": 0.5, "learn_sigma": True}
    folder = write_tiny_sweep(tmp_path, {"dn": norm})
    runs = tmp_path / "runs"
    sweep = ["sweep", str(folder), "--runs-dir", str(runs), "--results-dir", "none"]
    sweep += ["--in-process", "--"]
    cli_main([*sweep, "--trainer.max_steps=4"])
    run_dir = runs / "cifar10" / "dn" / "version_0"
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    result = cli_main(["analyze", str(checkpoint), "--config", str(folder / "dn.yaml")])
    out = run_dir / "analysis"  # the default next to the run
    assert result["shape"] == [8, 32, 32, 32]  # one test batch of 8, first conv's 32 channels
    assert 0 <= result["mean_abs_correlation"] <= 1
    assert result["mean_mutual_information_nats"] > 0
    assert json.loads((out / "analysis.json").read_text()) == result
    for name in ("activations.png", "sigma.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width >= 400 and image.height >= 300

    history = sigma_history(run_dir)
    state = load_checkpoint_safely(checkpoint)["state_dict"]
    assert len(history) == 3 == len([k for k in state if "sigma" in k])  # one per conv layer
    assert all(len(series) == 4 for series in history.values())  # logged every step
    assert all(series[0][1] == pytest.approx(0.5, abs=1e-3) for series in history.values())

    report = cli_main(["report", str(runs), "--out", str(tmp_path / "report"), "--no-plots"])
    table = report.read_text().split("## Table 10", 1)[1]
    row = next(line for line in table.splitlines() if line.startswith("| cifar10/dn "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    corr, mi = result["mean_abs_correlation"], result["mean_mutual_information_nats"]
    assert cells == ["cifar10/dn", f"{corr:.4f}", "0.1958", f"{mi:.4f}", "0.8951"]

    # the same checkpoint with another model configuration: refused, naming the difference
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["analyze", str(checkpoint), "--config", str(folder / "dn.yaml"), "--",
                  "--model.init_args.norm=bn"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "CheckpointMismatchError" in err and "norm: checkpoint" in err


class _RunsCommand:
    """Unpickling this calls ``os.system(command)``: what a malicious checkpoint would hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_analyze_refuses_a_checkpoint_whose_pickle_would_run_a_command(
    tmp_path, capsys, monkeypatch
):
    folder = write_tiny_sweep(tmp_path, {"dn": "dn"})
    monkeypatch.chdir(tmp_path)
    control, marker = tmp_path / "control_ran", tmp_path / "payload_ran"
    torch.save({"x": _RunsCommand(f"touch {control}")}, tmp_path / "control.ckpt")
    torch.load(tmp_path / "control.ckpt", weights_only=False)  # an unsafe load runs it
    assert control.exists()
    evil = tmp_path / "evil.ckpt"
    payload = _RunsCommand(f"touch {marker}")
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": payload}, evil)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["analyze", str(evil), "--config", str(folder / "dn.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "evil.ckpt" in err and "will not run code" in err and "system" in err
    assert not marker.exists()  # the command never ran
    assert not (tmp_path / "analysis").exists()  # and nothing was written
