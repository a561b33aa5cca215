"""The per-epoch report (the seed's logs/report.html, self-contained), its plot, and TensorBoard scalars.

report.html embeds its plot as a base64 PNG, so it opens offline and can be copied anywhere;
it is written under a temporary name and renamed, so a browser never sees half a file (and a write that
fails, on a full disk, leaves no temporary file behind). TensorBoard event files through tensorboardX.
"""

from __future__ import annotations

import base64
import concurrent.futures
import html
import io
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxcifar.nn import metrics
from jaxcifar.run.files import atomic_write, write_failed


def plot_curves(history: Sequence[dict]) -> bytes:
    """PNG: train/test accuracy (left) and loss (right) per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    seeds = history[-1].get("seeds", [None])
    over = f", mean of {len(seeds)} seeds" if len(seeds) > 1 else ""
    ax_acc.plot(epochs, [r["train_accuracy"] for r in history], ".-" if len(epochs) < 30 else "-",
                label=f"train (train mode){over}")
    test_line, = ax_acc.plot(epochs, [r["test_accuracy"] for r in history], ".-" if len(epochs) < 30 else "-",
                             label=f"test{over}")
    if len(seeds) > 1:  # each seed's test accuracy, faint, around the mean
        for i in range(len(seeds)):
            ax_acc.plot(epochs, [r["per_seed"]["test_accuracy"][i] for r in history], "-", lw=0.6, alpha=0.35,
                        color=test_line.get_color())
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy, %")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(loc="lower right")
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "-", label="train")
    ax_loss.plot(epochs, [r["test_loss"] for r in history], "-", label="test")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str]) -> bytes:
    """PNG: the test confusion matrix as a heatmap, each row's share of its class, with the counts written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(confusion)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.4, 5.4), dpi=100)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true class")
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, f"{n}", ha="center", va="center", fontsize=7, color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _png(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(rows) -> str:
    return "<table>\n" + "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>\n" for k, v in rows) + "</table>\n"


def _seed_table(latest: dict) -> str:
    """Each seed's numbers at the latest epoch, when the run trained several."""
    seeds = latest.get("seeds", [])
    if len(seeds) < 2:
        return ""
    p = latest["per_seed"]
    rows = "".join(f"<tr><td>{s}</td><td>{p['train_loss'][i]:.4f}</td><td>{p['train_accuracy'][i]:.2f}</td>"
                   f"<td>{p['test_loss'][i]:.4f}</td><td>{p['test_accuracy'][i]:.2f}</td></tr>\n"
                   for i, s in enumerate(seeds))
    return ("<h4>Seeds</h4>\n<table>\n<tr><th>seed</th><th>train loss</th><th>train accuracy, %</th><th>test loss</th>"
            f"<th>test accuracy, %</th></tr>\n{rows}</table>\n")


def _flatten_config(d: dict, resolved: dict, prefix: str = ""):
    """(field, value) rows; a field left to the backend (0 or "auto") shows what it resolved to."""
    for k, v in sorted(d.items()):
        if isinstance(v, dict):
            yield from _flatten_config(v, resolved, f"{prefix}{k}.")
        elif not prefix and k in resolved and v in (0, "auto"):
            yield k, f"{v} -> {resolved[k]}"
        else:
            yield f"{prefix}{k}", v


