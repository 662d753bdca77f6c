"""Accuracy and calibration of label transfer on cells whose true label is known.

:func:`calibration` compares predicted labels and their confidences (e.g. the ``label`` and
``confidence`` columns of :func:`scatlas.search.annotate`) with true labels, the way held-out
cells should be scored (never cells that are themselves in the index: their nearest neighbour is
their own copy). It returns a :class:`Calibration` holding

- ``accuracy``: the fraction of scored cells whose predicted label equals the true one;
- the **reliability table** (Naeini et al. 2015; Guo et al. 2017, "On calibration of modern
  neural networks", section 2): confidences in ``n_bins`` equal-width bins
  ``[0, 1/M], (1/M, 2/M], ..., ((M-1)/M, 1]``, per bin the number of cells ``n``, their
  ``mean_confidence``, their ``accuracy`` and ``gap = accuracy - mean_confidence``;
- ``ece``: the expected calibration error ``sum_b (n_b / N) |accuracy_b - mean_confidence_b|``
  and ``mce``, the largest ``|gap|`` over non-empty bins;
- with the out-of-distribution flags: the flagged fraction and the accuracy of flagged and of
  unflagged cells (a useful flag picks out the wrong calls);
- with the reference's labels (``known_labels``): how many cells carry a true label that the
  reference does not have (no k-NN vote can get those right), the accuracy and ECE on the
  others and, with the flags, the flagged fraction of each group (an unseen type should be
  flagged far more often).

Scored cells are those with a true label and a prediction; cells with no prediction (no labelled
neighbour: label None, confidence NaN) and cells with no true label are counted, not scored.

:func:`plot_reliability` draws the reliability diagram (accuracy per bin against the diagonal,
cells per bin below) and :func:`write_report` writes ``calibration.json``, ``reliability.csv``
and ``reliability.png`` into a folder (each file written atomically). ``scatlas annotate
--truth-key KEY --report DIR`` calls both.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._validate import ScatlasInputError, check_positive_int

__all__ = ["Calibration", "calibration", "plot_reliability", "write_report"]

TABLE_COLUMNS = ("bin", "lower", "upper", "n", "mean_confidence", "accuracy", "gap")


@dataclass
class Calibration:
    """The result of :func:`calibration` (see the module docstring for each field)."""

    table: pd.DataFrame
    n_cells: int
    n_scored: int
    n_no_prediction: int
    n_no_truth: int
    n_correct: int
    accuracy: float
    ece: float
    mce: float
    mean_confidence: float
    n_bins: int
    ood: dict[str, Any] | None = None
    unseen_truth: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: every scalar field, ``ood``, ``unseen_truth`` and the table as a
        list of per-bin records (NaN -> None)."""
        out: dict[str, Any] = {
            "n_cells": self.n_cells, "n_scored": self.n_scored,
            "n_no_prediction": self.n_no_prediction, "n_no_truth": self.n_no_truth,
            "n_correct": self.n_correct, "accuracy": _num(self.accuracy),
            "mean_confidence": _num(self.mean_confidence), "ece": _num(self.ece),
            "mce": _num(self.mce), "n_bins": self.n_bins,
            "binning": "equal-width confidence bins [0, 1/M], (1/M, 2/M], ..., ((M-1)/M, 1]",
        }
        if self.ood is not None:
            out["ood"] = {k: _num(v) for k, v in self.ood.items()}
        if self.unseen_truth is not None:
            out["unseen_truth"] = {k: _num(v) if not isinstance(v, list) else v
                                   for k, v in self.unseen_truth.items()}
        out.update(self.extra)
        out["reliability"] = [{k: _num(v) for k, v in rec.items()}
                              for rec in self.table.to_dict("records")]
        return out


