"""The real datasets of ``../shared/data`` as the quality benchmark sees them.

Every loader returns an AnnData of **raw counts** (float32 CSR in ``.X``) with standard ``.obs``
columns, so each section runs every method at its defaults with no per-dataset settings:

- ``obs["batch"]``: the batch to integrate over / hold out (categorical strings);
- ``obs["label"]``: the ground-truth label (absent for the CITE-seq cells).

``DATASETS`` names the views: Baron appears twice, once with donors as batches and once with
species as batches; the CITE-seq cells carry their protein counts in ``obsm["protein_counts"]``
(a float32 array) and ``uns["protein_names"]``.
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

DATA_DIR = Path(os.environ.get("SCATLAS_DATA", Path(__file__).resolve().parents[2].parent
                               / "shared" / "data"))

# name -> (file, label column or None, batch column or None)
DATASETS: dict[str, tuple[str, str | None, str | None]] = {
    "cellbench": ("cellbench_lung_celllines_5batch.h5ad", "cell_line", "batch"),
    "baron_donor": ("baron_pancreas_human_mouse_cider.h5ad", "cell_type", "donor"),
    "baron_species": ("baron_pancreas_human_mouse_cider.h5ad", "cell_type", "species"),
    "mesc": ("scmerge_mesc_2batch.h5ad", "cell_type", "batch"),
    "cite": ("citefuse_eccite_cite_seq_500.h5ad", None, None),
}
INTEGRATION = ("cellbench", "baron_donor", "baron_species", "mesc")
ENCODER = ("cellbench", "baron_donor")


def available(name: str, data_dir: Path | None = None) -> bool:
    """Whether the file behind ``name`` is present."""
    return (Path(data_dir or DATA_DIR) / DATASETS[name][0]).exists()


def load(name: str, data_dir: Path | None = None) -> ad.AnnData:
    """The dataset ``name`` (a key of ``DATASETS``) with ``obs['batch']`` / ``obs['label']``."""
    file, label_key, batch_key = DATASETS[name]
    path = Path(data_dir or DATA_DIR) / file
    if not path.exists():
        raise FileNotFoundError(f"{path} is absent (the real datasets live in ../shared/data)")
    src = ad.read_h5ad(path)
    X = sp.csr_matrix(src.X, dtype=np.float32)
    obs = src.obs.iloc[:, :0].copy()
    if batch_key is not None:
        obs["batch"] = src.obs[batch_key].astype(str).astype("category").to_numpy()
    if label_key is not None:
        obs["label"] = src.obs[label_key].astype(str).astype("category").to_numpy()
    out = ad.AnnData(X=X, obs=obs, var=src.var.iloc[:, :0].copy())
    out.var_names_make_unique()
    out.uns["dataset"] = name
    if "protein_counts" in src.obsm:
        prot = src.obsm["protein_counts"]
        out.obsm["protein_counts"] = np.asarray(prot, dtype=np.float32)
        out.uns["protein_names"] = np.asarray(getattr(prot, "columns", range(prot.shape[1])),
                                              dtype=str)
    return out
