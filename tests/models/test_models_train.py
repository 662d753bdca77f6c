"""The shared training stack: loader, exact resume from orbax checkpoints, sharded steps, logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

from scatlas import datasets
from scatlas.models import data as mdata
from scatlas.models.metric import MetricConfig, MetricTask, related_labels
from scatlas.models.train import TrainConfig, fit, plot_history, read_log


@pytest.fixture(scope="module")
def small():
    a = datasets.synthetic(600, 50, n_batches=3, n_cell_types=4, seed=0)
    return a


def _batches(a, batch_size=64, seed=0, **kw):
    return mdata.CellBatches(a.X, labels=a.obs["cell_type"].to_numpy(),
                             studies=a.obs["batch"].to_numpy(), batch_size=batch_size,
                             seed=seed, **kw)


def test_lognorm_equals_scanpy(small):
    ref = small.copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    np.testing.assert_allclose(mdata.lognorm(small.X[:50]), ref.X[:50].toarray(), rtol=1e-5)
    np.testing.assert_allclose(mdata.lognorm(small.X[:50].toarray()), ref.X[:50].toarray(),
                               rtol=1e-5)


def test_batches_are_deterministic_distinct_and_balanced(small):
    b = _batches(small)
    one, again = b.batch(7), _batches(small).batch(7)
    for k in one:
        np.testing.assert_array_equal(one[k], again[k])
    assert len(np.unique(one["index"])) == 64  # no repeats within a batch
    assert not np.array_equal(b.batch(8)["index"], one["index"])
    np.testing.assert_allclose(one["x"], mdata.lognorm(small.X[one["index"]]), rtol=1e-6)
    # weights: SCimilarity's 1/log1p(n_label/1e4) * 1/log1p(n_study/1e6), clipped
    labels = np.array([0] * 90 + [1] * 10)
    studies = np.zeros(100, dtype=int)
    w = mdata.sampling_weights(labels, studies, "label")
    expect = 1 / np.log1p(np.where(labels == 0, 90, 10) / 1e4)
    expect = np.minimum(expect, 2 * np.quantile(expect, 0.999))
    np.testing.assert_allclose(w, expect / expect.sum())
    # a rare label is drawn about as often as a common one
    rng = np.random.default_rng(0)
    draws = np.concatenate([
        mdata.draw_without_repeats(rng, 100, 10, np.cumsum(w)) for _ in range(400)
    ])
    frac_rare = np.mean(labels[draws] == 1)
    assert 0.35 < frac_rare < 0.65


def test_backed_source_gives_the_same_batches(small, tmp_path):
    path = tmp_path / "a.h5ad"
    small.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    b_mem, b_disk = _batches(small), _batches(backed)
    for t in (0, 3):
        np.testing.assert_array_equal(b_mem.batch(t)["x"], b_disk.batch(t)["x"])


def test_synthetic_source_streams_labelled_batches():
    src = mdata.SyntheticSource(40, n_blocks=4, n_cell_types=3, n_batches=2, seed=1)
    b = mdata.CellBatches(src, labels=src.labels, studies=src.studies, batch_size=100)
    first = b.batch(0)
    ref = datasets.synthetic(4 * 512, 40, n_cell_types=3, n_batches=2, seed=1)
    np.testing.assert_allclose(first["x"], mdata.lognorm(ref.X[first["index"]]), rtol=1e-6)
    assert set(first["label"]) <= {0, 1, 2}


def _task_and_cfg(tmp_path, **kw):
    cfg = TrainConfig(max_steps=20, seed=3, log_every=1, checkpoint_every=5, data_parallel=False,
                      **kw)
    return MetricTask(MetricConfig(n_genes=50, hidden=(32, 32), latent_dim=8), cfg,
                      np.eye(4, dtype=bool)), cfg


def _flat(variables):
    return np.concatenate([np.ravel(x) for x in _leaves(variables)])


@pytest.mark.parametrize("with_validation",
                         [False, pytest.param(True, marks=pytest.mark.slow)])
def test_resume_from_checkpoint_reproduces_uninterrupted_run(small, tmp_path, with_validation):
    """Interrupted at step 12, resumed from the step-10 checkpoint: the same weights (with a
    validation split: the same best weights and best step), history and log as one run."""
    val = None
    if with_validation:  # cells of another synthetic atlas: the best step comes early
        other = datasets.synthetic(600, 50, n_batches=3, n_cell_types=4, seed=5)
        val = list(_batches(other, seed=9).sequential(np.arange(128), 64))
    kw = dict(eval_every=2, learning_rate=0.05) if with_validation else {}
    task, cfg = _task_and_cfg(tmp_path, log_path=str(tmp_path / "straight.jsonl"), **kw)
    straight = fit(task, _batches(small), cfg, val_batches=val)

    task, cfg = _task_and_cfg(tmp_path, checkpoint_dir=str(tmp_path / "ck"),
                              log_path=str(tmp_path / "resumed.jsonl"), **kw)

    def crash(rec):
        if rec.get("step") == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(task, _batches(small), cfg, val_batches=val, on_log=crash)
    # what a write cut off by a crash leaves (orbax writes a temporary folder, then renames it)
    partial = tmp_path / "ck" / "15.orbax-checkpoint-tmp-1" / "state"
    partial.mkdir(parents=True)
    (partial / "junk").write_bytes(b"half a file")
    resumed = fit(task, _batches(small), cfg, val_batches=val)  # resumes at step 10
    assert resumed.steps == 20
    np.testing.assert_array_equal(_flat(straight.variables), _flat(resumed.variables))
    assert (resumed.best_step, resumed.best_val) == (straight.best_step, straight.best_val)
    if with_validation:  # best before the interruption: the resumed run read it from the checkpoint
        assert straight.best_step <= 10
    def untimed(history):
        return [{k: v for k, v in r.items() if k != "cells_per_s"} for r in history]

    assert untimed(resumed.history) == untimed(straight.history)
    steps = [(r["step"], "val_loss" in r) for r in read_log(tmp_path / "resumed.jsonl")]
    assert steps == [(r["step"], "val_loss" in r) for r in read_log(tmp_path / "straight.jsonl")]


def test_early_stopping_returns_the_best_weights(small, tmp_path):
    """The weights returned are those of the best validation step: a run of exactly that many
    steps (constant schedule, so the steps are the same) ends with them."""
    val = list(_batches(small, seed=9).sequential(np.arange(128), 64))
    task, cfg = _task_and_cfg(tmp_path, eval_every=1, patience=2, learning_rate=1.0,
                              schedule="constant")
    res = fit(task, _batches(small), cfg, val_batches=val)
    assert res.stopped_early and res.best_step < res.steps
    task, cfg = _task_and_cfg(tmp_path, learning_rate=1.0, schedule="constant")
    cfg.max_steps = res.best_step
    short = fit(task, _batches(small), cfg)
    np.testing.assert_array_equal(_flat(short.variables), _flat(res.variables))


def test_rerunning_an_early_stopped_run_does_not_train_further(small, tmp_path):
    val = list(_batches(small, seed=9).sequential(np.arange(128), 64))
    task, cfg = _task_and_cfg(tmp_path, eval_every=1, patience=2, learning_rate=1.0,
                              checkpoint_dir=str(tmp_path / "ck"))
    first = fit(task, _batches(small), cfg, val_batches=val)
    assert first.stopped_early
    again = fit(task, _batches(small), cfg, val_batches=val)
    assert again.stopped_early and again.steps == first.steps
    assert again.best_step == first.best_step and len(again.history) == len(first.history)
    np.testing.assert_array_equal(_flat(again.variables), _flat(first.variables))


def test_resume_refuses_other_settings(small, tmp_path):
    from scatlas._validate import ScatlasInputError

    ck = str(tmp_path / "ck")
    task, cfg = _task_and_cfg(tmp_path, checkpoint_dir=ck)
    cfg.max_steps = 5
    fit(task, _batches(small), cfg)
    task, cfg = _task_and_cfg(tmp_path, checkpoint_dir=ck, learning_rate=1e-3)
    cfg.max_steps = 5
    with pytest.raises(ScatlasInputError, match="learning_rate: 0.005 -> 0.001"):
        fit(task, _batches(small), cfg)
    cfg = TrainConfig(max_steps=5, seed=3, log_every=1, checkpoint_every=5, data_parallel=False,
                      checkpoint_dir=ck)
    wider = MetricTask(MetricConfig(n_genes=50, hidden=(64, 32), latent_dim=8), cfg,
                       np.eye(4, dtype=bool))
    with pytest.raises(ScatlasInputError, match="model.hidden"):
        fit(wider, _batches(small), cfg)
    task, cfg = _task_and_cfg(tmp_path, checkpoint_dir=ck)
    cfg.max_steps = 5
    with pytest.raises(ScatlasInputError, match="data.balance: 'label_study' -> 'label'"):
        fit(task, _batches(small, balance="label"), cfg)
    with pytest.raises(ScatlasInputError, match="data.cells"):  # another training split
        fit(task, _batches(small, rows=np.arange(500)), cfg)
    val = list(_batches(small).sequential(np.arange(64), 64))
    with pytest.raises(ScatlasInputError, match="eval_every: default -> 100.*validation.cells"):
        fit(task, _batches(small), cfg, val_batches=val)  # validation where there was none
    other = MetricTask(task.config, cfg, related_labels(["0", "1", "2", "3"], {"1": "0"}))
    with pytest.raises(ScatlasInputError, match="model.related"):
        fit(other, _batches(small), cfg)
    # the same settings, spelled with numpy scalars, resume (nothing left to train)
    cfg.learning_rate = np.float64(0.005)
    assert fit(task, _batches(small), cfg).steps == 5


def test_resuming_a_checkpoint_without_best_weights(small, tmp_path, caplog):
    """A checkpoint of an older scatlas (no settings, no best weights, a best step) resumes with
    early stopping started afresh, and the checkpoints it then writes resume again."""
    from scatlas.models.train import Trainer, _Checkpoints

    val = list(_batches(small, seed=9).sequential(np.arange(128), 64))
    task, cfg = _task_and_cfg(tmp_path, checkpoint_dir=str(tmp_path / "ck"), eval_every=2)
    cfg.max_steps = 14
    ts = Trainer(task, cfg).init_state(_batches(small).batch(0))
    ts = ts.replace(step=ts.step + 10)
    old = _Checkpoints(cfg.checkpoint_dir, 2)
    old.save(10, ts, {"best_val": 0.5, "best_step": 4, "bad_evals": 3, "history": []})
    old.close()
    first = fit(task, _batches(small), cfg, val_batches=val)
    assert "no best weights" in caplog.text
    assert first.best_step in (12, 14) and first.steps == 14
    again = fit(task, _batches(small), cfg, val_batches=val)  # at the end: restores the best
    assert again.best_step == first.best_step
    np.testing.assert_array_equal(_flat(again.variables), _flat(first.variables))


def test_non_finite_input_is_refused_and_a_diverged_loss_stops_the_run(small, tmp_path):
    from scatlas._validate import ScatlasInputError
    from scatlas.models.train import TrainingDivergedError

    dense = small.X.toarray()
    dense[17, 3] = np.nan
    dense[40, 0] = -2.0
    path = tmp_path / "nan.h5ad"
    ad.AnnData(sp.csr_matrix(dense), obs=small.obs).write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    batches = _batches(backed, batch_size=len(small), balance=None)  # every cell in a batch
    with pytest.raises(ScatlasInputError, match=r"NaN or infinite .*\[17\]"):
        batches.batch(0)
    dense[17, 3] = 1.0
    with pytest.raises(ScatlasInputError, match=r"1 negative value.*source rows \[40\]"):
        _batches(ad.AnnData(dense, obs=small.obs), batch_size=len(small), balance=None).batch(0)
    # a backed file reaches the loader unchecked; the error surfaces from the prefetch thread
    import scatlas

    with pytest.raises(ScatlasInputError, match="NaN or infinite|negative value"):
        scatlas.tl.train_metric(backed, "cell_type", "batch", max_steps=4, batch_size=1000,
                                balance=None, hidden=(16,), latent_dim=4, progress=False)
    # unchecked NaN input: the run stops at the first logged loss instead of saving NaN weights
    dense[17, 3] = np.nan
    dense[40, 0] = 1.0
    unchecked = _batches(ad.AnnData(dense, obs=small.obs), batch_size=len(small), balance=None,
                         check_input=False)
    task, cfg = _task_and_cfg(tmp_path, checkpoint_dir=str(tmp_path / "ck"))
    cfg.log_every, cfg.checkpoint_every = 4, 1  # a checkpoint is due before the first log
    with pytest.raises(TrainingDivergedError, match="loss is nan at step 1"):
        fit(task, unchecked, cfg)
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name[0].isdigit()]


def test_prefetcher_surfaces_the_loader_error_in_order():
    made = []

    def make(t):
        if t == 3:
            raise ValueError("bad block 3")
        made.append(t)
        return t

    it = mdata.Prefetcher(make, 0, depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad block 3"):
        next(it)
    assert not it._thread.is_alive()


def test_study_balance_draws_small_studies_as_often():
    labels = np.zeros(1000, dtype=int)
    studies = np.array([0] * 950 + [1] * 50)
    w = mdata.sampling_weights(labels, studies, "study")
    expect = 1 / np.log1p(np.where(studies == 0, 950, 50) / 1e6)
    expect = np.minimum(expect, 2 * np.quantile(expect, 0.999))
    np.testing.assert_allclose(w, expect / expect.sum())
    assert mdata.sampling_weights(labels, studies, "label") is not None
    np.testing.assert_allclose(mdata.sampling_weights(labels, studies, "label"), 1 / 1000)
    rng = np.random.default_rng(0)
    draws = np.concatenate([mdata.draw_without_repeats(rng, 1000, 20, np.cumsum(w))
                            for _ in range(300)])
    assert 0.4 < np.mean(studies[draws] == 1) < 0.6


def _leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def test_early_stopping_log_and_plot(small, tmp_path):
    task, cfg = _task_and_cfg(tmp_path, eval_every=2, patience=1, learning_rate=1.0,
                              log_path=str(tmp_path / "log.jsonl"))
    val = list(_batches(small).sequential(np.arange(128), 64))
    res = fit(task, _batches(small), cfg, val_batches=val)
    log = read_log(tmp_path / "log.jsonl")
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert res.best_val == min(vals)
    if res.stopped_early:  # lr=1.0 diverges quickly: stop one evaluation after the best
        assert res.steps < 20 and vals[-1] > res.best_val
    assert all("cells_per_s" in r for r in log if "loss" in r and r["step"] > 1)
    png = plot_history(tmp_path / "log.jsonl", tmp_path / "loss.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bad_config():
    from scatlas._validate import ScatlasInputError

    with pytest.raises(ScatlasInputError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ScatlasInputError, match="max_steps"):
        TrainConfig(max_steps=0)


MULTI_HOST = textwrap.dedent("""
    import json, sys
    from scatlas.models.train import initialize_distributed
    initialize_distributed(coordinator_address="127.0.0.1:" + sys.argv[2], num_processes=2,
                           process_id=int(sys.argv[1]))
    import jax, numpy as np
    from scatlas import datasets
    from scatlas.models import data as mdata
    from scatlas.models.metric import MetricConfig, MetricTask
    from scatlas.models.train import TrainConfig, fit
    assert jax.process_count() == 2 and jax.device_count() == 2
    a = datasets.synthetic(400, 30, n_batches=2, n_cell_types=3, seed=0)
    b = mdata.CellBatches(a.X, labels=a.obs["cell_type"].to_numpy(),
                          studies=a.obs["batch"].to_numpy(), batch_size=64, seed=0)
    cfg = TrainConfig(max_steps=4, seed=1, log_every=1, eval_every=2)
    task = MetricTask(MetricConfig(n_genes=30, hidden=(16,), latent_dim=4, dropout=0.0,
                                   input_dropout=0.0), cfg, np.eye(3, dtype=bool))
    val = list(b.sequential(np.arange(128), 64))  # every process holds the whole global batch
    print(json.dumps(fit(task, b, cfg, val_batches=val).history))
