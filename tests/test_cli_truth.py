"""The command line tells the truth and fails early (issues R part 3/4, S part 4/7):

- every numeric flag is range-checked before any work: exit 2, one ``error:`` line naming the
  flag and its valid range, nothing written at ``--out``;
- help is fast (importing the CLI imports neither torch nor NumPy) and readable at 80 columns;
- help rows say what each option takes; hidden arguments stay out of the usage line;
- ``--out ''`` and an unquoted glob get an error that says what to do;
- nothing is written outside ``--out`` (repair triage's cost matrix);
- ``predict`` prints per-image probabilities and findings and writes them to a CSV.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer

from medscalpel.cli.bounds import BOUNDS, OVERRIDES, constraint_for
from medscalpel.cli.main import app, run
from medscalpel.errors import ConfigError
from medscalpel.validation import Interval, OneOf, check_params, check_range

ROOT = Path(__file__).resolve().parents[1]


def _leaf_commands():
    def walk(cmd, path=()):
        subs = getattr(cmd, "commands", None)
        if subs is not None:
            for name, sub in sorted(subs.items()):
                yield from walk(sub, path + (name,))
        else:
            yield " ".join(path), cmd

    return list(walk(typer.main.get_command(app)))


def _run(argv, capsys, monkeypatch, cwd: Path) -> tuple[int, str, str]:
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    with pytest.raises(SystemExit) as ex:
        run([str(a) for a in argv])
    out, err = capsys.readouterr()
    return ex.value.code, out, err


# ----------------------------------------------------------------------------- range checks
#: (argv after the program name, flag the error must name, text of the valid range)
BAD_NUMBERS = [
    (["train", "--data", "phantom?n=40", "--seed", "-1"], "--seed", "[0, 4294967295]"),
    (["evaluate", "preds.npz", "--seed", "-1"], "--seed", "[0, 4294967295]"),
    (["train", "--data", "phantom?n=40", "--workers", "-1"], "--workers", "[0, 256]"),
    (["compress", "deploy", "--model", "m", "--data", "phantom", "--threads", "-1"],
     "--threads", "[1, 1024]"),
    (["compress", "prune", "m", "--data", "phantom", "--n-calib", "0"], "--n-calib",
     "[1, 100000]"),
    (["compress", "prune", "m", "--data", "phantom", "--n-calib", "-1"], "--n-calib",
     "[1, 100000]"),
    (["explain", "cam", "--model", "m", "--data", "phantom", "--class", "Mass",
      "--n-images", "-1"], "--n-images", "[1, 10000000]"),
    (["evaluate", "preds.npz", "--n-boot", "1e12"], "--n-boot", "[0, 100000]"),
    (["evaluate", "preds.npz", "--n-boot", "1000000000000"], "--n-boot", "[0, 100000]"),
    (["data", "phantom", "--n", "1e12"], "--n", "[1, 1000000]"),
    (["data", "phantom", "--n-images", "1000000000000"], "--n-images", "[1, 1000000]"),
    (["train", "--data", "phantom?n=40", "--size", "100000"], "--size", "[8, 2048]"),
    (["train", "--data", "phantom?n=40", "--batch-size", "1e12"], "--batch-size", "[1, 4096]"),
    (["train", "--data", "phantom?n=40", "--batch-size", "1000000000000"], "--batch-size",
     "[1, 4096]"),
    (["train", "--data", "phantom?n=40", "--lr", "nan"], "--lr", "(0, 10]"),
    (["train", "--data", "phantom?n=40", "--channels", "2"], "--channels", "1, 3"),
    (["audit", "changes", "dense", "c", "--data", "phantom", "--severities", "4"],
     "--severities", "[1, 3]"),
]


@pytest.mark.parametrize("argv,flag,span", BAD_NUMBERS, ids=[" ".join(a) for a, _, _ in
                                                              BAD_NUMBERS])
def test_bad_number_is_refused_before_work(tmp_path, capsys, monkeypatch, argv, flag, span):
    out = tmp_path / "run"
    code, stdout, err = _run([*argv, "--out", out], capsys, monkeypatch, tmp_path)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert f"'{flag}'" in lines[0] and span in lines[0], lines[0]
    assert "Traceback" not in err + stdout
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing written anywhere


def test_every_numeric_flag_has_a_range_and_its_default_is_in_it():
    missing, bad_default = [], []
    for command, cmd in _leaf_commands():
        for p in cmd.params:
            if p.param_type_name != "option":
                continue
            bare = str(p.bare_type())
            if not any(t in bare for t in ("int", "float")):
                continue
            constraint = constraint_for(command, list(p.opts))
            if constraint is None:
                missing.append(f"{command} {p.opts[0]}")
                continue
            defaults = p.default if isinstance(p.default, (list, tuple)) else [p.default]
            for d in defaults:
                if d is None:
                    continue
                try:
                    constraint.check(d, p.opts[0], command)
                except ConfigError as exc:
                    bad_default.append(str(exc))
    assert missing == [], f"numeric flags without a range in medscalpel/cli/bounds.py: {missing}"
    assert bad_default == []


def test_overrides_name_real_commands():
    commands = {c for c, _ in _leaf_commands()}
    assert {c for c, _ in OVERRIDES} <= commands
    assert all(flag.startswith("--") for flag in BOUNDS)


def test_validation_accepts_numpy_numbers_and_rejects_bools():
    assert check_range(np.int64(3), "k", "f", 0, 10, integer=True) == 3
    assert check_range(np.float32(0.5), "p", "f", 0.0, 1.0) == np.float32(0.5)
    with pytest.raises(ConfigError, match=r"The 'k' parameter of f must be an integer in the "
                                          r"range \[0, 10\]. Got 11 instead."):
        check_range(np.int32(11), "k", "f", 0, 10, integer=True)
    with pytest.raises(ConfigError, match="Got True instead"):
        check_range(True, "k", "f", 0, 10, integer=True)
    with pytest.raises(ConfigError, match="Got True instead"):
        check_range(np.bool_(True), "k", "f", 0, 10, integer=True)
    with pytest.raises(ConfigError, match="must be a finite number"):
        check_range(float("inf"), "x", "f", 0)
    with pytest.raises(ConfigError, match=r"'c' parameter of f must be one of 1, 3. Got 2"):
        check_params({"c": np.int64(2)}, {"c": OneOf((1, 3))}, "f")
    with pytest.raises(ConfigError, match=r"'s' parameter of f must be an integer in the range "
                                          r"\[1, 3\]. Got 4 instead."):
        check_params({"s": [1, 4], "absent": None}, {"s": Interval(1, 3, integer=True),
                                                     "absent": Interval(0, 1)}, "f")


# ----------------------------------------------------------------------------- help
def _cli(*args: str, columns: int = 80) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns), "MEDSCALPEL_PROGRESS": "0"}
    return subprocess.run([sys.executable, "-m", "medscalpel.cli.main", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_importing_the_cli_imports_neither_torch_nor_numpy():
    code = ("import sys; import medscalpel.cli.main as m; "
            "from typer.main import get_command; get_command(m.app); "
            "heavy = [k for k in ('torch', 'numpy', 'scipy', 'sklearn', 'pandas') "
            "if k in sys.modules]; assert not heavy, heavy; print('light')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "light"


@pytest.mark.parametrize("args", [("train", "-h"), ("compress", "prune", "-h"),
                                  ("repair", "surgery", "-h"), ("-h",)])
def test_help_is_readable_at_80_columns(args):
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(ln) for ln in lines) <= 80
    # the help column keeps at least 40 of the 80 characters (the rich panels left it ~17, so
    # that it wrapped one word per line)
    indents = [len(ln) - len(ln.lstrip()) for ln in lines if ln.strip()]
    assert max(indents) <= 40, r.stdout
    assert "╭" not in r.stdout  # plain text, no rich panels


def test_help_rows_say_what_options_take():
    r = _cli("evaluate", "-h", columns=200)
    assert "--reference PREDICTIONS" in r.stdout
    assert "--seed N" in r.stdout and "Range: [0, 4294967295]" in r.stdout
    assert "--out FILE.npz" in _cli("features", "-h", columns=200).stdout
    exp = _cli("report", "experiment", "-h", columns=200).stdout
    assert "--out FILE.html" in exp and "INTO the input run directory" in exp
    assert "--internal PREDICTIONS" in _cli("repair", "recalibrate-site", "-h",
                                            columns=200).stdout
    train = _cli("train", "-h", columns=200).stdout
    assert "--pos-weight none|balanced" in train and "--device auto|cpu|cuda" in train


def test_hidden_arguments_stay_out_of_the_usage_line():
    usage = _cli("repair", "surgery", "-h", columns=200).stdout.splitlines()[0]
    assert usage.startswith("Usage: medscalpel repair surgery")
    assert "MODEL" not in usage
    assert "DATA" not in _cli("compress", "lossless", "-h", columns=200).stdout.splitlines()[0]
    usage = _cli("repair", "triage", "-h", columns=200).stdout.splitlines()[0]
    assert usage == "Usage: medscalpel repair triage [OPTIONS] FIT HELD_OUT"


# ----------------------------------------------------------------------------- clear errors
def test_empty_out_is_refused(tmp_path, capsys, monkeypatch):
    code, _, err = _run(["data", "phantom", "--n-images", "10", "--out", ""], capsys,
                        monkeypatch, tmp_path)
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert "'--out'" in err and "current directory" in err
    assert list(tmp_path.iterdir()) == []


def test_unquoted_glob_says_quote_it(tmp_path, capsys, monkeypatch):
    code, _, err = _run(["predict", "--model", "m", "--data", "a/1.png", "a/2.png", "--out",
                         tmp_path / "o"], capsys, monkeypatch, tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "unexpected extra argument" in err and "quote it" in err


def test_report_experiment_out_must_be_html(tmp_path, capsys, monkeypatch):
    (tmp_path / "runx").mkdir()
    code, _, err = _run(["report", "experiment", tmp_path / "runx", "--out",
                         tmp_path / "report_dir"], capsys, monkeypatch, tmp_path)
    assert code == 2 and "ending in .html" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runx"]


def test_surgery_errors_name_flags_not_python_arguments(tmp_path, capsys, monkeypatch):
    code, _, err = _run(["repair", "surgery", "--model", "m", "--class", "a", "--features",
                         "f.npz", "--out", tmp_path / "o"], capsys, monkeypatch, tmp_path)
    assert code == 2 and "--delta-prob" in err and "--below-threshold" in err
    assert "delta_prob=" not in err
    code, _, err = _run(["repair", "surgery", "--model", "m", "--class", "a", "--features",
                         "f.npz", "--delta-prob", "0.2", "--criterion", "median", "--out",
                         tmp_path / "o"], capsys, monkeypatch, tmp_path)
    assert code == 2 and "'--criterion'" in err and "'mean', 'each'" in err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- outputs
def _tiny_predictions(path: Path, n: int, seed: int, prefix: str) -> Path:
    from medscalpel.engine.predictions import Predictions

    rng = np.random.default_rng(seed)
    y = (rng.random((n, 3)) < [0.4, 0.3, 0.5]).astype(np.float32)
    logits = (2.0 * y - 1.0) + rng.normal(0, 1.2, size=(n, 3))
    Predictions(logits.astype(np.float32), y, tuple(f"{prefix}{i}" for i in range(n)),
                ("a", "b", "c"), "multilabel", split="val").save(path)
    return path


def test_triage_writes_its_costs_inside_out(tmp_path, capsys, monkeypatch):
    fit = _tiny_predictions(tmp_path / "fit.npz", 80, 0, "fit")
    held = _tiny_predictions(tmp_path / "held.npz", 80, 1, "held")
    work = tmp_path / "cwd"
    work.mkdir()
    code, out, err = _run(["repair", "triage", fit, held, "--out", tmp_path / "tri"], capsys,
                          monkeypatch, work)
    assert code == 0, err
    assert (tmp_path / "tri" / "repair" / "triage" / "costs.json").is_file()
    assert list(work.iterdir()) == []  # no runs/costs.json beside the user


def test_findings_table_thresholds_are_stated():
    from medscalpel.engine.findings import findings_table
    from medscalpel.engine.predictions import Predictions

    p = Predictions(np.array([[0.0, 1.0], [-3.0, -0.5]], np.float32),
                    np.array([[1, 1], [0, 0]], np.float32), ("x", "y"), ("A", "B"),
                    "multilabel")
    t = findings_table(p)
    assert t.threshold_source.startswith("0.5")
    assert [r["findings"] for r in t.rows] == ["A; B", "none"]  # sigmoid(0) = 0.5 reaches 0.5
    t2 = findings_table(p, thresholds=[0.6, 0.3])
    assert t2.threshold_source == "model card (calibrated)"
    assert [r["findings"] for r in t2.rows] == ["B", "B"]  # sigmoid(-0.5) = 0.378 >= 0.3
    assert t2.rows[1]["B"] == pytest.approx(1 / (1 + np.exp(0.5)), abs=1e-6)
    mc = Predictions(np.array([[0.1, 2.0, -1.0]], np.float32), np.array([1]), ("z",),
                     ("n", "p", "v"), "multiclass")
    t3 = findings_table(mc)
    assert t3.threshold_source.startswith("argmax") and t3.rows[0]["findings"] == "p"
    assert type(t3).from_dict(t3.to_dict()) == t3


def test_predict_prints_and_writes_per_image_findings(tmp_path, capsys, monkeypatch):
    import torch
    from PIL import Image

    from medscalpel.data import Preprocess, open_dataset
    from medscalpel.models import create_model
    from medscalpel.models.checkpoint import make_card, save_model

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rows = ["path,a,b,split"]
    for i in range(14):
        Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(
            tmp_path / "img" / f"{i:02d}.png")
        rows.append(f"img/{i:02d}.png,{i % 2},{(i // 2) % 2},test")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    spec = f"csv:{tmp_path / 'labels.csv'}?split_col=split"
    pp = Preprocess(size=32)
    ds = open_dataset(spec, split="test", preprocess=pp)
    torch.manual_seed(0)
    m = create_model("resnet_tiny", ds.num_classes, 1, 32)
    model = save_model(m, tmp_path / "model", make_card(m, ds.class_names, ds.task, pp))

    code, out, err = _run(["predict", "--model", model, "--data", spec, "--split", "test",
                           "--out", tmp_path / "pred"], capsys, monkeypatch, tmp_path)
    assert code == 0, err
    flat = " ".join(out.split())  # the console wraps at its width
    assert "findings at 0.5 (the model card has no calibrated thresholds)" in flat
    assert "4 more rows; all 14 rows" in flat
    assert sum(ln.lstrip("│┃ ").startswith("img/") for ln in out.splitlines()) == 10
    with open(tmp_path / "pred" / "predictions.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 14 and list(table[0]) == ["id", "a", "b", "findings"]
    from medscalpel.engine.predictions import Predictions

    probs = Predictions.load(tmp_path / "pred" / "predictions.npz").probs()
    got = np.array([[float(r["a"]), float(r["b"])] for r in table])
    np.testing.assert_allclose(got, probs, atol=1e-6)
    expected = ["; ".join(c for c, v in zip("ab", row) if v >= 0.5) or "none" for row in probs]
    assert [r["findings"] for r in table] == expected


# ----------------------------------------------------------------------------- deprecations
def _hidden_spellings():
    """(command path, old spelling) of every hidden parameter and hidden command of the CLI."""
    import typer

    from medscalpel.cli.main import app

    found = set()

    def walk(c, path):
        if hasattr(c, "commands"):
            for n, sub in c.commands.items():
                if getattr(sub, "hidden", False):
                    found.add((" ".join(path + [n]), " ".join(path + [n])))
                walk(sub, path + [n])
            return
        for p in c.params:
            if getattr(p, "hidden", False):
                old = p.opts[0] if p.opts[0].startswith("-") else p.metavar
                found.add((" ".join(path), old))

    walk(typer.main.get_command(app), [])
    return found


def test_every_old_spelling_is_in_the_one_deprecation_table_and_back():
    from medscalpel.cli.deprecations import DEPRECATIONS, _version

    hidden = _hidden_spellings()
    table = {(c, e.old) for e in DEPRECATIONS for c in e.commands}
    assert hidden and hidden == table, (sorted(hidden - table), sorted(table - hidden))
    for e in DEPRECATIONS:
        assert _version(e.removed_in) >= _version(e.since) and (e.new or e.note), e


def test_an_old_spelling_warns_with_its_removal_version_and_a_removed_one_fails(tmp_path,
                                                                                 capsys):
    from medscalpel.cli.main import run

    with pytest.raises(SystemExit) as ok:
        run(["data", "phantom", "--n", "40", "--size", "32", "--out", str(tmp_path / "p")])
    assert ok.value.code == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "--n (data phantom) is deprecated since 0.1.0 and will be removed in 0.2.0: use " \
           "--n-images" in err
    assert len(list((tmp_path / "p").glob("*.npz"))) >= 1  # the old spelling still works
    with pytest.raises(SystemExit) as ex:
        run(["report", "clinical", "x.png", "--model", str(tmp_path / "m"),
             "--jaccard-exclusion", "0.1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert ex.value.code == 2 and "--jaccard-exclusion (report clinical) was removed in 0.1.0" \
        in " ".join(err.split())
    assert not (tmp_path / "r").exists()


def test_the_old_audit_polarity_command_warns(monkeypatch):
    from medscalpel.cli import deprecations, explain_cmd

    calls = []
    monkeypatch.setattr(deprecations, "used", lambda old, cmd: calls.append((old, cmd)))
    wrapped = deprecations.old_command("audit polarity", lambda **kw: kw)
    assert wrapped(a=1) == {"a": 1} and calls == [("audit polarity", "audit polarity")]
    import inspect

    w = deprecations.old_command("audit polarity", explain_cmd.polarity)
    assert inspect.signature(w) == inspect.signature(explain_cmd.polarity)
