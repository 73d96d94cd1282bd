"""The report's PNG plots (matplotlib, optional): ours - paper per row, and each column's runs
over training beside the paper's test numbers.
"""

from __future__ import annotations

from pathlib import Path

from lit_divnorm.experiments.tables import Result, Table


def save_figure(figure, path: str | Path) -> Path:
    """Lay out, write as PNG and close a matplotlib figure; returns ``path``."""
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    _pyplot().close(figure)
    return Path(path)


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plots need matplotlib: pip install 'lit-divnorm[plot]' (or pip install matplotlib);"
            " lit-divnorm report --no-plots writes the tables alone"
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_differences(table: Table, path: str | Path) -> Path | None:
    """Ours - paper per row (one panel per column with runs), the seeds' standard deviation
    as error bars, hollow markers for partial runs, a line at 0; ``None`` if nothing to
    plot (no cell with both a run and a paper number)."""
    panels = []
    for column in table.columns_with_runs():
        rows = [row for row in table.rows if table.cells[(row, column)].difference is not None]
        if rows:
            panels.append((column, rows))
    if not panels:
        return None
    plt = _pyplot()
    height = max(3.0, 0.45 * max(len(rows) for _, rows in panels) + 1.5)
    size = (max(8, 6 * len(panels)), height)
    figure, axes = plt.subplots(1, len(panels), figsize=size, squeeze=False)
    for axis, (column, rows) in zip(axes[0], panels):
        reach = 0.0
        for position, row in enumerate(rows):
            cell = table.cells[(row, column)]
            error = cell.std or 0.0
            reach = max(reach, abs(cell.difference) + error)
            axis.errorbar(
                cell.difference,
                position,
                xerr=error if cell.std is not None else None,
                fmt="o",
                color="C0",
                markerfacecolor="white" if cell.partial else "C0",
                capsize=4,
            )
            note = f"n={cell.seeds}" + (", partial" if cell.partial else "")
            axis.annotate(
                note,
                (cell.difference, position),
                xytext=(6, 6),
                textcoords="offset points",
                fontsize="small",
            )
        axis.axvline(0.0, color="black", linewidth=1)
        reach = reach * 1.4 or 1.0
        axis.set_xlim(-reach, reach)
        axis.set_yticks(range(len(rows)))
        axis.set_yticklabels([table.rows[row] for row in rows])
        axis.set_ylim(-0.7, len(rows) - 0.3)
        axis.invert_yaxis()
        better = "higher" if table.higher_is_better else "lower"
        axis.set_xlabel(f"ours - paper ({table.metric}; {better} is better)")
        axis.set_title(table.columns[column])
        axis.grid(axis="x", alpha=0.3)
    figure.suptitle(f"{table.title}: ours - paper, error bars: std over seeds")
    return save_figure(figure, path)


def plot_curves(table: Table, column: str, path: str | Path) -> Path | None:
    """The runs of ``column`` over training: left, the test metric (the points a
    :class:`~lit_divnorm.callbacks.PeriodicTest` logged and each finished run's final test, a
    star) beside the paper's test number of its row, dashed in the same colour; right, when
    runs logged one, the validation metric, which is not the paper's figure and has no paper
    line. ``None`` if no run of the column has a test or validation figure."""
    leaf = table.metric.split("/", 1)[1]
    runs = [(row, r) for row in table.rows for r in table.cells[(row, column)].results]
    tested = [(row, r) for row, r in runs if r.curves.get(f"test/{leaf}") or _final(r, table)]
    validated = [(row, r) for row, r in runs if r.curves.get(f"val/{leaf}")]
    if not tested and not validated:
        return None
    plt = _pyplot()
    panels = [("test", tested)] + ([("validation", validated)] if validated else [])
    figure, axes = plt.subplots(
        1, len(panels), figsize=(8 * len(panels), 5), squeeze=False, sharex=True
    )
    colours: dict[str, str] = {}
    for axis, (kind, members) in zip(axes[0], panels):
        for row, result in members:
            colour = colours.setdefault(row, f"C{len(colours) % 10}")
            label = _curve_label(table, row, result)
            points = result.curves.get(f"{'test' if kind == 'test' else 'val'}/{leaf}") or []
            if points:
                steps, values = zip(*points)
                marker = "o" if len(steps) < 30 else None
                axis.plot(steps, values, color=colour, marker=marker, markersize=3, label=label)
                label = None
            final = _final(result, table) if kind == "test" else None
            if final is not None:
                axis.plot([result.steps], [final], "*", color=colour, markersize=12, label=label)
        if kind == "test":
            for row in {row for row, _ in members}:
                paper = table.cells[(row, column)].paper
                if paper is not None:
                    axis.axhline(
                        paper,
                        color=colours[row],
                        linestyle="--",
                        linewidth=1,
                        label=f"{table.rows[row]}: paper (test) {paper}",
                    )
        axis.set_xlabel("training step")
        axis.set_ylabel(f"{'test' if kind == 'test' else 'val'}/{leaf}")
        axis.set_title(
            f"{table.columns[column]}: {kind}"
            + (" (star: final test)" if kind == "test" else " (no paper figure)")
        )
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle(f"{table.title}, {table.columns[column]}: over training")
    return save_figure(figure, path)


def _final(result: Result, table: Table) -> float | None:
    return result.value(table.metric)


def _curve_label(table: Table, row: str, result: Result) -> str:
    seed = "" if result.seed is None else f" seed {result.seed}"
    state = "" if result.complete else f" ({result.status if not result.record else 'partial'})"
    return f"{table.rows[row]}{seed}{state}"
