"""Array kernels: NumPy/SciPy on the CPU, CuPy on the GPU, from one code path.

Arrays are cells x features. Each kernel returns the caller's array kind.
"""

from .cca import cca, pls, ridge_cca
from .linalg import pca, rsvd

__all__ = ["cca", "pca", "pls", "ridge_cca", "rsvd"]