""")


def _curves(history):
    """Training losses, then validation losses and mined validation triplets, of a history."""
    return ([r["loss"] for r in history if "loss" in r],
            [r["val_loss"] for r in history if "val_loss" in r],
            [r["val_n_triplets"] for r in history if "val_loss" in r])


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # 13-30 s: opt in with -m slow (default suite under 10 min)
def test_two_processes_train_like_one_device():
    """jax.distributed over two local CPU processes (each feeding half of every batch)."""
    port = str(_free_port())
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", MULTI_HOST, str(i), port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    curves = [_curves(json.loads(out.strip().splitlines()[-1])) for out, _ in outs]
    assert curves[0] == curves[1]
    a = datasets.synthetic(400, 30, n_batches=2, n_cell_types=3, seed=0)
    cfg = TrainConfig(max_steps=4, seed=1, log_every=1, eval_every=2, data_parallel=False)
    task = MetricTask(MetricConfig(n_genes=30, hidden=(16,), latent_dim=4, dropout=0.0,
                                   input_dropout=0.0), cfg, np.eye(3, dtype=bool))
    b = _batches(a)
    single = _curves(fit(task, b, cfg, val_batches=list(b.sequential(np.arange(128), 64))).history)
    assert len(single[1]) == 2
    np.testing.assert_allclose(curves[0][0], single[0], rtol=1e-4)  # training losses
    # validation sees the same cells (a duplicated global batch mined about 4x the triplets),
    # up to Adam's reduction-order noise in the weights (see the sharded test), which can move
    # a near-tied semi-hard pick
    np.testing.assert_allclose(curves[0][1], single[1], rtol=1e-3)
    np.testing.assert_allclose(curves[0][2], single[2], rtol=0.05)


SHARDED = textwrap.dedent("""
    import json, os, sys
    import jax, numpy as np
    from scatlas import datasets
    from scatlas.models import data as mdata
    from scatlas.models.metric import MetricConfig, MetricTask
    from scatlas.models.train import TrainConfig, fit
    assert jax.device_count() == 4, jax.devices()
    a = datasets.synthetic(400, 30, n_batches=2, n_cell_types=3, seed=0)
    out = {}
    for dp in (False, True):
        b = mdata.CellBatches(a.X, labels=a.obs["cell_type"].to_numpy(),
                              studies=a.obs["batch"].to_numpy(), batch_size=64, seed=0)
        cfg = TrainConfig(max_steps=4, seed=1, data_parallel=dp, log_every=1)
        task = MetricTask(MetricConfig(n_genes=30, hidden=(16,), latent_dim=4, dropout=0.0,
                                       input_dropout=0.0), cfg, np.eye(3, dtype=bool))
        res = fit(task, b, cfg)
        out[str(dp)] = {"leaves": [np.asarray(x).ravel().tolist()
                                   for x in jax.tree_util.tree_leaves(res.variables)],
                        "metrics": res.history}
    print(json.dumps(out))
