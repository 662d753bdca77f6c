"""Calibration of label transfer: the reliability table and ECE against sklearn's
``calibration_curve`` (an independent binning), the OOD and unseen-label summaries by hand, the
report files, and ``scatlas annotate --truth-key --report`` end to end."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scatlas._validate import ScatlasInputError
from scatlas.cli import main
from scatlas.search import CellIndex, annotate
from scatlas.search.calibration import calibration, write_report
from scatlas.search.synthetic import clustered_embeddings


def _sample(n: int = 2000, seed: int = 0):
    """Predictions whose accuracy is conf**2 (over-confident), with a few missing entries."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.2, 1.0, n)
    truth = np.array(["a", "b", "c"])[rng.integers(0, 3, n)].astype(object)
    right = rng.uniform(size=n) < conf**2
    wrong = np.where(truth == "a", "b", "a")
    pred = np.where(right, truth, wrong).astype(object)
    return pred, conf, truth


def test_table_and_ece_match_sklearn_binning():
    from sklearn.calibration import calibration_curve

    pred, conf, truth = _sample()
    pred[:5], conf[:5] = None, np.nan  # no prediction: counted, not scored
    truth[5:9] = None  # no truth: counted, not scored
    cal = calibration(pred, conf, truth, n_bins=10)
    keep = np.arange(len(pred)) >= 9
    correct = (pred[keep] == truth[keep]).astype(int)
    prob_true, prob_pred = calibration_curve(correct, conf[keep], n_bins=10, strategy="uniform")
    full = cal.table[cal.table["n"] > 0]
    np.testing.assert_allclose(full["accuracy"], prob_true, rtol=1e-12)
    np.testing.assert_allclose(full["mean_confidence"], prob_pred, rtol=1e-12)
    # ECE from sklearn's per-bin values weighted by bin counts (the same equal-width bins)
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], conf[keep]), minlength=10)
    counts = counts[counts > 0]
    ece = float((counts / counts.sum() * np.abs(prob_true - prob_pred)).sum())
    assert cal.ece == pytest.approx(ece, rel=1e-12)
    assert cal.mce == pytest.approx(np.abs(prob_true - prob_pred).max(), rel=1e-12)
    assert (cal.n_cells, cal.n_scored, cal.n_no_prediction, cal.n_no_truth) == (2000, 1991, 5, 4)
    assert cal.accuracy == pytest.approx(correct.mean())
    assert int(cal.table["n"].sum()) == 1991
    # over-confident by construction: accuracy ~ conf^2 < conf, so every full bin has gap < 0
    assert (full["gap"] < 0).all() and cal.ece > 0.1


def test_perfectly_calibrated_has_small_ece():
    rng = np.random.default_rng(3)
    n = 20000
    conf = rng.uniform(0.0, 1.0, n)
    truth = np.full(n, "x", dtype=object)
    pred = np.where(rng.uniform(size=n) < conf, "x", "y").astype(object)
    cal = calibration(pred, conf, truth, n_bins=10)
    # each bin's accuracy is a binomial mean around its mean confidence: |gap| ~ 1/sqrt(n_b)
    assert cal.ece < 4 / np.sqrt(n / 10)


def test_ood_and_unseen_summaries_by_hand():
    pred = np.array(["a", "a", "b", "b", "a", None], dtype=object)
    conf = np.array([0.9, 0.6, 0.8, 0.55, 0.95, np.nan])
    truth = np.array(["a", "b", "b", "z", "a", "a"], dtype=object)
    flag = np.array([False, True, False, True, False, True])
    cal = calibration(pred, conf, truth, n_bins=4, is_ood=flag, known_labels=["a", "b"])
    # scored: rows 0-4; correct: 0, 2, 4
    assert cal.n_scored == 5 and cal.n_correct == 3 and cal.accuracy == pytest.approx(0.6)
    assert cal.ood["n_flagged"] == 3 and cal.ood["fraction_flagged"] == pytest.approx(0.5)
    assert cal.ood["accuracy_flagged"] == 0.0  # rows 1, 3
    assert cal.ood["accuracy_unflagged"] == 1.0  # rows 0, 2, 4
    assert cal.ood["fraction_of_errors_flagged"] == 1.0
    assert cal.unseen_truth["n_truth_not_in_reference"] == 1  # row 3 ("z")
    assert cal.unseen_truth["labels_not_in_reference"] == ["z"]
    assert cal.unseen_truth["accuracy_on_reference_labels"] == pytest.approx(3 / 4)
    assert cal.unseen_truth["fraction_flagged_not_in_reference"] == 1.0  # row 3
    assert cal.unseen_truth["fraction_flagged_reference_labels"] == 0.25  # rows 0, 1, 2, 4
    # rows 0, 1, 2, 4: bin (0.5, 0.75] holds 0.6 (wrong), (0.75, 1] 0.9, 0.8, 0.95 (right)
    want = 1 / 4 * 0.6 + 3 / 4 * (1 - (0.9 + 0.8 + 0.95) / 3)
    assert cal.unseen_truth["ece_on_reference_labels"] == pytest.approx(want)
    # bins of width 0.25: (0.5, 0.75] holds 0.6 and 0.55 (both wrong); (0.75, 1] 0.9, 0.8, 0.95
    t = cal.table.set_index("bin")
    assert list(t["n"]) == [0, 0, 2, 3]
    assert t.loc[2, "accuracy"] == 0.0 and t.loc[3, "accuracy"] == 1.0
    ece = 2 / 5 * abs(0 - 0.575) + 3 / 5 * abs(1 - (0.9 + 0.8 + 0.95) / 3)
    assert cal.ece == pytest.approx(ece)
    d = cal.to_dict()
    json.dumps(d)  # JSON-ready: NaN of the empty bins -> None
    assert d["reliability"][0]["accuracy"] is None


