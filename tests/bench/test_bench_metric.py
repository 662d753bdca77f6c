"""The ``metric`` benchmark's baseline side: SCimilarity's mining/loss wrapper on tiny inputs.

The peer (CPU torch + SCimilarity 0.4.1) lives in ``bench/.peers/scimilarity``
(``python -m bench.metric --install``); the tests that drive it are skipped without it. They check
the triplets SCimilarity's own ``TripletSelector`` mines through our wrapper (synthetic ontology,
stubbed package import) against the mining rules recomputed here in NumPy, the loss against
NumPy, and that the training step and the worker protocol run. No timing asserts.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `bench` is a top-level folder, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import metric as bench_metric  # noqa: E402

PEER = bench_metric.peer_python()
needs_peer = pytest.mark.skipif(PEER is None, reason="SCimilarity peer venv not installed "
                                "(python -m bench.metric --install)")


def test_synthetic_batch_shape_density_and_determinism():
    runner = bench_metric.runner_module()
    X, labels, studies = runner.synthetic_batch(300, 500, density=0.1, n_labels=7, n_studies=3,
                                                seed=4)
    assert X.shape == (300, 500) and X.dtype == np.float32
    assert labels.shape == studies.shape == (300,)
    assert set(np.unique(labels)) <= set(range(7)) and set(np.unique(studies)) <= set(range(3))
    # ~10 % drawn positions, fewer after collisions: 1 - exp(-0.1)
    assert 0.08 < np.mean(X > 0) < 0.1
    assert np.all(X >= 0) and np.isfinite(X).all()
    # log1p of library-size-normalised values: expm1 of every row sums to 1e4
    sums = np.expm1(X.astype(np.float64)).sum(axis=1)
    np.testing.assert_allclose(sums, 1e4, rtol=1e-4)
    X2, labels2, _ = runner.synthetic_batch(300, 500, density=0.1, n_labels=7, n_studies=3,
                                            seed=4)
    assert np.array_equal(X, X2) and np.array_equal(labels, labels2)


def test_synthetic_ontology_is_a_dag_with_related_labels():
    import networkx as nx

    runner = bench_metric.runner_module()
    graph, int2label = runner.synthetic_ontology(20, seed=0)
    assert nx.is_directed_acyclic_graph(graph) and graph.number_of_nodes() == 3000
    assert sorted(int2label) == list(range(20)) and len(set(int2label.values())) == 20
    name2id = {d["name"]: n for n, d in graph.nodes(data=True)}
    ids = [name2id[int2label[k]] for k in range(20)]
    pairs = [(a, b) for a, b in itertools.permutations(ids, 2) if b in nx.descendants(graph, a)]
    assert len(pairs) >= 20 // 5  # every added parent is an ancestor of its chosen child


def test_throughput_column_uses_the_cells_per_call():
    record = {"runs": {"r": {"params": {**bench_metric.DEFAULT_PARAMS, "batch_size": 500}}},
              "results": {"2000": {"methods": {
                  "a": {"status": "ok", "median_s": 2.0, "group": "train", "run_id": "r"},
                  "b": {"status": "ok", "median_s": 0.5, "group": "embed", "run_id": "r"},
                  "c": {"status": "error", "group": "train", "run_id": "r"}}}}}
    bench_metric.add_throughput(record)
    methods = record["results"]["2000"]["methods"]
    assert methods["a"]["accuracy"]["cells_per_s"] == pytest.approx(250.0)
    assert methods["b"]["accuracy"]["cells_per_s"] == pytest.approx(10_000 / 0.5)
    assert "accuracy" not in methods["c"]


def test_missing_peer_is_a_recorded_skip(monkeypatch, tmp_path):
    monkeypatch.setenv(bench_metric.PEER_ENV, str(tmp_path / "no" / "python"))
    names = {m.name: m for m in bench_metric.methods(bench_metric.DEFAULT_PARAMS)}
    msg = names["scimilarity.train_step"].skip_message(2000)
    assert msg is not None and "--install" in msg
    assert names["scatlas.metric.train_step"].skip_message(28231) is None


@pytest.fixture(scope="module")
def selftest():
    params = {"batch_size": 40, "n_labels": 6, "n_studies": 3, "seed": 3}
    done = subprocess.run([str(PEER), "-W", "ignore", str(bench_metric.RUNNER), "selftest",
                           "--params", json.dumps(params)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@needs_peer
def test_scimilarity_mining_follows_its_rules(selftest):
    emb = np.asarray(selftest["embeddings"], dtype=np.float64)
    labels = np.asarray(selftest["labels"])
    studies = np.asarray(selftest["studies"])
    related = {tuple(p) for p in selftest["related"]}
    margin = selftest["margin"]
    assert related, "the synthetic ontology should relate some of the batch's labels"
    d2 = ((emb[:, None, :] - emb[None, :, :]) ** 2).sum(-1)

    def negatives(a: int) -> np.ndarray:
        ok = [n for n in range(len(labels)) if labels[n] != labels[a]
              and (int(labels[a]), int(labels[n])) not in related]
        return np.asarray(ok)

    # every anchor-positive pair: same label, different studies (sample_across_studies=True)
    pairs = [(a, p) for a, p in itertools.combinations(range(len(labels)), 2)
             if labels[a] == labels[p] and studies[a] != studies[p]]
    n_viable = sum(len(negatives(a)) for a, _ in pairs)
    with_semihard = 0
    for a, p in pairs:
        loss = d2[a, p] - d2[a, negatives(a)] + margin
        with_semihard += bool(np.any((loss > 0) & (loss < margin)))
    assert selftest["n_viable"] == n_viable
    anchors, positives, negs = (np.asarray(t) for t in selftest["triplets"])
    assert len(anchors) == with_semihard > 0
    for a, p, n in zip(anchors, positives, negs, strict=True):
        assert (a, p) in pairs or (p, a) in pairs
        assert labels[n] != labels[a] and (int(labels[a]), int(labels[n])) not in related
        loss = d2[a, p] - d2[a, n] + margin  # semi-hard on squared distances
        assert -1e-6 < loss < margin + 1e-6
    # the loss: torch's triplet_margin_loss on (non-squared) distances, reduction none
    eps = 1e-6
    dap = np.linalg.norm(emb[anchors] - emb[positives] + eps, axis=1)
    dan = np.linalg.norm(emb[anchors] - emb[negs] + eps, axis=1)
    np.testing.assert_allclose(selftest["losses"], np.maximum(dap - dan + margin, 0.0),
                               atol=1e-5)


@needs_peer
def test_scimilarity_training_step_runs_and_trains(selftest):
    steps = selftest["steps"]
    assert len(steps) == 3
    for s in steps:
        assert np.isfinite([s["loss"], s["mse"], s["triplet"]]).all()
        # mixed loss plus a small non-negative L1 term
        mixed = 0.001 * s["triplet"] + 0.999 * s["mse"]
        assert s["loss"] >= mixed - 1e-5 and s["loss"] == pytest.approx(mixed, rel=1e-2)
        assert 0 < s["mining_s"] < s["step_s"]
    assert steps[-1]["mse"] < steps[0]["mse"]
    assert selftest["params_moved"]
    # SCimilarity's L1 loop hits the first *direct* nn.Linear of encoder.network: the
    # bottleneck (latent 8 x hidden 32 in this tiny network), not the input layer
    assert selftest["l1_layer_shape"] == [8, 32]
    assert selftest["embed_shape"] == [40, 8] and selftest["embed_norm_err"] < 1e-5
    prov = selftest["provenance"]
    assert prov["scimilarity"] and prov["torch"]


@needs_peer
@pytest.mark.parametrize("embed_input", ["dense", "csr"])
def test_worker_protocol(tmp_path, embed_input):
    params = {**bench_metric.DEFAULT_PARAMS, "batch_size": 60, "n_embed": 25, "n_labels": 5,
              "n_studies": 2, "embed_input": embed_input}
    worker = bench_metric.PeerWorker(PEER, 40, params, tmp_path)
    try:
        assert worker.setup["torch_threads"] == params["threads"]
        assert worker.setup["l1_layer_shape"] == [128, 1024]
        step = worker.request({"cmd": "train"})
        assert step["n_triplets"] >= 1 and np.isfinite(step["loss"])
        emb = worker.request({"cmd": "embed"})
        assert emb["n_cells"] == 25 and emb["dim"] == 128 and emb["norm_err"] < 1e-5
        with pytest.raises(RuntimeError, match="unknown command"):
            worker.request({"cmd": "nope"})
    finally:
        worker.close()
    assert worker.proc.poll() == 0


def test_interleaved_run_records_harness_entries(monkeypatch, tmp_path):
    """ABBA timing with a stand-in for our side; a missing peer is a recorded skip."""
    monkeypatch.setenv(bench_metric.PEER_ENV, str(tmp_path / "no" / "python"))
    order: list[str] = []

    def fake(w, step="auto"):
        def train_step():
            order.append("train" if step == "auto" else f"train-{step}")

        def embed(X, precision="float32"):
            order.append("embed" if precision == "float32" else precision)
            Z = np.ones((X.shape[0], 128), dtype=np.float32)
            return Z / np.sqrt(128)

        return {"train_step": train_step, "embed": embed, "sparse_step": False}

    monkeypatch.setattr(bench_metric, "_ours_callables", fake)
    rec = bench_metric.run_interleaved("64", repeats=3, warmup=2, out=tmp_path, n_embed=30,
                                       batch_size=50)
    res = rec["results"]["64"]["methods"]
    train, embed = res["scatlas.metric.train_step"], res["scatlas.metric.embed"]
    # warm-ups, then ABBA over the two ours train methods; then embedding
    assert order[:4] == ["train", "train", "train-dense", "train-dense"]
    assert order[4:10] == ["train", "train-dense", "train-dense", "train", "train", "train-dense"]
    assert order[10:] == ["embed"] * 5 + ["bfloat16"] * 5
    assert res["scatlas.metric.train_step[dense]"]["status"] == "ok"
    bf16 = res["scatlas.metric.embed-bf16"]
    for entry, cells in ((train, 50), (embed, 30), (bf16, 30)):
        assert entry["status"] == "ok" and len(entry["times_s"]) == entry["repeats"] == 3
        assert len(entry["load_1m_all"]) == 3
        assert entry["accuracy"]["cells_per_s"] == pytest.approx(cells / entry["median_s"])
    assert embed["accuracy"]["norm_err"] < 1e-6
    # dense-equivalent FLOPs of the 64-gene model, by hand: encoder / encoder + decoder
    enc = 64 * 1024 + 2 * 1024 * 1024 + 1024 * 128
    train_flops = 2 * (3 * 2 * enc - 64 * 1024)
    assert embed["accuracy"]["gflops_dense_eq"] == pytest.approx(
        embed["accuracy"]["cells_per_s"] * 2 * enc / 1e9)
    assert train["accuracy"]["gflops_dense_eq"] == pytest.approx(
        train["accuracy"]["cells_per_s"] * train_flops / 1e9)
    # identical outputs agree perfectly with the float32 embedding
    assert bf16["accuracy"]["cos_min"] == pytest.approx(1.0)
    assert bf16["accuracy"]["knn15_shared"] == pytest.approx(1.0)
    assert res["scimilarity.train_step"]["status"] == "skipped"
    saved = json.loads((tmp_path / "metric_cpu.json").read_text())
    assert saved["results"]["64"]["methods"]["scatlas.metric.embed"]["status"] == "ok"


def test_missing_ours_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(bench_metric.PEER_ENV, str(tmp_path / "no" / "python"))
    monkeypatch.setitem(sys.modules, "bench.metric_units", None)  # import fails
    rec = bench_metric.run_interleaved("64", repeats=1, warmup=1, out=tmp_path,
                                       methods_=["ours"], n_embed=10, batch_size=20)
    res = rec["results"]["64"]["methods"]["scatlas.metric.train_step"]
    assert res["status"] == "error" and "benchmark_callables" in res["error"]


def test_csr_embedding_methods_have_their_own_names_and_group():
    names = {m.name: m for m in bench_metric.methods({**bench_metric.DEFAULT_PARAMS,
                                                      "embed_input": "csr"})}
    assert {"scatlas.metric.embed[csr]", "scimilarity.embed[csr]"} <= set(names)
    assert names["scatlas.metric.embed[csr]"].group == "embed[csr]"
    record = {"runs": {}, "results": {"10": {"methods": {
        "x": {"status": "ok", "median_s": 0.5, "group": "embed[csr]", "run_id": "?"}}}}}
    bench_metric.add_throughput(record)
    cells = bench_metric.DEFAULT_PARAMS["n_embed"]
    assert record["results"]["10"]["methods"]["x"]["accuracy"]["cells_per_s"] == 2 * cells


def test_gpu_backend_names_the_record_and_skips_the_dense_twin(monkeypatch, tmp_path):
    """With JAX on a GPU (faked), ``main`` writes and finds ``metric_gpu.json``, our entries run
    on the GPU, and ``train_step[dense]`` (the same step there) is a recorded skip."""
    monkeypatch.setenv(bench_metric.PEER_ENV, str(tmp_path / "no" / "python"))
    dense = "scatlas.metric.train_step[dense]"
    on_cpu = {m.name: m for m in bench_metric.methods(bench_metric.DEFAULT_PARAMS)}
    assert on_cpu[dense].skip_message(2000) is None
    calls: list[str] = []

    def fake(w, step="auto"):
        def embed(X, precision="float32"):
            return np.ones((X.shape[0], 128), dtype=np.float32) / np.sqrt(128)

        return {"train_step": lambda: calls.append(step), "embed": embed, "sparse_step": False}

    monkeypatch.setattr(bench_metric, "_ours_callables", fake)
    monkeypatch.setattr(bench_metric, "_jax_device", lambda: "gpu")
    code = bench_metric.main(["--genes", "64", "--repeats", "1", "--warmup", "1",
                              "--out", str(tmp_path), "--param", "n_embed=10",
                              "--param", "batch_size=20"])
    assert code == 0
    assert not (tmp_path / "metric_cpu.json").exists()
    saved = json.loads((tmp_path / "metric_gpu.json").read_text())
    assert saved["device"] == "gpu"
    res = saved["results"]["64"]["methods"]
    assert calls == ["auto", "auto"]  # warm-up + one timed call; the dense twin never ran
    assert res[dense]["status"] == "skipped" and "CPU-only" in res[dense]["reason"]
    for name in ("scatlas.metric.train_step", "scatlas.metric.embed"):
        assert res[name]["status"] == "ok" and res[name]["runs_on"] == "gpu"
        assert res[name]["accuracy"]["cells_per_s"] > 0  # main's throughput pass found the file
    assert res["scimilarity.train_step"]["runs_on"] == "cpu"