""")


@pytest.mark.slow  # 11 s: opt in with -m slow (default suite under 10 min)
def test_sharded_step_agrees_with_single_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # Every logged metric of every step (loss, MSE, triplet loss, mined triplets, gradient norm)
    # agrees: the 4-way split computes the global batch's loss and gradient.
    for ra, rb in zip(out["True"]["metrics"], out["False"]["metrics"], strict=True):
        for key in ("loss", "mse", "triplet", "n_triplets", "grad_norm"):
            np.testing.assert_allclose(ra[key], rb[key], rtol=1e-4, err_msg=key)
    # Parameters agree to a few learning-rate steps: Adam divides by sqrt(v), so reduction-order
    # noise in near-zero gradients can move a weight by up to lr per step.
    for a, b in zip(out["True"]["leaves"], out["False"]["leaves"], strict=True):
        np.testing.assert_allclose(a, b, atol=4 * 5e-3)


def test_sparse_and_dense_sources_agree(small):
    dense = _batches(ad.AnnData(small.X.toarray(), obs=small.obs)).batch(2)
    csr = _batches(small).batch(2)
    np.testing.assert_allclose(dense["x"], csr["x"], rtol=1e-6)
    assert sp.issparse(small.X)


def test_zarr_store_gives_the_same_batches(small, tmp_path):
    import zarr
    from anndata.io import sparse_dataset

    path = tmp_path / "a.zarr"
    small.write_zarr(path)
    X = sparse_dataset(zarr.open_group(path, mode="r")["X"])
    b_mem = _batches(small)
    b_zarr = mdata.CellBatches(X, labels=small.obs["cell_type"].to_numpy(),
                               studies=small.obs["batch"].to_numpy(), batch_size=64, seed=0)
    np.testing.assert_array_equal(b_mem.batch(5)["x"], b_zarr.batch(5)["x"])


def test_train_metric_from_a_backed_file(small, tmp_path):
    import scatlas

    path = tmp_path / "a.h5ad"
    small.write_h5ad(path)
    kw = dict(max_steps=6, batch_size=64, hidden=(16,), latent_dim=4, progress=False)
    backed = scatlas.tl.train_metric(ad.read_h5ad(path, backed="r"), "cell_type", "batch", **kw)
    memory = scatlas.tl.train_metric(small, "cell_type", "batch", **kw)
    np.testing.assert_allclose(backed.embed(small), memory.embed(small), rtol=1e-6)


GPU_VS_CPU = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from scatlas import datasets
    from scatlas.models import data as mdata
    from scatlas.models.metric import MetricConfig, MetricTask
    from scatlas.models.train import TrainConfig, fit
    a = datasets.synthetic(400, 30, n_batches=2, n_cell_types=3, seed=0)
    out = {"platform": jax.devices()[0].platform}
    for bf16 in (False, True):
        b = mdata.CellBatches(a.X, labels=a.obs["cell_type"].to_numpy(),
                              studies=a.obs["batch"].to_numpy(), batch_size=64, seed=0)
        cfg = TrainConfig(max_steps=4, seed=1, log_every=1, data_parallel=False)
        task = MetricTask(MetricConfig(n_genes=30, hidden=(16,), latent_dim=4, dropout=0.0,
                                       input_dropout=0.0, bf16=bf16), cfg, np.eye(3, dtype=bool))
        out[str(bf16)] = [r["loss"] for r in fit(task, b, cfg).history]
    print(json.dumps(out))
""")


