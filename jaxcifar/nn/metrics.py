"""The confusion matrix and its text in torch `optim.ConfusionMatrix`'s layout."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def confusion_update(logits, labels, num_classes: int, weights=None):
    """(classes, classes) counts, rows = true class, columns = prediction; jit-friendly."""
    import jax.numpy as jnp

    pred = jnp.argmax(logits, axis=-1)
    w = jnp.ones(labels.shape, jnp.int32) if weights is None else weights.astype(jnp.int32)
    flat = labels * num_classes + pred
    return jnp.zeros(num_classes * num_classes, jnp.int32).at[flat].add(w).reshape(num_classes, num_classes)


def summarize(confusion: np.ndarray) -> dict:
    """Global accuracy, mean per-class accuracy and mean intersection-over-union (VOC), in %."""
    m = np.asarray(confusion, dtype=np.float64)
    total = m.sum()
    tp = np.diag(m)
    rows, cols = m.sum(1), m.sum(0)
    per_class = np.divide(tp, rows, out=np.zeros_like(tp), where=rows > 0)
    union = rows + cols - tp
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=union > 0)
    return {
        "accuracy": 100.0 * tp.sum() / total if total else 0.0,
        "average_row_correct": 100.0 * per_class.mean(),
        "average_rowucol_correct": 100.0 * iou.mean(),
        "per_class": (100.0 * per_class).tolist(),
    }


def format_confusion(confusion: np.ndarray, class_names: Sequence[str] | None = None) -> str:
    """The seed's printout: per-class rows with %, average row correct, rowUcol (VOC), global correct."""
    m = np.asarray(confusion, dtype=np.int64)
    s = summarize(m)
    width = max(8, len(str(m.max())) + 2)
    lines = ["ConfusionMatrix:"]
    n = len(m)
    for i, row in enumerate(m):
        cells = "".join(f"{v:{width}d}" for v in row)
        opening = "[[" if i == 0 else " ["
        closing = "]]" if i == n - 1 else "] "
        line = f"{opening}{cells}{closing}  {s['per_class'][i]:7.3f}%"
        if class_names:
            line += f" \t[class: {class_names[i]}]"
        lines.append(line)
    lines.append(f" + average row correct: {s['average_row_correct']:.3f}%")
    lines.append(f" + average rowUcol correct (VOC measure): {s['average_rowucol_correct']:.3f}%")
    lines.append(f" + global correct: {s['accuracy']:.2f}%")
    return "\n".join(lines)
