"""scatlas.graphs: gene-protein, gene-peak and prior links, validation, the synthetic data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scatlas import graphs
from scatlas.exceptions import ScatlasInputError

CITE_ADTS = [
    "B220 (CD45R)", "B7-H1 (PD-L1)", "C-kit (CD117)", "CCR7", "CD11b", "CD11c", "CD138", "CD14",
    "CD16", "CD19", "CD1a", "CD2", "CD223 (lag3)", "CD24", "CD26 (Adenosine)", "CD27", "CD28",
    "CD3", "CD34", "CD366 (tim3)", "CD4", "CD44", "CD45", "CD45RA", "CD45RO", "CD5", "CD56",
    "CD62L", "CD66b", "CD69", "CD7", "CD77", "CD8", "CTLA4", "EpCAM (CD326)", "HLA-A,B,C",
    "IL7Ralpha (CD127)", "IgG1", "IgG2a", "LAMP1", "MHCII (HLA-DR)", "Ox40 (CD134)",
    "PD-1 (CD279)", "PD-L1 (CD274)", "PD1 (CD279)", "PECAM (CD31)", "Siglec-8", "TCRb", "TCRg",
]


def test_curated_table_covers_the_shared_cite_seq_panel():
    table = graphs.cite_seq_antibodies()
    assert {"antibody", "gene"} <= set(table.columns)
    g = graphs.gene_protein_graph(CITE_ADTS)
    linked = set(g.edges["target"])
    # isotype controls and the CD77 glycolipid have no coding gene; every other ADT links
    assert set(CITE_ADTS) - linked == {"IgG1", "IgG2a", "CD77"}
    e = g.edges.set_index("target")
    assert e.loc["CD8", "source"] == "CD8A" and e.loc["CD16", "source"] == "FCGR3A"
    assert set(e.loc["HLA-A,B,C", "source"]) == {"HLA-A", "HLA-B", "HLA-C"}
    assert (g.edges["source_type"] == "rna").all() and (g.edges["target_type"] == "protein").all()


def test_gene_protein_user_table_loose_names_and_gene_filter():
    table = pd.DataFrame({"protein": ["CD3", "CD4"], "gene": ["CD3E", "CD4"]})
    g = graphs.gene_protein_graph(["cd3_TotalSeqB", "CD4"], genes=["CD3E"], table=table)
    assert list(zip(g.edges["source"], g.edges["target"], strict=True)) == [
        ("CD3E", "cd3_TotalSeqB")]
    with pytest.raises(ScatlasInputError, match="no protein"):
        graphs.gene_protein_graph(["XYZ"], table=table)


def test_resolve_both_directions_self_loops_and_keepvar():
    g = graphs.prior_graph(pd.DataFrame({"source": ["a", "b"], "target": ["X", "X"],
                                         "weight": [1.0, 0.5], "sign": [1, -1]}))
    r = g.resolve({"m1": ["a", "b", "c"], "m2": ["X", "Y"]})
    assert r.n_vertices == 5 and r.offsets == {"m1": (0, 3), "m2": (3, 5)}
    edges = {(int(s), int(t)): (float(w), float(sg))
             for s, t, w, sg in zip(r.src, r.tgt, r.weight, r.sign, strict=True)}
    assert edges[(0, 3)] == edges[(3, 0)] == (1.0, 1.0)
    assert edges[(1, 3)] == edges[(3, 1)] == (0.5, -1.0)
    assert all(edges[(i, i)] == (1.0, 1.0) for i in range(5))
    assert len(edges) == 4 + 5
    # keepvar: w / sqrt(weighted in-degree of the target), numpy reference
    deg = np.zeros(5)
    for (_, t), (w, _) in edges.items():
        deg[t] += w
    want = np.array([w / np.sqrt(deg[t]) for t, w in zip(r.tgt, r.weight, strict=True)])
    np.testing.assert_allclose(r.keepvar_norm(), want, rtol=1e-6)
    assert r.n_links == {"m1": 2, "m2": 1}


def test_validation_names_the_problem():
    g = graphs.prior_graph(pd.DataFrame({"source": ["a", "zz"], "target": ["X", "X"]}))
    with pytest.warns(UserWarning, match="'zz'"):
        g.resolve({"m1": ["a"], "m2": ["X"]})
    within = graphs.prior_graph(pd.DataFrame({"source": ["a", "Q"], "target": ["b", "R"]}))
    with pytest.raises(ScatlasInputError, match="names no feature of modality 'm2'"):
        within.resolve({"m1": ["a", "b"], "m2": ["S"]}, warn_unknown=False)
    with pytest.raises(ScatlasInputError, match="'m1' has no feature linked to another"):
        within.resolve({"m1": ["a", "b"], "m2": ["Q", "R"]}, warn_unknown=False)
    with pytest.raises(ScatlasInputError, match="no links"):
        graphs.FeatureGraph(pd.DataFrame({"source": [], "target": []}))
    with pytest.raises(ScatlasInputError, match="weights"):
        graphs.FeatureGraph(pd.DataFrame({"source": ["a"], "target": ["b"], "weight": [2.0]}))
    with pytest.raises(ScatlasInputError, match="source"):
        graphs.as_graph(pd.DataFrame({"from": ["a"], "to": ["b"]}))


def test_typed_ends_pick_their_modality():
    # the same name in two modalities: typed links pick the right vertex
    g = graphs.gene_protein_graph(["CD4"], table=pd.DataFrame({"protein": ["CD4"],
                                                               "gene": ["CD4"]}))
    r = g.resolve({"rna": ["CD4", "GAPDH"], "protein": ["CD4"]})
    cross = {(int(s), int(t)) for s, t in zip(r.src, r.tgt, strict=True) if s != t}
    assert cross == {(0, 2), (2, 0)}


def test_gene_peak_window_and_weight(tmp_path):
    genes = pd.DataFrame({"chrom": ["chr1", "chr1"], "start": [100_000, 900_000],
                          "end": [110_000, 910_000], "strand": ["+", "-"], "name": ["A", "B"]})
    peaks = ["chr1:98000-98500", "chr1:105000-105500", "chr1:300000-300500",
             "chr1:912500-913000", "chr2:100000-100500"]
    g = graphs.gene_peak_graph(genes, peaks, window=150_000)
    got = {(s, t): w for s, t, w in zip(g.edges["source"], g.edges["target"], g.edges["weight"],
                                        strict=True)}
    # A (+, promoter 2 kb upstream: 98,000..110,000): overlaps peaks 1 and 2; peak 3 at 190 kb
    assert got[("A", "chr1:98000-98500")] == 1.0 and got[("A", "chr1:105000-105500")] == 1.0
    assert ("A", "chr1:300000-300500") not in got
    # B (-, promoter past the end: 900,000..912,000): peak 4 starts 500 b away
    assert got[("B", "chr1:912500-913000")] == pytest.approx((1500 / 1000) ** -0.75)
    assert not any(t.startswith("chr2") for _, t in got)
    # the same genes from a BED file
    bed = tmp_path / "genes.bed"
    bed.write_text("chr1\t100000\t110000\tA\t0\t+\nchr1\t900000\t910000\tB\t0\t-\n")
    g2 = graphs.gene_peak_graph(bed, peaks, window=150_000)
    assert g2.edges[["source", "target"]].equals(g.edges[["source", "target"]])
    gtf = tmp_path / "genes.gtf"
    gtf.write_text('chr1\tx\tgene\t100001\t110000\t.\t+\t.\tgene_id "g1"; gene_name "A";\n')
    assert graphs.read_gene_table(gtf).iloc[0].tolist() == ["chr1", 100_000, 110_000, "+", "A"]
    with pytest.raises(ScatlasInputError, match="chrom:start-end"):
        graphs.gene_peak_graph(genes, ["nonsense"])


def test_union_keeps_the_largest_weight():
    a = graphs.prior_graph(pd.DataFrame({"source": ["g"], "target": ["p"], "weight": [0.3]}))
    b = graphs.prior_graph(pd.DataFrame({"source": ["g", "h"], "target": ["p", "p"],
                                         "weight": [0.9, 1.0]}))
    u = a | b
    assert len(u) == 2 and u.edges.set_index("source").loc["g", "weight"] == 0.9


def test_synthetic_multiome_planted_links():
    s = graphs.synthetic_multiome(50, 20, seed=1)
    assert s.rna.shape == (50, 20) and s.atac.n_obs == 50
    assert set(s.links["target"]) <= set(s.atac.var_names)
    assert s.candidates["planted"].sum() == len(s.links)
    assert (s.rna.X.toarray() >= 0).all() and set(np.unique(s.atac.X.toarray())) <= {0.0, 1.0}
    paired = graphs.synthetic_multiome(30, 10, paired=True, seed=1)
    assert (paired.rna.obs_names == paired.atac.obs_names).all()
    assert (paired.rna.obs["state"] == paired.atac.obs["state"]).all()