@pytest.mark.gpu
def test_gpu_training_matches_cpu():
    """The same 4 steps on the GPU and on the CPU (float32; bf16 runs and stays close)."""
    runs = {}
    for platform in ("cuda", "cpu"):
        env = dict(os.environ, JAX_PLATFORMS=platform,
                   XLA_FLAGS="--xla_gpu_deterministic_ops=true")
        proc = subprocess.run([sys.executable, "-c", GPU_VS_CPU], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[platform] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert runs["cuda"]["platform"] == "gpu"
    np.testing.assert_allclose(runs["cuda"]["False"], runs["cpu"]["False"], rtol=2e-2)
    np.testing.assert_allclose(runs["cuda"]["True"], runs["cpu"]["False"], rtol=1e-1)


def test_draw_without_repeats_when_weights_concentrate():
    """A batch of most (or all) cells under sampling weights that favour a few rare cells: the
    redraws of repeated rows stall and the rest is drawn without replacement (once this raised
    'could not draw 818 distinct cells'). Rows stay distinct, and rare labels are drawn."""
    labels = np.array([0] * 700 + [1] * 100 + [2] * 15 + [3] * 2 + [4])
    studies = np.repeat(np.arange(3), 273)[: labels.size]
    cdf = np.cumsum(mdata.sampling_weights(labels, studies, "label_study"))
    rng = np.random.default_rng(0)
    for size in (409, 700, labels.size):
        out = mdata.draw_without_repeats(rng, labels.size, size, cdf)
        assert out.size == size and np.unique(out).size == size
        assert set(labels[out]) >= {2, 3, 4}
    assert np.array_equal(np.sort(out), np.arange(labels.size))


def test_a_million_cells_get_the_default_batch_cheaply():
    """The defaults at 1e6 cells, without training: 1,000-cell batches of distinct cells drawn
    from imbalanced labels (a singleton, a pair) in O(batch log n)."""
    from scatlas.models.data import default_batch_size
    from scatlas.tl._models import _split

    n = 1_000_000
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 50, n)
    labels[:3] = [50, 51, 51]
    labels[3:] = np.where(labels[3:] >= 50, 0, labels[3:])
    studies = rng.integers(0, 20, n)
    train, val = _split(labels, 0.1, seed=0)
    assert np.flatnonzero(np.isin(labels, [50, 51])).tolist() == [0, 1, 2]
    assert np.isin([0, 1, 2], train).all()
    assert default_batch_size(train.size) == 1000
    b = mdata.CellBatches(sp.csr_matrix((n, 4), dtype=np.float32), labels=labels,
                          studies=studies, rows=train, batch_size=default_batch_size(train.size))
    for t in range(3):
        idx = b.indices(t)
        assert idx.size == 1000 and np.unique(idx).size == 1000 and np.isin(idx, train).all()
    assert [default_batch_size(m) for m in (4, 300, 818, 2000, 10**6)] == [2, 150, 409, 1000,
                                                                          1000]


