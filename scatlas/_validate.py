"""Input checks shared by every public entry point.

Each check raises at the API boundary with a message that names the problem (which argument,
what shape, how many NaNs...), so that no kernel crashes deep inside or returns silently wrong
output. Checks work on numpy, scipy.sparse, cupy and cupyx.scipy.sparse inputs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import backend
from .exceptions import ScatlasInputError, TrainingDivergedError  # noqa: F401 (re-exported)


def _values(X: Any):
    """The stored values of a matrix (``.data`` for sparse) and its array module."""
    xp = backend.array_module(X)
    return (X.data if backend.issparse(X) else X), xp


def check_matrix(
    X: Any,
    name: str = "X",
    *,
    allow_sparse: bool = True,
    finite: bool = True,
    nonnegative: bool = False,
    min_rows: int = 1,
    min_cols: int = 1,
) -> Any:
    """Validate a 2-D numeric matrix (cells x features) and return it unchanged.

    Raises :class:`ScatlasInputError` for: not 2-D, fewer than ``min_rows`` rows or
    ``min_cols`` columns (an empty matrix), a non-numeric dtype, NaN/inf values (``finite``),
    negative values (``nonnegative``), or a sparse matrix where only dense is supported.
    """
    if X is None:
        raise ScatlasInputError(f"{name} is None; expected a 2-D matrix (cells x features)")
    is_sparse = backend.issparse(X)
    if not is_sparse and not hasattr(X, "shape"):
        X = np.asarray(X)
    if is_sparse and not allow_sparse:
        raise ScatlasInputError(f"{name} must be dense here, got a sparse matrix")
    if len(X.shape) != 2:
        raise ScatlasInputError(f"{name} must be 2-D (cells x features), got shape {X.shape}")
    n, p = X.shape
    if n < min_rows or p < min_cols:
        raise ScatlasInputError(
            f"{name} has shape {X.shape}; need at least {min_rows} row(s) and {min_cols} "
            "column(s) (empty matrix?)"
        )
    vals, xp = _values(X)
    kind = np.dtype(vals.dtype).kind
    if kind not in "biuf":
        raise ScatlasInputError(f"{name} must be numeric, got dtype {vals.dtype}")
    # one reduction first (NaN/inf propagate into a sum, a negative value into the minimum);
    # the exact count, with its temporary mask, only when that flags something
    if finite and kind == "f" and vals.size and not bool(xp.isfinite(vals.sum())):
        bad = int(xp.count_nonzero(~xp.isfinite(vals)))
        if bad:
            raise ScatlasInputError(f"{name} contains {bad} NaN or infinite value(s)")
    checked_finite = finite or kind != "f"
    if nonnegative and kind in "if" and vals.size and (not checked_finite or vals.min() < 0):
        neg = int(xp.count_nonzero(vals < 0))
        if neg:
            raise ScatlasInputError(
                f"{name} contains {neg} negative value(s); non-negative values (counts) are "
                "required here"
            )
    return X


def check_counts(X: Any, name: str = "X") -> Any:
    """Validate a raw-count matrix: finite, non-negative, not empty."""
    return check_matrix(X, name, nonnegative=True)


def check_positive_int(value: Any, name: str, *, upper: int | None = None, what: str = "") -> int:
    """An integer >= 1 (and <= ``upper`` when given)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ScatlasInputError(f"{name} must be an integer, got {value!r}", param=name)
    value = int(value)
    if value < 1:
        raise ScatlasInputError(f"{name} must be >= 1, got {value}", param=name)
    if upper is not None and value > upper:
        raise ScatlasInputError(
            f"{name}={value} exceeds {what or 'the allowed maximum'} ({upper})", param=name)
    return value


def check_same_features(mats: Sequence[Any], names: Sequence[str]) -> int:
    """All matrices have the same number of columns; return it."""
    widths = {name: m.shape[1] for m, name in zip(mats, names, strict=True)}
    if len(set(widths.values())) != 1:
        raise ScatlasInputError(
            f"matrices must share the same features (columns); got widths {widths}. Align them "
            "to a common gene list first (scatlas.io.align_genes)"
        )
    return next(iter(widths.values()))


def check_obs_key(adata, key: str, what: str = "key") -> None:
    """``key`` is a column of ``adata.obs``."""
    if key not in adata.obs.columns:
        cols = list(adata.obs.columns)
        raise ScatlasInputError(
            f"{what} {key!r} is not a column of adata.obs (available: {cols[:20]}"
            f"{' ...' if len(cols) > 20 else ''})", param=what
        )


# ------------------------------------------------------------------- messages in callers' terms

#: a Python value as messages write it after ``name=``: a quoted string, None / True / False, a
#: number (a percentage too), an identifier; nothing (``layer=``: "give a value")
_VALUE = r"""'[^']*'|"[^"]*"|-?\d+(?:\.\d+)?(?:e[+-]?\d+)?%?|\w+"""
#: a name in a message: not part of a longer name, an attribute, an index, a quoted string or
#: a path
_BEFORE = r"(?<![\w.\[\]'\"{/\\-])"
_AFTER = r"(?![\w=(/\\]|\.\w)"


