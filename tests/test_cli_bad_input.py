"""No traceback reaches a user: EVERY command of the typer app (enumerated from the app object,
so a new command is covered automatically) is run through the real console entry point
``medscalpel.cli.main.run`` with a set of bad inputs. Each run must end with exit code 2, exactly
one line starting with ``error:`` and no traceback."""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import numpy as np
import pytest
import typer

from medscalpel.cli.main import app, run



def write_csv_dataset(root: Path, n: int = 16, size: int = 32, seed: int = 0) -> str:
    """A tiny on-disk multi-label CSV dataset (PNG files); returns its spec."""
    from PIL import Image

    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = ["path,a,b,c,split"]
    for i in range(n):
        y = (rng.random(3) < [0.4, 0.35, 0.3]).astype(int)
        img = (rng.random((size, size)) * 80).astype(np.uint8)
        img[4:12, 4:12] += np.uint8(150 * y[0])
        img[20:28, 20:28] += np.uint8(150 * y[1])
        Image.fromarray(img).save(root / "img" / f"{i:03d}.png")
        rows.append(f"img/{i:03d}.png,{y[0]},{y[1]},{y[2]},"
                    f"{('train', 'train', 'val', 'test')[i % 4]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return f"csv:{root / 'labels.csv'}?split_col=split"


def save_tiny_model(spec: str, out: Path, arch: str = "resnet_tiny", seed: int = 0) -> Path:
    import torch

    from medscalpel.data import Preprocess, open_dataset
    from medscalpel.models import create_model
    from medscalpel.models.checkpoint import make_card, save_model

    pp = Preprocess(size=32)
    ds = open_dataset(spec, split="test", preprocess=pp)
    torch.manual_seed(seed)
    m = create_model(arch, ds.num_classes, 1, 32)
    return save_model(m, out, make_card(m, ds.class_names, ds.task, pp))

#: parameter names by role (the vocabulary of the CLI); anything else that is required gets a
#: plausible valid value by type
MODEL = {"model", "model_dir", "teacher", "student", "dense", "compressed", "models",
         "reference"}
DATA = {"data", "data_spec", "spec", "like", "labels", "internal", "external", "train_data",
        "dataset"}
FILE = {"predictions", "fit", "held_out", "train", "val", "evaluate_on", "features", "csv",
        "checkpoint", "images", "weights", "stats", "calibration"}
DIRS = {"sweep_dir", "run_dir"}
CLASS = {"target", "target_class", "classes", "saliency_classes"}
VALID = {"arch": "resnet_tiny", "latency_budget_ms": "5"}

#: command -> reason, for bad-input failures in commands this session does not own (the fix is
#: written in the report to the lead); strict so that the lead sees when it is fixed
XFAIL: dict[str, str] = {}


def _commands():
    def walk(cmd, path=()):
        subs = getattr(cmd, "commands", None)
        if subs is not None:
            for name, sub in sorted(subs.items()):
                if not getattr(sub, "hidden", False):
                    yield from walk(sub, path + (name,))
        else:
            yield path, cmd

    return list(walk(typer.main.get_command(app)))


COMMANDS = _commands()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from medscalpel.engine.predict import predict

    root = tmp_path_factory.mktemp("bad")
    spec = write_csv_dataset(root / "data", n=16)
    model = save_tiny_model(spec, root / "model")
    from medscalpel.data import open_dataset
    from medscalpel.models.checkpoint import load_model

    m = load_model(model)
    preds = predict(m, open_dataset(spec, split="all", preprocess=m.card.preprocess),
                    batch_size=8, progress=False)
    preds.save(root / "preds.npz")
    (root / "empty_dir").mkdir()
    (root / "a_file.txt").write_text("not what you expected\n")
    np.savez(root / "pickled.npz", logits=np.array([{"x": 1}], dtype=object))
    np.savez(root / "strings.npz", logits=np.array(["a", "b"]), labels=np.array(["c", "d"]),
             meta=np.frombuffer(b"{}", dtype=np.uint8), features=np.array(["x"]))
    return {"root": root, "spec": spec, "model": model, "preds": root / "preds.npz"}


def _scenarios(inp):
    r = inp["root"]
    missing = {"model": r / "no_model", "data": f"folder:{r / 'no_data'}",
               "file": r / "no_file.npz", "dir": r / "no_dir", "out": r / "o_missing"}
    wrong_kind = {"model": r / "a_file.txt", "data": f"csv:{r / 'empty_dir'}",
                  "file": r / "empty_dir", "dir": r / "a_file.txt", "out": r / "o_kind"}
    valid = {"model": inp["model"], "data": inp["spec"], "file": inp["preds"],
             "dir": r / "no_dir"}
    return {
        "missing": missing,
        "wrong_kind": wrong_kind,
        "pickled_npz": {**valid, "file": r / "pickled.npz", "out": r / "o_pickle"},
        "non_numeric_npz": {**valid, "file": r / "strings.npz", "out": r / "o_strings"},
        "spec_option": {**valid, "data": inp["spec"] + "&dedup=maybe&skip_corrupt=maybe",
                        "file": r / "no_file.npz", "out": r / "o_spec"},
        "out_under_file": {**missing, "out": r / "a_file.txt" / "out"},
        "out_under_proc": {**missing, "out": Path("/proc/medscalpel-test/out")},
        "unknown_class": {**valid, "class": "NO_SUCH_CLASS", "file": r / "no_file.npz",
                          "out": r / "o_class"},
    }


BAD_ROLES = {"missing": {"model", "data", "file", "dir"},
             "wrong_kind": {"model", "data", "file", "dir"}, "pickled_npz": {"file"},
             "non_numeric_npz": {"file"}, "spec_option": {"data"}, "out_under_file": {"out"},
             "out_under_proc": {"out"}, "unknown_class": {"class"}}


def _argv(path, cmd, values, bad: set[str]) -> list[str] | None:
    """The command line, or None when no parameter of the command carries a bad value."""
    argv = list(path)
    carried = False
    for p in cmd.params:
        name = p.name
        if getattr(p, "hidden", False) or name in ("help",):
            continue
        if name == "out":
            role = "out"
        elif name in MODEL:
            role = "model"
        elif name in DATA:
            role = "data"
        elif name in FILE:
            role = "file"
        elif name in DIRS:
            role = "dir"
        elif name in CLASS:
            role = "class"
        else:
            role = None
        if role is None or (role == "class" and "class" not in values):
            if not p.required:
                continue
            value = VALID.get(name) or "1"
        elif role == "file" and not p.required and name not in ("predictions",):
            continue  # optional extra inputs: the required ones carry the bad value
        else:
            value = values[role]
            carried |= role in bad
        flag = p.opts[0] if p.param_type_name == "option" else None
        if flag is not None and getattr(p, "is_flag", False):
            continue
        argv += [flag, str(value)] if flag else [str(value)]
    return argv if carried else None


CASES = [(" ".join(path), scen) for path, _ in COMMANDS for scen in
         ("missing", "wrong_kind", "pickled_npz", "non_numeric_npz", "spec_option",
          "out_under_file", "out_under_proc", "unknown_class")]


def test_every_command_is_enumerated():
    names = {c for c, _ in CASES}
    # a few fixed points: the enumeration walks nested groups
    assert {"train", "predict", "evaluate", "repair calibrate", "compress lossless",
            "report clinical", "data stats"} <= names
    assert len(names) >= 35


@pytest.mark.parametrize("command,scenario", CASES)
def test_bad_input_is_one_clean_line(inputs, capsys, monkeypatch, command, scenario):
    if command in XFAIL:
        pytest.xfail(XFAIL[command])
    path, cmd = next((p, c) for p, c in COMMANDS if " ".join(p) == command)
    values = _scenarios(inputs)[scenario]
    argv = _argv(path, cmd, values, BAD_ROLES[scenario])
    if argv is None:
        pytest.skip(f"{command} takes no input that {scenario} makes bad")
    monkeypatch.setenv("MEDSCALPEL_PROGRESS", "0")
    monkeypatch.chdir(inputs["root"])  # default --out paths land in the temporary folder
    capsys.readouterr()
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as ex:
        run(argv)
    seconds = time.perf_counter() - t0
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in out + err, f"{argv}\n{err}"
    assert ex.value.code == 2, f"{argv} exit {ex.value.code}\n{err}"
    assert len(lines) == 1, f"{argv}\n{err}"
    # generous: the first call of a command imports its modules (slow on a loaded machine);
    # a command that does real work before checking its inputs takes far longer
    assert seconds < 60, f"{argv} took {seconds:.1f} s"


def test_spec_option_value_kinds(inputs):
    from medscalpel.data import open_dataset
    from medscalpel.errors import ConfigError

    with pytest.raises(ConfigError, match=r"'dedup' of adapter 'folder' is true or false; got "
                                          r"'maybe'"):
        open_dataset(f"folder:{inputs['root']}?dedup=maybe", split="all")
    with pytest.raises(ConfigError, match=r"'n' of adapter 'phantom' is a whole number"):
        open_dataset("phantom?n=2.5", split="all")
    ds = open_dataset(inputs["spec"] + "&val_fraction=0&seed=3", split="all")
    assert len(ds) == 16


@pytest.mark.parametrize("stale", [
    "--skip-corrupt",
    "pass values='logit'", "Pass allow_missing=True", "pass allow_pickle"])
def test_advice_names_real_flags(stale):
    """No message advises a flag or keyword that the CLI does not have."""
    src = Path(__file__).parents[1] / "medscalpel"
    hits = [str(p) for p in src.rglob("*.py") if stale in p.read_text()]
    assert not hits, hits


def test_advised_flags_exist():
    """Every '--flag' a message tells the user to add/pass exists on some command."""
    import re

    src = Path(__file__).parents[1] / "medscalpel"
    text = "\n".join(p.read_text() for p in src.rglob("*.py"))
    flags = set()
    for _, cmd in COMMANDS:
        for p in cmd.params:
            flags.update(o for o in list(getattr(p, "opts", [])) +
                         list(getattr(p, "secondary_opts", [])) if o.startswith("--"))
    advised = set(re.findall(r"(?:[Pp]ass|[Uu]se|[Gg]ive|[Aa]dd|[Ww]ith) (--[a-z][a-z0-9-]+)",
                             text))
    unknown = sorted(a for a in advised if a not in flags)
    assert not unknown, unknown
    assert inspect.signature(run).parameters["argv"].default is None
