"""Metric losses and on-device mining against plain numpy references (SCimilarity's rules)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scatlas.models import host_mining
from scatlas.models import metric_losses as ml
from scatlas.models.metric import related_labels


def _embeddings(rng, B=40, d=8):
    z = rng.normal(size=(B, d)).astype(np.float32)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def ref_mine(sq, labels, studies, related, u, margin, strategy, across):
    """SCimilarity's TripletSelector rules, looped in Python (the uniform pick uses ``u``)."""
    B = len(labels)
    margin32 = np.float32(margin)
    picks = {}
    for a in range(B):
        if labels[a] < 0:
            continue
        same = [p for p in range(B) if p != a and labels[p] == labels[a]]
        has_cross = any(studies[p] != studies[a] for p in same)
        negs = [n for n in range(B) if labels[n] >= 0 and not related[labels[a], labels[n]]]
        negs = sorted(negs, key=lambda n: (sq[a, n], n))
        for p in range(a + 1, B):
            if labels[p] != labels[a]:
                continue
            if across and has_cross and studies[p] == studies[a]:
                continue
            hi = np.float32(sq[a, p]) + margin32  # loss > 0  <=>  d_an < d_ap + margin
            if strategy == "semihard":
                cand = [n for n in negs if sq[a, p] < sq[a, n] < hi]
            else:
                cand = [n for n in negs if sq[a, n] < hi]
            if not cand:
                continue
            if strategy == "hardest":
                picks[(a, p)] = cand[0]
            else:
                picks[(a, p)] = cand[min(int(math.floor(u[a, p] * len(cand))), len(cand) - 1)]
    return picks


def _mine_with(implementation, *args, **kw):
    """``mine`` as the jitted step calls it (host loop on the CPU), or one form directly."""
    if implementation == "xla":
        return ml.mine_in_xla(*args, **kw)
    if implementation == "host":
        return host_mining.mine_on_host(*(np.asarray(a) for a in args), kw["margin"],
                                        kw["strategy"])
    return jax.jit(lambda *a: ml.mine(*a, **kw))(*args)


@pytest.mark.parametrize("implementation", ["mine", "xla", "host"])
@pytest.mark.parametrize("strategy", ["semihard", "hardest", "random"])
@pytest.mark.parametrize("across", [True, False])
def test_mining_equals_reference(strategy, across, implementation):
    rng = np.random.default_rng(3)
    B = 48
    z = _embeddings(rng, B)
    labels = rng.integers(0, 5, B).astype(np.int32)
    labels[:3] = -1  # unlabelled cells are neither anchors nor negatives
    studies = rng.integers(0, 3, B).astype(np.int32)
    studies[labels == 4] = 0  # label 4 lives in one study: same-study positives allowed
    related = related_labels(["a", "b", "c", "d", "e"], {"b": "a"})  # a and b are related
    sq = np.asarray(ml.squared_distances(jnp.asarray(z)))
    u = rng.random((B, B)).astype(np.float32)
    margin = 0.3  # wide enough that every strategy has work to do on random embeddings
    neg, mask = _mine_with(
        implementation,
        jnp.asarray(sq), ml.candidate_pairs(jnp.asarray(labels), jnp.asarray(studies), across),
        ml.candidate_negatives(jnp.asarray(labels), jnp.asarray(related)), jnp.asarray(u),
        margin=margin, strategy=strategy,
    )
    neg, mask = np.asarray(neg), np.asarray(mask)
    ours = {(a, p): int(neg[a, p]) for a, p in zip(*np.nonzero(mask), strict=True)}
    ref = ref_mine(sq, labels, studies, related, u, margin, strategy, across)
    assert len(ref) > 20
    assert ours == ref


def test_negative_margin_is_refused():
    from scatlas._validate import ScatlasInputError
    from scatlas.models.metric import MetricConfig

    for bad in (-0.1, float("nan")):
        with pytest.raises(ScatlasInputError, match="margin"):
            MetricConfig(n_genes=10, margin=bad)
    assert MetricConfig(n_genes=10, margin=0.0).margin == 0.0


def test_related_labels_follow_the_hierarchy():
    names = ["T cell", "CD4 T cell", "naive CD4 T cell", "B cell", "lymphocyte"]
    parents = {"CD4 T cell": "T cell", "naive CD4 T cell": ["CD4 T cell"], "T cell": "lymphocyte",
               "B cell": "lymphocyte"}
    rel = related_labels(names, parents)
    assert rel[2, 0] and rel[0, 2] and rel[2, 4]  # grandparent and great-grandparent
    assert not rel[3, 0] and not rel[3, 2]  # siblings under lymphocyte are not related
    assert rel[3, 4] and np.array_equal(rel, rel.T)


