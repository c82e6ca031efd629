"""A SpeedReport as a markdown table, CSV, JSON, a PNG chart and TensorBoard entries.

Times in the table are medians per batch in milliseconds; a speedup is dense time / low-rank time
(above 1: the factorised layer is faster). CSV and JSON keep the quartiles (the run's own spread)
and, in JSON, every sample.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .speed import SpeedReport
    from .timing import Timing


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def _shape(shape) -> str:
    return "×".join(map(str, shape))


def heading(report: SpeedReport) -> str:
    meta = report.meta
    size = _shape(meta["input_shape"][2:])
    layout = ", channels_last" if meta["channels_last"] else ""
    return (
        f"{report.title}: measured speed on {meta['device_name']} ({meta['dtype']}{layout}, batch"
        f" {meta['input_shape'][0]}, {size}, torch {meta['torch']})"
    )


def markdown(report: SpeedReport) -> str:
    """The per-layer table, a totals line and the whole-model images/s."""
    meta = report.meta
    lines = [
        f"### {heading(report)}",
        "",
        f"Median of {meta['repeats']} samples after {meta['warmup']} warm-up calls, dense and low-rank alternated;"
        " times in ms per batch. *theory*: dense MACs / low-rank MACs; *measured*: dense time / low-rank time."
        " Layers kept dense are one module in both models: timed once, ratio 1.",
        "",
        "| layer | kernel N×C×kh×kw | rank | input | MMACs/img dense → low-rank | theory"
        " | fwd dense | fwd low-rank | fwd measured | fwd+bwd dense | fwd+bwd low-rank | fwd+bwd measured |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report.rows:
        cost = row.cost
        kernel = _shape(cost.kernel) + (f" /{cost.groups}g" if cost.groups > 1 else "")
        lines.append(
            f"| {row.name} | {kernel} | {cost.rank if cost.rank is not None else 'dense'} | {_shape(row.input_shape)}"
            f" | {cost.dense_macs / 1e6:,.1f} → {cost.lowrank_macs / 1e6:,.1f} | {row.theoretical:.2f}×"
            f" | {_ms(row.dense_forward.median)} | {_ms(row.lowrank_forward.median)} | {row.forward_speedup:.2f}×"
            f" | {_ms(row.dense_train.median)} | {_ms(row.lowrank_train.median)} | {row.train_speedup:.2f}× |"
        )
    if report.rows:
        total = {key: sum(getattr(row, key).median for row in report.rows)
                 for key in ("dense_forward", "lowrank_forward", "dense_train", "lowrank_train")}
        dense_macs = sum(row.cost.dense_macs for row in report.rows)
        lowrank_macs = sum(row.cost.lowrank_macs for row in report.rows)
        factorised = sum(row.cost.rank is not None for row in report.rows)
        lines.append(
            f"| **all {len(report.rows)} convs ({factorised} factorised)** | | | | **{dense_macs / 1e6:,.1f} →"
            f" {lowrank_macs / 1e6:,.1f}** | **{dense_macs / lowrank_macs:.2f}×**"
            f" | **{_ms(total['dense_forward'])}** | **{_ms(total['lowrank_forward'])}**"
            f" | **{total['dense_forward'] / total['lowrank_forward']:.2f}×**"
            f" | **{_ms(total['dense_train'])}** | **{_ms(total['lowrank_train'])}**"
            f" | **{total['dense_train'] / total['lowrank_train']:.2f}×** |"
        )
    model = report.model
    if model is not None:
        lines += [
            "",
            f"Whole model, batch {model.batch}: forward {model.images_per_s(model.dense_forward):,.1f} →"
            f" {model.images_per_s(model.lowrank_forward):,.1f} images/s ({model.forward_speedup:.2f}×);"
            f" train step (forward, backward, SGD update) {model.images_per_s(model.dense_train):,.1f} →"
            f" {model.images_per_s(model.lowrank_train):,.1f} images/s ({model.train_speedup:.2f}×), dense → low-rank.",
        ]
    return "\n".join(lines)


def _timing_columns(prefix: str, timing: Timing) -> dict:
    q1, q3 = timing.quartiles
    return {f"{prefix}_ms": timing.median * 1e3, f"{prefix}_q1_ms": q1 * 1e3, f"{prefix}_q3_ms": q3 * 1e3}


def csv_rows(report: SpeedReport) -> list[dict]:
    rows = []
    for row in report.rows:
        cost = row.cost
        rows.append({
            "layer": row.name, "kernel": _shape(cost.kernel), "groups": cost.groups,
            "rank": "" if cost.rank is None else cost.rank, "input_shape": _shape(row.input_shape),
            "output": _shape(cost.output), "dense_macs": cost.dense_macs, "lowrank_macs": cost.lowrank_macs,
            "theoretical_speedup": row.theoretical,
            **_timing_columns("dense_forward", row.dense_forward),
            **_timing_columns("lowrank_forward", row.lowrank_forward),
            "forward_speedup": row.forward_speedup,
            **_timing_columns("dense_train", row.dense_train),
            **_timing_columns("lowrank_train", row.lowrank_train),
            "train_speedup": row.train_speedup,
        })
    return rows


def chart(report: SpeedReport, path: Path) -> None:
    """Grouped bars per factorised layer: theoretical, measured forward, measured forward+backward
    speedup, with the break-even line at 1 (every layer if none is factorised)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in report.rows if row.cost.rank is not None] or report.rows
    figure = _figure(report, rows, plt)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _figure(report: SpeedReport, rows, plt):
    width = 0.27
    figure, axes = plt.subplots(figsize=(max(6.0, 0.55 * len(rows) + 2.0), 4.5), layout="constrained")
    positions = range(len(rows))
    series = (
        ("theoretical (MACs)", [row.theoretical for row in rows], "#999999"),
        ("measured forward", [row.forward_speedup for row in rows], "#4c72b0"),
        ("measured forward+backward", [row.train_speedup for row in rows], "#dd8452"),
    )
    for offset, (label, values, color) in zip((-width, 0.0, width), series):
        axes.bar([p + offset for p in positions], values, width, label=label, color=color)
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xticks(list(positions), [row.name for row in rows], rotation=60, ha="right", fontsize=8)
    axes.set_ylabel("speedup (dense time / low-rank time)")
    axes.set_title(heading(report), fontsize=9)
    axes.legend(fontsize=8)
    return figure


