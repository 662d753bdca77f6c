"""MichiGAN (issue 22 item 1): the estimators against NumPy references, save/load, input
errors, the CLI."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")

import anndata as ad  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from scipy.special import logsumexp  # noqa: E402
from scipy.stats import norm  # noqa: E402

from scatlas.exceptions import ScatlasInputError  # noqa: E402
from scatlas.models.michigan import gradient_penalty, tc_terms, total_correlation  # noqa: E402

# ----------------------------------------------------------------------------- estimators

def _tc_reference(z, mu, logvar, n):
    """Chen et al. 2018's minibatch-weighted sampling, with loops and scipy densities."""
    B, D = z.shape
    sd = np.exp(0.5 * logvar)
    log_q = np.empty(B)
    log_prod = np.empty(B)
    for i in range(B):
        per_j = np.array([[norm.logpdf(z[i, d], mu[j, d], sd[j, d]) for d in range(D)]
                          for j in range(B)])  # (B, D)
        log_q[i] = logsumexp(per_j.sum(axis=1)) - np.log(n * B)
        log_prod[i] = sum(logsumexp(per_j[:, d]) - np.log(n * B) for d in range(D))
    log_qz_x = np.array([norm.logpdf(z[i], mu[i], sd[i]).sum() for i in range(B)])
    log_pz = norm.logpdf(z).sum(axis=1)
    return log_qz_x, log_q, log_prod, log_pz


def test_tc_estimator_matches_numpy_reference():
    rng = np.random.default_rng(0)
    B, D, N = 7, 3, 1000
    mu = rng.normal(size=(B, D))
    logvar = rng.normal(scale=0.5, size=(B, D))
    z = mu + np.exp(0.5 * logvar) * rng.normal(size=(B, D))
    ref = _tc_reference(z, mu, logvar, N)
    args = [jnp.asarray(a, jnp.float32) for a in (z, mu, logvar)]
    got = jax.jit(tc_terms, static_argnums=3)(*args, N)  # one compile, not one per eager op
    for key, want in zip(("log_qz_x", "log_qz", "log_prod_qz", "log_pz"), ref, strict=True):
        np.testing.assert_allclose(np.asarray(got[key]), want, rtol=1e-5, atol=1e-4)
    tc = float(jax.jit(total_correlation, static_argnums=3)(*args, N))
    assert tc == pytest.approx(np.mean(ref[1] - ref[2]), abs=1e-4)


def test_gradient_penalty_matches_numpy_reference():
    rng = np.random.default_rng(1)
    B, G, H = 6, 5, 4
    W, a = rng.normal(size=(H, G)), rng.normal(size=H)
    real, fake, eps = rng.normal(size=(B, G)), rng.normal(size=(B, G)), rng.random(B)

    def critic(x):  # D(x) = a . tanh(W x), per row
        return jnp.tanh(x @ jnp.asarray(W.T, jnp.float32)) @ jnp.asarray(a, jnp.float32)

    x_hat = eps[:, None] * real + (1 - eps[:, None]) * fake
    grad = (a * (1 - np.tanh(x_hat @ W.T) ** 2)) @ W  # analytic d/dx of a . tanh(W x)
    want = np.mean((np.linalg.norm(grad, axis=1) - 1.0) ** 2)
    got = jax.jit(lambda *v: gradient_penalty(critic, *v))(
        *(jnp.asarray(v, jnp.float32) for v in (real, fake, eps)))
    assert float(got) == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------------------- the model

