"""CoVEL: loss terms and the graph VAE against NumPy references, view masking, save/load, bad
input; slow: a shuffled graph integrates worse than the true one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.special import expit, logsumexp

from scatlas import graphs
from scatlas.exceptions import ScatlasInputError
from scatlas.models.covel import CoVELConfig, CoVELTask
from scatlas.models.covel import _task as T
from scatlas.models.covel._module import CoVELNet, graph_conv

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------ numpy references

def test_nb_and_bernoulli_log_prob_match_scipy():
    x = RNG.poisson(3.0, (4, 6)).astype(np.float32)
    mu = RNG.uniform(0.2, 8, (4, 6)).astype(np.float32)
    log_theta = RNG.normal(0, 1, 6).astype(np.float32)
    theta = np.exp(log_theta)
    want = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    np.testing.assert_allclose(T.nb_log_prob(x, mu, log_theta), want, rtol=1e-4, atol=1e-4)
    logits = RNG.normal(0, 2, (4, 6)).astype(np.float32)
    y = (x > 2).astype(np.float32)
    want = stats.bernoulli.logpmf(y, expit(logits))
    np.testing.assert_allclose(T.bernoulli_log_prob(y, logits), want, rtol=1e-5, atol=1e-5)


def test_kl_infonce_cross_entropy_match_numpy():
    loc = RNG.normal(0, 1, (5, 3))
    std = RNG.uniform(0.3, 2, (5, 3))
    want = np.log(1 / std) + (std**2 + loc**2) / 2 - 0.5  # KL(N(m, s) || N(0, 1)) per dim
    np.testing.assert_allclose(T.kl_normal(loc, std), want.sum(1), rtol=1e-6)
    a, b = RNG.normal(0, 1, (6, 4)), RNG.normal(0, 1, (6, 4))
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    S = an @ bn.T / 0.2
    row = -np.mean([S[i, i] - logsumexp(S[i]) for i in range(6)])
    col = -np.mean([S[i, i] - logsumexp(S[:, i]) for i in range(6)])
    np.testing.assert_allclose(T.info_nce(a, b, 0.2), (row + col) / 2, rtol=1e-5)
    logits = RNG.normal(0, 1, (7, 3))
    labels = RNG.integers(0, 3, 7)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(T.cross_entropy(logits, jnp.asarray(labels)),
                               -np.mean(np.log(p[np.arange(7), labels])), rtol=1e-5)


def test_graph_nll_matches_a_loop():
    v = RNG.normal(0, 1, (6, 3))
    src, tgt = np.array([0, 1, 2, 3]), np.array([1, 0, 4, 5])
    w, sg = np.array([1.0, 0.5, 1.0, 0.8]), np.array([1.0, -1.0, 1.0, 1.0])
    neg = RNG.integers(0, 6, (4, 2))
    pos, negs = [], []
    for e in range(4):
        s = expit(sg[e] * v[src[e]] @ v[tgt[e]])
        pos.append(-(w[e] * np.log(s) + (1 - w[e]) * np.log(1 - s)))
        for k in range(2):
            negs.append(-np.log(1 - expit(sg[e] * v[src[e]] @ v[neg[e, k]])))
    want = 0.5 * (np.mean(pos) + np.mean(negs))
    got = T.graph_nll(jnp.asarray(v), src, tgt, jnp.asarray(w), jnp.asarray(sg), neg)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_data_nll_inner_product_decoders():
    u, v = RNG.normal(0, 1, (3, 4)), RNG.normal(0, 1, (5, 4))
    dec = {"scale": RNG.normal(0, 1, 5), "bias": RNG.normal(0, 1, 5),
           "log_theta": RNG.normal(0, 1, 5)}
    x = RNG.poisson(4, (3, 5)).astype(np.float64)
    logit = np.log1p(np.exp(dec["scale"])) * (u @ v.T) + dec["bias"]
    mu = np.exp(logit) / np.exp(logit).sum(1, keepdims=True) * x.sum(1, keepdims=True)
    th = np.exp(dec["log_theta"])
    want = -stats.nbinom.logpmf(x, th, th / (th + mu)).mean()
    np.testing.assert_allclose(T.data_nll(x, u, v, dec, "nb"), want, rtol=1e-4)
    want = -stats.bernoulli.logpmf(x > 0, expit(logit)).mean()
    np.testing.assert_allclose(T.data_nll(x, u, v, dec, "bernoulli"), want, rtol=1e-5)


def test_reverse_gradient_negates():
    g = jax.grad(lambda x: jnp.sum(3.0 * T.reverse_gradient(x)))(jnp.ones(3))
    np.testing.assert_allclose(g, -3.0)


def _tiny(**kw):
    cfg = CoVELConfig(("rna", "protein"), ("nb", "nb"), (6, 3), latent_dim=4, hidden=8,
                      n_tokens=4, n_bins=3, token_dim=4, heads=2, **kw)
    g = graphs.prior_graph(pd.DataFrame({"source": ["g0", "g1", "g2"],
                                         "target": ["p0", "p1", "p2"],
                                         "weight": [1.0, 0.5, 1.0], "sign": [1, 1, -1]}))
    r = g.resolve({"rna": [f"g{i}" for i in range(6)], "protein": ["p0", "p1", "p2"]})
    arrays = {"src": r.src, "tgt": r.tgt, "weight": r.weight, "sign": r.sign,
              "norm": r.keepvar_norm()}
    batch = {"x_rna": RNG.poisson(2, (5, 6)).astype(np.float32),
             "x_protein": RNG.poisson(5, (5, 3)).astype(np.float32)}
    return cfg, arrays, batch


def test_graph_vae_encoder_matches_numpy():
    cfg, arrays, batch = _tiny()
    task = CoVELTask(cfg, arrays)
    params = task.init(jax.random.PRNGKey(0), batch)["params"]
    loc, std = task.net.apply({"params": params}, *task.conv_edges(), method=CoVELNet.features)
    gp = params["graph"]
    r = np.asarray(gp["vrepr"], np.float64)
    A = np.zeros((9, 9))  # dense A[t, s] = sign * w / sqrt(in-degree(t))
    deg = np.bincount(arrays["tgt"], weights=arrays["weight"], minlength=9)
    for s, t, w, sg in zip(arrays["src"], arrays["tgt"], arrays["weight"], arrays["sign"],
                           strict=True):
        A[t, s] += sg * w / np.sqrt(deg[t])
    h = A @ r
    want_loc = h @ np.asarray(gp["loc"]["kernel"]) + np.asarray(gp["loc"]["bias"])
    want_std = np.log1p(np.exp(h @ np.asarray(gp["std"]["kernel"])
                               + np.asarray(gp["std"]["bias"]))) + 1e-7
    np.testing.assert_allclose(loc, want_loc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, want_std, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(graph_conv(jnp.asarray(r, jnp.float32), arrays["src"],
                                          arrays["tgt"], arrays["norm"], arrays["sign"]),
                               h, rtol=1e-5, atol=1e-6)


VIEW_TERMS = {"graph_view": {"g_nll", "g_kl"}, "align": {"dsc"},
              "contrastive": {"pair", "aug"}, "fine_grained": set()}


# "align" compiles the discriminator too (13 s): opt in with -m slow
@pytest.mark.parametrize("view", [pytest.param(v, marks=pytest.mark.slow) if v == "align" else v
                                  for v in sorted(VIEW_TERMS)])
def test_masking_a_view_removes_exactly_its_terms(view):
    cfg, arrays, batch = _tiny(paired=True, fine_grained=True)
    on = CoVELTask(cfg, arrays)
    params = on.init(jax.random.PRNGKey(0), batch)["params"]
    rng = jax.random.PRNGKey(3)
    t_on = on.terms(params, batch, rng, False)
    off_cfg, _, _ = _tiny(**{"paired": True, "fine_grained": True, view: False})
    off = CoVELTask(off_cfg, arrays)
    if view == "fine_grained":  # the transformer's parameters are gone, nothing else
        p_off = off.init(jax.random.PRNGKey(0), batch)["params"]
        assert "tokens" in params["enc_rna"] and "tokens" not in p_off["enc_rna"]
        t_off = off.terms(p_off, batch, rng, False)
        assert set(t_on) == set(t_off)
        return
    t_off = off.terms(params, batch, rng, False)
    assert set(t_on) - set(t_off) == VIEW_TERMS[view] and set(t_off) <= set(t_on)
    if view == "graph_view":
        # off = the same model on a graph of self-loops only, without the graph terms
        n = 9
        loops = {"src": np.arange(n, dtype=np.int32), "tgt": np.arange(n, dtype=np.int32),
                 "weight": np.ones(n, np.float32), "sign": np.ones(n, np.float32),
                 "norm": np.ones(n, np.float32)}
        t_ref = CoVELTask(cfg, loops).terms(params, batch, rng, False)
    else:
        t_ref = t_on
    for k in t_off:
        np.testing.assert_allclose(t_off[k], t_ref[k], rtol=1e-6, err_msg=k)
    # the total is the weighted sum of the terms present, weights of the enabled views only
    total, (metrics, _) = off.loss(params, None, batch, rng, jnp.int32(0), False)
    assert set(off.weights()) == set(metrics)
    np.testing.assert_allclose(total, sum(off.weights()[k] * metrics[k] for k in metrics),
                               rtol=1e-6)


def test_terms_match_numpy_for_fixed_params():
    """The task's data terms equal numpy's on its own posterior means (noise fixed by rng)."""
    cfg, arrays, batch = _tiny(contrastive=False, align=False)
    task = CoVELTask(cfg, arrays)
    params = task.init(jax.random.PRNGKey(1), batch)["params"]
    enc = [task.net.apply({"params": params}, k, jnp.asarray(batch[f"x_{m}"]), False,
                          method=CoVELNet.encode) for k, m in enumerate(cfg.modalities)]
    for k, m in enumerate(cfg.modalities):
        loc, std = (np.asarray(a, np.float64) for a in enc[k])
        want = (np.log(1 / std) + (std**2 + loc**2) / 2 - 0.5).sum(1).mean() / cfg.n_features[k]
        got = task.terms(params, batch, jax.random.PRNGKey(2), False)[f"x_kl_{m}"]
        np.testing.assert_allclose(got, want, rtol=1e-5)


# ---------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny_model():
    from scatlas.tl import train_covel

    s = graphs.synthetic_multiome(60, 20, peaks_per_gene=2, seed=0)
    g = graphs.gene_peak_graph(s.genes, list(s.atac.var_names))
    model = train_covel({"rna": s.rna, "atac": s.atac}, g, max_steps=4, batch_size=16,
                        latent_dim=4, hidden=16, progress=False)
    return model, s


def test_save_load_round_trip(tiny_model, tmp_path):
    from scatlas.models import CoVEL, load

    model, s = tiny_model
    assert model.info["steps"] == 4 and model.info["n_features"] == {"rna": 20, "atac": 40}
    za = model.embed(s.atac, "atac")
    assert s.atac.obsm["X_covel"].shape == (60, 4)
    imp = model.impute(s.rna, source="rna", target="atac")
    assert imp.shape == (60, 40) and ((imp.to_numpy() >= 0) & (imp.to_numpy() <= 1)).all()
    model.save(tmp_path / "m")
    back = load(tmp_path / "m")
    assert isinstance(back, CoVEL) and back.config == model.config
    np.testing.assert_array_equal(back.embed(s.atac.copy(), "atac"), za)
    np.testing.assert_array_equal(back.impute(s.rna.copy(), "rna", "atac").to_numpy(),
                                  imp.to_numpy())
    fe = back.feature_embeddings()
    assert list(fe["rna"].index) == list(s.rna.var_names)


def test_bad_input_is_named(tiny_model):
    from scatlas.tl import train_covel

    _, s = tiny_model
    g = graphs.gene_peak_graph(s.genes, list(s.atac.var_names))
    neg = s.rna.copy()
    neg.X = neg.X.toarray()
    neg.X[0, 0] = -1
    with pytest.raises(ScatlasInputError, match="negative"):
        train_covel({"rna": neg, "atac": s.atac}, g, max_steps=1)
    with pytest.raises(ScatlasInputError, match="cell names of 'atac' do not match"):
        train_covel({"rna": s.rna, "atac": s.atac}, g, paired=True, max_steps=1)
    other = graphs.prior_graph(pd.DataFrame({"source": ["G0000", "G0000"],
                                             "target": ["G0001", "nope"]}))
    with pytest.raises(ScatlasInputError, match="names no feature of modality 'atac'"), \
            pytest.warns(UserWarning):
        train_covel({"rna": s.rna, "atac": s.atac}, other, max_steps=1)
    within = graphs.prior_graph(pd.DataFrame({"source": ["G0000", s.atac.var_names[0]],
                                              "target": ["G0001", s.atac.var_names[1]]}))
    with pytest.raises(ScatlasInputError, match="no feature linked to another modality"):
        train_covel({"rna": s.rna, "atac": s.atac}, within, max_steps=1)
    with pytest.raises(ScatlasInputError, match="two modalities"):
        train_covel({"rna": s.rna}, g, max_steps=1)
    with pytest.raises(ScatlasInputError, match="modality 'protein' is not one"):
        tiny_model[0].embed(s.rna, "protein")
    with pytest.raises(ScatlasInputError, match="FeatureGraph or a DataFrame"):
        train_covel({"rna": s.rna, "atac": s.atac}, [("a", "b")], max_steps=1)


# ---------------------------------------------------------------------------------- slow

def _transfer(model, s) -> float:
    from sklearn.neighbors import KNeighborsClassifier

    zr, za = model.embed(s.rna, "rna"), model.embed(s.atac, "atac")
    knn = KNeighborsClassifier(5).fit(zr, s.rna.obs["state"])
    return float((knn.predict(za) == s.atac.obs["state"].to_numpy()).mean())


@pytest.mark.slow
def test_shuffled_graph_integrates_worse():
    from scatlas.tl import train_covel

    s = graphs.synthetic_multiome(300, 60, seed=3)
    true = graphs.gene_peak_graph(s.genes, list(s.atac.var_names))
    e = true.to_frame()
    e["target"] = np.random.default_rng(0).permutation(e["target"].to_numpy())
    shuffled = graphs.FeatureGraph(e)
    kw = dict(max_steps=400, progress=False, seed=0)
    acc_true = _transfer(train_covel({"rna": s.rna, "atac": s.atac}, true, **kw), s)
    acc_shuf = _transfer(train_covel({"rna": s.rna, "atac": s.atac}, shuffled, **kw), s)
    assert acc_true > acc_shuf + 0.1, (acc_true, acc_shuf)