def test_triplet_loss_equals_numpy():
    rng = np.random.default_rng(0)
    z = _embeddings(rng, 12, 6)
    neg = rng.integers(0, 12, (12, 12)).astype(np.int32)
    mask = (rng.random((12, 12)) < 0.3) & ~np.eye(12, dtype=bool)  # pairs never have a == p
    loss, count, hard = ml.triplet_loss(jnp.asarray(z), jnp.asarray(neg), jnp.asarray(mask), 0.5)
    per = [max(np.linalg.norm(z[a] - z[p]) - np.linalg.norm(z[a] - z[neg[a, p]]) + 0.5, 0.0)
           for a, p in zip(*np.nonzero(mask), strict=True)]
    np.testing.assert_allclose(float(loss), np.mean(per), rtol=1e-4)  # float32 Gram route
    assert int(count) == mask.sum() and int(hard) == sum(v > 0 for v in per)


@pytest.mark.parametrize("same_study", [False, True])
def test_supcon_equals_numpy(same_study):
    """InfoNCE against a loop; with ``negatives="same_study"`` an anchor's denominator keeps its
    positives and only its own study's negatives."""
    rng = np.random.default_rng(1)
    z = _embeddings(rng, 16, 5)
    labels = rng.integers(0, 4, 16).astype(np.int32)
    labels[0] = 3
    labels[5] = -1
    studies = rng.integers(0, 2, 16).astype(np.int32)
    related = related_labels(list("abcd"), {"b": "a"})
    tau = 0.2
    got = float(ml.supcon_loss(jnp.asarray(z), jnp.asarray(labels), jnp.asarray(related), tau,
                               jnp.asarray(studies) if same_study else None))
    per = []
    for i in range(16):
        if labels[i] < 0:
            continue
        pos = [j for j in range(16) if j != i and labels[j] == labels[i]]
        allowed = [j for j in range(16) if j != i and labels[j] >= 0
                   and (labels[j] == labels[i] or (not related[labels[i], labels[j]] and (
                       not same_study or studies[j] == studies[i])))]
        if not pos:
            continue
        s = {j: z[i] @ z[j] / tau for j in allowed}
        lse = np.log(np.sum([np.exp(v) for v in s.values()]))
        per.append(-np.mean([s[p] - lse for p in pos]))
    np.testing.assert_allclose(got, np.mean(per), rtol=1e-5)
    negs = np.asarray(ml.candidate_negatives(jnp.asarray(labels), jnp.asarray(related),
                                             jnp.asarray(studies) if same_study else None))
    for a in range(16):
        for n in range(16):
            want = (labels[a] >= 0 and labels[n] >= 0 and not related[labels[a], labels[n]]
                    and (not same_study or studies[a] == studies[n]))
            assert negs[a, n] == want


def test_mined_loss_is_zero_without_triplets_and_grads_flow():
    rng = np.random.default_rng(2)
    z = jnp.asarray(_embeddings(rng, 10, 4))
    one_label = jnp.zeros(10, jnp.int32)
    loss, m = ml.mined_triplet_loss(z, one_label, one_label, jnp.eye(1, dtype=bool),
                                    jax.random.PRNGKey(0))
    assert float(loss) == 0.0 and float(m["n_triplets"]) == 0
    labels = jnp.asarray(rng.integers(0, 3, 10), jnp.int32)
    g = jax.grad(lambda z: ml.mined_triplet_loss(
        z, labels, labels * 0, jnp.eye(3, dtype=bool), jax.random.PRNGKey(0), margin=1.0)[0])(z)
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0


@pytest.mark.parametrize("strategy", ["semihard", "hardest", "random"])
@pytest.mark.parametrize("margin", [0.0, 0.05, 0.5])
def test_host_mining_equals_xla_with_tied_distances(strategy, margin):
    """Duplicated cells give exactly tied (and zero) distances: both forms break ties by row."""
    rng = np.random.default_rng(5)
    z = _embeddings(rng, 60, 6)
    z = np.concatenate([z, z[:40], z[:20]])  # 120 cells, many exact ties
    labels = rng.integers(0, 6, 120).astype(np.int32)
    labels[-2:] = -1
    studies = rng.integers(0, 2, 120).astype(np.int32)
    related = related_labels(list("abcdef"), {"c": "b"})
    sq = ml.squared_distances(jnp.asarray(z))
    args = (sq, ml.candidate_pairs(jnp.asarray(labels), jnp.asarray(studies), True),
            ml.candidate_negatives(jnp.asarray(labels), jnp.asarray(related)),
            jnp.asarray(rng.random((120, 120)).astype(np.float32)))
    neg_x, mask_x = (np.asarray(a) for a in ml.mine_in_xla(*args, margin=margin,
                                                             strategy=strategy))
    neg_h, mask_h = host_mining.mine_on_host(*(np.asarray(a) for a in args), margin, strategy)
    assert (np.asarray(sq) == 0).sum() > 120  # the duplicates are there
    if margin == 0 and strategy == "semihard":
        assert mask_h.sum() == 0  # d_ap < d_an < d_ap is empty
    else:
        assert mask_h.sum() > 100
    np.testing.assert_array_equal(mask_h, mask_x)
    np.testing.assert_array_equal(neg_h[mask_h], neg_x[mask_x])


