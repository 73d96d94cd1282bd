"""Decorrelation and sparsity of normalized responses (the paper's Table 10 and its figures).

Responses are the output of a model's first normalization slot (after normalization, before
the nonlinearity), captured with a forward hook on a batch of inputs. **Units** are channels
(``C`` of ``(N, C, H, W)``; hidden units for ``(N, C)``): every spatial position of every
image is one joint sample of the ``C`` channel responses, so a response tensor becomes a sample
matrix ``X`` of shape ``(N*H*W, C)`` (``(N*L, C)`` for ``(N, C, L)``).

* mean pairwise correlation: the Pearson correlation ``rho_ij`` of columns ``i, j`` of ``X``,
  averaged over all pairs ``i < j`` of absolute values ``|rho_ij|`` (by default; signed with
  ``absolute=False``). Units with zero variance (dead channels) are left out.
* mean pairwise mutual information, in nats: for each pair, the plug-in estimate from a 2-D
  histogram with ``bins`` equal-width bins spanning each unit's own [min, max]::

      I(i; j) = sum_ab p_ab log(p_ab / (p_a p_b)),     p_ab = count_ab / S

  averaged over pairs ``i < j`` (at most ``max_pairs`` random pairs when given).
* centred activations: ``X`` minus each unit's mean, for histograms (the L1 term's sparsity).
* learned sigma over training: the ``sigma/<module>`` columns of a run's ``metrics.csv``.

CLI: ``lit-divnorm analyze CKPT --config CONFIG [--out DIR] [--batches 1] [-- overrides]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lit_divnorm.norm.layers import DivisiveNorm
from lit_divnorm.norm.registry import Identity as NoNorm


def is_norm_slot(module: nn.Module) -> bool:
    """A module a norm registry built: any ``DivisiveNorm`` or the ``"none"`` placeholder."""
    return isinstance(module, (DivisiveNorm, NoNorm))


@torch.no_grad()
def first_norm_responses(model: nn.Module, inputs: Any, layer: str | None = None) -> Tensor:
    """The output of the first norm slot that runs in ``model(inputs)`` (eval mode).

    ``layer`` names a module (``model.named_modules()``) to capture instead. Returns a
    detached CPU tensor; the model's train/eval mode is restored.
    """
    modules = dict(model.named_modules())
    if layer is not None:
        if layer not in modules:
            raise ValueError(f"layer must name a module of the model, got {layer!r}")
        targets = {layer: modules[layer]}
    else:
        targets = {name: m for name, m in modules.items() if is_norm_slot(m)}
        if not targets:
            raise ValueError("model has no normalization slot; pass layer=<module name>")
    captured: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
        if not captured:
            captured.append(output.detach().cpu())

    handles = [m.register_forward_hook(hook) for m in targets.values()]
    was_training = model.training
    try:
        model.eval()
        model(inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if not captured:
        raise ValueError(f"no module of {sorted(targets)} ran in the forward pass")
    return captured[0]


def units_matrix(responses: Tensor | np.ndarray) -> np.ndarray:
    """``(N, C, *spatial)`` -> samples x units ``(N * prod(spatial), C)`` (float64)."""
    array = responses.detach().cpu().numpy() if isinstance(responses, Tensor) else responses
    array = np.asarray(array, dtype=np.float64)
    if array.ndim < 2:
        raise ValueError(f"responses must be (N, C, ...), got shape {array.shape}")
    return np.moveaxis(array, 1, -1).reshape(-1, array.shape[1])


def _pairs(num_units: int, max_pairs: int | None, seed: int) -> list[tuple[int, int]]:
    pairs = [(i, j) for i in range(num_units) for j in range(i + 1, num_units)]
    if max_pairs is not None and len(pairs) > max_pairs:
        chosen = np.random.default_rng(seed).choice(len(pairs), size=max_pairs, replace=False)
        pairs = [pairs[k] for k in sorted(chosen)]
    return pairs


def mean_pairwise_correlation(responses: Tensor | np.ndarray, absolute: bool = True) -> float:
    """Mean over unit pairs ``i < j`` of ``|rho_ij|`` (or ``rho_ij``); see the module doc."""
    x = units_matrix(responses)
    alive = x.std(axis=0) > 0
    x = x[:, alive]
    if x.shape[1] < 2:
        raise ValueError(f"responses need at least 2 units with variance, got {x.shape[1]}")
    rho = np.corrcoef(x, rowvar=False)
    upper = rho[np.triu_indices(x.shape[1], k=1)]
    return float(np.mean(np.abs(upper) if absolute else upper))


def _bin_indices(column: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bins over [min, max] (the max falls in the last bin), as np.histogram."""
    low, high = column.min(), column.max()
    if high == low:
        return np.zeros(column.shape, dtype=np.int64)
    index = np.floor((column - low) / (high - low) * bins).astype(np.int64)
    return np.clip(index, 0, bins - 1)


