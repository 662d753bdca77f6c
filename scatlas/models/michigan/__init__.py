"""MichiGAN (Yu & Welch 2021): a beta-TCVAE and a Wasserstein GAN with gradient penalty
conditioned on its latent means, on the shared training stack.

Laid out as scvi-tools separates module from model: :mod:`._module` (Flax networks),
:mod:`._task` (losses: the beta-TCVAE ELBO with the minibatch-weighted total-correlation
estimate, WGAN-GP critic and generator losses), :mod:`._model` (the user-facing
:class:`MichiGAN`). Train one with :func:`scatlas.tl.train_michigan`.
"""

from ._model import LatentShift, MichiGAN
from ._task import MichiGANConfig, gradient_penalty, tc_terms, total_correlation

__all__ = ["LatentShift", "MichiGAN", "MichiGANConfig", "gradient_penalty", "tc_terms",
           "total_correlation"]
