"""Held-out quality of every method at its defaults on the real datasets.

``python -m bench.quality`` runs it.

Sections (one module each, run in this order): ``integration`` (cca, mnn, inmf, harmony against
harmonypy / scanorama / Seurat 4.3), ``encoder`` (the metric encoder, leave one batch out, against
PCA and logistic regression on PCA) and ``vae`` (the multimodal VAE on random CITE-seq splits
against linear CCA and ridge).

Each section module exposes ``run(*, quick: bool = False) -> dict`` returning

- ``rows``: one dict per (dataset, split, method) with ``section``, ``dataset``, ``split``,
  ``method``, ``role`` (``"ours"``, ``"peer"`` or ``"baseline"``), ``seconds``, ``error``
  (``None`` or the message of a method that failed) and one float per metric (flat keys);
- ``checks``: one dict per target of issue 15 with ``section``, ``dataset``, ``check`` (what is
  compared, in words), ``value``, ``target`` and ``passed``.

No section takes per-dataset settings: every method runs at its defaults.
"""
