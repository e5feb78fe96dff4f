"""The trade-off plot: accuracy vs size and accuracy vs batch-1 latency, with the Pareto front."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edgeq.verify.rows import Row, VerifyResult

MARKERS = {"fp32": "o", "int8": "^"}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated (cost, accuracy) points, cheapest first: lower cost, higher accuracy."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def write_plot(result: VerifyResult, path: Path) -> None:
    """A PNG with two panels, one point per CPU artifact, colored by family and marked by precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [r for r in result.rows if r.runtime != "torch-cuda" and r.accuracy is not None
            and r.bytes is not None and r.p50_ms_b1 is not None]
    families = list(dict.fromkeys(r.model for r in rows))
    colors = {m: f"C{i}" for i, m in enumerate(families)}
    fig, axes = plt.subplots(1, 2, figsize=(14, 6), constrained_layout=True)
    panels = [("file size (KiB, log scale)", lambda r: r.bytes / 1024),
              (f"p50 latency at batch 1, {result.config.threads} thread(s) (ms, log scale)", lambda r: r.p50_ms_b1)]
    for ax, (xlabel, cost) in zip(axes, panels, strict=True):
        _panel(ax, rows, cost, colors)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
    handles = [Line2D([], [], color=c, marker="s", linestyle="", label=m) for m, c in colors.items()]
    handles += [Line2D([], [], color="gray", marker=mk, linestyle="", label=p) for p, mk in MARKERS.items()]
    handles += [Line2D([], [], color="gray", linestyle="--", label="Pareto front (per model)"),
                Line2D([], [], color="red", marker="x", linestyle="", label="fails a gate")]
    axes[1].legend(handles=handles, loc="lower right", fontsize=9)
    axes[0].set_title("accuracy vs size")
    axes[1].set_title("accuracy vs latency")
    fig.suptitle(f"edgeq verify: {result.directory} ({'PASSED' if result.passed else 'FAILED'})")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _panel(ax, rows: list[Row], cost, colors: dict[str, str]) -> None:
    """Scatter the rows, cross out failing ones, and draw and label the Pareto front."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    points = [(cost(r), 100 * r.accuracy) for r in rows]
    for r, (x, y) in zip(rows, points, strict=True):
        ax.scatter(x, y, color=colors[r.model], marker=MARKERS.get(r.precision, "o"), s=46, alpha=0.85)
        if r.status == "FAIL":
            ax.scatter(x, y, color="red", marker="x", s=60)
    for model, color in colors.items():  # one front per family: the models solve the task differently well
        members = [i for i, r in enumerate(rows) if r.model == model]
        front = [members[j] for j in pareto_front([points[i] for i in members])]
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color=color, linewidth=1, zorder=0)
        for i in front:
            ax.annotate(rows[i].name, points[i], textcoords="offset points", xytext=(5, -10), fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.05, not 5x10^-2
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both", alpha=0.3)


def write_sensitivity_plot(result: VerifyResult, path: Path) -> bool:
    """Per family, one panel per fp32 parent: each layer's accuracy change alone in int8 and the accuracy
    won back alone in fp32; and one panel of each pruning group's cost alone. False when the manifest
    holds no sensitivity (nothing written)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for model, fam in result.families.items():
        sens = fam.get("sensitivity") or {}
        for parent, q in (sens.get("quantization") or {}).items():
            panels.append((f"{model} ({parent}): int8 sensitivity per layer", [r["node"] for r in q["layers"]],
                           {"alone in int8 (change, pts)": [-r["only_this_int8_drop_points"] for r in q["layers"]],
                            "alone in fp32 (won back, pts)": [r["gain_points"] for r in q["layers"]]}))
        groups = (sens.get("pruning") or {}).get("groups") or []
        if groups:
            panels.append((f"{model}: pruning sensitivity per group ({100 * sens['pruning']['amount']:g}% of channels)",
                           [g["group"] for g in groups], {"pruned alone (change, pts)": [-g["drop_points"] for g in groups]}))
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.2 * len(panels)), constrained_layout=True, squeeze=False)
    for ax, (title, labels, series) in zip(axes[:, 0], panels, strict=True):
        width = 0.8 / len(series)
        for i, (label, values) in enumerate(series.items()):
            ax.bar([j + i * width for j in range(len(labels))], values, width, label=label, color=f"C{i}")
        ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(labels))])
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set_ylabel("accuracy (points)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