def _cells(n=120, genes=30, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.poisson(rng.gamma(2.0, 1.0, (1, genes)) * rng.uniform(0.5, 2, (n, 1)), (n, genes))
    a = ad.AnnData(sp.csr_matrix(X.astype(np.float32)))
    a.var_names = [f"g{i}" for i in range(genes)]
    a.obs_names = [f"c{i}" for i in range(n)]
    return a


SMALL = {"latent_dim": 3, "hidden": 16, "n_layers": 1, "noise_dim": 2, "gen_hidden": 16,
         "gen_layers": 1, "critic_hidden": 16, "critic_layers": 1, "n_critic": 2}


@pytest.fixture(scope="module")
def model():
    from scatlas import tl

    return tl.train_michigan(_cells(), seed=0, n_top_genes=None, batch_size=32, vae_steps=20,
                             gan_steps=20, progress=False, **SMALL)


def test_train_logs_both_stages(model, tmp_path):
    gan = [r for r in model.history["gan"] if "loss" in r]
    assert {"critic", "generator", "gp", "wasserstein"} <= set(gan[-1])
    assert {"nll", "tc", "mi", "dwkl"} <= set(model.history["vae"][-1])
    assert model.info["vae"]["steps"] == 20 and model.info["gan"]["steps"] == 20
    paths = model.plot_history(tmp_path / "loss.png")
    assert all(p.stat().st_size > 0 for p in paths)


def test_generation_shapes_and_seed(model):
    a = _cells(10, seed=3)
    g = model.generate(a, n_per_cell=3, seed=5)
    assert g.shape == (30, 30) and g.dtype == np.float32 and (g >= 0).all()
    z = model.embed(a)
    np.testing.assert_array_equal(model.generate(np.repeat(z, 1, 0), 3, seed=5), g)
    assert not np.array_equal(model.generate(z, 3, seed=6), g)
    assert model.decode(z, 2).shape == (20, 30)


def test_save_load_round_trip(model, tmp_path):
    from scatlas.models import load

    model.save(tmp_path / "m")
    back = load(tmp_path / "m")
    assert type(back).__name__ == "MichiGAN" and list(back.genes) == list(model.genes)
    z = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    np.testing.assert_array_equal(back.generate(z, 2, seed=1), model.generate(z, 2, seed=1))
    a = _cells(5, seed=4)
    np.testing.assert_array_equal(back.embed(a), model.embed(a))


def test_latent_shift(model):
    a = _cells(40, seed=2)
    m1, m2 = np.arange(40) < 20, np.arange(40) >= 20
    res = model.latent_shift(a, m1, m2, n_per_cell=2)
    z = model.embed(a)
    np.testing.assert_allclose(res.delta, z[m2].mean(0) - z[m1].mean(0), rtol=1e-5, atol=1e-6)
    assert res.profiles.shape == (40, 30) and res.cells.tolist() == list(range(20))


# ------------------------------------------------------------------------------ bad input

def test_negative_counts_are_refused():
    from scatlas import tl

    a = _cells(20)
    a.X = a.X.toarray()
    a.X[0, 0] = -1.0
    with pytest.raises(ScatlasInputError) as err:
        tl.train_michigan(a, vae_steps=1, gan_steps=1, progress=False, **SMALL)
    assert err.value.param == "input" and "negative" in str(err.value)


@pytest.mark.parametrize("kw, param", [
    ({"n_per_cell": 0}, "n_per_cell"), ({"n_per_cell": -2}, "n_per_cell")])
def test_generate_bad_n_per_cell(model, kw, param):
    with pytest.raises(ScatlasInputError) as err:
        model.generate(np.zeros((2, 3), np.float32), **kw)
    assert err.value.param == param and param in str(err.value)


def test_generate_bad_codes(model):
    with pytest.raises(ScatlasInputError) as err:
        model.generate(np.zeros((2, 4), np.float32))
    assert err.value.param == "z"


@pytest.mark.parametrize("which", ["from_mask", "to_mask", "apply_to"])
@pytest.mark.parametrize("bad", ["short", "empty", "not_bool"])
def test_latent_shift_bad_masks(model, which, bad):
    a = _cells(10, seed=1)
    good = np.arange(10) < 5
    value = {"short": good[:7], "empty": np.zeros(10, bool),
             "not_bool": good.astype(int)}[bad]
    kw = {"from_mask": good, "to_mask": ~good, which: value}
    with pytest.raises(ScatlasInputError) as err:
        model.latent_shift(a, kw.pop("from_mask"), kw.pop("to_mask"), **kw)
    assert err.value.param == which and which in str(err.value)


def test_generate_negative_input_cells(model):
    a = _cells(4)
    a.X = -a.X.toarray() - 1
    with pytest.raises(ScatlasInputError) as err:
        model.generate(a)
    assert err.value.param == "input"


# ----------------------------------------------------------------------------------- the CLI

def test_cli_train_michigan_wiring(model, tmp_path, monkeypatch):
    """The command's flags reach tl.train_michigan, and it saves, plots and summarises (the
    training itself is the fixture's; the end-to-end run is the slow test below)."""
    from scatlas import tl
    from scatlas.cli import main
    from scatlas.io import write_h5ad

    seen = {}

    def fake(adata, **kw):
        seen.update(kw, n_obs=adata.n_obs)
        return model

    monkeypatch.setattr(tl, "train_michigan", fake)
    write_h5ad(_cells(), tmp_path / "cells.h5ad")
    code = main(["train", "michigan", str(tmp_path / "cells.h5ad"), "--out",
                 str(tmp_path / "m"), "--vae-steps", "5", "--gan-steps", "7", "--beta", "3",
                 "--n-critic", "4", "--n-top-genes", "0", "--gan-lr", "1e-3",
                 "--plot", str(tmp_path / "loss.png"), "--no-progress"])
    assert code == 0 and (tmp_path / "m" / "manifest.json").is_file()
    assert (tmp_path / "loss.vae.png").is_file() and (tmp_path / "loss.gan.png").is_file()
    assert seen["vae_steps"] == 5 and seen["gan_steps"] == 7 and seen["beta"] == 3.0
    assert seen["n_critic"] == 4 and seen["n_top_genes"] is None and seen["n_obs"] == 120
    assert seen["gan_learning_rate"] == 1e-3 and seen["input"] == "counts"


def test_cli_generate(model, tmp_path, capsys):
    from scatlas.cli import main
    from scatlas.io import read_h5ad, write_h5ad

    model.save(tmp_path / "m")
    cells = _cells(6, seed=7)
    write_h5ad(cells, tmp_path / "cells.h5ad")
    code = main(["generate", "--model", str(tmp_path / "m"), str(tmp_path / "cells.h5ad"),
                 str(tmp_path / "gen.h5ad"), "--n-per-cell", "2", "--seed", "3"])
    out = read_h5ad(tmp_path / "gen.h5ad")
    assert code == 0 and out.shape == (12, 30)
    assert out.obs["source_cell"].iloc[1] == "c0" and out.obs["sample"].tolist()[:2] == [0, 1]
    np.testing.assert_allclose(out.X, model.generate(cells, 2, seed=3))
    code = main(["generate", "--model", str(tmp_path / "m"), str(tmp_path / "cells.h5ad"),
                 str(tmp_path / "gen.h5ad"), "--n-per-cell", "0"])
    assert code == 2 and "--n-per-cell" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_train_and_generate_end_to_end(tmp_path):
    from scatlas.cli import main
    from scatlas.io import read_h5ad, write_h5ad

    write_h5ad(_cells(), tmp_path / "cells.h5ad")
    code = main(["train", "michigan", str(tmp_path / "cells.h5ad"), "--out",
                 str(tmp_path / "m"), "--vae-steps", "5", "--gan-steps", "5", "--latent-dim",
                 "2", "--hidden", "16", "--n-top-genes", "0", "--batch-size", "32",
                 "--no-progress"])
    assert code == 0
    code = main(["generate", "--model", str(tmp_path / "m"), str(tmp_path / "cells.h5ad"),
                 str(tmp_path / "gen.h5ad")])
    assert code == 0 and read_h5ad(tmp_path / "gen.h5ad").shape == (120, 30)
