"""scatlas.exceptions is the one public home of the errors scatlas raises (issue 18): the
private modules re-export the same classes, and the checks that used to raise a bare ValueError
raise ScatlasInputError (still a ValueError, so callers catching ValueError keep working)."""

from __future__ import annotations

import numpy as np
import pytest

import scatlas
from scatlas import backend, exceptions
from scatlas.exceptions import (
    BatcherClosedError,
    DeviceUnavailableError,
    ScatlasInputError,
    TrainingDivergedError,
)


def test_one_class_per_error_wherever_it_is_imported_from():
    from scatlas import _validate
    from scatlas.search import _batcher

    assert _validate.ScatlasInputError is ScatlasInputError
    assert _validate.TrainingDivergedError is TrainingDivergedError
    assert backend.DeviceUnavailableError is DeviceUnavailableError
    assert _batcher.BatcherClosedError is BatcherClosedError
    assert scatlas.exceptions is exceptions
    assert issubclass(ScatlasInputError, ValueError)
    assert set(exceptions.__all__) == {"ScatlasInputError", "TrainingDivergedError",
                                       "DeviceUnavailableError", "BatcherClosedError"}


def test_former_bare_value_errors_are_input_errors(monkeypatch):
    with pytest.raises(ScatlasInputError, match="device argument must be one of"):
        backend.resolve_device("tpu")
    with pytest.raises(ScatlasInputError, match="dtype must be float32 or float64"):
        backend.resolve_dtype(np.int8)
    monkeypatch.setenv("SCATLAS_NUM_THREADS", "zero")
    with pytest.raises(ScatlasInputError, match="SCATLAS_NUM_THREADS must be a positive"):
        backend.cpu_threads()
    from scatlas.search._batcher import MicroBatcher

    with pytest.raises(ScatlasInputError, match="max_batch must be >= 1"):
        MicroBatcher(lambda *a: None, max_batch=0)
    from scatlas.models.mvae_eval import foscttm

    with pytest.raises(ScatlasInputError, match="paired rows"):
        foscttm(np.zeros((3, 2)), np.zeros((4, 2)))


def test_no_bare_value_error_is_raised_by_scatlas():
    """Every check raises a scatlas.exceptions class (the service's JSON hook, in its request
    checks, is the one place where a ValueError is the stdlib json module's contract)."""
    import re
    from pathlib import Path

    root = Path(scatlas.__file__).parent
    bare = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"raise ValueError\(", line)]
    assert len(bare) <= 1 and all(b.startswith("search/_requests.py:") for b in bare), bare
