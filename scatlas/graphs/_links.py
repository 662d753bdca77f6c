"""Links from annotations: gene <-> protein (a mapping table) and gene <-> peak (genomic window).

- :func:`gene_protein_graph`: each protein (antibody) to its coding gene(s), from a user table or
  the curated CITE-seq table shipped with scatlas (:func:`cite_seq_antibodies`).
- :func:`gene_peak_graph`: each peak to every gene whose body, extended by ``promoter`` bases
  upstream of the TSS, lies within ``window`` bases; weight ``((d + 1000) / 1000) ** -0.75`` of
  the distance ``d`` (0 when they overlap), GLUE's ``dist_power_decay`` on
  ``window_graph(genes.expand(2000, 0), peaks, 150000)`` (``scglue.genomics``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..exceptions import ScatlasInputError
from ._graph import FeatureGraph, _shown


def cite_seq_antibodies() -> pd.DataFrame:
    """The curated antibody -> gene table (columns ``antibody``, ``gene``; package data)."""
    text = resources.files("scatlas.graphs").joinpath("data/cite_seq_antibodies.tsv")
    with text.open() as fh:
        return pd.read_csv(fh, sep="\t", comment="#", dtype=str)


def _norm(name: str) -> str:
    """Loose key of an antibody name: case, spaces, ``_TotalSeq*`` / ``ADT-`` affixes dropped."""
    name = re.sub(r"(?i)^(adt[-_])|([-_]?totalseq[-_]?[abc]?)$", "", str(name).strip())
    return re.sub(r"[\s_]+", "", name).lower()


def gene_protein_graph(
    proteins: Sequence[str],
    genes: Sequence[str] | None = None,
    table: pd.DataFrame | None = None,
    *,
    gene_type: str = "rna",
    protein_type: str = "protein",
) -> FeatureGraph:
    """Links protein -> coding gene for the ``proteins`` of a panel.

    Parameters
    ----------
    proteins
        The protein (antibody) feature names.
    genes
        The RNA feature names; links to other genes are dropped (None: keep all).
    table
        A mapping with columns ``protein`` (or ``antibody``) and ``gene``; None: the curated
        CITE-seq table (:func:`cite_seq_antibodies`). Names match exactly, else case- and
        space-insensitively.
    gene_type, protein_type
        The modality names the ends belong to.

    Raises :class:`ScatlasInputError` when no protein has a link (after ``genes``).
    """
    if table is None:
        table = cite_seq_antibodies()
    if not isinstance(table, pd.DataFrame):
        raise ScatlasInputError(f"table must be a DataFrame, got {type(table).__name__}",
                                param="table")
    key = "protein" if "protein" in table.columns else "antibody"
    if key not in table.columns or "gene" not in table.columns:
        raise ScatlasInputError(
            f"table needs columns 'protein' (or 'antibody') and 'gene', got {list(table.columns)}",
            param="table")
    exact: dict[str, list[str]] = {}
    loose: dict[str, list[str]] = {}
    for p, g in zip(table[key].astype(str), table["gene"].astype(str), strict=True):
        exact.setdefault(p, []).append(g)
        loose.setdefault(_norm(p), []).append(g)
    gene_set = None if genes is None else {str(g) for g in genes}
    rows = []
    for p in map(str, proteins):
        for g in exact.get(p) or loose.get(_norm(p), []):
            if gene_set is None or g in gene_set:
                rows.append((g, p))
    if not rows:
        raise ScatlasInputError(
            f"no protein of {_shown(list(proteins))} links to a gene"
            + ("" if genes is None else " among the given genes")
            + "; pass table= with columns protein, gene", param="proteins")
    df = pd.DataFrame(rows, columns=["source", "target"]).drop_duplicates()
    df["source_type"], df["target_type"] = gene_type, protein_type
    return FeatureGraph(df.reset_index(drop=True))


_PEAK = re.compile(r"^(?P<chrom>[^:_-]+)[:_-](?P<start>\d+)[_-](?P<end>\d+)$")


def _peak_table(peaks: Any) -> pd.DataFrame:
    if isinstance(peaks, pd.DataFrame):
        missing = {"chrom", "start", "end"} - set(peaks.columns)
        if missing:
            raise ScatlasInputError(f"peaks lacks columns {sorted(missing)}", param="peaks")
        out = peaks[["chrom", "start", "end"]].copy()
        out["name"] = (peaks["name"].astype(str) if "name" in peaks.columns else
                       out["chrom"].astype(str) + ":" + out["start"].astype(str) + "-"
                       + out["end"].astype(str))
        return out.reset_index(drop=True)
    rows, bad = [], []
    for p in map(str, peaks):
        m = _PEAK.match(p)
        if m is None:
            bad.append(p)
            continue
        rows.append((m["chrom"], int(m["start"]), int(m["end"]), p))
    if bad:
        raise ScatlasInputError(f"peak names must read chrom:start-end; got {_shown(bad)}",
                                param="peaks")
    return pd.DataFrame(rows, columns=["chrom", "start", "end", "name"])


def read_gene_table(path: str | Path) -> pd.DataFrame:
    """Genes (``chrom``, ``start``, ``end``, ``strand``, ``name``) from a GTF (``gene``
    records, ``gene_name`` attribute, else ``gene_id``) or a BED file (chrom, start, end, name,
    [score, strand]); 0-based half-open starts for both."""
    path = Path(path)
    first = next((ln for ln in path.read_text().splitlines()
                  if ln.strip() and not ln.startswith(("#", "track"))), "")
    cols = first.split("\t")
    if len(cols) >= 9 and cols[3].isdigit() and cols[4].isdigit():  # GTF
        df = pd.read_csv(path, sep="\t", comment="#", header=None, dtype=str)
        df = df[df[2] == "gene"]
        attr = df[8].astype(str)
        name = attr.str.extract(r'gene_name "([^"]+)"')[0].fillna(
            attr.str.extract(r'gene_id "([^"]+)"')[0])
        return pd.DataFrame({"chrom": df[0].to_numpy(), "start": df[3].astype(int).to_numpy() - 1,
                             "end": df[4].astype(int).to_numpy(), "strand": df[6].to_numpy(),
                             "name": name.to_numpy()})
    df = pd.read_csv(path, sep="\t", comment="#", header=None)
    out = pd.DataFrame({"chrom": df[0].astype(str), "start": df[1].astype(int),
                        "end": df[2].astype(int), "name": df[3].astype(str)})
    out["strand"] = df[5].astype(str) if df.shape[1] > 5 else "+"
    return out


def gene_peak_graph(
    genes: pd.DataFrame | str | Path,
    peaks: Sequence[str] | pd.DataFrame,
    *,
    window: int = 150_000,
    promoter: int = 2_000,
    gene_names: Sequence[str] | None = None,
    gene_type: str = "rna",
    peak_type: str = "atac",
) -> FeatureGraph:
    """Links gene <-> peak by genomic proximity (GLUE's RNA-anchored guidance graph).

    ``genes``: a table with ``chrom``, ``start``, ``end``, ``name`` (optional ``strand``; "-"
    genes extend their promoter past ``end``) or a GTF/BED path (:func:`read_gene_table`);
    ``peaks``: "chrom:start-end" names or a table with ``chrom``, ``start``, ``end`` (optional
    ``name``); ``gene_names``: keep only these genes (the RNA features). A peak links a gene when
    its distance to the gene body extended by ``promoter`` upstream is at most ``window``;
    ``weight = ((d + 1000) / 1000) ** -0.75``.
    """
    if not isinstance(genes, pd.DataFrame):
        genes = read_gene_table(genes)
    missing = {"chrom", "start", "end", "name"} - set(genes.columns)
    if missing:
        raise ScatlasInputError(f"genes lacks columns {sorted(missing)}", param="genes")
    genes = genes.copy()
    if gene_names is not None:
        genes = genes[genes["name"].astype(str).isin({str(g) for g in gene_names})]
    strand = genes["strand"].astype(str) if "strand" in genes.columns else "+"
    minus = np.asarray(strand == "-")
    g_start = genes["start"].to_numpy(np.int64) - np.where(minus, 0, promoter)
    g_end = genes["end"].to_numpy(np.int64) + np.where(minus, promoter, 0)
    pk = _peak_table(peaks)
    rows = []
    for chrom, gi in pd.Series(np.arange(len(genes))).groupby(genes["chrom"].astype(str).values):
        on = pk.index[pk["chrom"].astype(str) == chrom].to_numpy()
        if on.size == 0:
            continue
        p_start = pk["start"].to_numpy(np.int64)[on]
        p_end = pk["end"].to_numpy(np.int64)[on]
        order = np.argsort(p_start, kind="stable")
        for g in gi.to_numpy():
            lo = np.searchsorted(p_start[order], g_start[g] - window - (p_end - p_start).max())
            hi = np.searchsorted(p_start[order], g_end[g] + window, side="right")
            cand = order[lo:hi]
            d = np.maximum(0, np.maximum(p_start[cand] - g_end[g], g_start[g] - p_end[cand]))
            keep = d <= window
            for p, dd in zip(on[cand[keep]], d[keep], strict=True):
                rows.append((str(genes["name"].iloc[g]), str(pk["name"].iloc[p]),
                             float(((dd + 1000) / 1000) ** -0.75)))
    if not rows:
        raise ScatlasInputError(
            f"no peak lies within window={window} of a gene; check that genes and peaks use "
            "the same chromosome names and genome build", param="peaks")
    df = pd.DataFrame(rows, columns=["source", "target", "weight"])
    df["source_type"], df["target_type"] = gene_type, peak_type
    return FeatureGraph(df)
