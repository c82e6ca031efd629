"""A SpeedReport as a markdown table, CSV, JSON, a PNG chart and TensorBoard entries.

Times in the table are medians per batch in milliseconds; a speedup is dense time / low-rank time
(above 1: the low-rank layer is faster), for the factorized form, the composed one and the plan's.
CSV and JSON keep the quartiles (the run's own spread) and, in JSON, every sample. Layers are
named as the paper names them (the `layer` column, also in the chart and the TensorBoard tags);
CSV and JSON keep the module path beside it (`module`).

These are functions of a report's data: they read its fields and call nothing in report.py, which
imports this module (not the reverse) and offers them as SpeedReport methods.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import SpeedReport
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


def _total(rows, key: str) -> float:
    return sum(getattr(row, key).median for row in rows)


def _all_composed(row) -> Timing:
    """The row's time with every layer that has a composed form composed (the others as they are)."""
    return row.composed_train if row.composed_train is not None else row.lowrank_train


def markdown(report: SpeedReport) -> str:
    """The per-layer table, a totals line and the whole-model images/s."""
    meta = report.meta
    lines = [
        f"### {heading(report)}",
        "",
        f"Median of {meta['repeats']} samples after {meta['warmup']} warm-up calls, the forms of a layer alternated;"
        " times in ms per batch. *theory*: dense MACs / factorized MACs; *×*: dense time / that form's time."
        " *composed*: one dense conv of the composed kernel Σ_k V_k ⊗ H_k (same parameters). *plan*: the form"
        f" each layer runs ({meta.get('plan', 'given')}). Layers kept dense are one module in both models:"
        " timed once, ratio 1.",
        "",
        "| layer | kernel N×C×kh×kw | rank | input | MMACs/img dense → low-rank | theory"
        " | fwd dense | fwd factorized | fwd composed | fwd+bwd dense | fwd+bwd factorized | fwd+bwd composed"
        " | factorized fwd+bwd × | plan | plan fwd × | plan fwd+bwd × |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in report.rows:
        cost = row.cost
        kernel = _shape(cost.kernel) + (f" /{cost.groups}g" if cost.groups > 1 else "")
        composed = [_ms(t.median) if t is not None else "—" for t in (row.composed_forward, row.composed_train)]
        lines.append(
            f"| {row.layer} | {kernel} | {cost.rank if cost.rank is not None else 'dense'} | {_shape(row.input_shape)}"
            f" | {cost.dense_macs / 1e6:,.1f} → {cost.lowrank_macs / 1e6:,.1f} | {row.theoretical:.2f}×"
            f" | {_ms(row.dense_forward.median)} | {_ms(row.lowrank_forward.median)} | {composed[0]}"
            f" | {_ms(row.dense_train.median)} | {_ms(row.lowrank_train.median)} | {composed[1]}"
            f" | {row.train_speedup:.2f}× | {row.execution} | {row.planned_forward_speedup:.2f}×"
            f" | {row.planned_train_speedup:.2f}× |"
        )
    if report.rows:
        rows = report.rows
        dense_macs = sum(row.cost.dense_macs for row in rows)
        lowrank_macs = sum(row.cost.lowrank_macs for row in rows)
        factorized = sum(row.cost.rank is not None for row in rows)
        composed = sum(row.execution == "composed" for row in rows)
        composed_forward = sum((row.composed_forward or row.lowrank_forward).median for row in rows)
        composed_train = sum(_all_composed(row).median for row in rows)
        fcs = sum(len(row.cost.kernel) == 2 for row in rows)  # fc6/fc7 rows have an out×in kernel
        what = f"{len(rows)} convs" if not fcs else f"{len(rows) - fcs} convs and {fcs} FC layers"
        lines.append(
            f"| **all {what} ({factorized} factorized)** | | | | **{dense_macs / 1e6:,.1f} →"
            f" {lowrank_macs / 1e6:,.1f}** | **{dense_macs / lowrank_macs:.2f}×**"
            f" | **{_ms(_total(rows, 'dense_forward'))}** | **{_ms(_total(rows, 'lowrank_forward'))}**"
            f" | **{_ms(composed_forward)}** | **{_ms(_total(rows, 'dense_train'))}**"
            f" | **{_ms(_total(rows, 'lowrank_train'))}** | **{_ms(composed_train)}**"
            f" | **{_total(rows, 'dense_train') / _total(rows, 'lowrank_train'):.2f}×** | **{composed} composed**"
            f" | **{_total(rows, 'dense_forward') / _total(rows, 'planned_forward'):.2f}×**"
            f" | **{_total(rows, 'dense_train') / _total(rows, 'planned_train'):.2f}×** |"
        )
    model = report.model
    if model is not None:
        rate = model.images_per_s
        lines += [
            "",
            f"Whole model, batch {model.batch}, images/s — train step (forward, backward, SGD update): dense"
            f" {rate(model.dense_train):,.1f}, all factorized {rate(model.lowrank_train):,.1f}"
            f" ({model.train_speedup:.2f}×), plan {rate(model.planned_train):,.1f} ({model.planned_train_speedup:.2f}×);"
            f" forward: dense {rate(model.dense_forward):,.1f}, all factorized {rate(model.lowrank_forward):,.1f}"
            f" ({model.forward_speedup:.2f}×), plan {rate(model.planned_forward):,.1f}"
            f" ({model.planned_forward_speedup:.2f}×).",
        ]
    return "\n".join(lines)


def _timing_columns(prefix: str, timing: Timing | None) -> dict:
    if timing is None:
        return {f"{prefix}_ms": "", f"{prefix}_q1_ms": "", f"{prefix}_q3_ms": ""}
    q1, q3 = timing.quartiles
    return {f"{prefix}_ms": timing.median * 1e3, f"{prefix}_q1_ms": q1 * 1e3, f"{prefix}_q3_ms": q3 * 1e3}


def csv_rows(report: SpeedReport) -> list[dict]:
    rows = []
    for row in report.rows:
        cost = row.cost
        rows.append({
            "layer": row.layer, "module": row.module, "kernel": _shape(cost.kernel), "groups": cost.groups,
            "rank": "" if cost.rank is None else cost.rank, "input_shape": _shape(row.input_shape),
            "output": _shape(cost.output), "dense_macs": cost.dense_macs, "lowrank_macs": cost.lowrank_macs,
            "theoretical_speedup": row.theoretical,
            **_timing_columns("dense_forward", row.dense_forward),
            **_timing_columns("lowrank_forward", row.lowrank_forward),
            **_timing_columns("composed_forward", row.composed_forward),
            "forward_speedup": row.forward_speedup,
            **_timing_columns("dense_train", row.dense_train),
            **_timing_columns("lowrank_train", row.lowrank_train),
            **_timing_columns("composed_train", row.composed_train),
            "train_speedup": row.train_speedup,
            "execution": row.execution,
            "planned_forward_speedup": row.planned_forward_speedup,
            "planned_train_speedup": row.planned_train_speedup,
        })
    return rows


def chart(report: SpeedReport, path: Path) -> None:
    """Grouped bars per factorized layer: theoretical, measured factorized forward and
    forward+backward, and composed forward+backward speedup, with the break-even line at 1 (every layer if none is factorized)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in report.rows if row.cost.rank is not None] or report.rows
    figure = _figure(report, rows, plt)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _figure(report: SpeedReport, rows, plt):
    width = 0.2
    figure, axes = plt.subplots(figsize=(max(6.0, 0.7 * len(rows) + 2.0), 4.5), layout="constrained")
    positions = range(len(rows))
    series = (
        ("theoretical (MACs)", [row.theoretical for row in rows], "#999999"),
        ("factorized forward", [row.forward_speedup for row in rows], "#4c72b0"),
        ("factorized forward+backward", [row.train_speedup for row in rows], "#dd8452"),
        ("composed forward+backward", [row.dense_train.median / _all_composed(row).median for row in rows], "#55a868"),
    )
    for offset, (label, values, color) in zip((-1.5 * width, -0.5 * width, 0.5 * width, 1.5 * width), series):
        axes.bar([p + offset for p in positions], values, width, label=label, color=color)
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xticks(list(positions), [row.layer for row in rows], rotation=60, ha="right", fontsize=8)
    axes.set_ylabel("speedup (dense time / low-rank time)")
    axes.set_title(heading(report), fontsize=9)
    axes.legend(fontsize=8)
    return figure


def write_files(report: SpeedReport, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {kind: out_dir / f"speed.{kind}" for kind in ("md", "csv", "json", "png")}
    files["md"].write_text(markdown(report) + "\n")
    rows = csv_rows(report)
    with open(files["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["layer"])
        writer.writeheader()
        writer.writerows(rows)
    files["json"].write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    chart(report, files["png"])
    return files


def log_tensorboard(report: SpeedReport, writer, step: int = 0, prefix: str = "speed") -> None:
    """Per layer `{prefix}/layer/<layer>/{theoretical,forward,train,planned_train,composed_train}`
    speedups (the paper's layer name, e.g. speed/layer/conv4_2/train), the whole model's images/s
    and speedups under `{prefix}/model/`, the table as text and the chart as a figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for row in report.rows:
        writer.add_scalar(f"{prefix}/layer/{row.layer}/theoretical", row.theoretical, step)
        writer.add_scalar(f"{prefix}/layer/{row.layer}/forward", row.forward_speedup, step)
        writer.add_scalar(f"{prefix}/layer/{row.layer}/train", row.train_speedup, step)
        writer.add_scalar(f"{prefix}/layer/{row.layer}/planned_train", row.planned_train_speedup, step)
        if row.composed_train is not None:
            writer.add_scalar(f"{prefix}/layer/{row.layer}/composed_train",
                              row.dense_train.median / row.composed_train.median, step)
    model = report.model
    if model is not None:
        for key, value in model.as_dict().items():
            if isinstance(value, float):
                writer.add_scalar(f"{prefix}/model/{key}", value, step)
    writer.add_text(f"{prefix}/table", markdown(report), step)
    rows = [row for row in report.rows if row.cost.rank is not None] or report.rows
    if rows:
        writer.add_figure(f"{prefix}/chart", _figure(report, rows, plt), step)  # add_figure closes it
    writer.flush()
