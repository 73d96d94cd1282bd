"""The paper's published numbers (Ren et al., ICLR 2017), copied from PAPER.md section 3.

The single place these figures live; :mod:`lit_divnorm.experiments.report` prints them beside
ours. Each table is typed as the paper prints it, a row per line (:func:`_numbers` reads it), in
a Python module (not a YAML/JSON file) so it ships with the package without package-data rules.

Keys:
    rows: ``{config stem: row label}``; a sweep's run of ``configs/<area>/<stem>.yaml`` fills
        the row ``<stem>``. Rows listed in ``not_ours`` are other papers' methods we do not run.
    columns: ``{column key: column label}``; a run's column key is its area (the config's
        folder under ``configs/``, e.g. ``cifar10``, ``ptb/lstm``); for super-resolution it is
        ``"<eval set> x<scale>"`` read from the run's saved config (the paper's sets are Set14
        and BSD200; ours default to Set5).
    areas: which runs belong to the table (an area equal to an entry, or below an entry that
        ends with ``/``).
    metric: the logged metric compared (``test/acc`` ...); ``row_metrics`` overrides it for a
        row (the bicubic row reads the bicubic baseline every SR run logs beside the model).
    values: ``{row: {column: number}}``.
"""

from __future__ import annotations

from typing import Any

_CIFAR_ROWS = {
    "baseline": "Baseline",
    "baseline_wd_dropout": "Baseline +WD +Dropout",
    "baseline_l1": "Baseline +L1",
    "bn": "BN",
    "bn_l1": "BN +L1",
    "bn_s": "BN-s",
    "bn_star": "BN*",
    "ln": "LN",
    "ln_l1": "LN +L1",
    "ln_s": "LN-s",
    "ln_star": "LN*",
    "dn": "DN",
    "dn_star": "DN*",
}


_PTB_ROWS = {key: label for key, label in _CIFAR_ROWS.items() if key != "baseline_wd_dropout"}


_SR_ROWS = {"bicubic": "Bicubic", "a_plus": "A+", "baseline": "SRCNN", "bn": "BN", "dn_star": "DN*"}


_SR_COLUMNS = ("Set14 x3", "Set14 x4", "BSD200 x3", "BSD200 x4")


def _numbers(table: str) -> dict[str, tuple[float, ...]]:
    """``{row: (numbers...)}`` of a table typed one row per line: its key, then its numbers."""
    rows = {}
    for line in table.strip().splitlines():
        key, *numbers = line.split()
        rows[key] = tuple(float(number) for number in numbers)
    return rows


# Table 3: test accuracy, CIFAR-10 then CIFAR-100.
_CIFAR_VALUES = _numbers("""
    baseline             0.7565  0.4409
    baseline_wd_dropout  0.7795  0.4179
    baseline_l1          0.7839  0.4517
    bn                   0.7807  0.4814
    bn_l1                0.8067  0.5100
    bn_s                 0.8017  0.5005
    bn_star              0.8179  0.5156
    ln                   0.7211  0.4249
    ln_l1                0.7994  0.4990
    ln_s                 0.8083  0.4863
    ln_star              0.8091  0.4957
    dn                   0.8058  0.4892
    dn_star              0.8122  0.5066
""")

# Table 4: test perplexity, LSTM, tanh RNN, ReLU RNN.
_PTB_VALUES = _numbers("""
    baseline     115.720  149.357  147.630
    baseline_l1  111.885  143.965  148.572
    bn           123.245  148.052  164.977
    bn_l1        123.736  152.777  166.658
    bn_s         123.243  131.719  139.159
    bn_star      116.920  129.155  138.947
    ln           119.247  154.324  149.128
    ln_l1        116.964  152.100  147.937
    ln_s         102.492  133.812  118.786
    ln_star      101.725  129.823  116.609
    dn           103.714  132.143  118.789
    dn_star      102.238  123.652  117.868
""")

