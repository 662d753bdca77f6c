"""CoVEL: comprehensive view embedding of modalities measured in different cells.

Tang et al., AAAI 2024 (doi:10.1609/aaai.v38i14.29453): three views learned jointly, each
switchable in :class:`CoVELConfig`:

- **graph-linked** (GLUE, Cao & Gao, Nat Biotechnol 2022): a graph VAE gives every feature a
  vector from the feature graph (:mod:`scatlas.graphs`); each modality's inner-product decoder
  reconstructs a cell from its latent and those vectors (NB for RNA / protein, Bernoulli for
  ATAC), so unpaired cells of different modalities share one space; an adversarial modality
  discriminator aligns them;
- **fine-grained**: a transformer over each cell's top-N features with value binning;
- **contrastive**: InfoNCE (van den Oord et al. 2018) between the modalities of paired cells and
  between two feature-masked views of a cell.

Modules: :mod:`._module` (Flax networks), :mod:`._task` (loss terms, the training task, batches),
:mod:`._model` (:class:`CoVEL`). Train with :func:`scatlas.tl.train_covel`.
"""

from __future__ import annotations

from ._model import CoVEL
from ._module import VIEWS, CoVELConfig
from ._task import CoVELTask

__all__ = ["VIEWS", "CoVEL", "CoVELConfig", "CoVELTask"]
