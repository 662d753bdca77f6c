"""Multimodal VAE with a product-of-experts posterior (MVAE), in Flax, trained by
:mod:`scatlas.models.train`.

Split as scvi-tools splits ``module/`` from ``model/``: :mod:`._module` (:class:`MVAEConfig`,
the network :class:`MVAENet`, the experts' PCA input layers), :mod:`._task` (likelihoods, the
sub-sampled ELBO, penalties, :class:`MVAETask`) and :mod:`._model` (the user-facing
:class:`MultimodalVAE`).

Model (Wu & Goodman 2018, MVAE; likelihoods as totalVI / MultiVI / PeakVI): a shared latent
``z ~ N(0, I)`` of ``latent_dim`` dimensions generates every modality ``m`` independently:

- counts (``"nb"``): ``x_mf ~ NB(l_m softmax(f_m(z, s))_f, theta_mf)`` with the observed total
  ``l_m`` as library size (log library as offset) and a per-feature inverse dispersion;
- protein (``"nb_mixture"``, optional): totalVI's background/foreground mixture with a shared
  theta, ``mu_back = l softmax(b(z, s))``, ``mu_fore = mu_back (1 + softplus(a(z, s)))``, mixing
  ``sigmoid(pi(z, s))`` on the background;
- counts on the ``log1p`` scale (``"log1p_normal"``, optional): ``log1p(x_mf) ~ N(f_m(z, s)_f,
  sigma_mf^2)``, a per-feature sd; no library offset (the decoder predicts the values, as a
  regression of ``log1p`` counts does);
- accessibility (``"bernoulli"``): ``x_mf ~ Bernoulli(sigmoid(f_m(z, s)_f + log l_m - c_m))``
  on binarised data, ``c_m`` the mean training log depth (PeakVI's depth factor as an offset);
- the log library itself, standardised, ``~ N(g_m(z, s), sigma_m^2)`` (so that imputation can
  predict a missing modality's depth); ``s`` is the optional one-hot batch covariate (decoders
  only, so the latent is pushed to be batch-free).

Inference: one encoder ("expert") per modality gives ``N(mu_m, exp(logvar_m))``; the posterior
of any subset ``S`` of observed modalities is the product of the experts in ``S`` and the prior
expert (:func:`~scatlas.models.mvae_likelihoods.product_of_experts`); a missing modality's
expert is masked per cell, so any non-empty subset embeds a cell. Encoder input:
``log1p(1e4 x / l)`` (counts) or the 0/1 data, plus the standardised log library;
``Dense -> LayerNorm -> ReLU -> Dropout`` blocks.

Training: the sub-sampled ELBO (MVAE): per cell the average of the ELBO terms of the joint
posterior, of every single modality's posterior and, beyond two modalities, of
``n_random_subsets`` random subsets per step, each term reconstructing every *observed*
modality of the cell (``cross_reconstruction=True``, a valid ELBO of all observed data with a
restricted posterior; it trains the one-modality posteriors to predict the others, as scMM's
cross-decoding; ``False``: each term reconstructs its own subset, the original MVAE); terms whose
subset has no observed modality are dropped. The KL weight rises linearly from 0 to 1 over
``kl_warmup_steps`` (validation uses weight 1). Added to the negative ELBO, outside the warm-up
(as MultiVI): ``alignment_weight`` x the Jeffreys divergence between the one-modality posteriors
of every pair of modalities a cell has (MultiVI's ``modality_penalty="Jeffreys"``), which pulls
the RNA-only and protein-only latents of a cell together, and ``contrastive_weight`` x a
symmetric InfoNCE loss (CLIP, scCLIP) between the one-modality posterior means of the paired
cells of a batch (:func:`contrastive_penalty`; scale-free, so it cannot be met by collapsing the
posteriors to the prior, which the Jeffreys term can).
"""

from ._model import MultimodalVAE
from ._module import (
    INPUT_PCA,
    INPUT_SCALE,
    PCA_CELLS,
    Expert,
    Head,
    MVAEConfig,
    MVAENet,
    expert_input,
    fit_expert_pca,
)
from ._task import (
    MVAETask,
    alignment_penalty,
    contrastive_penalty,
    expected_value,
    log_likelihood,
    negative_elbo,
    one_hot,
    subset_patterns,
)

__all__ = [
    "Expert", "Head", "INPUT_PCA", "INPUT_SCALE", "MVAEConfig", "MVAENet", "MVAETask",
    "MultimodalVAE", "PCA_CELLS", "alignment_penalty", "contrastive_penalty", "expected_value",
    "expert_input", "fit_expert_pca", "log_likelihood", "negative_elbo", "one_hot",
    "subset_patterns",
]