def test_calibration_input_errors():
    with pytest.raises(ScatlasInputError, match="truth has 2 entries"):
        calibration(["a"], [0.5], ["a", "b"])
    with pytest.raises(ScatlasInputError, match=r"\[0, 1\]"):
        calibration(["a"], [1.5], ["a"])
    with pytest.raises(ScatlasInputError, match="n_bins"):
        calibration(["a"], [0.5], ["a"], n_bins=0)


def test_write_report_files(tmp_path):
    pred, conf, truth = _sample(300)
    cal = calibration(pred, conf, truth, is_ood=conf < 0.3)
    out = write_report(cal, tmp_path / "rep", settings={"k": 50})
    names = sorted(p.name for p in out.iterdir())
    assert names == ["calibration.json", "reliability.csv", "reliability.png"]
    rec = json.loads((out / "calibration.json").read_text())
    assert rec["settings"] == {"k": 50} and rec["accuracy"] == pytest.approx(cal.accuracy)
    assert rec["ece"] == pytest.approx(cal.ece) and len(rec["reliability"]) == 10
    table = pd.read_csv(out / "reliability.csv")
    assert list(table["n"]) == list(cal.table["n"])
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def held_out(tmp_path):
    """An index over 8 clusters; query cells drawn separately (not in the index), and an
    unseen cluster among them."""
    X, lab = clustered_embeddings(3000, 16, n_clusters=8, labels=True, seed=11)
    names = np.array([f"t{v}" for v in lab], dtype=object)
    ref = np.arange(3000) < 2400
    seen_type = names != "t7"
    idx = CellIndex.build(X[ref & seen_type], pd.DataFrame({"cell_type": names[ref & seen_type]}))
    idx.save(tmp_path / "idx")
    q = ~ref
    qa = ad.AnnData(np.zeros((int(q.sum()), 2), np.float32),
                    obs=pd.DataFrame({"truth": names[q]},
                                     index=[f"c{i}" for i in range(int(q.sum()))]))
    qa.obsm["X_scatlas"] = X[q]
    qa.write_h5ad(tmp_path / "q.h5ad")
    return idx, X[q], names[q]


def test_annotate_cli_truth_key_report(tmp_path, held_out, capsys):
    idx, Q, truth = held_out
    rep = tmp_path / "report"
    assert main(["annotate", "--index", str(tmp_path / "idx"), str(tmp_path / "q.h5ad"),
                 "--label-key", "cell_type", "--k", "20", "--truth-key", "truth",
                 "--report", str(rep), "--out", str(tmp_path / "out.h5ad")]) == 0
    err = capsys.readouterr().err
    direct = annotate(idx, Q, k=20, label_key="cell_type")
    want = calibration(direct["label"], direct["confidence"], truth, is_ood=direct["is_ood"])
    rec = json.loads((rep / "calibration.json").read_text())
    assert rec["accuracy"] == pytest.approx(want.accuracy)
    assert rec["ece"] == pytest.approx(want.ece)
    assert rec["n_scored"] == len(Q)
    assert rec["unseen_truth"]["labels_not_in_reference"] == ["t7"]
    assert rec["n_exact_copies_in_index"] == 0
    assert rec["settings"]["ood_source"] == "index"
    assert [r["n"] for r in rec["reliability"]] == list(want.table["n"])
    assert f"accuracy {want.accuracy:.4f}" in err
    t7 = truth == "t7"
    assert rec["unseen_truth"]["fraction_flagged_not_in_reference"] == pytest.approx(
        direct["is_ood"].to_numpy()[t7].mean())
    assert "true label the index lacks (t7)" in err
    assert (rep / "reliability.png").is_file() and (rep / "reliability.csv").is_file()
    assert not [p for p in rep.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_annotate_cli_truth_key_errors_and_self_query_warning(tmp_path, held_out, capsys):
    base = ["annotate", "--index", str(tmp_path / "idx"), str(tmp_path / "q.h5ad"),
            "--label-key", "cell_type"]
    assert main([*base, "--report", str(tmp_path / "r")]) == 2
    assert "--report needs --truth-key" in capsys.readouterr().err
    assert main([*base, "--truth-key", "nope"]) == 2
    assert "--truth-key 'nope'" in capsys.readouterr().err
    assert main([*base, "--label-key", "nope"]) == 2
    assert "--label-key 'nope'" in capsys.readouterr().err
    assert main([*base, "--ood-quantile", "0.97"]) == 2
    assert "--ood-quantile must be one of" in capsys.readouterr().err
    assert main([*base, "--ood-quantile", "0.95", "--ood-distance", "0.1"]) == 2
    assert "--ood-distance or --ood-quantile, not both" in capsys.readouterr().err
    # querying indexed cells: exact copies vote for themselves; the CLI says so
    X, lab = clustered_embeddings(3000, 16, n_clusters=8, labels=True, seed=11)
    names = np.array([f"t{v}" for v in lab], dtype=object)
    inside = np.flatnonzero((np.arange(3000) < 2400) & (names != "t7"))[:40]
    qa = ad.AnnData(np.zeros((40, 2), np.float32), obs=pd.DataFrame(
        {"truth": names[inside]}, index=[f"r{i}" for i in range(40)]))
    qa.obsm["X_scatlas"] = X[inside]
    qa.write_h5ad(tmp_path / "inside.h5ad")
    assert main(["annotate", "--index", str(tmp_path / "idx"), str(tmp_path / "inside.h5ad"),
                 "--label-key", "cell_type", "--truth-key", "truth"]) == 0
    assert "not a held-out measure" in capsys.readouterr().err
