"""scanpy-style tools: AnnData in, results written to ``.obsm`` / ``.varm`` / ``.uns``.

The matrix used is ``adata.X`` or ``adata.layers[layer]``: numpy / scipy.sparse on the CPU, or
cupy / cupyx.scipy.sparse after ``scatlas.backend.anndata_to_device`` (rapids-singlecell's
convention). Results are of the matrix's array kind unless ``device=`` moves the computation.
One module per tool family; this package re-exports them.
"""

from ._covel import train_covel
from ._inmf import inmf
from ._inmf_online import online_inmf
from ._inmf_reference import online_inmf_add, project_inmf
from ._integrate import integrate
from ._linalg import cca, pca
from ._michigan import train_michigan
from ._models import embed, train_metric
from ._mvae import impute, train_mvae
from ._snf import snf
from ._tsne import tsne, tsne_coordinates

__all__ = [
    "cca", "embed", "impute", "inmf", "integrate", "online_inmf", "online_inmf_add", "pca",
    "project_inmf", "snf", "train_covel", "train_metric", "train_michigan", "train_mvae", "tsne",
    "tsne_coordinates",
]
