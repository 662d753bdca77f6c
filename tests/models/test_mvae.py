"""Multimodal VAE: the ELBO against a numpy reference, training on mosaic data, embed / impute,
save / load, and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats
from scipy.special import expit, log_softmax, logsumexp

from scatlas._validate import ScatlasInputError
from scatlas.models.mvae import (
    INPUT_SCALE,
    MVAEConfig,
    MVAETask,
    negative_elbo,
    subset_patterns,
)
from scatlas.models.mvae_eval import foscttm

# ------------------------------------------------------------------------ numpy reference ELBO


def _np_blocks(p, h, n):
    for i in range(n):
        d, ln = p[f"Dense_{i}"], p[f"LayerNorm_{i}"]
        h = h @ d["kernel"] + d["bias"]
        mean, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
        h = (h - mean) / np.sqrt(var + 1e-6) * ln["scale"] + ln["bias"]
        h = np.maximum(h, 0)
    return h


def _np_dense(p, h):
    return h @ p["kernel"] + p["bias"]


def _np_nb(x, mu, theta):
    return stats.nbinom.logpmf(x, n=theta, p=theta / (theta + mu))


def _np_negative_elbo(cfg, params, batch, eps, kl_weight, subsets, pca=None):
    """Everything recomputed in float64 numpy / scipy from the flax parameters (``pca``: the
    ``input_pca`` collection of ``input_pcs``)."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    M = len(cfg.modalities)
    xs = [np.asarray(batch[f"x{m}"], np.float64) for m in range(M)]
    obs = np.stack([np.asarray(batch[f"m{m}"]) for m in range(M)], axis=1)
    B = obs.shape[0]
    mus, lvs, log_libs = [], [], []
    for m in range(M):
        e = p[f"experts_{m}"]
        lib = np.maximum(xs[m].sum(1), 1.0)
        log_libs.append(np.log(lib))
        h = xs[m] if cfg.likelihoods[m] == "bernoulli" else np.log1p(xs[m] * INPUT_SCALE
                                                                      / lib[:, None])
        if cfg.input_pcs[m]:  # the fixed PCA input layer: centred scores
            pr = pca[f"experts_{m}"]
            h = (h - np.float64(pr["pca_mean"])) @ np.asarray(pr["pca_components"], np.float64)
        std = (np.log(lib) - cfg.log_lib_mean[m]) / cfg.log_lib_sd[m]
        h = _np_blocks(e["_Blocks_0"], np.concatenate([h, std[:, None]], 1), cfg.n_layers)
        mus.append(_np_dense(e["mean"], h))
        lvs.append(np.clip(_np_dense(e["logvar"], h), -12, 12))
    subsets = np.broadcast_to(subsets, (subsets.shape[0], B, M))
    S = subsets.shape[0]
    onehot = np.eye(cfg.n_batches)[np.asarray(batch["cov"])]
    terms = np.zeros((S, B))
    valid = np.zeros((S, B))
    recon = np.zeros((S, B, M))
    for s in range(S):
        sub = subsets[s] * obs
        valid[s] = sub.sum(1) > 0
        prec = sum(sub[:, m, None] * np.exp(-lvs[m]) for m in range(M))
        var = 1.0 / (1.0 + prec)
        mu = var * sum(sub[:, m, None] * np.exp(-lvs[m]) * mus[m] for m in range(M))
        z = mu + np.sqrt(var) * eps[s]
        kl = 0.5 * np.sum(mu**2 + var - 1 - np.log(var), axis=1)
        for m in range(M):
            hp = p[f"heads_{m}"]
            h = _np_blocks(hp["_Blocks_0"], np.concatenate([z, onehot], 1), cfg.decoder_layers)
            logits = _np_dense(hp["rate"], h)
            lik, x = cfg.likelihoods[m], xs[m]
            if lik == "bernoulli":
                prob = expit(logits + (log_libs[m] - cfg.log_lib_mean[m])[:, None])
                ll = stats.bernoulli.logpmf(x, prob).sum(1)
            elif lik == "log1p_normal":  # x + 1 log-normal, no library offset
                ll = stats.lognorm.logpdf(x + 1, s=np.exp(hp["log_sd"]),
                                          scale=np.exp(logits)).sum(1)
            else:
                mu1 = np.exp(log_softmax(logits, axis=1) + log_libs[m][:, None])
                theta = np.exp(hp["log_theta"])
                if lik == "nb":
                    ll = _np_nb(x, mu1, theta).sum(1)
                else:
                    mu2 = mu1 * (1 + np.logaddexp(0, _np_dense(hp["fore"], h)))
                    pi = expit(_np_dense(hp["mix"], h))
                    ll = logsumexp([np.log(pi) + _np_nb(x, mu1, theta),
                                    np.log1p(-pi) + _np_nb(x, mu2, theta)], axis=0).sum(1)
            lib_pred = _np_dense(hp["library"], h)[:, 0]
            std = (log_libs[m] - cfg.log_lib_mean[m]) / cfg.log_lib_sd[m]
            lib_ll = stats.norm.logpdf(std, lib_pred, np.exp(hp["lib_log_sd"]))
            recon[s, :, m] = ll + cfg.library_weight * lib_ll
        weights = obs if cfg.cross_reconstruction else sub
        terms[s] = -(weights * recon[s]).sum(1) + kl_weight * kl
    per_cell = (valid * terms).sum(0) / np.maximum(valid.sum(0), 1)
    # Jeffreys divergence between the one-modality posteriors (expert x prior) of paired cells
    one_mu = [np.exp(-lvs[m]) * mus[m] / (1 + np.exp(-lvs[m])) for m in range(M)]
    one_var = [1 / (1 + np.exp(-lvs[m])) for m in range(M)]
    align = np.zeros(B)
    for a in range(M):
        for b in range(a + 1, M):
            kl_ab = 0.5 * np.sum(np.log(one_var[b] / one_var[a]) + one_var[a] / one_var[b]
                                 + (one_mu[a] - one_mu[b]) ** 2 / one_var[b] - 1, axis=1)
            kl_ba = 0.5 * np.sum(np.log(one_var[a] / one_var[b]) + one_var[b] / one_var[a]
                                 + (one_mu[a] - one_mu[b]) ** 2 / one_var[a] - 1, axis=1)
            align += obs[:, a] * obs[:, b] * (kl_ab + kl_ba)
    # symmetric InfoNCE between the one-modality posterior means of the paired cells, logits
    # -d_ij / (temperature * mean d over the paired cells), written loop by loop
    contrast = np.zeros(B)
    for a in range(M):
        for b in range(a + 1, M):
            P = np.flatnonzero(obs[:, a] * obs[:, b])
            d = np.array([[np.sum((one_mu[a][i] - one_mu[b][j]) ** 2) for j in P] for i in P])
            lg = -d / (cfg.contrastive_temperature * d.mean())
            for k, i in enumerate(P):
                contrast[i] += 0.5 * (logsumexp(lg[k]) + logsumexp(lg[:, k]) - 2 * lg[k, k])
    loss = per_cell + cfg.alignment_weight * align + cfg.contrastive_weight * contrast
    return loss.mean(), terms, valid, recon, align, contrast


