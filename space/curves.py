"""Training curves as a figure: loss against step, validation MSE against step and against wall time
(the paper's figure 5, convergence panels), and validation AP50 against step, one line per run.
`python -m space curves --help`."""

from __future__ import annotations

import csv
from pathlib import Path

from .config import ConfigError


def _read(path: Path) -> dict[str, list[float]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {k: [float(r[k]) for r in rows if r[k] not in ("", None)] for k in (rows[0] if rows else {})}


def plot_curves(runs: list[str], out: str, labels: list[str] | None = None) -> None:
    """Write a PNG of four panels for the given run directories (each with metrics.csv, and val.csv when
    the run validated)."""
    import matplotlib.pyplot as plt

    fig = curves_figure(runs, labels)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def curves_figure(runs: list[str], labels: list[str] | None = None):
    """The figure of `plot_curves`: panels loss, validation MSE by step and by wall time, validation AP50."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    labels = labels or [Path(r).name for r in runs]
    if len(labels) != len(runs):
        raise ConfigError(f"{len(labels)} labels for {len(runs)} runs; give one label per run")
    data = []
    for run in runs:
        metrics = Path(run) / "metrics.csv"
        if not metrics.is_file():
            raise ConfigError(f"{run} has no metrics.csv; is it a run directory of `python -m space train`?")
        val = Path(run) / "val.csv"
        data.append((_read(metrics), _read(val) if val.is_file() else {}))

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for (m, v), label in zip(data, labels):
        axes[0].plot(m.get("step", []), m.get("loss", []), label=label, lw=1)
        if v.get("val_mse"):
            axes[1].plot(v["step"], v["val_mse"], marker=".", label=label)
            axes[2].plot([t / 60 for t in v["wall_s"]], v["val_mse"], marker=".", label=label)
        if v.get("val_ap50"):  # runs from before validation AP was recorded have none
            axes[3].plot(v["step"][: len(v["val_ap50"])], v["val_ap50"], marker=".", label=label)
    axes[0].set(xlabel="step", ylabel="training loss (-ELBO per image, nats)", title="loss")
    axes[1].set(xlabel="step", ylabel="validation MSE per pixel", title="convergence against steps", yscale="log")
    axes[2].set(xlabel="wall time (minutes)", ylabel="validation MSE per pixel",
                title="convergence against time (figure 5)", yscale="log")
    axes[3].set(xlabel="step", ylabel="validation AP at IoU 0.5 (COCO)", title="detection", ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
