"""The feature graph: typed, signed, weighted links between features of several modalities.

A :class:`FeatureGraph` holds one row per link in ``edges`` (a DataFrame): ``source``, ``target``
(feature names), ``weight`` in (0, 1], ``sign`` (+1 / -1) and optional ``source_type`` /
``target_type`` (the modality a name belongs to, e.g. ``"rna"``; empty: any modality holding
that name). Links are undirected in use: :meth:`FeatureGraph.resolve` adds both directions and a
self-loop per feature, as GLUE's guidance graphs do (Cao & Gao, Nat Biotechnol 2022,
``scglue.genomics`` / ``scglue.models.scglue``: ``compose_multigraph``, ``nx.Graph`` with self
loops, ``normalize_edges(method="keepvar")``).

Validation (:meth:`FeatureGraph.check`) names what is wrong: features the graph names that no
modality has (a warning, listing a few; prior graphs usually cover more genes than a panel), a
modality the graph names none of (an error), a modality with no link to another modality (an
error: nothing ties its cells to the others).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..exceptions import ScatlasInputError

log = logging.getLogger(__name__)

COLUMNS = ("source", "target", "weight", "sign", "source_type", "target_type")


def _shown(names: Sequence[Any], k: int = 8) -> str:
    names = [str(n) for n in names]
    more = f" ... ({len(names)} in all)" if len(names) > k else ""
    return ", ".join(repr(n) for n in names[:k]) + more


def _edge_frame(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with the :data:`COLUMNS`, checked: names as str, weight in (0, 1], sign +-1."""
    if not isinstance(df, pd.DataFrame):
        raise ScatlasInputError(f"graph links must be a DataFrame, got {type(df).__name__}",
                                param="graph")
    missing = [c for c in ("source", "target") if c not in df.columns]
    if missing:
        raise ScatlasInputError(
            f"graph DataFrame lacks column(s) {missing}; it needs 'source' and 'target' (and "
            f"optionally 'weight', 'sign'), got columns {list(df.columns)}", param="graph")
    if len(df) == 0:
        raise ScatlasInputError("the graph has no links (empty DataFrame)", param="graph")
    out = pd.DataFrame({
        "source": df["source"].astype(str).to_numpy(),
        "target": df["target"].astype(str).to_numpy(),
    })
    w = (np.asarray(df["weight"], np.float64) if "weight" in df.columns
         else np.ones(len(df)))
    if not np.all(np.isfinite(w)) or np.any(w <= 0) or np.any(w > 1):
        bad = int(np.sum(~np.isfinite(w) | (w <= 0) | (w > 1)))
        raise ScatlasInputError(f"graph weights must be in (0, 1]; {bad} link(s) are not",
                                param="graph")
    s = np.asarray(df["sign"], np.float64) if "sign" in df.columns else np.ones(len(df))
    if not np.all(np.isin(s, (-1.0, 1.0))):
        raise ScatlasInputError("graph signs must be +1 or -1", param="graph")
    out["weight"], out["sign"] = w, s
    for col in ("source_type", "target_type"):
        out[col] = (df[col].fillna("").astype(str).to_numpy() if col in df.columns
                    else np.full(len(df), "", object))
    return out


@dataclass
class ResolvedGraph:
    """A graph on the vertices ``0..n_vertices-1`` (modality features concatenated in order).

    ``src``, ``tgt``: int32 (E,) edge ends, both directions of every link plus one self-loop per
    vertex; ``weight``, ``sign``: float32 (E,); ``offsets``: {modality: (start, stop)} vertex
    ranges; ``n_links``: {modality: number of its features linked to another modality}.
    """

    src: np.ndarray
    tgt: np.ndarray
    weight: np.ndarray
    sign: np.ndarray
    n_vertices: int
    offsets: dict[str, tuple[int, int]]
    n_links: dict[str, int]

    def keepvar_norm(self) -> np.ndarray:
        """GLUE's ``normalize_edges(method="keepvar")``: ``w_e / sqrt(in-degree(tgt_e))`` with
        the weighted in-degree, so a convolution keeps the variance of its inputs (float32)."""
        deg = np.bincount(self.tgt, weights=self.weight, minlength=self.n_vertices)
        return (self.weight / np.sqrt(deg[self.tgt])).astype(np.float32)

    def cross_pairs(self, a: str, b: str) -> np.ndarray:
        """(k, 2) vertex pairs (a's vertex, b's vertex) of the links between modalities a, b."""
        (a0, a1), (b0, b1) = self.offsets[a], self.offsets[b]
        m = (self.src >= a0) & (self.src < a1) & (self.tgt >= b0) & (self.tgt < b1)
        return np.stack([self.src[m], self.tgt[m]], 1)