def _tiny_batch(rng, B, feats, liks):
    batch = {}
    for m, (f, lik) in enumerate(zip(feats, liks, strict=True)):
        if lik == "bernoulli":
            x = (rng.random((B, f)) < 0.3).astype(np.float32)
        else:
            x = rng.negative_binomial(2, 0.2, size=(B, f)).astype(np.float32)
        batch[f"x{m}"] = x
    obs = np.ones((B, len(feats)), np.float32)
    obs[1, 0] = obs[2, 1] = obs[3, 2] = obs[4, :2] = 0  # mosaic: cells missing modalities
    for m in range(len(feats)):
        batch[f"x{m}"][obs[:, m] == 0] = 0
        batch[f"m{m}"] = obs[:, m]
    batch["cov"] = rng.integers(0, 2, B).astype(np.int32)
    return batch


@pytest.mark.parametrize("cross", [pytest.param(True, marks=pytest.mark.slow), False])
def test_negative_elbo_matches_numpy_reference(cross):
    rng = np.random.default_rng(0)
    liks, feats = ("nb", "nb_mixture", "bernoulli"), (11, 6, 9)
    cfg = MVAEConfig(("rna", "protein", "atac"), liks, feats, log_lib_mean=(3.0, 2.5, 1.0),
                     log_lib_sd=(0.7, 0.9, 0.5), n_batches=2, latent_dim=4, hidden=8,
                     n_layers=2, decoder_layers=1, dropout=0.0, library_weight=0.7,
                     alignment_weight=1.5, contrastive_weight=0.8,
                     contrastive_temperature=0.3, cross_reconstruction=cross)
    B = 7
    batch = _tiny_batch(rng, B, feats, liks)
    task = MVAETask(cfg)
    variables = task.init(jax.random.PRNGKey(1), batch)
    # perturb the zero-initialised parameters so every term is exercised
    leaves, tree = jax.tree_util.tree_flatten(variables)
    leaves = [a + 0.3 * rng.standard_normal(a.shape).astype(np.float32) for a in leaves]
    variables = jax.tree_util.tree_unflatten(tree, leaves)
    fixed = np.broadcast_to(subset_patterns(3)[:, None], (4, B, 3))
    random = (rng.random((2, B, 3)) < 0.5).astype(np.float32)
    subsets = np.concatenate([fixed, random]).astype(np.float32)
    eps = rng.standard_normal((subsets.shape[0], B, cfg.latent_dim)).astype(np.float32)
    loss, aux = negative_elbo(task.net, variables, {k: jnp.asarray(v) for k, v in batch.items()},
                              jnp.asarray(eps), 0.3, jnp.asarray(subsets))
    ref_loss, terms, valid, recon, align, contrast = _np_negative_elbo(
        cfg, variables["params"], batch, eps, 0.3, subsets)
    np.testing.assert_allclose(np.asarray(aux["align"]), align, rtol=2e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(aux["contrast"]), contrast, rtol=2e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(aux["valid"]), valid)
    np.testing.assert_allclose(np.asarray(aux["recon"]), recon, rtol=2e-4, atol=2e-3)
    np.testing.assert_allclose(np.asarray(aux["terms"]), terms, rtol=2e-4, atol=2e-3)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-4)
    assert valid[:, 4].tolist()[:4] == [1, 0, 0, 1]  # cell 4 has only atac