def render_html(*, workdir: str, history: Sequence[dict], config: dict, optimizer_state: dict, model_summary: str,
                class_names: Sequence[str], png: bytes, confusion_png: bytes = b"", resolved: dict | None = None) -> str:
    """The page; `resolved`: the step fields the config leaves to the backend, as they were resolved."""
    latest = history[-1]
    e = html.escape
    title = f"{workdir} - epoch {latest['epoch']}"
    confusion = metrics.format_confusion(np.asarray(latest["test_confusion"]), class_names)
    timing = [("epoch time, s", f"{latest['epoch_time_s']:.1f}"),
              ("training images/s", f"{latest['train_images_per_s']:.0f}"),
              ("evaluation time, s", f"{latest['eval_time_s']:.1f}")]
    # Which machine and code trained the latest epoch (records from before they said so show neither).
    timing += [(label, latest[k]) for label, k in (("trained on", "machine"), ("code commit", "commit"))
               if latest.get(k)]
    seeds = latest.get("seeds", [None])
    spread = f" ± {latest['test_accuracy_std']:.2f} (mean ± std of {len(seeds)} seeds)" if len(seeds) > 1 else ""
    accuracy = [("test accuracy, %", f"{latest['test_accuracy']:.2f}{spread}"),
                ("best test accuracy, %", f"{max(r['test_accuracy'] for r in history):.2f}"),
                ("train accuracy, %", f"{latest['train_accuracy']:.2f}"),
                ("train loss", f"{latest['train_loss']:.4f}")]
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{e(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
td {{ padding: 0 1em 0 0; }}
pre {{ font-size: 12px; background: #f6f6f6; padding: 0.6em; overflow-x: auto; }}
</style>
</head>
<body>
<h2>{e(title)}</h2>
{_png(png, "accuracy and loss per epoch")}
<h4>Accuracy</h4>
{_table(accuracy)}
<h4>optimState:</h4>
{_table(sorted(optimizer_state.items()))}
<h4>Speed</h4>
{_table(timing)}
{_seed_table(latest)}<h4>Test confusion matrix{" (summed over the seeds)" if len(seeds) > 1 else ""}</h4>
{_png(confusion_png, "test confusion matrix") if confusion_png else ""}
<pre>{e(confusion)}</pre>
<h4>Config</h4>
{_table(_flatten_config(config, resolved or {}))}
<h4>Model</h4>
<pre>{e(model_summary)}</pre>
</body>
</html>
"""


def write_report(workdir: str | Path, history: Sequence[dict], config: dict, optimizer_state: dict,
                 model_summary: str, class_names: Sequence[str], resolved: dict | None = None) -> None:
    """Rewrites workdir/report.html and workdir/accuracy.png from the history so far."""
    workdir = Path(workdir)
    png = plot_curves(history)
    atomic_write(workdir / "accuracy.png", png)
    page = render_html(workdir=str(workdir), history=history, config=config, optimizer_state=optimizer_state,
                       model_summary=model_summary, class_names=class_names, png=png,
                       confusion_png=plot_confusion(history[-1]["test_confusion"], class_names), resolved=resolved)
    atomic_write(workdir / "report.html", page.encode())


class BackgroundReporter:
    """Writes reports on one worker thread; each submit first waits for (and re-raises from) the previous one."""

    def __init__(self, enabled: bool = True):
        """`enabled=False`: submit does nothing (every process but 0 of a multi-process run)."""
        self.enabled = enabled
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="report")
        self._pending = None

    def submit(self, *args) -> None:
        if not self.enabled:
            return
        self.wait()
        self._pending = self._pool.submit(write_report, *args)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown()


def model_summary(params, batch_stats=None, order: Sequence[str] = ()) -> str:
    """One line per layer, in `order` (the network's, step.layer_order) where given: its parameter shapes and
    count, then the total."""
    import jax

    from jaxcifar.run import trees

    lines = []
    total = 0
    by_layer: dict[str, list] = {}
    for path, leaf in trees.flat_dict(params).items():
        layer, _, name = path.rpartition("/")
        by_layer.setdefault(layer, []).append((name, tuple(leaf.shape)))
    width = max((len(k) for k in by_layer), default=10)
    rank = {layer: i for i, layer in enumerate(order)}
    for layer, entries in sorted(by_layer.items(), key=lambda item: rank.get(item[0], len(rank))):
        count = sum(int(np.prod(s)) for _, s in entries)
        total += count
        shapes = ", ".join(f"{name} {'x'.join(map(str, s))}" for name, s in entries)
        lines.append(f"{layer:<{width}}  {count:>10,}  {shapes}")
    lines.append(f"{'total':<{width}}  {total:>10,}  parameters")
    if batch_stats:
        n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(batch_stats))
        lines.append(f"{'batch_stats':<{width}}  {n:>10,}  running means and variances (not trained)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# TensorBoard scalars without TensorFlow


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without PyTorch.

    tensorboardX's writer imports torch, where installed, for a type annotation alone: 1.6 s of every training
    start (Sapphire Rapids, torch 2.14; the GPU image has torch too). Scalars need none of it. Hidden only
    while tensorboardX loads, and only if nothing has imported torch yet.
    """
    if "tensorboardX.writer" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError: tensorboardX takes its numpy-only path
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class ScalarWriter:
    """Scalars in an events.out.tfevents.* file under `logdir`, through tensorboardX (no TensorFlow).

    Flushed after every `write`, so TensorBoard (and a crash) sees each epoch as soon as it is logged.
    """

    def __init__(self, logdir: str | Path, purge_after: int | None = None):
        """`purge_after`: TensorBoard hides the events this logdir already holds past this step (train.open_scalars
        passes 0 and writes the run's history again)."""
        SummaryWriter = _summary_writer_class()
        self.logdir = logdir
        purge = None if purge_after is None else purge_after + 1
        self._writer = SummaryWriter(logdir=str(logdir), flush_secs=3600, purge_step=purge)

    def write(self, step: int, scalars: dict) -> None:
        try:
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, float(value), step)
            self._writer.flush()
        except OSError as e:
            raise write_failed(e, self.logdir) from None

    def close(self) -> None:
        self._writer.close()