def test_history_panels_put_each_loss_term_on_its_own_axis(tmp_path):
    """plot_history: the total loss and every logged term (weights in the titles, validation
    where logged, a log axis where a term spans 10x), not the total alone (issue 16, item 7)."""
    from scatlas.models.train import history_panels

    steps = np.arange(10, 210, 10)
    mse = 1.0 / np.sqrt(steps)
    triplet = 0.04 - 0.0001 * steps
    l1 = 1e-3 * np.exp(-steps / 30)
    history = []
    for s, m, t, p in zip(steps, mse, triplet, l1, strict=True):
        history.append({"step": int(s), "lr": 0.005, "loss": 0.999 * m + 0.001 * t + p,
                        "triplet": t, "mse": m, "l1": p, "n_triplets": 40.0, "grad_norm": 1.0,
                        "cells_per_s": 1e4})
        if s % 50 == 0:
            history.append({"step": int(s), "val_loss": 0.999 * m + 0.001 * t,
                            "val_triplet": t / 2, "val_mse": m, "val_l1": 0.0})
    terms = {"triplet": 0.001, "mse": 0.999, "l1": 1.0}
    panels = history_panels(history, terms)
    assert [p.key for p in panels] == ["loss", "triplet", "mse", "l1"]
    assert [p.title for p in panels] == ["total loss", "triplet (weight 0.001)",
                                         "mse (weight 0.999)", "l1"]
    by = {p.key: p for p in panels}
    np.testing.assert_allclose([v for _, v in by["triplet"].train], triplet)
    assert [s for s, _ in by["triplet"].val] == [50, 100, 150, 200]
    assert by["l1"].val == [] and by["l1"].yscale == "log"  # spans 1e-3 .. 1.3e-6
    assert by["triplet"].yscale == "linear"  # 0.039 .. 0.02: within 10x
    # inferred from the log alone: the same terms (counts and diagnostics left out)
    assert [p.key for p in history_panels(history)] == ["loss", "triplet", "mse", "l1"]
    # a term at weight 0, or 0 throughout, is not drawn
    assert [p.key for p in history_panels(history, {**terms, "triplet": 0})] == [
        "loss", "mse", "l1"]
    png = plot_history(history, tmp_path / "loss.png", terms=terms)
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[1] > 1000  # three panels a row, 100 dpi