def test_input_pcs_elbo_matches_numpy_reference():
    """Experts reading fixed PCA scores: the ELBO equals the numpy reference that projects the
    log-normalised input by the stored mean and components; those are not parameters. The
    protein here has the log1p-normal likelihood (scipy's log-normal of ``x + 1``)."""
    from scatlas.models.mvae import INPUT_PCA

    rng = np.random.default_rng(4)
    liks, feats = ("nb", "log1p_normal", "bernoulli"), (12, 6, 9)
    cfg = MVAEConfig(("rna", "protein", "atac"), liks, feats, log_lib_mean=(3.0, 2.5, 1.0),
                     log_lib_sd=(0.7, 0.9, 0.5), n_batches=2, latent_dim=4, hidden=8,
                     dropout=0.0, alignment_weight=0.5, input_pcs=(5, 0, 3))
    proj = {m: {"mean": rng.standard_normal(feats[m]).astype(np.float32),
                "components": rng.standard_normal((feats[m], k)).astype(np.float32)}
            for m, k in ((0, 5), (2, 3))}
    B = 7
    batch = _tiny_batch(rng, B, feats, liks)
    task = MVAETask(cfg, proj)
    variables = task.init(jax.random.PRNGKey(1), batch)
    assert set(variables) == {"params", INPUT_PCA}
    assert set(variables[INPUT_PCA]) == {"experts_0", "experts_2"}
    np.testing.assert_array_equal(variables[INPUT_PCA]["experts_2"]["pca_components"],
                                  proj[2]["components"])
    # the first dense layer of a projected expert reads k (+ library) inputs
    assert variables["params"]["experts_0"]["_Blocks_0"]["Dense_0"]["kernel"].shape == (6, 8)
    assert variables["params"]["experts_1"]["_Blocks_0"]["Dense_0"]["kernel"].shape == (7, 8)
    params = jax.tree_util.tree_map(
        lambda a: a + 0.3 * rng.standard_normal(a.shape).astype(np.float32),
        variables["params"])
    variables = {"params": params, INPUT_PCA: variables[INPUT_PCA]}
    subsets = np.broadcast_to(subset_patterns(3)[:, None], (4, B, 3)).astype(np.float32)
    eps = rng.standard_normal((4, B, cfg.latent_dim)).astype(np.float32)
    loss, aux = negative_elbo(task.net, variables, {k: jnp.asarray(v) for k, v in batch.items()},
                              jnp.asarray(eps), 0.6, jnp.asarray(subsets))
    ref_loss, terms, _, _, align, _ = _np_negative_elbo(cfg, params, batch, eps, 0.6, subsets,
                                                        pca=variables[INPUT_PCA])
    np.testing.assert_allclose(np.asarray(aux["align"]), align, rtol=2e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(aux["terms"]), terms, rtol=2e-4, atol=2e-3)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-4)
    with pytest.raises(ScatlasInputError, match="go together"):
        MVAETask(cfg)
    with pytest.raises(ScatlasInputError, match="input_pcs"):
        MVAEConfig(("rna",), ("nb",), (5,), input_pcs=(6,))