def _num(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


def _labels(values: Any, name: str, n: int | None) -> np.ndarray:
    """Object array of labels as strings, None where missing (None / NaN / pd.NA)."""
    arr = np.asarray(values, dtype=object)
    if arr.ndim != 1:
        raise ScatlasInputError(f"{name} must be 1-D (one label per cell), got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ScatlasInputError(f"{name} has {arr.shape[0]} entries; predicted has {n}")
    missing = pd.isna(arr)
    return np.array([None if m else str(v) for v, m in zip(arr, missing, strict=True)],
                    dtype=object)


def bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each confidence in ``[0, 1]``: 0 for ``[0, 1/M]``, b for ``(b/M, (b+1)/M]``."""
    inner = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    return np.searchsorted(inner, confidence, side="left").astype(np.int64)


def calibration(predicted: Any, confidence: Any, truth: Any, *, n_bins: int = 10,
                is_ood: Any = None, known_labels: Iterable[Any] | None = None) -> Calibration:
    """Accuracy, reliability table and ECE of predicted labels against true labels.

    Parameters
    ----------
    predicted
        (n,) predicted labels (None / NaN: no prediction).
    confidence
        (n,) float confidences in ``[0, 1]`` (NaN allowed only where there is no prediction).
    truth
        (n,) true labels (None / NaN: unknown, the cell is not scored). Compared as strings.
    n_bins
        Equal-width confidence bins (default 10, as Guo et al. 2017).
    is_ood
        Optional (n,) bool out-of-distribution flags: adds the flagged fraction and the
        accuracy of flagged / unflagged scored cells.
    known_labels
        Optional labels of the reference: adds the number of scored cells whose true label the
        reference lacks, and the accuracy on the other cells.
    """
    n_bins = check_positive_int(n_bins, "n_bins")
    pred = _labels(predicted, "predicted", None)
    n = pred.shape[0]
    true = _labels(truth, "truth", n)
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    if conf.shape[0] != n:
        raise ScatlasInputError(f"confidence has {conf.shape[0]} entries; predicted has {n}")
    has_pred = np.array([p is not None for p in pred]) & np.isfinite(conf)
    has_true = np.array([t is not None for t in true])
    bad = has_pred & ((conf < 0) | (conf > 1))
    if bad.any():
        rows = np.flatnonzero(bad)[:5].tolist()
        raise ScatlasInputError(f"confidence must lie in [0, 1]; rows {rows} do not")
    scored = has_pred & has_true
    correct = np.zeros(n, bool)
    correct[scored] = pred[scored] == true[scored]
    c, ok = conf[scored], correct[scored]
    b = bin_index(c, n_bins)
    rows = []
    for j in range(n_bins):
        sel = b == j
        nb = int(sel.sum())
        mc = float(c[sel].mean()) if nb else float("nan")
        acc = float(ok[sel].mean()) if nb else float("nan")
        rows.append({"bin": j, "lower": j / n_bins, "upper": (j + 1) / n_bins, "n": nb,
                     "mean_confidence": mc, "accuracy": acc, "gap": acc - mc})
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    m = int(scored.sum())
    full = table[table["n"] > 0]
    if m:
        ece = float((full["n"] / m * full["gap"].abs()).sum())
        mce = float(full["gap"].abs().max())
        accuracy, mean_conf = float(ok.mean()), float(c.mean())
    else:
        ece = mce = accuracy = mean_conf = float("nan")
    ood = None
    if is_ood is not None:
        flag = np.asarray(is_ood, dtype=bool).ravel()
        if flag.shape[0] != n:
            raise ScatlasInputError(f"is_ood has {flag.shape[0]} entries; predicted has {n}")
        fs, us = scored & flag, scored & ~flag
        ood = {"n_flagged": int(flag.sum()), "fraction_flagged": float(flag.mean()) if n else
               float("nan"), "n_scored_flagged": int(fs.sum()),
               "accuracy_flagged": float(correct[fs].mean()) if fs.any() else float("nan"),
               "accuracy_unflagged": float(correct[us].mean()) if us.any() else float("nan"),
               "fraction_of_errors_flagged": (float(flag[scored & ~correct].mean())
                                              if (scored & ~correct).any() else float("nan"))}
    unseen = None
    if known_labels is not None:
        known = {str(v) for v in known_labels if not pd.isna(v)}
        novel = scored & np.array([t is not None and t not in known for t in true])
        seen = scored & ~novel
        unseen = {"n_truth_not_in_reference": int(novel.sum()),
                  "labels_not_in_reference": sorted({str(t) for t in true[novel]}),
                  "accuracy_on_reference_labels": (float(correct[seen].mean()) if seen.any()
                                                   else float("nan"))}
        if seen.any():
            unseen["ece_on_reference_labels"] = _ece(conf[seen], correct[seen], n_bins)
        if is_ood is not None:  # the flag's point: cells of labels the reference lacks
            unseen["fraction_flagged_not_in_reference"] = (float(flag[novel].mean())
                                                           if novel.any() else float("nan"))
            unseen["fraction_flagged_reference_labels"] = (float(flag[seen].mean())
                                                           if seen.any() else float("nan"))
    return Calibration(table=table, n_cells=n, n_scored=m,
                       n_no_prediction=int((~has_pred).sum()),
                       n_no_truth=int((has_pred & ~has_true).sum()), n_correct=int(ok.sum()),
                       accuracy=accuracy, ece=ece, mce=mce, mean_confidence=mean_conf,
                       n_bins=n_bins, ood=ood, unseen_truth=unseen)


def _ece(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    b = bin_index(conf, n_bins)
    n = np.bincount(b, minlength=n_bins)
    acc = np.bincount(b, weights=correct.astype(np.float64), minlength=n_bins)
    mc = np.bincount(b, weights=conf, minlength=n_bins)
    full = n > 0
    return float((np.abs(acc[full] - mc[full]) / conf.size).sum())


def reliability_figure(cal: Calibration, title: str | None = None) -> Any:
    """The reliability diagram of ``cal`` as a matplotlib ``Figure`` (Agg canvas, no pyplot):
    accuracy per confidence bin against the diagonal (perfect calibration), with the cells per
    bin below."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    t = cal.table
    fig = Figure(figsize=(4.6, 5.4))
    FigureCanvasAgg(fig)
    ax, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = 1.0 / cal.n_bins
    full = t[t["n"] > 0]
    ax.plot([0, 1], [0, 1], ls="--", color="0.5", lw=1, label="perfect calibration")
    ax.bar(full["lower"], full["accuracy"], width=width, align="edge", color="#4C72B0",
           edgecolor="white", label="accuracy")
    ax.plot(full["lower"] + width / 2, full["mean_confidence"], "o", color="#DD8452", ms=4,
            label="mean confidence in the bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    text = f"accuracy {cal.accuracy:.3f}\nECE {cal.ece:.3f}\nn = {cal.n_scored}"
    if cal.ood is not None:
        text += f"\nflagged OOD {cal.ood['fraction_flagged']:.1%}"
    ax.text(0.97, 0.03, text, ha="right", va="bottom", fontsize=8, transform=ax.transAxes)
    ax.set_title(title or "reliability diagram", fontsize=10)
    ax2.bar(t["lower"], t["n"], width=width, align="edge", color="0.6", edgecolor="white")
    ax2.set_xlabel("confidence (vote share of the predicted label)")
    ax2.set_ylabel("cells")
    fig.tight_layout()
    return fig


def plot_reliability(cal: Calibration, path: str | Path, title: str | None = None) -> Path:
    """Write the reliability diagram of ``cal`` to ``path`` (PNG, written atomically)."""
    from ..io import atomic_write

    path = Path(path)
    fig = reliability_figure(cal, title)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path


def write_report(cal: Calibration, out_dir: str | Path, *, title: str | None = None,
                 settings: dict[str, Any] | None = None) -> Path:
    """Write ``calibration.json`` (:meth:`Calibration.to_dict` plus ``settings``),
    ``reliability.csv`` (the table) and ``reliability.png`` into ``out_dir`` (created when
    missing; each file written atomically). Returns ``out_dir``."""
    from ..io import atomic_write

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ScatlasInputError(f"report folder {str(out)!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    record = cal.to_dict()
    if settings:
        record = {"settings": settings, **record}
    with atomic_write(out / "calibration.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    with atomic_write(out / "reliability.csv") as tmp:
        cal.table.to_csv(tmp, index=False)
    plot_reliability(cal, out / "reliability.png", title)
    return out
