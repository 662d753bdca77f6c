"""``scatlas integrate`` (scatlas.cli.integrate): round trips on small synthetic .h5ad files."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from scatlas import cli, datasets
from scatlas.tl import inmf


@pytest.fixture
def main():
    """``cli.main`` (the integrate command is registered by ``scatlas/cli/integrate.py``, one
    of the explicit command modules)."""
    assert "integrate" in cli.COMMAND_MODULES
    return cli.main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two synthetic atlases (2 batches each, raw counts) written to .h5ad."""
    d = tmp_path_factory.mktemp("integrate")
    a, b = d / "a.h5ad", d / "b.h5ad"
    datasets.write_synthetic_h5ad(a, 1500, 300, n_batches=2, seed=0)
    datasets.write_synthetic_h5ad(b, 1000, 300, n_batches=2, seed=1)
    return a, b


def test_help(main, capsys):
    with pytest.raises(SystemExit) as info:
        main(["integrate", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--method" in out and "online-inmf" in out and "--inputs" in out


def test_inmf_round_trip_equals_the_tool(main, files, tmp_path):
    src, _ = files
    out = tmp_path / "out.h5ad"
    assert main(["integrate", str(src), str(out), "--method", "inmf", "--batch-key", "batch",
                 "--k", "5", "--lam", "5", "--seed", "1", "--n-iter", "10"]) == 0
    res = ad.read_h5ad(out)
    expect = ad.read_h5ad(src)
    inmf(expect, "batch", k=5, lam=5.0, seed=1, n_iter=10)
    for key in ("X_inmf", "X_inmf_norm"):
        np.testing.assert_array_equal(res.obsm[key], expect.obsm[key])
    np.testing.assert_array_equal(res.varm["inmf_W"], expect.varm["inmf_W"])
    assert res.X is not None and res.uns["inmf"]["params"]["n_iter"] == 10


def test_online_from_two_files_then_add_and_project(main, files, tmp_path):
    a, b = files
    out = tmp_path / "online.h5ad"
    assert main(["integrate", str(out), "--inputs", str(a), str(b), "--method", "online-inmf",
                 "--k", "5", "--minibatch-size", "1000", "--max-epochs", "2"]) == 0
    res = ad.read_h5ad(out)
    assert res.n_obs == 2500 and res.X is None
    assert list(res.uns["inmf"]["datasets"]) == ["a", "b"]
    assert res.obsm["X_inmf_norm"].shape == (2500, 5)
    assert res.obs["inmf_dataset"].value_counts().to_dict() == {"a": 1500, "b": 1000}
    # scenario 2: b's batches as new datasets; scenario 3: projection onto the result
    added = tmp_path / "added.h5ad"
    assert main(["integrate", str(added), "--inputs", str(b), "--method", "online-inmf",
                 "--batch-key", "batch", "--add-to", str(out), "--minibatch-size", "500"]) == 0
    both = ad.read_h5ad(added)
    assert both.n_obs == 3500
    assert list(both.uns["inmf"]["datasets"]) == ["a", "b", "batch0", "batch1"]
    proj = tmp_path / "proj.h5ad"
    assert main(["integrate", str(b), str(proj), "--method", "online-inmf",
                 "--project-onto", str(out)]) == 0
    assert ad.read_h5ad(proj).obsm["X_inmf"].shape == (1000, 5)


def test_clear_errors(main, files, tmp_path, capsys):
    a, b = files
    out = tmp_path / "o.h5ad"
    assert main(["integrate", str(a), str(out), "--batch-key", "donor"]) == 2
    assert "donor" in capsys.readouterr().err
    assert main(["integrate", str(tmp_path / "missing.h5ad"), str(out)]) == 2
    with pytest.raises(SystemExit) as info:  # several inputs need a streaming method
        main(["integrate", str(out), "--inputs", str(a), str(b), "--method", "inmf"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):  # OUT must come before --inputs
        main(["integrate", "--inputs", str(a), str(b), "--method", "online-inmf"])
    with pytest.raises(SystemExit):
        main(["integrate", str(a), str(a)])
    assert not out.exists()


def test_cca_on_small_batches_and_anchor_flags(main, tmp_path):
    """Batches of ~30 cells run at the defaults (dims/k_score lowered per pair, recorded), and
    --k-anchor / --k-score / --k-filter reach the anchors."""
    src = tmp_path / "small.h5ad"
    datasets.write_synthetic_h5ad(src, 120, 200, n_batches=4, seed=2)
    sizes = ad.read_h5ad(src).obs["batch"].value_counts()
    assert sizes.min() <= 30  # some batch is too small for dims = 30
    out = tmp_path / "cca.h5ad"
    with pytest.warns(UserWarning, match="adapted to small batches"):
        assert main(["integrate", str(src), str(out), "--method", "cca"]) == 0
    params = ad.read_h5ad(out).uns["cca"]["params"]
    pairs = params["effective"]["pairs"]
    for b1, b2, d in zip(pairs["dataset1"], pairs["dataset2"], pairs["dims"], strict=True):
        assert d == min(30, min(sizes[b1], sizes[b2]) - 1)
    out2 = tmp_path / "cca2.h5ad"
    assert main(["integrate", str(src), str(out2), "--method", "cca", "--n-pcs", "10",
                 "--k-anchor", "3", "--k-score", "8", "--k-filter", "none",
                 "--k-weight", "10"]) == 0
    params = ad.read_h5ad(out2).uns["cca"]["params"]
    assert (params["dims"], params["k_anchor"], params["k_score"], params["k_filter"]) == (
        10, 3, 8, "None")
    eff = params["effective"]
    assert np.all(eff["pairs"]["k_score"] == 8) and np.all(eff["pairs"]["k_anchor"] == 3)
    assert np.all(eff["merges"]["k_weight"] <= 10)
    with pytest.raises(SystemExit):
        main(["integrate", str(src), str(out2), "--method", "cca", "--k-filter", "many"])


def test_report_label_key_is_checked_before_integrating(main, files, tmp_path, capsys,
                                                         monkeypatch):
    import scatlas.tl._integrate as tl_integrate

    def never(*args, **kwargs):
        raise AssertionError("integrated before checking --label-key")

    monkeypatch.setattr(tl_integrate, "integrate", never)
    src, _ = files
    code = main(["integrate", str(src), str(tmp_path / "o.h5ad"), "--method", "mnn",
                 "--report", str(tmp_path / "rep"), "--label-key", "nope"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--label-key 'nope'" in err and "cell_type" in err  # names the flag and the choices


def test_default_genes_on_a_small_gene_set_use_every_gene_without_warning(main, tmp_path,
                                                                         recwarn):
    src = tmp_path / "small.h5ad"
    datasets.write_synthetic_h5ad(src, 400, 150, n_batches=2, seed=0)  # fewer than 2000 genes
    out = tmp_path / "o.h5ad"
    assert main(["integrate", str(src), str(out), "--method", "mnn", "--no-progress"]) == 0
    assert len(ad.read_h5ad(out).uns["mnn"]["genes"]) == 150
    assert not [w for w in recwarn if "n_top_genes" in str(w.message)]