def test_kl_warmup_is_linear():
    cfg = MVAEConfig(("rna",), ("nb",), (5,), kl_warmup_steps=10)
    task = MVAETask(cfg)
    w = [float(task.kl_weight(jnp.int32(s))) for s in (0, 4, 9, 50)]
    np.testing.assert_allclose(w, [0.1, 0.5, 1.0, 1.0])
    assert subset_patterns(1).tolist() == [[1.0]]
    assert subset_patterns(2).tolist() == [[1, 1], [1, 0], [0, 1]]


# -------------------------------------------------------------------------- training and API


@pytest.fixture(scope="module")
def mosaic():
    """Synthetic RNA + protein cells, a third missing protein, a sixth missing RNA."""
    from scatlas.datasets import synthetic

    adata = synthetic(900, 300, n_cell_types=6, n_batches=2, protein=True, n_proteins=30,
                      seed=3, progress=False)
    prot = adata.obsm["protein_counts"].astype(np.float64)
    rng = np.random.default_rng(0)
    test = np.zeros(adata.n_obs, bool)
    test[rng.choice(adata.n_obs, 200, replace=False)] = True
    order = rng.permutation(np.flatnonzero(~test))
    no_prot, no_rna = order[:230], order[230:345]
    prot.iloc[no_prot] = np.nan
    X = adata.X.tolil()
    X[no_rna] = 0
    adata.X = X.tocsr()
    adata.obsm["protein_counts"] = prot
    return adata, test, no_prot, no_rna


@pytest.fixture(scope="module")
def mosaic_model(mosaic):
    from scatlas.tl import train_mvae

    adata, test, _, _ = mosaic
    return train_mvae(adata[~test].copy(), batch_key="batch", max_steps=300, batch_size=128,
                      validation_fraction=0.1, eval_every=100, seed=0, progress=False)


def test_trains_on_mosaic_and_aligns_modalities(mosaic, mosaic_model):
    adata, test, _, _ = mosaic
    model = mosaic_model
    assert model.info["observed"] == {"rna": 700 - 115, "protein": 700 - 230}
    held = adata[test].copy()
    z_rna = model.embed(held, ["rna"])
    z_prot = model.embed(held, ["protein"])
    z_joint = model.embed(held)
    assert z_rna.shape == (200, model.latent_dim) and z_rna.dtype == np.float32
    assert model.latent_dim == 10 and model.config.input_pcs == (50, 0)  # the defaults
    # the same cells from either modality land close together (random pairing: 0.5)
    f = foscttm(z_rna, z_prot)
    print(f"mosaic FOSCTTM {f:.4f}")
    assert f < 0.3, f
    # the joint posterior is tighter than either single-modality posterior
    _, lv_joint = model.embed(held, return_logvar=True)
    _, lv_rna = model.embed(held, ["rna"], return_logvar=True)
    assert np.all(lv_joint <= lv_rna + 1e-5)
    assert not np.allclose(z_joint, z_rna)
    # imputed protein tracks the measured protein (per-protein Pearson on log1p counts)
    pred = np.log1p(model.impute(held, ["rna"], "protein"))
    meas = np.log1p(held.obsm["protein_counts"].to_numpy(float))
    r = np.mean([np.corrcoef(pred[:, j], meas[:, j])[0, 1] for j in range(meas.shape[1])])
    print(f"mosaic imputation r {r:.4f}")
    assert r > 0.25, r
    hist = model.history
    assert any("val_loss" in h for h in hist)
    assert [h for h in hist if "kl_weight" in h][-1]["kl_weight"] == pytest.approx(1.0)


def test_embed_uses_whatever_modalities_a_cell_has(mosaic, mosaic_model):
    adata, test, no_prot, no_rna = mosaic
    train = adata[~test].copy()
    idx = np.flatnonzero(~test)
    pos = {c: i for i, c in enumerate(idx)}
    z_all = mosaic_model.embed(train)
    rows_np = [pos[c] for c in no_prot]  # no protein: the joint is the RNA posterior
    z_rna = mosaic_model.embed(train[rows_np].copy(), ["rna"])
    np.testing.assert_allclose(z_all[rows_np], z_rna, rtol=1e-5, atol=1e-6)
    rows_nr = [pos[c] for c in no_rna]
    z_prot = mosaic_model.embed(train[rows_nr].copy(), ["protein"])
    np.testing.assert_allclose(z_all[rows_nr], z_prot, rtol=1e-5, atol=1e-6)
    with pytest.raises(ScatlasInputError, match="every modality missing"):
        mosaic_model.embed(train, ["protein"])  # cells without protein cannot use only protein