class FeatureGraph:
    """Links between features of modalities (see the module docstring).

    Build one with :func:`~scatlas.graphs.gene_protein_graph`,
    :func:`~scatlas.graphs.gene_peak_graph` or :func:`~scatlas.graphs.prior_graph`, or from a
    DataFrame (``FeatureGraph(df)``); combine graphs with ``|``.
    """

    def __init__(self, edges: pd.DataFrame):
        self.edges = _edge_frame(edges)

    def __repr__(self) -> str:
        return f"FeatureGraph({len(self.edges)} links, {len(self.features)} features)"

    def __len__(self) -> int:
        return len(self.edges)

    def __or__(self, other: FeatureGraph | pd.DataFrame) -> FeatureGraph:
        other = as_graph(other)
        both = pd.concat([self.edges, other.edges], ignore_index=True)
        key = ["source", "target", "source_type", "target_type"]
        both = both.sort_values("weight", ascending=False, kind="stable")
        return FeatureGraph(both.drop_duplicates(key).sort_index().reset_index(drop=True))

    @property
    def features(self) -> set[str]:
        """Every feature name the graph mentions."""
        return set(self.edges["source"]) | set(self.edges["target"])

    def to_frame(self) -> pd.DataFrame:
        """A copy of the links."""
        return self.edges.copy()

    # --------------------------------------------------------------------------- resolution

    @staticmethod
    def _ends(names: np.ndarray, types: np.ndarray, lookup: dict[str, dict[str, int]],
              known: set[str]) -> list[list[int]]:
        """Vertex ids each end may denote: the typed modality's feature (none if that modality
        lacks it), or, untyped or of a type no modality has, every modality's with that name."""
        out = []
        for name, typ in zip(names, types, strict=True):
            hits = lookup.get(name, {})
            out.append([hits[typ]] if typ and typ in hits else
                       ([] if typ and typ in known else list(hits.values())))
        return out

    def resolve(self, modalities: Mapping[str, Sequence[str]], *, warn_unknown: bool = True
                ) -> ResolvedGraph:
        """The graph on the features of ``modalities`` ({name: feature names, in order}).

        Links whose ends are not features of the modalities are dropped (a warning names a
        few); a name without a type links every modality that has it. Raises
        :class:`ScatlasInputError` if the graph names no feature of a modality, or a modality
        has no link to another modality.
        """
        names = list(modalities)
        if len(names) < 2:
            raise ScatlasInputError(f"need at least two modalities, got {names}",
                                    param="modalities")
        lookup: dict[str, dict[str, int]] = {}
        offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for m in names:
            feats = [str(f) for f in modalities[m]]
            for i, f in enumerate(feats):
                lookup.setdefault(f, {})[m] = start + i
            offsets[m] = (start, start + len(feats))
            start += len(feats)
        n = start
        e = self.edges
        src = self._ends(e["source"].to_numpy(), e["source_type"].to_numpy(), lookup, set(names))
        tgt = self._ends(e["target"].to_numpy(), e["target_type"].to_numpy(), lookup, set(names))
        unknown = sorted({str(x) for x, ids in zip(e["source"], src, strict=True) if not ids}
                         | {str(x) for x, ids in zip(e["target"], tgt, strict=True) if not ids})
        if unknown and warn_unknown:
            warnings.warn(f"the graph names {len(unknown)} feature(s) that no modality has "
                          f"({_shown(unknown)}); their links are dropped", UserWarning,
                          stacklevel=2)
        rows = [(s, t, w, g) for ss, tt, w, g in zip(src, tgt, e["weight"], e["sign"],
                                                     strict=True)
                for s in ss for t in tt if s != t]
        mod_of = np.empty(n, np.int32)
        for k, m in enumerate(names):
            mod_of[offsets[m][0]:offsets[m][1]] = k
        arr = np.asarray(rows, np.float64).reshape(-1, 4)
        s, t = arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64)
        touched = np.zeros(n, bool)
        touched[s], touched[t] = True, True
        cross = mod_of[s] != mod_of[t]
        linked = np.zeros(n, bool)
        linked[s[cross]], linked[t[cross]] = True, True
        n_links = {}
        for m in names:
            a, b = offsets[m]
            if not touched[a:b].any():
                raise ScatlasInputError(
                    f"the graph names no feature of modality {m!r} ({b - a} features, e.g. "
                    f"{_shown(list(modalities[m])[:3], 3)}); check the feature names or the "
                    "mapping table", param="graph")
        for m in names:
            a, b = offsets[m]
            n_links[m] = int(linked[a:b].sum())
            if n_links[m] == 0:
                raise ScatlasInputError(
                    f"modality {m!r} has no feature linked to another modality in the graph; "
                    "nothing ties its cells to the others (add links, e.g. "
                    "scatlas.graphs.gene_protein_graph)", param="graph")
        # both directions, duplicates merged (largest weight), then one self-loop per vertex
        both = np.concatenate([arr, arr[:, [1, 0, 2, 3]]])
        df = pd.DataFrame(both, columns=["s", "t", "w", "g"])
        df = df.sort_values("w", ascending=False, kind="stable").drop_duplicates(["s", "t"])
        df = df.sort_values(["s", "t"], kind="stable")
        loops = np.arange(n)
        src_all = np.concatenate([df["s"].to_numpy().astype(np.int32), loops]).astype(np.int32)
        tgt_all = np.concatenate([df["t"].to_numpy().astype(np.int32), loops]).astype(np.int32)
        w_all = np.concatenate([df["w"].to_numpy(), np.ones(n)]).astype(np.float32)
        g_all = np.concatenate([df["g"].to_numpy(), np.ones(n)]).astype(np.float32)
        return ResolvedGraph(src_all, tgt_all, w_all, g_all, n, offsets, n_links)

    def check(self, modalities: Mapping[str, Sequence[str]]) -> dict[str, int]:
        """Validate against ``modalities``; returns {modality: features linked across}."""
        return self.resolve(modalities).n_links


