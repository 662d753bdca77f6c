"""`scatlas integrate --report`: metrics JSON and UMAP plots before / after integration."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

from scatlas import cli, datasets


@pytest.mark.slow  # 13-30 s: opt in with -m slow (default suite under 10 min)
def test_integrate_mnn_and_cca_with_report(tmp_path):
    src = tmp_path / "in.h5ad"
    datasets.synthetic(1500, 500, n_batches=2, n_cell_types=4, seed=3,
                       batch_effect=1.0).write_h5ad(src)  # a strong batch effect
    for method in ("mnn", "cca"):
        out, rep = tmp_path / f"{method}.h5ad", tmp_path / f"rep_{method}"
        code = cli.main(["integrate", str(src), str(out), "--method", method, "--n-top-genes",
                         "300", "--report", str(rep), "--label-key", "cell_type"])
        assert code == 0
        emb = ad.read_h5ad(out).obsm[f"X_{method}"]
        assert emb.shape[0] == 1500 and np.isfinite(emb).all()
        record = json.loads((rep / "metrics.json").read_text())
        assert record["key"] == f"X_{method}"
        before, after = record["uncorrected"], record["integrated"]
        # batches separate before (iLISI ~0) and mix after; cell types (4: chance 0.25) are still
        # recovered across batches (measured: mnn 0.78, cca 0.69)
        assert after["ilisi"] > before["ilisi"] + 0.3, (method, before["ilisi"], after["ilisi"])
        assert after["knn_label_transfer"] > 0.6, after
        assert (rep / "umap.png").stat().st_size > 10_000


def _colour_pixels(fig, rgb) -> int:
    """Pixels of the rendered figure within 2/255 of the colour ``rgb``."""
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    return int((np.abs(img - np.round(np.asarray(rgb) * 255)).max(axis=-1) <= 2).sum())


def test_umap_draws_cells_in_random_order_with_sorted_legend():
    import matplotlib
    import matplotlib.pyplot as plt

    from scatlas.report import umap_figure

    # two batches on exactly the same points: drawn batch by batch, the last one would hide the
    # first completely; in one shuffled order both stay visible in similar amounts
    rng = np.random.default_rng(0)
    xy = rng.normal(size=(400, 2))
    panels = {"integrated": np.vstack([xy, xy])}
    batch = np.array(["b10"] * 400 + ["b2"] * 400)
    fig = umap_figure(panels, {"batch": batch}, seed=0)
    try:
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["b2", "b10"]
        first, second = matplotlib.colormaps["tab10"].colors[:2]
        shown = _colour_pixels(fig, first), _colour_pixels(fig, second)
        assert min(shown) > 0.25 * max(shown), shown
    finally:
        plt.close(fig)


def test_report_shows_no_umap_warnings(tmp_path, recwarn):
    from scatlas.report import integration_report

    adata = datasets.synthetic(300, 200, n_batches=2, n_cell_types=3, seed=1)
    adata.obsm["X_fake"] = np.random.default_rng(0).normal(size=(300, 10))
    integration_report(adata, tmp_path / "rep", key="X_fake", label_key="cell_type",
                       progress=False)
    assert (tmp_path / "rep" / "umap.png").exists()
    leaked = [str(w.message) for w in recwarn if "umap" in w.filename]
    assert not leaked, leaked


def test_cli_integrate_harmony_matches_the_library(tmp_path):
    pytest.importorskip("harmonypy")
    from scatlas import tl

    src, out = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    adata = datasets.synthetic(600, 300, n_batches=2, n_cell_types=3, seed=2, batch_effect=1.0)
    adata.write_h5ad(src)
    code = cli.main(["integrate", str(src), str(out), "--method", "harmony", "--n-top-genes",
                     "200", "--n-pcs", "20", "--theta", "2", "--seed", "0", "--no-progress"])
    assert code == 0
    got = ad.read_h5ad(out).obsm["X_harmony"]
    tl.integrate(adata, "batch", method="harmony", n_top_genes=200, n_pcs=20, seed=0, theta=2)
    ref = adata.obsm["X_harmony"]
    assert got.shape == (600, 20)
    # the same computation through two front doors: equal up to float32 storage
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_report_shows_progress_when_asked(tmp_path, capsys):
    from scatlas.report import integration_report

    adata = datasets.synthetic(200, 100, n_batches=2, n_cell_types=3, seed=2)
    adata.obsm["X_fake"] = np.random.default_rng(1).normal(size=(200, 8))
    integration_report(adata, tmp_path / "rep", key="X_fake", progress=True)
    err = capsys.readouterr().err
    assert "report" in err and "step" in err  # tqdm's bar over the report's steps
    integration_report(adata, tmp_path / "rep2", key="X_fake", progress=False)
    assert "report" not in capsys.readouterr().err