def mutual_information(x: np.ndarray, y: np.ndarray, bins: int = 20) -> float:
    """Plug-in histogram estimate of ``I(x; y)`` in nats (equal-width bins per variable)."""
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"x and y must be non-empty and of one size, got {x.size} and {y.size}")
    return _mi_from_indices(_bin_indices(x, bins), _bin_indices(y, bins), bins)


def _mi_from_indices(ix: np.ndarray, iy: np.ndarray, bins: int) -> float:
    joint = np.bincount(ix * bins + iy, minlength=bins * bins).reshape(bins, bins)
    p = joint / joint.sum()
    px, py = p.sum(axis=1, keepdims=True), p.sum(axis=0, keepdims=True)
    nonzero = p > 0
    return float(np.sum(p[nonzero] * np.log(p[nonzero] / (px @ py)[nonzero])))


def mean_pairwise_mutual_information(
    responses: Tensor | np.ndarray, bins: int = 20, max_pairs: int | None = None, seed: int = 0
) -> float:
    """Mean histogram MI (nats) over unit pairs ``i < j``; see the module docstring."""
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    x = units_matrix(responses)
    x = x[:, x.std(axis=0) > 0]
    if x.shape[1] < 2:
        raise ValueError(f"responses need at least 2 units with variance, got {x.shape[1]}")
    indices = np.stack([_bin_indices(x[:, k], bins) for k in range(x.shape[1])], axis=1)
    values = [
        _mi_from_indices(indices[:, i], indices[:, j], bins)
        for i, j in _pairs(x.shape[1], max_pairs, seed)
    ]
    return float(np.mean(values))


def centred_activations(responses: Tensor | np.ndarray) -> np.ndarray:
    """Samples x units with each unit's mean removed, flattened: ``(N * prod(spatial) * C,)``."""
    x = units_matrix(responses)
    return (x - x.mean(axis=0, keepdims=True)).ravel()


def sparsity_summary(values: np.ndarray, threshold: float = 0.1) -> dict[str, float]:
    """Share of centred activations with ``|v| < threshold * std``, and the excess kurtosis
    (heavy tails + a peak at 0 = sparse)."""
    values = np.asarray(values, dtype=np.float64)
    std = values.std()
    if std == 0:
        return {"near_zero_fraction": 1.0, "excess_kurtosis": 0.0}
    z = (values - values.mean()) / std
    return {
        "near_zero_fraction": float(np.mean(np.abs(z) < threshold)),
        "excess_kurtosis": float(np.mean(z**4) - 3.0),
    }


def analyze_responses(
    responses: Tensor | np.ndarray, bins: int = 20, max_pairs: int | None = None
) -> dict:
    """Correlation, MI and sparsity of one response tensor, as a JSON-ready dict."""
    return {
        "shape": list(responses.shape),
        "mean_abs_correlation": mean_pairwise_correlation(responses),
        "mean_mutual_information_nats": mean_pairwise_mutual_information(
            responses, bins=bins, max_pairs=max_pairs
        ),
        **sparsity_summary(centred_activations(responses)),
    }


