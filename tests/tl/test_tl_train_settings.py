"""``train=`` and ``model=`` of the tl trainers: TrainConfig / model-config settings reach the
run (the logged learning rate follows the schedule asked for; checkpoints land every
``checkpoint_every`` steps), and a setting given twice or unknown is refused by name."""

import numpy as np
import pytest

import scatlas
from scatlas import datasets
from scatlas.exceptions import ScatlasInputError
from scatlas.models.metric import MetricConfig
from scatlas.models.train import TrainConfig


@pytest.fixture(scope="module")
def cells():
    return datasets.synthetic(200, 40, n_batches=2, n_cell_types=3, seed=0, progress=False)


def _train(cells, **kw):
    sizes = {} if "model" in kw and not isinstance(kw["model"], dict) else {
        "hidden": (16,), "latent_dim": 4}
    kw = {"max_steps": 12, "batch_size": 50, "input_pcs": None, "progress": False,
          "n_top_genes": None, **sizes, **kw}
    return scatlas.tl.train_metric(cells, "cell_type", "batch", **kw)


def test_train_settings_reach_the_schedule_and_checkpoints(cells, tmp_path):
    lr = 1e-3
    model = _train(cells, learning_rate=lr, checkpoint_dir=tmp_path / "ck",
                   train={"schedule": "constant", "warmup_steps": 4, "log_every": 1,
                          "checkpoint_every": 5, "keep_checkpoints": 10, "clip_norm": None})
    assert model.info["train"]["schedule"] == "constant"
    assert model.info["train"]["clip_norm"] is None
    logged = {r["step"]: r["lr"] for r in model.history if "lr" in r}
    # optax's linear warm-up from 0 over 4 steps, then constant: step s used lr(s - 1)
    for step, value in logged.items():
        want = lr * min(step - 1, 4) / 4
        assert value == pytest.approx(want, rel=1e-6, abs=1e-12), step
    assert logged[12] == pytest.approx(lr)  # no cosine decay at the end
    saved = sorted(int(p.name) for p in (tmp_path / "ck").iterdir() if p.name.isdigit())
    assert {5, 10} <= set(saved)


def test_train_config_instance_gives_its_non_default_fields(cells):
    model = _train(cells, train=TrainConfig(schedule="constant"))
    assert model.info["train"]["schedule"] == "constant"
    assert model.info["train"]["max_steps"] == 12  # the function's own argument still counts


def test_model_config_instance_and_mapping(cells):
    model = _train(cells, model=MetricConfig(n_genes=999, hidden=(16,), latent_dim=6,
                                             objective="infonce"))
    assert model.config.latent_dim == 6 and model.config.objective == "infonce"
    assert model.config.n_genes == cells.n_vars  # from the data, not the instance


@pytest.mark.parametrize("kw, names", [
    ({"train": {"max_steps": 5}}, "max_steps="),
    ({"train": {"learning_rte": 1e-3}}, "learning_rte"),
    ({"train": {"schedule": "cosine"}, "model": {"latent_dim": 4}}, "latent_dim"),
    ({"train": 3}, "TrainConfig"),
])
def test_bad_settings_are_named(cells, kw, names):
    with pytest.raises(ScatlasInputError, match=names) as err:
        _train(cells, **kw)
    assert err.value.param in ("train", "model")


def test_mvae_takes_train_and_model(cells):
    rng = np.random.default_rng(0)
    a = cells.copy()
    a.obsm["protein_counts"] = rng.poisson(5, (a.n_obs, 4)).astype(np.float32)
    vae = scatlas.tl.train_mvae(a, max_steps=3, batch_size=50, progress=False, n_top_genes=None,
                                input_pcs=None, train={"schedule": "constant"},
                                model={"latent_dim": 3})
    assert vae.info["train"]["schedule"] == "constant"
    assert vae.config.latent_dim == 3
    with pytest.raises(ScatlasInputError, match="kl_warmup_steps="):
        scatlas.tl.train_mvae(a, max_steps=3, progress=False, model={"kl_warmup_steps": 1})


def test_covel_and_michigan_take_train_and_model(cells, monkeypatch):
    """The same train=/model= reach CoVEL's and MichiGAN's configs (their fit is replaced by a
    recorder here: the wiring, not the training, is under test; both train in their own
    tests)."""
    from scatlas import graphs
    from scatlas.models.covel import CoVEL
    from scatlas.models.michigan import MichiGAN

    seen = {}
    monkeypatch.setattr(CoVEL, "fit", classmethod(
        lambda cls, config, feats, mats, graph, tcfg, **kw: seen.update(covel=(config, tcfg))))
    monkeypatch.setattr(MichiGAN, "fit", classmethod(
        lambda cls, source, names, config, **kw: seen.update(michigan=(config, kw))))
    s = graphs.synthetic_multiome(60, 20, peaks_per_gene=2, seed=0)
    g = graphs.gene_peak_graph(s.genes, list(s.atac.var_names))
    scatlas.tl.train_covel({"rna": s.rna, "atac": s.atac}, g, max_steps=4, progress=False,
                           train={"schedule": "constant", "warmup_steps": 2},
                           model={"latent_dim": 5})
    config, tcfg = seen["covel"]
    assert (tcfg.schedule, tcfg.warmup_steps, config.latent_dim) == ("constant", 2, 5)
    with pytest.raises(ScatlasInputError, match="max_steps="):
        scatlas.tl.train_covel({"rna": s.rna, "atac": s.atac}, g, train={"max_steps": 3})

    scatlas.tl.train_michigan(cells, vae_steps=3, gan_steps=3, progress=False,
                              train={"warmup_steps": 1}, gan_train={"clip_norm": 5.0},
                              model={"beta": 1.0})
    config, kw = seen["michigan"]
    assert config.beta == 1.0 and kw["vae_train"].warmup_steps == 1
    assert kw["gan_train"].clip_norm == 5.0 and kw["gan_train"].schedule == "constant"
    with pytest.raises(ScatlasInputError, match="learning_rate="):
        scatlas.tl.train_michigan(cells, gan_train={"learning_rate": 1e-3})
