"""Readable run reports: ``report.md`` plus accuracy/loss plots with schedule events on the time axis."""

from __future__ import annotations

import json
import os
from typing import Any

from lotus.errors import LotusError
from lotus.safe_io import atomic_write_stream, atomic_write_text

__all__ = ["read_metrics", "write_report", "summary_text", "event_line", "mark_rows"]


def read_metrics(run_dir: str) -> tuple[list[dict], list[dict], dict]:
    """(epoch records, event records, summary) of a run directory."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise LotusError(f"report: {run_dir} is not a run directory (no metrics.jsonl)")
    epochs, events = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise LotusError(f"report: {path} line {n} is not JSON") from None
            kind = rec.get("type")
            if kind == "epoch":
                epochs.append(rec)
            elif kind == "event":
                events.append(rec)  # "step" records (train.log_every_n_steps) are not part of the report
    summary: dict[str, Any] = {}
    spath = os.path.join(run_dir, "summary.json")
    if os.path.isfile(spath):
        with open(spath) as f:
            try:
                summary = json.load(f)
            except json.JSONDecodeError as e:
                raise LotusError(f"report: {spath} is not valid JSON ({e.msg} at line {e.lineno})") from None
    # a resumed run may repeat epochs that were re-trained: keep the last record of each epoch
    by_epoch = {r["epoch"]: r for r in epochs}
    return [by_epoch[k] for k in sorted(by_epoch)], events, summary


def _fmt_pct(v: Any) -> str:
    return f"{v * 100:.2f}%" if isinstance(v, (int, float)) else "-"


# event fields that hold a 0-based epoch index (metrics.jsonl keeps those); people read epochs from 1
_EPOCH_FIELDS = ("epoch_start", "from_epoch", "at_epoch")


def event_line(record: dict) -> str:
    """An event as people read it: ``[name] epoch N: k=v, ...`` with every epoch counted from 1, as the epoch
    lines are (the record's own ``epoch`` is the 0-based index of the epoch it happened in)."""
    fields = {
        k: (v + 1 if k in _EPOCH_FIELDS and isinstance(v, int) else v)
        for k, v in record.items()
        if k not in ("type", "event", "epoch", "step", "wall_s") and not isinstance(v, (list, dict))
    }
    where = f" epoch {record['epoch'] + 1}:" if isinstance(record.get("epoch"), int) else ""
    return f"[{record['event']}]{where} " + ", ".join(f"{k}={v}" for k, v in fields.items())


def summary_text(run_dir: str) -> str:
    """A short plain-text summary of the run (what ``lotus report`` prints)."""
    epochs, events, summary = read_metrics(run_dir)
    last = epochs[-1] if epochs else {}
    accs = [r["val_acc"] for r in epochs if "val_acc" in r]
    lines = [
        f"run: {os.path.abspath(run_dir)}",
        f"epochs: {last.get('epoch', 0)}   steps: {last.get('step', 0)}   samples seen: {last.get('samples_seen', 0)}",
        f"final val acc: {_fmt_pct(last.get('val_acc'))}   best: {_fmt_pct(max(accs) if accs else None)}   "
        f"final val loss: {last.get('val_loss', float('nan')):.4f}",
        f"train time: {last.get('wall_s', 0):.1f} s   training FLOPs: {last.get('train_flops', 0):.3g}",
    ]
    if summary:
        lines.append(f"params: {summary.get('params')}   nonzero: {summary.get('nonzero_params')}")
        data = summary.get("data")
        if data:
            sizes = ", ".join(
                f"{data[k]} {k.split('_')[0]}"
                for k in ("train_size", "val_size", "test_size")
                if data.get(k) is not None
            )
            lines.append(
                f"data: {data['name']} ({sizes} images; {len(data['classes'])} classes: "
                f"{', '.join(map(str, data['classes'][:10]))}{', ...' if len(data['classes']) > 10 else ''})"
            )
        if summary.get("test_acc") is not None:
            lines.append(f"test acc: {_fmt_pct(summary['test_acc'])} (measured once, after training)")
    if events:
        lines.append(f"events ({len(events)}; epochs counted from 1):")
        for e in events:
            lines.append(f"  - step {e.get('step')}, t={e.get('wall_s', 0):.1f}s: {event_line(e)}")
    return "\n".join(lines)


_UNMARKED = {"run_dir", "threads_tuned", "data_resized"}  # start-up notes: in the report, not on the curves


def mark_rows(xs: list[float], min_gap: float) -> list[int]:
    """A row per event mark so that marks closer than ``min_gap`` on the x axis never share a row (greedy:
    each mark, in x order, takes the lowest row whose last mark is far enough away)."""
    rows, last = [0] * len(xs), []
    for i in sorted(range(len(xs)), key=lambda k: xs[k]):
        row = next((r for r, x in enumerate(last) if xs[i] - x >= min_gap), len(last))
        if row == len(last):
            last.append(xs[i])
        last[row] = xs[i]
        rows[i] = row
    return rows


def _plot(epochs: list[dict], events: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["wall_s"] for r in epochs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ev = [r for r in epochs if "val_acc" in r]
    ax1.plot([r["wall_s"] for r in ev], [r["val_acc"] * 100 for r in ev], marker="o", ms=3, label="val acc")
    ax1.set_xlabel("train time (s)")
    ax1.set_ylabel("val accuracy (%)")
    ax2.plot(t, [r["train_loss"] for r in epochs], label="train loss")
    ax2.plot([r["wall_s"] for r in ev], [r["val_loss"] for r in ev], label="val loss")
    ax2.set_xlabel("train time (s)")
    ax2.set_ylabel("loss")
    marks = [e for e in events if e.get("event") not in _UNMARKED]
    xs = [float(e.get("wall_s", 0)) for e in marks]
    rows = mark_rows(xs, min_gap=0.04 * max(max(t, default=0.0), max(xs, default=0.0), 1e-9))
    for ax in (ax1, ax2):
        for x in xs:
            ax.axvline(x, color="grey", ls=":", lw=1)
        ax.grid(alpha=0.3)
    lo, hi = ax1.get_ylim()
    for i, (x, row) in enumerate(zip(xs, rows), 1):  # numbered marks, stacked where they would touch
        ax1.annotate(str(i), (x, lo + (hi - lo) * (0.04 + 0.07 * row)), fontsize=7, ha="center", color="dimgrey")
    if marks:
        key = "   ".join(f"{i}: {event_line(e)[:60]}" for i, e in enumerate(marks, 1))
        fig.text(0.01, 0.005, key, fontsize=6, color="dimgrey", wrap=True, va="bottom")
    ax2.legend()
    fig.tight_layout(rect=(0, 0.08 if marks else 0, 1, 1))
    atomic_write_stream(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def write_report(run_dir: str) -> str:
    """Write ``report.md`` and ``curves.png`` into ``run_dir``; returns the summary text."""
    epochs, events, summary = read_metrics(run_dir)
    text = summary_text(run_dir)
    md = ["# Run report", "", "```", text, "```", ""]
    if epochs:
        _plot(epochs, events, os.path.join(run_dir, "curves.png"))
        md += [
            "![curves](curves.png)",
            "",
            "| epoch | step | time (s) | train loss | val loss | val acc | img/s | lr |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in epochs:
            md.append(
                f"| {r['epoch']} | {r['step']} | {r['wall_s']:.1f} | {r['train_loss']:.4f} | "
                f"{r.get('val_loss', float('nan')):.4f} | {_fmt_pct(r.get('val_acc'))} | {r.get('throughput')} | "
                f"{r.get('lr', 0):.2e} |"
            )
    atomic_write_text(os.path.join(run_dir, "report.md"), "\n".join(md) + "\n")
    return text
