"""Array kernels: NumPy/SciPy on the CPU, CuPy on the GPU, from one code path.

Arrays are cells x features. Each kernel returns the caller's array kind.
"""

from .anchors import Anchors, find_anchors, scale_data
from .cca import cca, pls, ridge_cca
from .fastmnn import FastMNNResult, fastmnn
from .liger_prep import (
    GeneMoments,
    excess_variance,
    liger_preprocess,
    liger_transform,
    normalize_rows,
    scale_not_center,
    select_genes,
)
from .linalg import PCAResult, pca, rsvd
from .neighbors import knn, mnn_pairs
from .nmf import INMFResult, JNMFResult, inmf, inmf_objective, jnmf, uinmf
from .nnls import nnls_bpp, nnls_hals
from .online_nmf import OnlineINMFResult, online_inmf, project_inmf
from .quantile import QuantileNormResult, quantile_norm
from .seurat import SeuratIntegration, integrate_pair, seurat_integrate
from .snf import affinity, snf
from .spectral import SpectralClusters, spectral_clusters

__all__ = [
    "Anchors", "FastMNNResult", "SeuratIntegration", "fastmnn", "find_anchors",
    "integrate_pair", "scale_data", "seurat_integrate",
    "GeneMoments", "excess_variance", "liger_preprocess", "liger_transform", "normalize_rows",
    "scale_not_center", "select_genes",
    "INMFResult", "JNMFResult", "OnlineINMFResult", "PCAResult", "QuantileNormResult", "cca",
    "inmf", "inmf_objective", "jnmf", "knn", "mnn_pairs", "nnls_bpp", "nnls_hals",
    "online_inmf", "pca", "pls", "project_inmf", "quantile_norm", "ridge_cca", "rsvd", "uinmf",
    "SpectralClusters", "affinity", "snf", "spectral_clusters",
]
