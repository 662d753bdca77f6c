"""Compare two k-nearest-neighbour results that come from different arithmetic.

A float32 GPU search and a float64 CPU one (or two float32 searches that sum in another order)
must agree on what the arithmetic determines, not on more:

- the sorted distances of every row, within a tolerance that follows from the arithmetic
  (:func:`float32_sum_tolerance`);
- the neighbours, as SETS, except among candidates whose distance ties with the row's k-th
  within that tolerance: any of them may fill the last places (so also their order).

Exact id equality demands more than either side can deliver: two keys a few ulps apart are
ordered by rounding.
"""

from __future__ import annotations

from typing import Any

import numpy as np

EPS32 = float(np.finfo(np.float32).eps) / 2  # unit roundoff of float32


def float32_sum_tolerance(n_terms: int, scale: float = 1.0, sides: int = 2) -> float:
    """Absolute error bound of a float32 sum of ``n_terms`` terms (a dot product, a squared
    distance summed from per-coordinate differences) whose magnitudes add up to at most
    ``scale``: ``gamma_n * scale`` with ``gamma_n ~ n u`` (Higham, Accuracy and Stability of
    Numerical Algorithms, 3.1; the rounding of each product or difference adds one u more), for
    each of ``sides`` computations compared (GPU and CPU each contribute their own error)."""
    return sides * (n_terms + 1) * EPS32 * scale


def _host(a: Any) -> np.ndarray:
    a = a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else a
    return np.asarray(a)


def neighbour_mismatches(D_ref: Any, I_ref: Any, D: Any, I: Any, atol: float,
                         rtol: float = 0.0) -> list[str]:
    """Rows where ``(D, I)`` disagrees with ``(D_ref, I_ref)`` beyond ties; empty when equal.

    ``D``/``I``: (n, k) distances (ascending per row, any monotone key) and ids; id -1 with
    distance +inf pads rows with fewer than k hits. Two ids may differ only where both results'
    distances for them lie within the tolerance of the row's k-th distance.
    """
    D_ref, I_ref, D, I = (_host(a) for a in (D_ref, I_ref, D, I))
    if D_ref.shape != D.shape or I_ref.shape != I.shape or D.shape != I.shape:
        return [f"shapes differ: {D_ref.shape}/{I_ref.shape} vs {D.shape}/{I.shape}"]
    bad = []
    for r in range(D.shape[0]):
        a, b = D_ref[r].astype(np.float64), D[r].astype(np.float64)
        fin = np.isfinite(a)
        if not np.array_equal(fin, np.isfinite(b)):
            bad.append(f"row {r}: {fin.sum()} vs {np.isfinite(b).sum()} hits")
            continue
        if not np.array_equal(I_ref[r][~fin], I[r][~fin]):
            bad.append(f"row {r}: padding ids {I_ref[r][~fin]} vs {I[r][~fin]}")
            continue
        tol = atol + rtol * np.abs(a[fin])
        if fin.any() and not (np.abs(a[fin] - b[fin]) <= tol).all():
            bad.append(f"row {r}: distances {a[fin].tolist()} vs {b[fin].tolist()}")
            continue
        ia, ib = I_ref[r][fin], I[r][fin]
        only_a, only_b = set(ia.tolist()) - set(ib.tolist()), set(ib.tolist()) - set(ia.tolist())
        if not only_a:
            continue
        kth = max(a[fin][-1], b[fin][-1])
        band = atol + rtol * abs(kth)
        da = {int(i): d for i, d in zip(ia, a[fin], strict=True)}
        db = {int(i): d for i, d in zip(ib, b[fin], strict=True)}
        loose = [i for i in only_a if da[i] < kth - 2 * band] + [
            i for i in only_b if db[i] < kth - 2 * band]
        if loose:
            bad.append(f"row {r}: ids {sorted(loose)} differ but are not tied with the k-th "
                       f"distance {kth:.9g} (+-{band:.3g})")
    return bad


def assert_same_neighbours(D_ref: Any, I_ref: Any, D: Any, I: Any, atol: float,
                           rtol: float = 0.0) -> None:
    """Assert :func:`neighbour_mismatches` is empty (showing the first few rows otherwise)."""
    bad = neighbour_mismatches(D_ref, I_ref, D, I, atol, rtol)
    assert not bad, f"{len(bad)} row(s) differ beyond ties: " + "; ".join(bad[:5])


def recall(I: Any, I_ref: Any) -> float:
    """Fraction of the reference's neighbours (ids >= 0) found in ``I``, row by row."""
    I, I_ref = _host(I), _host(I_ref)
    hit = tot = 0
    for got, ref in zip(I, I_ref, strict=True):
        ref = set(ref[ref >= 0].tolist())
        hit += len(ref & set(got.tolist()))
        tot += len(ref)
    return hit / max(tot, 1)


def stable_under_rounding(fn: Any, arrays: list[np.ndarray], key: Any, rel: float = 1e-10,
                          seed: int = 0) -> bool:
    """Whether ``key(fn(arrays))`` stays the same when every input entry moves by a relative
    ``rel`` (far above the float64 rounding by which two devices' results differ, ~1e-13, far
    below any real difference). True: the result is determined by the data and two devices
    must agree exactly; False: it rests on near-ties, which rounding decides."""
    rng = np.random.default_rng(seed)
    jittered = [A * (1 + rel * rng.uniform(-1, 1, size=A.shape)) for A in arrays]
    return key(fn(arrays)) == key(fn(jittered))


def assert_same_range_hits(ref: Any, got: Any, radius: float, atol: float) -> None:
    """Range-search results (one ``(distances, ids)`` pair per query) agree: the same ids except
    those within ``atol`` of the radius on either side, and their distances within ``atol``."""
    assert len(ref) == len(got), (len(ref), len(got))
    for q, ((dr, ir), (dg, ig)) in enumerate(zip(ref, got, strict=True)):
        dr, ir, dg, ig = (_host(a) for a in (dr, ir, dg, ig))
        a = dict(zip(ir.tolist(), dr.tolist(), strict=True))
        b = dict(zip(ig.tolist(), dg.tolist(), strict=True))
        for i in set(a) ^ set(b):
            d = a.get(i, b.get(i))
            assert abs(d - radius) <= atol, f"query {q}: id {i} at {d} (radius {radius})"
        for i in set(a) & set(b):
            assert abs(a[i] - b[i]) <= atol, f"query {q}: id {i}: {a[i]} vs {b[i]}"
