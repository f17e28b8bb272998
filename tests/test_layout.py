"""The declared run layout: typed and key-checked artifacts, errors that name the fix, and the
architecture doc's table kept current."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from medscalpel.errors import DataError
from medscalpel.layout import ARTIFACTS, artifact, read_artifact, write_artifact

REPO = Path(__file__).resolve().parents[1]


def test_every_declared_type_resolves_and_round_trips_through_dicts():
    for key, a in ARTIFACTS.items():
        assert a.key == key
        t = a.result_type()
        if t is not None:
            assert hasattr(t, "from_dict") and hasattr(t, "to_dict"), key
        else:
            assert not (a.is_json and not a.keys and a.stage != "any"), \
                f"{key}: a JSON artifact needs a type or declared keys"


def test_checked_dict_is_checked_on_write_and_on_read(tmp_path):
    good = {"classes": [], "settings": {}, "x": 1}
    p = write_artifact(tmp_path, "triage", good)
    assert p == tmp_path / "repair/triage/decision_log.json"
    assert read_artifact(tmp_path, "triage") == good
    with pytest.raises(DataError, match=r"lacks the key\(s\) \['settings'\] declared in "
                                        r"medscalpel/layout.py"):
        write_artifact(tmp_path / "b", "triage", {"classes": []})
    assert not (tmp_path / "b").exists()  # nothing half-written
    p.write_text('{"classes": []}', encoding="utf-8")  # a renamed key on disk
    with pytest.raises(DataError, match="re-run the stage 'repair'"):
        read_artifact(tmp_path, "triage")


def test_typed_artifact_refuses_another_type_and_reads_typed(tmp_path):
    from medscalpel.compress.contract import CompressionTable

    row = {k: None for k in importlib.import_module("medscalpel.compress.contract").ROW_KEYS}
    table = CompressionTable({**row, "method": "dense"}, ({**row, "method": "lossless"},
                                                          {"method": "x", "refused": "why"}),
                             {"split": "test", "n": 3})
    write_artifact(tmp_path, "compress", table)
    back = read_artifact(tmp_path, "compress")
    assert isinstance(back, CompressionTable) and back == table
    assert [r["method"] for r in back.measured()] == ["lossless"]
    with pytest.raises(DataError, match="holds a CompressionTable; got dict"):
        write_artifact(tmp_path, "compress", table.to_dict())
    with pytest.raises(DataError, match=r"row 0 \(y\) lacks"):
        CompressionTable(row, ({"method": "y"},), {})


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="Unknown artifact 'nope'. Valid names: attribution, baseline_card"):
        artifact("nope")
    with pytest.raises(DataError, match="did not run in this run directory"):
        read_artifact(tmp_path, "distill")
    with pytest.raises(DataError, match="needs the placeholder 'split'; pass split=..."):
        artifact("predictions").path_in(tmp_path)
    with pytest.raises(DataError, match="is not a JSON artifact"):
        write_artifact(tmp_path, "phantom_preview", {})


def test_architecture_doc_lists_every_artifact():
    doc = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    for key, a in ARTIFACTS.items():
        assert f"| {key} | `{a.path}` |" in doc, f"docs/architecture.md lacks the row of {key}"


def test_one_path_per_artifact_and_legacy_paths_read_only(tmp_path, monkeypatch):
    import medscalpel.layout as layout
    from medscalpel.layout import LEGACY_PATHS, legacy_paths, write_artifact_at

    # no artifact has a second location that commands write (issue S: no aliases)
    assert not hasattr(ARTIFACTS["pies"], "aliases")
    assert all(len(legacy_paths(k)) <= 1 for k in ARTIFACTS)
    assert set(LEGACY_PATHS) <= set(ARTIFACTS)
    # write_artifact writes the declared path; a library function given its folder writes the
    # same relative path through write_artifact_at
    p = write_artifact(tmp_path / "a", "pies", {"n_pies": 3})
    assert p == tmp_path / "a" / "audit" / "pies" / "pies.json"
    q = write_artifact_at(ARTIFACTS["pies"].dir_in(tmp_path / "b"), "pies", {"n_pies": 3})
    assert q.relative_to(tmp_path / "b") == p.relative_to(tmp_path / "a")
    # a run directory of medscalpel < 0.2 (a command wrote pies.json at its top) is still read
    old = tmp_path / "old"
    old.mkdir()
    (old / "pies.json").write_text('{"n_pies": 5}')
    assert ARTIFACTS["pies"].locate(old) == "pies.json"
    assert read_artifact(old, "pies")["n_pies"] == 5
    # ... until the version that removes the legacy locations
    monkeypatch.setattr(layout, "__version__", layout.LEGACY_REMOVED_IN)
    assert legacy_paths("pies") == () and ARTIFACTS["pies"].locate(old) is None
    with pytest.raises(DataError, match="does not exist"):
        read_artifact(old, "pies")
