"""MetricEncoder end to end: CellBench held-out batch, save/load, gene alignment, errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.neighbors import KNeighborsClassifier

import scatlas
from scatlas import datasets
from scatlas._validate import ScatlasInputError
from scatlas.models import load


@pytest.fixture(scope="module")
def tiny_model():
    a = datasets.synthetic(400, 60, n_batches=2, n_cell_types=3, seed=0)
    # the gene input (no PCA layer): these tests check the first layer over the genes
    model = scatlas.tl.train_metric(a, "cell_type", "batch", max_steps=30, batch_size=100,
                                    hidden=(32,), latent_dim=8, progress=False, input_pcs=None)
    return a, model


def _top_genes(adata, n):
    X = adata.X
    mean = np.asarray(X.mean(0)).ravel()
    sq = np.asarray(X.multiply(X).mean(0)).ravel() if sp.issparse(X) else (X**2).mean(0)
    return np.argsort(-(sq - mean**2))[:n]


def test_cellbench_held_out_batch(cellbench):
    """Train on four CellBench batches, embed the fifth: cell lines separate (kNN accuracy)."""
    a = cellbench
    held = "sc_celseq2"
    train, test = a[a.obs["batch"] != held].copy(), a[a.obs["batch"] == held].copy()
    genes = _top_genes(train, 2000)  # chosen on the training batches only
    train = train[:, genes].copy()
    model = scatlas.tl.train_metric(train, "cell_line", "batch", seed=0, batch_size=256,
                                    max_steps=250, hidden=(256, 256), latent_dim=32,
                                    progress=False)
    Z_train = model.embed(train)
    Z_test = model.embed(test)  # the full gene set: aligned to the model's 2000 by name
    knn = KNeighborsClassifier(15).fit(Z_train, train.obs["cell_line"])
    acc = float(np.mean(knn.predict(Z_test) == test.obs["cell_line"].to_numpy()))
    print(f"CellBench held-out batch {held}: kNN(15) accuracy {acc:.3f}")
    assert acc >= 0.85
    assert np.allclose(np.linalg.norm(Z_test, axis=1), 1, atol=1e-5)


def test_save_load_round_trip(tiny_model, tmp_path):
    a, model = tiny_model
    model.save(tmp_path / "m")
    again = load(tmp_path / "m")
    np.testing.assert_array_equal(model.embed(a), again.embed(a))
    assert list(again.genes) == list(a.var_names) and again.label_names == model.label_names
    model.save(tmp_path / "m")  # replacing an existing model folder works
    (tmp_path / "m" / "variables.msgpack").write_bytes(b"garbage")
    with pytest.raises(ScatlasInputError, match="checksum"):
        load(tmp_path / "m")
    with pytest.raises(ScatlasInputError, match="manifest"):
        load(tmp_path)


def test_embed_aligns_genes_by_name(tiny_model):
    a, model = tiny_model
    shuffled = a[:, np.random.default_rng(0).permutation(a.n_vars)].copy()
    np.testing.assert_allclose(model.embed(shuffled), model.embed(a), rtol=1e-5, atol=1e-6)
    # a missing gene is zero-filled: same as zeroing that gene's counts
    dropped = a[:, 1:].copy()
    zeroed = a.copy()
    X = zeroed.X.toarray()
    X[:, 0] = 0
    zeroed.X = sp.csr_matrix(X)
    np.testing.assert_allclose(model.embed(dropped), model.embed(zeroed), rtol=1e-5, atol=1e-6)
    with pytest.raises(ScatlasInputError, match="min_overlap"):
        model.embed(a[:, :10].copy())
    Z = scatlas.tl.embed(a, model)
    assert a.obsm["X_scatlas"].shape == (a.n_obs, 8) and Z is a.obsm["X_scatlas"]


def test_bad_input(tiny_model):
    a, model = tiny_model
    with pytest.raises(ScatlasInputError, match="not a column"):
        scatlas.tl.train_metric(a, "nope")
    single = a.copy()
    single.obs["lab"] = ["x"] * (a.n_obs - 1) + ["lonely"]  # one usable label only
    with pytest.raises(ScatlasInputError, match="at least two such labels"):
        scatlas.tl.train_metric(single, "lab")
    bad = a.copy()
    bad.X = bad.X.toarray().astype(np.float32)
    bad.X[3, 4] = np.nan
    with pytest.raises(ScatlasInputError, match="NaN"):
        scatlas.tl.train_metric(bad, "cell_type")
    with pytest.raises(ScatlasInputError, match="NaN"):
        model.embed(bad)
    lognormed = a.copy()
    lognormed.X = lognormed.X.multiply(0.37).tocsr()
    with pytest.raises(ScatlasInputError, match="raw counts"):
        model.embed(lognormed)
    with pytest.raises(ScatlasInputError, match="columns"):
        model.embed(np.zeros((3, 5), np.float32))
    with pytest.raises(ScatlasInputError, match="objective"):
        scatlas.tl.train_metric(a, "cell_type", objective="arcface")


def test_infonce_and_hierarchy_train(tiny_model):
    a, _ = tiny_model
    model = scatlas.tl.train_metric(a, "cell_type", "batch", max_steps=10, batch_size=100,
                                    hidden=(16,), latent_dim=4, objective="infonce",
                                    hierarchy={"type1": "type0"}, progress=False)
    assert any("infonce" in r for r in model.history)
    assert model.embed(a).shape == (a.n_obs, 4)


def test_sparse_first_layer_equals_dense_path(tiny_model):
    """On the CPU, sparse (and mostly-zero dense) input takes the host sparse first layer; it
    equals the jitted dense network on the same log-normalised rows."""
    from scatlas.models.data import lognorm

    a, model = tiny_model
    reference = np.asarray(model._encode(model._device_variables, lognorm(a.X)))
    np.testing.assert_allclose(model.embed(a), reference, rtol=1e-5, atol=1e-6)
    dense = a.copy()
    dense.X = dense.X.toarray()
    np.testing.assert_allclose(model.embed(dense), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_size", [400, 150, 37])
def test_embedding_in_row_blocks_equals_one_call(tiny_model, monkeypatch, batch_size):
    """Chunks split into equal row blocks (the last one padded) give the rows of one call of
    the jitted network over all cells."""
    from scatlas.models.data import lognorm
    from scatlas.models.metric import _model

    a, model = tiny_model
    reference = np.asarray(model._encode(model._device_variables, lognorm(a.X)))
    monkeypatch.setattr(_model, "CPU_BLOCK_ROWS", 60)
    rows = _model._block_rows(batch_size)
    assert rows <= 60 and -(-batch_size // rows) == -(-batch_size // 60)
    got = model.embed(a, batch_size=batch_size)
    assert got.shape == (a.n_obs, model.latent_dim)
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-6)
    dense = np.asarray(lognorm(a.X)) + 0.5  # no zeros: the jitted first layer, in blocks too
    want = np.asarray(model._encode(model._device_variables, dense))
    with pytest.warns(UserWarning, match="trained on raw counts"):  # not the model's input
        got = model.embed(dense, input="lognorm", batch_size=batch_size)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    one = model.embed(a[:61], batch_size=batch_size)  # a lone chunk: blocks sized from it
    np.testing.assert_allclose(one, reference[:61], rtol=1e-5, atol=1e-6)


def test_bfloat16_embedding_agrees_with_float32(tiny_model):
    """precision="bfloat16" computes the dense layers in bf16: the embedding stays within bf16
    rounding of the float32 one (cosine per cell) and keeps the same nearest neighbours."""
    a, model = tiny_model
    Z32 = model.embed(a)
    Z16 = model.embed(a, precision="bfloat16")
    assert Z16.dtype == np.float32 and Z16.shape == Z32.shape
    cos = np.sum(Z32 * Z16, axis=1)
    assert cos.min() > 0.99, cos.min()
    assert not np.array_equal(Z16, Z32)  # it did run in reduced precision
    nn32 = np.argsort(-(Z32 @ Z32.T), axis=1)[:, 1:6]
    nn16 = np.argsort(-(Z16 @ Z16.T), axis=1)[:, 1:6]
    shared = np.mean([len(np.intersect1d(x, y)) / 5 for x, y in zip(nn32, nn16, strict=True)])
    assert shared > 0.8, shared
    with pytest.raises(ScatlasInputError, match="precision"):
        model.embed(a, precision="float16")


def test_single_cell_label_trains_as_a_negative():
    """A label with one cell is kept (a warning names it): it never anchors a triplet (no
    positive exists) but is mined as a negative. The log counts the mined triplets whose
    negative has such a label; the cell stays in the training split."""
    a = datasets.synthetic(300, 60, n_batches=2, n_cell_types=3, seed=1)
    labels = a.obs["cell_type"].astype(str).to_numpy()
    labels[17] = "lonely"
    a.obs["lab"] = labels
    with pytest.warns(UserWarning, match="'lonely'.*negatives only"):
        model = scatlas.tl.train_metric(a, "lab", "batch", max_steps=20, hidden=(16,),
                                        latent_dim=4, objective="triplet", mining="random",
                                        progress=False)
    assert model.info["negative_only_labels"] == ["lonely"]
    assert "lonely" in model.label_names
    logged = [r["n_negative_only"] for r in model.history if "n_negative_only" in r]
    assert logged and sum(logged) > 0
    assert all(r["n_negative_only"] <= r["n_triplets"] for r in model.history
               if "n_negative_only" in r)


def test_validation_split_keeps_small_labels_in_training():
    from scatlas.tl._models import _split

    labels = np.array(["a"] * 50 + ["b"] * 3 + ["c"] * 2 + ["d"])
    train, val = _split(labels, 0.2, seed=0)
    assert np.intersect1d(train, val).size == 0 and train.size + val.size == labels.size
    held = dict(zip(*np.unique(labels[val], return_counts=True), strict=True))
    assert held == {"a": 10, "b": 1}  # about 20 % of each label, >= 2 cells (or all) stay


@pytest.mark.parametrize("n_cells", [300, 818])
def test_small_imbalanced_data_trains_without_a_batch_size(n_cells):
    """Defaults train on a few hundred imbalanced cells (the default batch once failed to draw
    818 distinct cells from concentrated sampling weights)."""
    a = datasets.synthetic(n_cells, 40, n_batches=3, n_cell_types=4, seed=2)
    labels = a.obs["cell_type"].astype(str).to_numpy()
    labels[:2] = "rare"  # a label of two cells, weighted up by the sampler
    a.obs["lab"] = labels
    model = scatlas.tl.train_metric(a, "lab", "batch", max_steps=3, progress=False)
    assert model.info["batch_size"] == scatlas.models.data.default_batch_size(
        model.info["n_train"])
    assert np.isfinite([r["loss"] for r in model.history if "loss" in r]).all()


def test_presets():
    """The auto preset fills in what is not given; "scimilarity" gives SCimilarity's settings;
    explicit settings win over either."""
    from scatlas.tl._models import preset_settings

    auto = preset_settings("auto", 500)
    assert auto["n_top_genes"] == 2000 and auto["model"]["objective"] == "infonce"
    sc_ = preset_settings("scimilarity", 500)
    assert sc_["n_top_genes"] is None and sc_["model"] == {} and sc_["batch_size"] == 1000
    with pytest.raises(ScatlasInputError, match="preset"):
        preset_settings("fast", 500)
    a = datasets.synthetic(200, 2500, n_batches=2, n_cell_types=3, seed=4)
    m = scatlas.tl.train_metric(a, "cell_type", "batch", max_steps=2, hidden=(8,),
                                latent_dim=4, progress=False)
    assert m.config.n_genes == 2000 and len(m.genes) == 2000 and m.config.objective == "infonce"
    assert set(m.genes) <= set(a.var_names)
    assert m.embed(a).shape == (a.n_obs, 4)  # the data's 2,500 genes aligned to the model's
    m = scatlas.tl.train_metric(a, "cell_type", "batch", max_steps=2, hidden=(8,),
                                latent_dim=4, preset="scimilarity", progress=False)
    assert m.config.n_genes == 2500 and m.config.objective == "triplet"
    assert m.config.metric_weight == 0.001


def test_input_pcs_projects_onto_the_training_cells_pca(tmp_path):
    """``input_pcs``: the network's input is the PCA scores of the log-normalised training cells
    (checked against sklearn's PCA of the same cells, up to each component's sign); embedding
    goes through the same projection, and a saved model keeps it."""
    from sklearn.decomposition import PCA

    from scatlas.models.data import lognorm
    from scatlas.models.metric import INPUT_PCA, MetricNet

    a = datasets.synthetic(300, 80, n_batches=2, n_cell_types=3, seed=5)
    m = scatlas.tl.train_metric(a, "cell_type", "batch", max_steps=20, hidden=(16,),
                                latent_dim=4, input_pcs=10, n_top_genes=None,
                                validation_fraction=0.0, progress=False)
    assert m.config.input_pcs == 10 and m.config.n_inputs == 10
    proj = m.variables[INPUT_PCA]
    L = lognorm(a.X).astype(np.float64)  # every cell trains (validation_fraction=0)
    ref = PCA(10, svd_solver="full").fit(L)
    np.testing.assert_allclose(proj["mean"], ref.mean_, rtol=0, atol=1e-5)
    C = ref.components_.T
    sign = np.sign(np.sum(C * proj["components"], axis=0))
    assert np.all(sign != 0)
    # leading components are well separated on this data; float32 input, float64 SVD
    np.testing.assert_allclose(proj["components"][:, :3] * sign[:3], C[:, :3], atol=1e-3)
    # the embedding is the network applied to the scores (x - mean) @ components
    scores = (L - proj["mean"]) @ proj["components"]
    v = {k: w for k, w in m.variables.items() if k != INPUT_PCA}
    net = m.config.net()
    ref_z = np.asarray(net.apply(v, scores.astype(np.float32), method=MetricNet.encode))
    Z = m.embed(a)
    np.testing.assert_allclose(Z, ref_z, atol=1e-4)
    m.save(tmp_path / "pcs")
    np.testing.assert_array_equal(load(tmp_path / "pcs").embed(a), Z)
    with pytest.raises(ScatlasInputError, match="input_pcs"):
        scatlas.tl.train_metric(a, "cell_type", "batch", max_steps=2, input_pcs=0,
                                progress=False)
    with pytest.raises(ScatlasInputError, match="sparse_step"):
        scatlas.tl.train_metric(a, "cell_type", "batch", max_steps=2, input_pcs=5,
                                sparse_step=True, progress=False)


def test_auto_preset_input_is_the_training_pcs_unless_the_sparse_step_is_asked():
    a = datasets.synthetic(300, 120, n_batches=2, n_cell_types=3, seed=1)
    kw = dict(max_steps=5, batch_size=50, hidden=(16,), latent_dim=4, progress=False)
    auto = scatlas.tl.train_metric(a, "cell_type", "batch", **kw)
    assert auto.config.input_pcs == 50 and auto.info["sparse_step"] is False
    sparse = scatlas.tl.train_metric(a, "cell_type", "batch", sparse_step=True, **kw)
    assert sparse.config.input_pcs is None and sparse.info["sparse_step"] is True
    genes = scatlas.tl.train_metric(a, "cell_type", "batch", preset="scimilarity", **kw)
    assert genes.config.input_pcs is None
