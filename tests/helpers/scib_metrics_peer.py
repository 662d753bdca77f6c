"""Run scib-metrics on one embedding and neighbour graph; used by tests/test_metrics.py.

Runs under the interpreter that has ``scib-metrics`` (0.6 needs Python >= 3.12, so normally its
own venv, ``bench/.peers/scib``; see tests/test_metrics.py). Usage::

    python tests/helpers/scib_metrics_peer.py IN.npz OUT.json

``IN.npz`` holds ``X`` (n, d) float32, ``labels`` and ``batch`` (n,) ints, and the exact
neighbour graph ``knn_idx`` / ``knn_dist`` (n, 90) with each cell itself in column 0 (distance 0),
as scib-metrics' ``NeighborsResults`` expects. Writes the metrics as JSON (per-cell LISI
included).
"""

from __future__ import annotations

import json
import sys

import numpy as np


def main(src: str, dst: str) -> None:
    import scib_metrics
    from scib_metrics import metrics as sm
    from scib_metrics.nearest_neighbors import NeighborsResults

    z = np.load(src)
    X, labels, batch = z["X"], z["labels"], z["batch"]
    nn90 = NeighborsResults(indices=z["knn_idx"], distances=z["knn_dist"])
    nn15 = nn90.subset_neighbors(15)
    out = {
        "version": scib_metrics.__version__,
        "lisi_batch": np.asarray(sm.lisi_knn(nn90, batch), dtype=float).tolist(),
        "lisi_label": np.asarray(sm.lisi_knn(nn90, labels), dtype=float).tolist(),
        "ilisi": float(sm.ilisi_knn(nn90, batch)),
        "clisi": float(sm.clisi_knn(nn90, labels)),
        "silhouette_label": float(sm.silhouette_label(X, labels)),
        "silhouette_batch": float(sm.silhouette_batch(X, labels, batch)),
        "silhouette_batch_cosine": float(sm.silhouette_batch(X, labels, batch, metric="cosine")),
        "bras": float(sm.bras(X, labels, batch)),
        "graph_connectivity": float(sm.graph_connectivity(nn15, labels)),
    }
    out.update({k: float(v) for k, v in sm.nmi_ari_cluster_labels_kmeans(X, labels).items()})
    with open(dst, "w") as fh:
        json.dump(out, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
