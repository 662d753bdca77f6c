"""Metric-learning cell encoder (SCimilarity-style) in Flax, trained by :mod:`scatlas.models.train`.

Split as scvi-tools splits ``module/`` from ``model/``:

- :mod:`._module`: the Flax network (:class:`MetricNet`) and :class:`MetricConfig`;
- :mod:`._task`: the training task (:class:`MetricTask`), the label hierarchy and the fixed PCA
  input layer (:func:`fit_input_pca`);
- :mod:`._model`: the user-facing :class:`MetricEncoder` (embed, save / load).

Architecture (SCimilarity ``nn_models.Encoder``/``Decoder``; Heimberg et al., Nature 2025):
encoder blocks ``Dropout -> Dense -> BatchNorm -> PReLU`` (input dropout 0.4 before the first
block, dropout 0.5 before the others; hidden 3 x 1024), then ``Dense(latent=128)`` and L2
normalisation; the decoder mirrors the hidden sizes and ends in ``Dense(n_genes)`` regressing the
log-normalised input. Loss: ``w * metric + (1 - w) * MSE + L1`` (see :mod:`._module`).
"""

from ._model import (
    CPU_BLOCK_ROWS,
    SPARSE_STEP_MAX_DENSITY,
    SPARSE_STEP_MIN_GENES,
    MetricEncoder,
    use_sparse_step,
)
from ._module import (
    INPUT_PCA,
    NEGATIVES,
    OBJECTIVES,
    PRECISIONS,
    Decoder,
    Encoder,
    GeneOutput,
    MetricConfig,
    MetricNet,
)
from ._task import MetricTask, fit_input_pca, read_hierarchy, related_labels

__all__ = [
    "CPU_BLOCK_ROWS", "Decoder", "Encoder", "GeneOutput", "INPUT_PCA", "MetricConfig",
    "MetricEncoder", "MetricNet", "MetricTask", "NEGATIVES", "OBJECTIVES", "PRECISIONS",
    "SPARSE_STEP_MAX_DENSITY", "SPARSE_STEP_MIN_GENES", "fit_input_pca", "read_hierarchy",
    "related_labels", "use_sparse_step",
]