def write_files(report: SpeedReport, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {kind: out_dir / f"speed.{kind}" for kind in ("md", "csv", "json", "png")}
    files["md"].write_text(report.to_markdown() + "\n")
    rows = csv_rows(report)
    with open(files["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["layer"])
        writer.writeheader()
        writer.writerows(rows)
    files["json"].write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    chart(report, files["png"])
    return files


def log_tensorboard(report: SpeedReport, writer, step: int = 0, prefix: str = "speed") -> None:
    """Per layer `{prefix}/layer/<name>/{theoretical,forward,train}` speedups, the whole model's
    images/s and speedups under `{prefix}/model/`, the table as text and the chart as a figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for row in report.rows:
        writer.add_scalar(f"{prefix}/layer/{row.name}/theoretical", row.theoretical, step)
        writer.add_scalar(f"{prefix}/layer/{row.name}/forward", row.forward_speedup, step)
        writer.add_scalar(f"{prefix}/layer/{row.name}/train", row.train_speedup, step)
    model = report.model
    if model is not None:
        for key, value in model.as_dict().items():
            if isinstance(value, float):
                writer.add_scalar(f"{prefix}/model/{key}", value, step)
    writer.add_text(f"{prefix}/table", report.to_markdown(), step)
    rows = [row for row in report.rows if row.cost.rank is not None] or report.rows
    if rows:
        writer.add_figure(f"{prefix}/chart", _figure(report, rows, plt), step)  # add_figure closes it
    writer.flush()