def as_graph(graph: Any) -> FeatureGraph:
    """A :class:`FeatureGraph` from a graph or a DataFrame of links (``source``, ``target``,
    optional ``weight``, ``sign``, ``source_type``, ``target_type``)."""
    if isinstance(graph, FeatureGraph):
        return graph
    if isinstance(graph, pd.DataFrame):
        return FeatureGraph(graph)
    raise ScatlasInputError(
        f"graph must be a scatlas.graphs.FeatureGraph or a DataFrame of links, got "
        f"{type(graph).__name__}", param="graph")


def prior_graph(df: pd.DataFrame, *, source: str = "source", target: str = "target",
                weight: str | None = "weight", sign: str | None = "sign",
                source_type: str | None = None, target_type: str | None = None
                ) -> FeatureGraph:
    """Prior links (e.g. TF -> target, pathway co-membership) from any DataFrame.

    ``source``/``target``: the columns of feature names; ``weight``/``sign``: columns used when
    present (default 1 / +1); ``source_type``/``target_type``: the modality every source / target
    belongs to (e.g. ``"rna"``), or None (any modality with that name).
    """
    if not isinstance(df, pd.DataFrame):
        raise ScatlasInputError(f"df must be a DataFrame, got {type(df).__name__}", param="df")
    for col in (source, target):
        if col not in df.columns:
            raise ScatlasInputError(f"df has no column {col!r} (columns {list(df.columns)})",
                                    param="df")
    out = pd.DataFrame({"source": df[source], "target": df[target]})
    if weight is not None and weight in df.columns:
        out["weight"] = df[weight].to_numpy()
    if sign is not None and sign in df.columns:
        out["sign"] = df[sign].to_numpy()
    out["source_type"] = source_type or ""
    out["target_type"] = target_type or ""
    return FeatureGraph(out)
