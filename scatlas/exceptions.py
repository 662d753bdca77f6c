"""The errors scatlas raises, in one public module (as ``sklearn.exceptions``).

Catch these rather than reaching into private modules::

    from scatlas.exceptions import ScatlasInputError

    try:
        scatlas.tl.integrate(adata, "donor")
    except ScatlasInputError as err:
        print(err.param, err)          # the parameter at fault (or None), and what is wrong

- :class:`ScatlasInputError` (a ``ValueError``): bad input given to a public function, raised at
  the API boundary with a message naming the problem; ``param`` names the parameter at fault
  when there is one.
- :class:`TrainingDivergedError` (a ``FloatingPointError``): a model's training or validation
  loss became NaN or infinite.
- :class:`DeviceUnavailableError` (a ``RuntimeError``): the GPU was asked for (``device="gpu"``
  or ``SCATLAS_DEVICE=gpu``) where none is usable.
- :class:`BatcherClosedError` (a ``RuntimeError``): the search service's micro-batcher is
  shutting down and takes no new requests.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BatcherClosedError", "DeviceUnavailableError", "ScatlasInputError",
           "TrainingDivergedError"]


class ScatlasInputError(ValueError):
    """Bad input given to a public scatlas function.

    ``param``: the parameter at fault, when there is one (a keyword; front ends name it in their
    own terms, :func:`scatlas._validate.in_caller_terms`). Messages name parameters as Python
    does (``name=value``, or the bare name leading the message), so that a front end can
    translate them.
    """

    def __init__(self, *args: Any, param: str | None = None) -> None:
        super().__init__(*args)
        self.param = param


class TrainingDivergedError(FloatingPointError):
    """A model's training (or validation) loss became NaN or infinite."""


class DeviceUnavailableError(RuntimeError):
    """The GPU was requested but no usable CUDA device and CuPy are present."""


class BatcherClosedError(RuntimeError):
    """The batcher is shutting down and takes no new requests."""