def test_save_load_roundtrip(tmp_path, mosaic, mosaic_model):
    from scatlas.models import load

    adata, test, _, _ = mosaic
    held = adata[test].copy()
    path = mosaic_model.save(tmp_path / "mvae")
    back = load(path)
    assert back.kind == "mvae" and back.modalities == ["rna", "protein"]
    assert back.locations == {"rna": "X", "protein": "obsm/protein_counts"}
    np.testing.assert_array_equal(back.embed(held), mosaic_model.embed(held))
    np.testing.assert_array_equal(back.impute(held, ["rna"], "protein"),
                                  mosaic_model.impute(held, ["rna"], "protein"))
    # genes are aligned by name: shuffled columns give the same embedding
    perm = np.random.default_rng(0).permutation(held.n_vars)
    np.testing.assert_allclose(back.embed(held[:, perm].copy(), ["rna"]),
                               back.embed(held, ["rna"]), rtol=1e-5, atol=1e-6)


def test_impute_library_options(mosaic, mosaic_model):
    adata, test, _, _ = mosaic
    held = adata[test].copy()
    fixed = mosaic_model.impute(held, ["rna"], "protein", library=1e4)
    np.testing.assert_allclose(fixed.sum(1), 1e4, rtol=1e-3)  # NB: softmax x library
    obs = mosaic_model.impute(held, ["rna"], "protein", library="observed")
    np.testing.assert_allclose(obs.sum(1), held.obsm["protein_counts"].to_numpy().sum(1),
                               rtol=1e-3)
    # log1p scale: at a fixed library exactly log1p of the counts; over posterior samples the
    # average is taken on the log scale, so by Jensen below log1p of the averaged counts
    log_fixed = mosaic_model.impute(held, ["rna"], "protein", library=1e4, scale="log1p")
    np.testing.assert_allclose(log_fixed, np.log1p(fixed), rtol=1e-5, atol=1e-5)
    mc_log = mosaic_model.impute(held, ["rna"], "protein", library=1e4, scale="log1p",
                                 n_samples=8, seed=3)
    mc = mosaic_model.impute(held, ["rna"], "protein", library=1e4, n_samples=8, seed=3)
    assert np.all(mc_log <= np.log1p(mc) + 1e-5)
    assert np.mean(np.log1p(mc) - mc_log) > 1e-4
    # the predicted library enters log1p at its log-scale mean (no lognormal correction): the
    # ratio to the counts-scale values is one constant for every cell and protein
    ratio = np.expm1(mosaic_model.impute(held, ["rna"], "protein", scale="log1p")) / \
        mosaic_model.impute(held, ["rna"], "protein")
    np.testing.assert_allclose(ratio, ratio[0, 0], rtol=1e-3)
    assert ratio[0, 0] < 1
    with pytest.raises(ScatlasInputError, match="scale"):
        mosaic_model.impute(held, ["rna"], "protein", scale="log")
    rna = mosaic_model.impute(held, ["protein"], "rna", batch="batch1")
    assert rna.shape == (200, 300) and np.all(rna >= 0)
    with pytest.raises(ScatlasInputError, match="target"):
        mosaic_model.impute(held, ["rna"], "atac")


# ---------------------------------------------------------------------------------- bad input


def _paired(n=40, seed=0):
    import anndata as ad

    rng = np.random.default_rng(seed)
    a = ad.AnnData(sp.csr_matrix(rng.poisson(1.0, (n, 15)).astype(np.float32)))
    a.obsm["protein_counts"] = pd.DataFrame(rng.poisson(5, (n, 4)), index=a.obs_names,
                                            columns=list("ABCD"))
    return a


def test_bad_input_errors():
    from scatlas.tl import train_mvae

    a = _paired()
    with pytest.raises(ScatlasInputError, match="has 39 cells but the data have 40"):
        train_mvae(a, {"rna": "X", "protein": np.ones((39, 4))}, max_steps=1)
    neg = a.copy()
    neg.obsm["protein_counts"].iloc[3, 1] = -2
    with pytest.raises(ScatlasInputError, match="negative values"):
        train_mvae(neg, max_steps=1)
    frac = a.copy()
    frac.X = frac.X * 0.5
    with pytest.raises(ScatlasInputError, match="integer counts"):
        train_mvae(frac, max_steps=1)
    gone = a.copy()
    gone.obsm["protein_counts"] = gone.obsm["protein_counts"].astype(float)
    gone.obsm["protein_counts"].iloc[[2, 5]] = np.nan
    X = gone.X.tolil()
    X[[2, 5]] = 0
    gone.X = X.tocsr()
    with pytest.raises(ScatlasInputError, match="2 cell\\(s\\) have every modality missing"):
        train_mvae(gone, max_steps=1)
    part = a.copy()
    part.obsm["protein_counts"] = part.obsm["protein_counts"].astype(float)
    part.obsm["protein_counts"].iloc[4, 0] = np.nan
    with pytest.raises(ScatlasInputError, match="some NaN"):
        train_mvae(part, max_steps=1)
    with pytest.raises(ScatlasInputError, match="no obsm key"):
        train_mvae(a, {"rna": "X", "protein": "obsm/adt"}, max_steps=1)
    with pytest.raises(ScatlasInputError, match="no default likelihood"):
        train_mvae(a, {"rna": "X", "spatial": "obsm/protein_counts"}, max_steps=1)
    with pytest.raises(ScatlasInputError, match="not one of"):
        train_mvae(a, likelihoods={"protein": "poisson"}, max_steps=1)
    with pytest.raises(ScatlasInputError, match="not 'X'"):
        train_mvae(a, {"rna": "varm/x"}, max_steps=1)