def sigma_history(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{module name: [(step, sigma), ...]}`` from the ``sigma/<module>`` columns of
    ``run_dir/metrics.csv`` (tasks log every learned sigma each training step)."""
    from lit_divnorm.experiments.metrics import read_metrics_csv

    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise ValueError(f"run_dir must hold a metrics.csv, got {str(run_dir)!r}")
    metrics = read_metrics_csv(path)
    return {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("sigma/")}


def plot_activation_histograms(
    activations: dict[str, np.ndarray], path: str | Path, bins: int = 100
) -> Path:
    """Histograms (log counts) of centred activations, one line per model, on one chart."""
    from lit_divnorm.experiments.plots import _pyplot, save_figure

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, values in activations.items():
        z = np.asarray(values) / (np.std(values) or 1.0)
        counts, edges = np.histogram(z, bins=bins, range=(-6, 6))
        shown = np.where(counts > 0, counts, np.nan)  # empty bins: no line on a log axis
        axis.step(edges[:-1], shown, where="post", label=name)
    axis.set_yscale("log")
    axis.set_xlabel("centred response / std")
    axis.set_ylabel("count")
    axis.set_title("First normalized layer: centred activations")
    axis.legend(fontsize="small")
    return save_figure(figure, path)


def plot_sigma_history(history: dict[str, list[tuple[int, float]]], path: str | Path) -> Path:
    """Learned sigma of every layer over training steps."""
    from lit_divnorm.experiments.plots import _pyplot, save_figure

    if not history:
        raise ValueError("history is empty: the run logged no sigma/<module> metric")
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, series in sorted(history.items()):
        steps, values = zip(*series)
        axis.plot(steps, values, label=name)
    axis.set_xlabel("training step")
    axis.set_ylabel("sigma")
    axis.set_title("Learned sigma per layer")
    axis.legend(fontsize="small")
    return save_figure(figure, path)


def load_task(config: str | Path, checkpoint: str | Path | None, overrides: list[str] = ()):
    """(task, datamodule) built from a LightningCLI ``config``, with ``checkpoint``'s weights.

    The checkpoint is read weights-only first (:func:`load_checkpoint_safely`: a file holding
    anything but tensors and plain containers is refused before anything is built or run),
    then compared with the config's model (:func:`check_compatible`: a checkpoint of another
    configuration is refused naming the differences) before its weights are loaded.
    """
    from lit_divnorm.checkpoint import check_compatible, load_checkpoint_safely
    from lit_divnorm.cli import run_cli

    state = None if checkpoint is None else load_checkpoint_safely(checkpoint)

    cli = run_cli(["--config", str(config), "--trainer.logger=false", *overrides], run=False)
    if state is not None:
        if "state_dict" not in state:
            raise ValueError(f"checkpoint {str(checkpoint)!r} holds no 'state_dict'")
        model = cli.model
        check_compatible(state, model.hparams, model.state_dict(), type(model).__name__)
        model.load_state_dict(state["state_dict"])
    return cli.model, cli.datamodule


def analyze_checkpoint(
    checkpoint: str | Path | None,
    config: str | Path,
    overrides: list[str] = (),
    *,
    batches: int = 1,
    bins: int = 20,
    layer: str | None = None,
    out: str | Path | None = None,
) -> dict:
    """Analysis of the first norm slot of a trained task on ``batches`` test batches.

    With ``out``: writes ``analysis.json``, ``activations.png`` and, when the checkpoint sits
    in a sweep run folder (``<run>/checkpoints/x.ckpt``) that logged sigmas, ``sigma.png``.
    ``lit-divnorm report`` shows ``<run>/analysis/analysis.json`` beside the paper's Table 10.
    """
    task, datamodule = load_task(config, checkpoint, overrides)
    from lit_divnorm.tasks.classification import ClassificationTask

    if not isinstance(task, ClassificationTask):
        raise ValueError(
            f"analyze supports classification checkpoints (ClassificationTask: the CIFAR "
            f"configs, the paper's Table 10), got a {type(task).__name__} from config "
            f"{str(config)!r}: the decorrelation analysis reads the first norm of an image "
            "model's feature maps"
        )
    datamodule.setup("test")
    collected = []
    for index, batch in enumerate(datamodule.test_dataloader()):
        if index >= batches:
            break
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        collected.append(first_norm_responses(task.model, inputs, layer))
    if not collected:
        raise ValueError("the test dataloader yielded no batch")
    responses = torch.cat(collected)
    result = {
        "checkpoint": str(checkpoint),
        "config": str(config),
        **analyze_responses(responses, bins),
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        name = Path(config).stem
        plot_activation_histograms({name: centred_activations(responses)}, out / "activations.png")
        run_dir = Path(checkpoint).parent.parent if checkpoint else None
        if run_dir is not None and (run_dir / "metrics.csv").is_file():
            history = sigma_history(run_dir)
            if history:
                plot_sigma_history(history, out / "sigma.png")
        (out / "analysis.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> dict:
    from lit_divnorm.experiments.sweep import split_overrides

    own, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(
        prog="lit-divnorm analyze",
        description="Correlation / MI / sparsity of the first normalized layer of a checkpoint.",
        epilog="Config overrides (e.g. --data.data_dir=...) follow '--'.",
    )
    parser.add_argument("checkpoint", help="a .ckpt of the task ('none': untrained weights)")
    parser.add_argument("--config", required=True, help="the run's LightningCLI config")
    parser.add_argument("--batches", type=int, default=1, help="test batches to use (1)")
    parser.add_argument("--bins", type=int, default=20, help="histogram bins per unit (20)")
    parser.add_argument("--layer", help="module name to analyse (default: first norm slot)")
    parser.add_argument(
        "--out",
        help="folder for analysis.json and plots (default: <run>/analysis when the checkpoint "
        "is in a sweep run folder, else ./analysis)",
    )
    options = parser.parse_args(own)
    checkpoint = None if options.checkpoint == "none" else options.checkpoint
    out = options.out
    if out is None:
        run_dir = Path(checkpoint).resolve().parent.parent if checkpoint else None
        in_run = run_dir is not None and (run_dir / "metrics.csv").is_file()
        out = run_dir / "analysis" if in_run else Path("analysis")
    result = analyze_checkpoint(
        checkpoint,
        options.config,
        overrides,
        batches=options.batches,
        bins=options.bins,
        layer=options.layer,
        out=out,
    )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
