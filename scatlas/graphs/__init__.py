"""Feature graphs linking the features of several modalities (guidance graphs, GLUE-style).

- :class:`FeatureGraph`: typed, signed, weighted links; ``|`` merges graphs;
  :meth:`FeatureGraph.resolve` validates a graph against the modalities' features;
- :func:`gene_protein_graph`: protein (antibody) -> coding gene, from a user table or the
  curated CITE-seq table shipped with scatlas (:func:`cite_seq_antibodies`);
- :func:`gene_peak_graph`: gene <-> peak by genomic window from a GTF/BED-like table;
- :func:`prior_graph`: prior links from any DataFrame (source, target, sign, weight);
- :func:`synthetic_multiome` (:mod:`.synthetic`): RNA + ATAC cells with a planted graph.

Used by :class:`scatlas.models.CoVEL` / :func:`scatlas.tl.train_covel` (Cao & Gao, Nat
Biotechnol 2022, GLUE; Tang et al., AAAI 2024, CoVEL).
"""

from __future__ import annotations

from ._graph import FeatureGraph, ResolvedGraph, as_graph, prior_graph
from ._links import cite_seq_antibodies, gene_peak_graph, gene_protein_graph, read_gene_table
from .synthetic import SyntheticMultiome, synthetic_multiome

__all__ = [
    "FeatureGraph", "ResolvedGraph", "SyntheticMultiome", "as_graph", "cite_seq_antibodies",
    "gene_peak_graph", "gene_protein_graph", "prior_graph", "read_gene_table",
    "synthetic_multiome",
]