def _np_forward(params, stats, x, train):
    """MetricNet in numpy: Dense -> BatchNorm -> PReLU blocks, L2-normalised embedding, mirror
    decoder with a gene-major output layer (no dropout)."""

    def block(p, s, h):
        h = h @ np.asarray(p["Dense_0"]["kernel"]) + np.asarray(p["Dense_0"]["bias"])
        if train:  # batch statistics (biased variance), as torch's and flax's BatchNorm
            mean, var = h.mean(0), h.var(0)
        else:
            mean, var = np.asarray(s["BatchNorm_0"]["mean"]), np.asarray(s["BatchNorm_0"]["var"])
        bn = p["BatchNorm_0"]
        h = (h - mean) / np.sqrt(var + 1e-5) * np.asarray(bn["scale"]) + np.asarray(bn["bias"])
        return np.where(h >= 0, h, np.asarray(p["PReLU_0"]["negative_slope"]) * h)

    enc, dec = params["encoder"], params["decoder"]
    h = x
    for i in range(len([k for k in enc if k.startswith("_Block")])):
        h = block(enc[f"_Block_{i}"], stats["encoder"][f"_Block_{i}"], h)
    z = h @ np.asarray(enc["Dense_0"]["kernel"]) + np.asarray(enc["Dense_0"]["bias"])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    h = z
    for i in range(len([k for k in dec if k.startswith("_Block")])):
        h = block(dec[f"_Block_{i}"], stats["decoder"][f"_Block_{i}"], h)
    out = dec["Output"]
    return z, h @ np.asarray(out["kernel"]).T + np.asarray(out["bias"])


@pytest.mark.parametrize("train", [True, False])
def test_metric_task_loss_equals_numpy(train):
    """The whole training loss, ``w * triplet + (1 - w) * MSE + l1 * lr(step) * |W1|_1``
    (SCimilarity's objective), from a numpy forward pass, the reference mining (hardest: no
    random draw) and the cosine schedule written out; the validation loss leaves L1 out."""
    from scatlas.models.metric import MetricConfig, MetricTask
    from scatlas.models.train import TrainConfig

    rng = np.random.default_rng(4)
    B, G = 32, 20
    x = np.log1p(rng.poisson(2.0, (B, G))).astype(np.float32)
    labels = rng.integers(0, 4, B).astype(np.int32)
    studies = rng.integers(0, 2, B).astype(np.int32)
    cfg = MetricConfig(n_genes=G, hidden=(16, 8), latent_dim=4, dropout=0.0, input_dropout=0.0,
                       mining="hardest", margin=0.3, metric_weight=0.4, l1=0.05)
    tcfg = TrainConfig(max_steps=100, learning_rate=0.01)
    related = related_labels(list("abcd"), {"b": "a"})
    task = MetricTask(cfg, tcfg, related)
    batch = {"x": jnp.asarray(x), "label": jnp.asarray(labels), "study": jnp.asarray(studies)}
    variables = task.init(jax.random.PRNGKey(0), batch)
    params = variables.pop("params")
    step = 30
    loss, (metrics, _) = jax.jit(task.loss, static_argnums=5)(
        params, variables, batch, jax.random.PRNGKey(1), step, train)

    z, recon = _np_forward(params, variables["batch_stats"], x.astype(np.float64), train)
    mse = np.mean((recon - x) ** 2)
    d = np.linalg.norm(z[:, None] - z[None], axis=2)
    picks = ref_mine(d**2, labels, studies, related, None, cfg.margin, "hardest", True)
    triplet = np.mean([max(d[a, p] - d[a, n] + cfg.margin, 0.0) for (a, p), n in picks.items()])
    assert len(picks) > 20 and triplet > 0
    lr = 0.01 * 0.5 * (1 + np.cos(np.pi * step / 100))
    w1 = np.asarray(params["encoder"]["_Block_0"]["Dense_0"]["kernel"])
    l1 = 0.05 * lr * np.abs(w1).sum() if train else 0.0
    np.testing.assert_allclose(float(metrics["mse"]), mse, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["triplet"]), triplet, rtol=1e-3)
    np.testing.assert_allclose(float(metrics["l1"]), l1, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.4 * triplet + 0.6 * mse + l1, rtol=1e-4)