# Tables 5 and 6: (PSNR, SSIM) per column of _SR_COLUMNS, in that order.
_SR_VALUES = _numbers("""
    bicubic   27.54 0.7733  26.01 0.7018  27.19 0.7636  25.92 0.6952
    a_plus    29.13 0.8188  27.32 0.7491  27.05 0.7945  25.51 0.7171
    baseline  29.35 0.8212  27.53 0.7512  28.42 0.8100  26.87 0.7378
    bn        22.31 0.7530  21.40 0.6851  21.89 0.7553  21.53 0.6741
    dn_star   29.34 0.8219  27.64 0.7562  28.44 0.8110  26.96 0.7428
""")


def _columns(
    values: dict[str, tuple[float, ...]], columns: tuple[str, ...], every: int = 1, offset: int = 0
) -> dict[str, dict[str, float]]:
    """``{row: {column: number}}``: the numbers ``offset, offset + every, ...`` of each row."""
    return {
        row: dict(zip(columns, numbers[offset::every], strict=True))
        for row, numbers in values.items()
    }


def _sr_table(title: str, metric: str, index: int, digits: int) -> dict[str, Any]:
    return {
        "title": title,
        "metric": metric,
        "row_metrics": {"bicubic": f"{metric}_bicubic"},
        "higher_is_better": True,
        "digits": digits,
        "areas": ["sr/"],
        "column_from": "sr_eval",
        "rows": dict(_SR_ROWS),
        "not_ours": ["a_plus"],
        "columns": {column: column for column in _SR_COLUMNS},
        "values": _columns(_SR_VALUES, _SR_COLUMNS, every=2, offset=index),
    }


PAPER_TABLES: dict[str, dict[str, Any]] = {
    "cifar": {
        "title": "Table 3: CIFAR test accuracy",
        "metric": "test/acc",
        "higher_is_better": True,
        "digits": 4,
        "areas": ["cifar10", "cifar100"],
        "column_from": "area",
        "rows": dict(_CIFAR_ROWS),
        "not_ours": [],
        "columns": {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"},
        "values": _columns(_CIFAR_VALUES, ("cifar10", "cifar100")),
    },
    "ptb": {
        "title": "Table 4: Penn Treebank test perplexity",
        "metric": "test/ppl",
        "higher_is_better": False,
        "digits": 3,
        "areas": ["ptb/"],
        "column_from": "area",
        "rows": dict(_PTB_ROWS),
        "not_ours": [],
        "columns": {"ptb/lstm": "LSTM", "ptb/tanh_rnn": "tanh RNN", "ptb/relu_rnn": "ReLU RNN"},
        "values": _columns(_PTB_VALUES, ("ptb/lstm", "ptb/tanh_rnn", "ptb/relu_rnn")),
    },
    "sr_psnr": _sr_table("Table 5: super-resolution PSNR (dB)", "test/psnr", 0, 2),
    "sr_ssim": _sr_table("Table 6: super-resolution SSIM", "test/ssim", 1, 4),
}


# Table 10: mean correlation / mutual information of the first layer's normalized responses
# (CIFAR-10 small CNN), keyed by config stem.
PAPER_DECORRELATION: dict[str, tuple[float, ...]] = _numbers("""
    baseline  0.1677  0.3774
    bn        0.5269  1.4878
    bn_s      0.2521  0.9912
    bn_star   0.1578  0.7287
    ln        0.7199  1.7784
    ln_s      0.1995  0.8959
    ln_star   0.1512  0.6986
    dn        0.1958  0.8951
    dn_star   0.2031  0.8412
""")


def metric_of(experiment: str) -> str | None:
    """The metric the paper reports for ``experiment`` (``"ptb/lstm/dn"`` -> ``"test/ppl"``),
    ``None`` when no paper table holds its area."""
    area = experiment.rsplit("/", 1)[0]
    for spec in PAPER_TABLES.values():
        if any(area == a or (a.endswith("/") and area.startswith(a)) for a in spec["areas"]):
            return spec["metric"]
    return None
