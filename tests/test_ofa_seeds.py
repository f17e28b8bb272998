"""benchmarks/ofa_seeds.py: the summary of OFA benchmark replicates (seeds) counts verdicts per
seed and refuses results that are not replicates of one setting."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import ofa_seeds  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "ofa_kermany_total_budget.json"


@pytest.fixture
def base():
    return json.loads(RESULT.read_text())


def _replicate(res, seed, outcome_of=None):
    r = copy.deepcopy(res)
    r["settings"].update(seed=seed, work=f"w{seed}", out=f"o{seed}.json")
    # another seed measures slightly other budgets: the names must still map to the same rank
    shift = 0.001 * seed
    r["budgets_ms"] = [b + shift for b in res["budgets_ms"]]
    rename = {f"ofa:budget_{b:g}ms": f"ofa:budget_{b + shift:g}ms" for b in res["budgets_ms"]}
    r["rows"] = {rename.get(k, k): v for k, v in r["rows"].items()}
    for p in r["dominance"]["pairs"]:
        p["candidate"] = rename.get(p["candidate"], p["candidate"])
        if outcome_of:
            p["outcome"] = outcome_of(p)
    return r


def test_counts_verdicts_and_target_per_seed(base):
    undecided = _replicate(base, 1, lambda p: "undecided")
    s = ofa_seeds.summarise([base, undecided], ["a.json", "b.json"])
    assert s["seeds"] == [0, 1]
    assert [p["target_met"] for p in s["per_seed"]] == [True, False]
    assert s["target_met_seeds"] == 1 and s["summary"] == "target met in 1 of 2 seed(s)"
    assert s["per_seed"][0]["verdicts"] == {"dominates": 3, "dominated": 0, "undecided": 6}
    assert s["per_seed"][1]["verdicts"] == {"dominates": 0, "dominated": 0, "undecided": 9}
    # pairs are keyed by budget rank, so both seeds land on the same 9 keys
    assert len(s["pairs"]) == 9
    key = "ofa:budget#2 vs student:densenet_tiny"
    assert s["pairs"][key] == {"dominates": 1, "dominated": 0, "undecided": 1}
    a = s["models"]["ofa:budget#2"]["test_auroc"]
    expected = base["rows"]["ofa:budget_0.0998ms"]["test_auroc"]
    assert a["n"] == 2 and a["min"] == a["max"] == expected
    assert "teacher" in s["models"] and "delta_auroc" not in s["models"]["teacher"]
    assert s["per_seed"][0]["cpu"] == base["machine"]["cpu"]
    assert s["same_test_split"] and "not independent test sets" in s["note"]
    assert s["per_seed"][0]["budgets_served"] == [True, True, True]
    assert s["per_seed"][0]["budgets_met_final"] == [True, True, True]
    md = ofa_seeds.markdown(s)
    assert "target met in 1 of 2 seed(s)" in md and "| 1 | 0.981 |" in md


def test_a_budget_not_served_or_exceeded_in_the_final_timing(base):
    other = _replicate(base, 1)
    other["per_budget"][0]["ofa"] = None                      # the search found none within it
    other["per_budget"][2]["ofa"]["latency_ms"] = other["per_budget"][2]["budget_ms"] * 1.5
    p = ofa_seeds.summarise([base, other], ["a.json", "b.json"])["per_seed"][1]
    assert p["budgets_served"] == [False, True, True]
    assert p["budgets_met_final"] == [False, True, False]
    assert "| 2 / 1 of 3 |" in ofa_seeds.markdown(ofa_seeds.summarise([base, other], ["a", "b"]))


def test_says_when_each_seed_has_its_own_data(base):
    other = _replicate(base, 1)
    other["data"]["spec"] = "generate_phantom(n=5000, size=64, seed=1, ...)"
    s = ofa_seeds.summarise([base, other], ["a.json", "b.json"])
    assert not s["same_test_split"] and "its own data" in s["note"]


def test_refuses_results_that_are_not_replicates(base, tmp_path, capsys):
    other = _replicate(base, 1)
    other["settings"]["size"] = 128
    with pytest.raises(ofa_seeds.NotReplicates, match="b.json differs from a.json in size"):
        ofa_seeds.summarise([base, other], ["a.json", "b.json"])
    with pytest.raises(ofa_seeds.NotReplicates, match="the same seed twice"):
        ofa_seeds.summarise([base, copy.deepcopy(base)], ["a.json", "b.json"])
    with pytest.raises(ofa_seeds.NotReplicates, match="at least two"):
        ofa_seeds.summarise([base], ["a.json"])
    # through main: exit 2, one line, nothing written
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(base))
    b.write_text(json.dumps(other))
    out = tmp_path / "s.json"
    assert ofa_seeds.main([str(a), str(b), "--out", str(out)]) == 2
    assert "differs from" in capsys.readouterr().err and not out.exists()
    assert ofa_seeds.main([str(a), str(tmp_path / "missing.json"), "--out", str(out)]) == 2
    assert not out.exists()


def test_main_writes_json_and_markdown(base, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(base))
    b.write_text(json.dumps(_replicate(base, 2)))
    out = tmp_path / "s.json"
    assert ofa_seeds.main([str(a), str(b), "--out", str(out)]) == 0
    s = json.loads(out.read_text())
    assert s["target_met_seeds"] == 2 and s["n_seeds"] == 2
    assert out.with_suffix(".md").read_text().startswith("# OFA benchmark over seeds: kermany 64")