@pytest.mark.slow  # 13-30 s: opt in with -m slow (default suite under 10 min)
def test_input_pcs_projection_is_the_training_cells_pca(tmp_path):
    """``train_mvae(input_pcs=k)``: the RNA expert's fixed layer is the PCA (numpy SVD here) of
    the log-normalised RNA of the training cells that have RNA (validation cells and cells
    missing RNA left out), unchanged by training; narrower modalities read their features;
    save / load keeps it."""
    from scatlas.models import load
    from scatlas.models.mvae import INPUT_PCA
    from scatlas.tl import train_mvae
    from scatlas.tl._training import holdout as _holdout

    a = _paired(80, seed=1)
    X = a.X.toarray()
    X[[3, 7, 11]] = 0  # three cells without RNA
    a.X = sp.csr_matrix(X)
    model = train_mvae(a, input_pcs=4, n_top_genes=None, validation_fraction=0.25,
                       max_steps=20, eval_every=10, seed=2, progress=False)
    assert model.config.input_pcs == (4, 0)  # 4 proteins: not more than k
    assert model.info["input_pcs"] == {"rna": 4, "protein": 0}
    train_rows, _ = _holdout(80, 0.25, 2)
    rows = train_rows[X[train_rows].sum(1) > 0]
    assert rows.size == 60 - np.isin([3, 7, 11], train_rows).sum()
    L = np.log1p(X[rows] * (INPUT_SCALE / X[rows].sum(1, keepdims=True)))
    mean = L.mean(0)
    _, sv, vt = np.linalg.svd(L - mean, full_matrices=False)
    got = model.variables[INPUT_PCA]["experts_0"]
    assert set(model.variables[INPUT_PCA]) == {"experts_0"}
    np.testing.assert_allclose(got["pca_mean"], mean, rtol=1e-5, atol=1e-6)
    comp = np.asarray(got["pca_components"], np.float64)
    signs = np.sign(np.sum(comp * vt[:4].T, axis=0))
    np.testing.assert_allclose(comp * signs, vt[:4].T, atol=1e-4)
    assert sv[3] > 1.01 * sv[4]  # the 4-dim subspace is well defined
    path = model.save(tmp_path / "mvae_pcs")
    back = load(path)
    assert back.config.input_pcs == (4, 0)
    has_rna = a[X.sum(1) > 0].copy()
    np.testing.assert_array_equal(back.embed(has_rna, ["rna"]), model.embed(has_rna, ["rna"]))
    with pytest.raises(ScatlasInputError, match="unknown modalities"):
        train_mvae(a, input_pcs={"atac": 3}, max_steps=1)
    # on many cells the PCA takes every ceil(n / max_cells)-th observed training cell
    from scatlas.models.mvae import fit_expert_pca
    from scatlas.models.mvae_data import read_modalities

    mod = read_modalities(a, {"rna": "X", "protein": "obsm/protein_counts"},
                          {"rna": "nb", "protein": "nb"})[0]
    sub = fit_expert_pca(mod, train_rows[::-1], 3, max_cells=20)
    every = rows[::-(-rows.size // 20)]
    assert every.size <= 20
    L = np.log1p(X[every] * (INPUT_SCALE / X[every].sum(1, keepdims=True)))
    np.testing.assert_allclose(sub["mean"], L.mean(0), rtol=1e-5, atol=1e-6)
    per_name = train_mvae(a, input_pcs={"protein": 2}, n_top_genes=None, max_steps=2,
                          progress=False)
    assert per_name.config.input_pcs == (0, 2)


@pytest.mark.slow  # 13-30 s: opt in with -m slow (default suite under 10 min)
def test_log1p_normal_target_imputes_its_decoded_mean():
    """A log1p-normal protein: ``scale="log1p"`` is the decoder's mean of ``log1p x``, the
    counts scale its log-normal mean ``exp(mean + sd^2 / 2) - 1``; no library applies."""
    from scatlas.tl import train_mvae

    a = _paired(60, seed=3)
    model = train_mvae(a, likelihoods={"protein": "log1p_normal"}, n_top_genes=None,
                       max_steps=30, seed=1, progress=False)
    assert model.likelihoods["protein"] == "log1p_normal"
    log_vals = model.impute(a, ["rna"], "protein", scale="log1p")
    counts = model.impute(a, ["rna"], "protein")
    sd = np.exp(np.asarray(model.variables["params"]["heads_1"]["log_sd"], np.float64))
    np.testing.assert_allclose(counts, np.expm1(log_vals + 0.5 * sd**2), rtol=1e-4, atol=1e-4)
    # the decoded mean, by hand: the posterior mean of the RNA expert through the protein head
    z = model.embed(a, ["rna"])
    out = model._net.apply(model.variables, jnp.asarray(z), None, method="decode")[1]
    np.testing.assert_allclose(log_vals, np.asarray(out["logits"]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ScatlasInputError, match="no library"):
        model.impute(a, ["rna"], "protein", library="observed")
    frac = a.copy()
    frac.obsm["protein_counts"] = frac.obsm["protein_counts"] * 0.5
    with pytest.raises(ScatlasInputError, match="integer counts"):
        train_mvae(frac, likelihoods={"protein": "log1p_normal"}, max_steps=1)


def test_mudata_mosaic_rows_are_matched():
    mudata = pytest.importorskip("mudata")
    import anndata as ad

    from scatlas.models.mvae_data import read_modalities

    a = _paired(30)
    prot = ad.AnnData(a.obsm["protein_counts"].to_numpy().astype(np.float32)[::-1][:20])
    prot.obs_names = a.obs_names[::-1][:20]
    md = mudata.MuData({"rna": ad.AnnData(a.X, obs=a.obs), "prot": prot})
    mods = read_modalities(md, {"rna": "rna", "protein": "prot"}, {"rna": "nb", "protein": "nb"})
    cells = pd.Index(md.obs_names)
    got = mods[1].matrix[cells.get_indexer(a.obs_names[::-1][:20])]
    np.testing.assert_array_equal(got, prot.X)
    assert mods[1].observed.sum() == 20


# ----------------------------------------------------------------- CITE-seq vs linear baselines


def _quality_rows(ours_f, ours_r, cca, ridge):
    """Rows as bench.quality.vae writes them: ours[split][seed], baselines[split]."""
    rows = []
    for s, (fs, rs) in enumerate(zip(ours_f, ours_r, strict=True)):
        for f, r in zip(fs, rs, strict=True):
            rows.append({"method": "scatlas.mvae", "split_seed": s, "error": None,
                         "foscttm": f, "impute_r_mean": r})
        for k, f in zip((5, 10, 20), cca[s], strict=True):
            rows.append({"method": f"cca{k}", "split_seed": s, "error": None, "foscttm": f})
        rows.append({"method": "ridge", "split_seed": s, "error": None,
                     "impute_r_mean": ridge[s]})
    return rows


def test_quality_checks_follow_the_targets():
    """The three issue-15 checks of bench.quality.vae, on hand-made rows: every split and seed
    below the best CCA; mean r >= ridge + 0.01; seed mean above ridge in >= 4 of 5 splits."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.quality.vae import make_checks

    cca = [(0.10, 0.09, 0.15)] * 5
    f_ok = [[0.08, 0.085, 0.089]] * 5
    r_ok = [[0.52, 0.53, 0.51]] * 4 + [[0.49, 0.49, 0.49]]  # split 4 below ridge (0.50)
    checks = make_checks(_quality_rows(f_ok, r_ok, cca, [0.50] * 5), range(5))
    assert [c["passed"] for c in checks] == [True, True, True]
    assert checks[0]["value"] == pytest.approx(0.089 - 0.09)
    assert checks[1]["value"] == pytest.approx(np.mean(r_ok) - 0.50)
    assert checks[2]["value"] == 4
    # one seed of one split at the best CCA (not below) fails the first check
    f_bad = [row[:] for row in f_ok]
    f_bad[2][1] = 0.09
    assert not make_checks(_quality_rows(f_bad, r_ok, cca, [0.50] * 5), range(5))[0]["passed"]
    # a margin of 0.009 fails the second; two splits below ridge fail the third
    r_small = [[0.509] * 3] * 5
    assert not make_checks(_quality_rows(f_ok, r_small, cca, [0.50] * 5), range(5))[1]["passed"]
    r_two = [[0.53] * 3] * 3 + [[0.49] * 3] * 2
    assert not make_checks(_quality_rows(f_ok, r_two, cca, [0.50] * 5), range(5))[2]["passed"]
    # a failed method fails its checks
    rows = _quality_rows(f_ok, r_ok, cca, [0.50] * 5)
    rows[0]["error"] = "boom"
    assert not make_checks(rows, range(5))[0]["passed"]


#: seed-to-seed standard deviations of the defaults' held-out scores on the CITE-seq splits
#: (``python -m bench.quality.vae``: 3 training seeds per split, sd per split, then the mean
#: over the 5 splits; docs/mvae.md)
SEED_SD_FOSCTTM = 0.0041
SEED_SD_R = 0.0125
#: the defaults' FOSCTTM minus the best CCA's and imputation r minus ridge's, means over splits
#: 0-2 at seed 0 (the same run, 2026-12-08): the VAE beats the best CCA there; its imputation
#: lead over ridge is within the seed noise; the test guards both against regressions
GAP_FOSCTTM = -0.0109
GAP_R = 0.0116


@pytest.mark.slow
def test_cite_seq_defaults_against_linear_baselines(shared_data):
    """``train_mvae`` at its defaults on 3 of the quality benchmark's random 70/30 splits of the
    500 ECCITE-seq cells (training seed 0), each paired with the linear baselines fitted on the
    same training cells (bench.quality.vae: CCA with 5/10/20 components on 30 RNA PCs; ridge
    with PCs and alpha by inner CV). Paired over the splits, with margins of two standard
    errors of the seed noise (``2 SEED_SD_* / sqrt(3)``): the FOSCTTM beats the best CCA
    (chosen on the test cells; mean over splits of ours - CCA below the measured
    ``GAP_FOSCTTM`` plus the margin, itself below 0); the imputation r minus ridge's stays
    above the measured ``GAP_R`` minus the margin (parity: the lead is within the noise).
    The issue's targets are not all met (2 of 15 seeds above the best CCA; r above ridge by
    0.002 on average, not 0.01): docs/mvae.md."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.quality import vae as q
    from bench.quality.data import load

    adata = load("cite", shared_data)
    X = sp.csr_matrix(adata.X)
    Y = np.asarray(adata.obsm["protein_counts"], np.float64)
    d_f, d_r = [], []
    for s in (0, 1, 2):
        train, test = q.split(adata.n_obs, s)
        L = q._lognorm_dense(X[:, q._default_genes(X, train)])
        best_cca = min(q.cca_foscttm(L, Y, train, test, k)[0] for k in q.CCA_COMPONENTS)
        pred, _ = q.ridge_predict(L, Y, train, test)
        ridge = q.per_protein_pearson(pred, np.log1p(Y[test])).mean()
        ours = q.fit_ours(adata, train, test, 0)
        d_f.append(ours["foscttm"] - best_cca)
        d_r.append(ours["impute_r_mean"] - ridge)
        print(f"split {s}: FOSCTTM ours {ours['foscttm']:.4f} best CCA {best_cca:.4f}; "
              f"r ours {ours['impute_r_mean']:.4f} ridge {ridge:.4f}")
    se_f, se_r = 2 * SEED_SD_FOSCTTM / np.sqrt(3), 2 * SEED_SD_R / np.sqrt(3)
    assert GAP_FOSCTTM + se_f < 0
    assert np.mean(d_f) < GAP_FOSCTTM + se_f, (d_f, se_f)
    assert np.mean(d_r) > GAP_R - se_r, (d_r, se_r)


@pytest.mark.slow  # 13-30 s: opt in with -m slow (default suite under 10 min)
def test_resume_refuses_another_covariate(tmp_path, mosaic):
    """A VAE checkpoint records its modalities, observed cells and covariate: resuming it on the
    same cells without the batch covariate is refused, naming what changed."""
    from scatlas.tl import train_mvae

    adata, test, _, _ = mosaic
    kw = dict(max_steps=4, batch_size=128, seed=0, progress=False,
              checkpoint_dir=tmp_path / "ck")
    train_mvae(adata[~test].copy(), batch_key="batch", **kw)
    assert train_mvae(adata[~test].copy(), batch_key="batch", **kw).info["steps"] == 4
    with pytest.raises(ScatlasInputError, match="cells_observed_covariate"):
        train_mvae(adata[~test].copy(), **kw)