def test_read_hierarchy_files_and_a_hierarchy_that_names_no_label(tmp_path):
    """CSV (with a header), TSV and JSON give the same child -> parents map; an empty file, a
    JSON list, or a hierarchy of other names (ontology IDs for label names) are refused."""
    from scatlas._validate import ScatlasInputError
    from scatlas.models.metric import read_hierarchy

    (tmp_path / "h.csv").write_text("child,parent\nCD4 T cell,T cell\nB cell,lymphocyte\n"
                                    "T cell,lymphocyte\nCD4 T cell,helper cell\n")
    (tmp_path / "h.tsv").write_text("CD4 T cell\tT cell\nB cell\tlymphocyte\n"
                                    "T cell\tlymphocyte\nCD4 T cell\thelper cell\n")
    (tmp_path / "h.json").write_text('{"CD4 T cell": ["T cell", "helper cell"], '
                                     '"B cell": "lymphocyte", "T cell": "lymphocyte"}')
    want = {"CD4 T cell": ["T cell", "helper cell"], "B cell": ["lymphocyte"],
            "T cell": ["lymphocyte"]}
    for name in ("h.csv", "h.tsv", "h.json"):
        assert read_hierarchy(tmp_path / name) == want
    rel = related_labels(["T cell", "CD4 T cell", "B cell"], read_hierarchy(tmp_path / "h.csv"))
    assert rel[0, 1] and not rel[1, 2] and not rel[0, 2]
    (tmp_path / "empty.csv").write_text("child,parent\n")
    (tmp_path / "list.json").write_text('["a", "b"]')
    for bad in ("empty.csv", "list.json"):
        with pytest.raises(ScatlasInputError, match="hierarchy"):
            read_hierarchy(tmp_path / bad)
    with pytest.raises(FileNotFoundError):
        read_hierarchy(tmp_path / "missing.csv")
    with pytest.raises(ScatlasInputError, match="names none of the 2 labels"):
        related_labels(["T cell", "B cell"], {"CL:0000624": "CL:0000084"})


def test_single_cell_label_is_a_negative_never_an_anchor():
    """A label with one cell in the batch has no admissible pair (it cannot anchor or be a
    positive) but is an admissible negative of every other anchor; ``n_negative_only`` counts
    the mined triplets whose negative has such a label, as a numpy count of the mined picks."""
    rng = np.random.default_rng(3)
    B = 30
    labels = np.array([0] * 12 + [1] * 12 + [2] * 5 + [3], dtype=np.int32)  # label 3: one cell
    studies = rng.integers(0, 2, B).astype(np.int32)
    related = np.eye(4, dtype=bool)
    pairs = np.asarray(ml.candidate_pairs(jnp.asarray(labels), jnp.asarray(studies), True))
    negs = np.asarray(ml.candidate_negatives(jnp.asarray(labels), jnp.asarray(related)))
    assert not pairs[B - 1].any() and not pairs[:, B - 1].any()
    assert negs[labels != 3, B - 1].all()
    z = jnp.asarray(_embeddings(rng, B))
    key = jax.random.PRNGKey(0)
    only = jnp.asarray([False, False, False, True])
    _, metrics = ml.mined_triplet_loss(z, jnp.asarray(labels), jnp.asarray(studies),
                                       jnp.asarray(related), key, margin=2.0, strategy="random",
                                       negative_only=only)
    sq = jax.lax.stop_gradient(ml.squared_distances(z))
    u = jax.random.uniform(key, sq.shape)
    neg, mask = ml.mine(sq, jnp.asarray(pairs), jnp.asarray(negs), u, margin=2.0,
                        strategy="random")
    neg, mask = np.asarray(neg), np.asarray(mask)
    want = int(np.sum(mask & (neg == B - 1)))
    assert want > 0 and metrics["n_negative_only"] == want


def test_single_cell_label_is_an_infonce_negative_only():
    """In the InfoNCE loss a cell whose label has no other cell in the batch is no anchor (the
    loss is the mean over the other anchors) but sits in every other anchor's denominator (its
    embedding gets a gradient)."""
    rng = np.random.default_rng(5)
    labels = jnp.asarray([0] * 6 + [1] * 6 + [2], dtype=jnp.int32)
    related = jnp.eye(3, dtype=bool)
    z = jnp.asarray(_embeddings(rng, 13, 4))
    grad = jax.grad(lambda x: ml.supcon_loss(x / jnp.linalg.norm(x, axis=1, keepdims=True),
                                             labels, related))(z)
    assert float(jnp.abs(grad[12]).sum()) > 0
    without = ml.supcon_loss(z[:12], labels[:12], related)
    assert not np.isclose(float(ml.supcon_loss(z, labels, related)), float(without))
