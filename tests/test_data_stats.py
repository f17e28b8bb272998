"""Label statistics against hand-computed values; the `data stats` command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from medscalpel.cli.data_cmd import stats as stats_cmd
from medscalpel.data.stats import LabelStats, dataset_statistics, label_statistics
from medscalpel.errors import ConfigError, DataError

Y = np.array([[1, 1, 0],
              [1, 0, 0],
              [0, 0, 1],
              [1, 1, 1],
              [0, 0, 0]], dtype=np.float32)


def test_hand_computed_values():
    s = label_statistics(Y, ["a", "b", "c"])
    assert s.n == 5 and s.counts == [3, 2, 2] and s.known == [5, 5, 5]
    assert s.prevalence == pytest.approx([0.6, 0.4, 0.4])
    assert s.cooccurrence == [[3, 2, 1], [2, 2, 1], [1, 1, 2]]
    # J(a,b) = 2 / (3 + 2 - 2); J(a,c) = 1 / (3 + 2 - 1); J(b,c) = 1 / (2 + 2 - 1)
    assert s.jaccard_of("a", "b") == pytest.approx(2 / 3)
    assert s.jaccard_of("a", "c") == pytest.approx(1 / 4)
    assert s.jaccard_of("c", "b") == pytest.approx(1 / 3)
    assert np.diag(s.jaccard_matrix()).tolist() == [1.0, 1.0, 1.0]
    assert s.never_cooccur == []
    assert s.findings_histogram == [1, 2, 1, 1]  # per-image findings 2,1,1,3,0
    assert s.n_ge3 == 1 and s.task == "multilabel"


def test_unknown_labels_absent_classes_and_never_cooccur():
    y = np.array([[np.nan, 1, 0], [1, 0, 0], [0, np.nan, 0]], np.float32)
    s = label_statistics(y, ["a", "b", "c"])
    assert s.counts == [1, 1, 0] and s.known == [2, 2, 3]
    assert s.prevalence == pytest.approx([0.5, 0.5, 0.0])
    assert s.never_cooccur == [("a", "b")]  # c has no positives: not listed
    assert s.jaccard_of("a", "b") == 0.0 and s.jaccard_of("a", "c") == 0.0
    assert math.isnan(s.jaccard_of("c", "c"))  # no positive at all


def test_multiclass_labels():
    s = label_statistics(np.array([0, 1, 1, 2]), ["x", "y", "z"])
    assert s.task == "multiclass" and s.counts == [1, 2, 1]
    assert s.never_cooccur == [("x", "y"), ("x", "z"), ("y", "z")]
    assert s.findings_histogram == [0, 4]


def test_roundtrip_and_heatmaps(tmp_path):
    y = np.array([[np.nan, 1, 0], [1, 0, 0], [0, 1, 0]], np.float32)
    s = label_statistics(y, ["a", "b", "c"], spec="x", split="test")
    p = s.save(tmp_path / "s.json")
    raw = json.loads(p.read_text())
    assert raw["jaccard"][2][2] is None and raw["never_cooccur"] == [["a", "b"]]
    back = LabelStats.load(p)
    assert back.counts == s.counts and back.never_cooccur == s.never_cooccur
    np.testing.assert_array_equal(back.jaccard_matrix(), s.jaccard_matrix())  # NaN kept
    for which in ("jaccard", "cooccurrence"):
        png = s.plot_heatmap(tmp_path / f"{which}.png", which)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="'which' parameter"):
        s.plot_heatmap(tmp_path / "x.png", "prevalence")


def test_errors():
    with pytest.raises(DataError, match="do not match the 2 class names"):
        label_statistics(Y, ["a", "b"])
    with pytest.raises(DataError, match="must be 0/1"):
        label_statistics(Y * 2, ["a", "b", "c"])
    with pytest.raises(DataError, match="integers in \\[0, 2\\)"):
        label_statistics(np.array([0, 2]), ["a", "b"])


def _csv_dataset(root):
    root.mkdir()
    lines = ["path,a,b,c"]
    for i, row in enumerate(Y.astype(int)):
        Image.fromarray(np.full((8, 8), 10 * i, np.uint8)).save(root / f"{i}.png")
        lines.append(f"{i}.png," + ",".join(map(str, row)))
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return f"csv:{root}"


def test_dataset_statistics_writes_files(tmp_path):
    spec = _csv_dataset(tmp_path / "d")
    s = dataset_statistics(spec, "all", tmp_path / "out")
    assert s.counts == [3, 2, 2] and s.spec == spec and len(s.content_hash) == 64
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "cooccurrence.png", "jaccard.png", "stats.json"]
    assert LabelStats.load(tmp_path / "out" / "stats.json").jaccard_of("a", "b") == \
        pytest.approx(2 / 3)


def test_cli_stats(tmp_path):
    app = typer.Typer()
    app.command()(stats_cmd)
    spec = _csv_dataset(tmp_path / "d")
    out = tmp_path / "run"
    res = CliRunner().invoke(app, [spec, "--split", "all", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "prevalence" in res.output and "0.6000" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["data", "manifest.json"]
    names = sorted(p.name for p in (out / "data" / "stats").iterdir())
    assert names == ["cooccurrence.png", "jaccard.png", "stats.json"]
    man = json.loads((out / "manifest.json").read_text())
    assert man["command"] == "data stats" and man["data"]["n_images"] == 5
    assert len(man["data"]["content_hash"]) == 64
    bad = tmp_path / "bad"
    res = CliRunner().invoke(app, [f"csv:{tmp_path / 'missing'}", "--out", str(bad)])
    assert res.exit_code != 0 and isinstance(res.exception, DataError)
    assert not bad.exists() and not list(tmp_path.glob(".bad*"))  # no partial run left


def test_evidence_in_label_stats_and_old_files(tmp_path):
    from medscalpel.data.cooccurrence import ExclusionRule

    s = label_statistics(Y, ["a", "b", "c"])
    assert s.pair_known == [[5] * 3] * 3 and s.pos_known == [[3] * 3, [2] * 3, [2] * 3]
    ev = s.cooccurrence_evidence()
    ab = ev.pair("a", "b")  # 2 observed vs 3 * 2 / 5 = 1.2 expected
    assert ab.observed == 2 and ab.expected == pytest.approx(1.2)
    assert ab.lift == pytest.approx(5 / 3)
    assert ev.exclusive_pairs() == [] and "only 5 images" in ev.warnings[0]
    assert s.evidence["n_exclusive"] == 0 and s.evidence["rule"]["min_images"] == 5000
    back = LabelStats.load(s.save(tmp_path / "s.json"))
    assert back.cooccurrence_evidence().to_dict() == ev.to_dict()
    assert back.cooccurrence_evidence(ExclusionRule(min_images=1)).warnings == ()
    # unknown labels: the per-pair counts leave those rows out of the pair
    y = np.array([[np.nan, 1, 0], [1, 0, 0], [0, np.nan, 1]], np.float32)
    u = label_statistics(y, ["a", "b", "c"])
    assert u.pair_known[0][1] == 1 and u.pos_known[0][2] == 1 and u.pos_known[0][1] == 1
    # a schema-1 file (no per-pair counts) with unknown labels: approximate, excludes nothing
    old = u.to_dict()
    for key in ("pair_known", "pos_known", "evidence"):
        old.pop(key)
    old["schema_version"] = 1
    oev = LabelStats.from_dict(old).cooccurrence_evidence(ExclusionRule(min_images=1))
    assert oev.approximate and oev.exclusive_pairs() == []
    assert any("approximate counts" in w for w in oev.warnings)
    assert oev.with_rule(ExclusionRule(min_images=2)).approximate


def test_cli_stats_writes_evidence(tmp_path):
    app = typer.Typer()
    app.command()(stats_cmd)
    spec = _csv_dataset(tmp_path / "d")
    res = CliRunner().invoke(app, [spec, "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    d = json.loads((tmp_path / "run" / "data" / "stats" / "stats.json").read_text())
    assert d["schema_version"] == 2 and d["evidence"]["kind"] == "cooccurrence_evidence"
    assert d["evidence"]["enough_images"] is False and len(d["evidence"]["pairs"]) == 3