def in_caller_terms(
    message: str | BaseException,
    names: Mapping[str, str],
    *,
    values: Mapping[str, Mapping[str, str]] | None = None,
    param: str | None = None,
) -> str:
    """A message written in Python's terms (``balance=None``, ``pass input='lognorm'``,
    ``batch_size must be >= 1``) rewritten in a front end's terms (``--balance none``,
    ``pass --input-kind lognorm``, ``--batch-size must be >= 1``).

    ``names``: parameter -> the caller's name (a CLI flag, a request field). ``values``:
    parameter -> {Python value as written: the caller's value} (``{"balance": {"None":
    "none"}}``); an empty string drops the value (a flag that takes none). Otherwise strings
    lose their quotes, a percentage becomes a fraction (``50.0%`` -> ``0.5``), True is the bare
    flag and False its ``--no-`` form. Rewritten: every ``name=value`` and ``name=`` of a known
    parameter; a bare name with an underscore (``learning_rate``); ``param`` (default: the
    error's ``param`` attribute) where it leads the message. Names of unknown parameters stay.
    """
    if param is None:
        param = getattr(message, "param", None)
    text = str(message)
    values = values or {}
    known = sorted(names, key=len, reverse=True)  # longer names first: n_top_genes before n_top
    if not known:
        return text

    def value_of(name: str, raw: str | None) -> str:
        flag = names[name]
        if raw is None or raw == "":
            return flag
        mapped = values.get(name, {})
        if raw in mapped:
            out = mapped[raw]
            return flag if out == "" else out if out.startswith("-") else f"{flag} {out}"
        if raw == "True":
            return flag
        if raw == "False" and flag.startswith("--"):
            return "--no-" + flag[2:]
        if raw[0] in "'\"":
            raw = raw[1:-1]
        elif raw.endswith("%"):
            try:
                raw = f"{float(raw[:-1]) / 100:g}"
            except ValueError:
                pass
        elif raw == "None":
            raw = "none"
        return f"{flag} {raw}"

    group = "|".join(map(re.escape, known))
    text = re.sub(rf"{_BEFORE}({group})=({_VALUE})?",
                  lambda m: value_of(m.group(1), m.group(2)), text)
    bare = [n for n in known if "_" in n]
    if bare:
        text = re.sub(rf"{_BEFORE}({'|'.join(map(re.escape, bare))}){_AFTER}",
                      lambda m: names[m.group(1)], text)
    if param in names and re.match(rf"{re.escape(param)}{_AFTER}", text):
        text = names[param] + text[len(param):]
    return text


def config_overrides(
    cls: type, given: Any, param: str, *, own_args: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> dict[str, Any]:
    """The fields a ``train=`` / ``model=`` argument sets, as a dict to merge over defaults.

    ``given``: None (nothing), an instance of the dataclass ``cls`` (its fields that differ from
    ``cls``'s defaults; a field without a default always counts) or a mapping of field names.
    A name that is not a field of ``cls``, one in ``exclude`` (chosen from the data, e.g.
    ``n_genes``) or one in ``own_args`` (the function takes it as its own argument: one way to
    set each setting) is refused with a :class:`ScatlasInputError` naming it and ``param``.
    """
    import dataclasses

    if given is None:
        return {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if isinstance(given, cls):
        chosen = {}
        for name, f in fields.items():
            value = getattr(given, name)
            default = (f.default if f.default is not dataclasses.MISSING
                       else f.default_factory() if f.default_factory is not dataclasses.MISSING
                       else dataclasses.MISSING)
            if name not in exclude and (default is dataclasses.MISSING or value != default):
                chosen[name] = value
        given = chosen
    elif not isinstance(given, Mapping):
        raise ScatlasInputError(
            f"{param} must be a {cls.__name__} or a mapping of its fields, got "
            f"{type(given).__name__}", param=param)
    out = {}
    for name, value in given.items():
        if name not in fields or name in exclude:
            settable = sorted(set(fields) - set(exclude) - set(own_args))
            raise ScatlasInputError(
                f"{param}[{name!r}] is not a setting of {cls.__name__} that can be given "
                f"here; settable: {settable}", param=param)
        if name in own_args:
            raise ScatlasInputError(
                f"{param}[{name!r}]: pass {name}= as its own argument instead", param=param)
        out[name] = value
    return out


def check_rank(k: int, n_cells: Sequence[tuple[str, int]], n_genes: int, *,
               cells: str = "cells", name: str = "k") -> int:
    """The data's rule for a factorisation rank: ``k`` (already a positive integer by its
    declared rule, :mod:`scatlas._params`) below the cells of every dataset (``(name, n)``
    pairs) and below the genes; shared by iNMF, UINMF, jNMF and online iNMF."""
    k = int(k)
    for dataset, n in n_cells:
        if k >= n:
            raise ScatlasInputError(
                f"{name}={k} is too large: dataset {dataset!r} has only {n} {cells}; {name} must "
                f"be smaller than the number of {cells} of every dataset", param=name)
    if k >= n_genes:
        raise ScatlasInputError(
            f"{name}={k} is too large: only {n_genes} genes are used; {name} must be smaller "
            "than the number of genes",
            param=name)
    return k
