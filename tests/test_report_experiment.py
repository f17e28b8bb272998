"""Experiment report: every section is read from its files, numbers equal the JSON they come
from, absent sections say "not run in this profile", user text is escaped."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from medscalpel.report.experiment import experiment_report, pointer, resolve_pointer
from medscalpel.report.sections import page_sections
from medscalpel.report.figures import pareto_front
from medscalpel.layout import write_artifact
from medscalpel.runs import write_json

EVIL = "<script>alert(1)</script>"
NAMES = ["Effusion", "Pneumothorax", EVIL, "Cardio/megaly"]


# ----------------------------------------------------------------------------- synthetic run
def _png(path: Path, seed: int = 0, title: str = "") -> Path:
    from matplotlib.figure import Figure

    rng = np.random.default_rng(seed)
    fig = Figure(figsize=(3, 2))
    ax = fig.subplots()
    ax.plot(rng.random(8))
    ax.set_title(title, fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=60)
    return path


def make_run_dir(root: Path, names: list[str] | None = None, clinical: bool = True) -> Path:
    """A demo-like run directory: JSON from the real to_dict() of each stage where that is
    cheap (label statistics, metrics, calibration, polarity), the documented layout otherwise,
    and a few small PNGs."""
    from medscalpel.explain.polarity import polarity_analysis
    from medscalpel.data.stats import label_statistics
    from medscalpel.engine.metrics import evaluate
    from medscalpel.engine.predictions import Predictions
    from medscalpel.repair.calibrate import calibrate_thresholds

    names = list(names or NAMES)
    k = len(names)
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "demo.json", {
        "profile": "micro", "seconds": 61.25, "settings": {"n_images": 400},
        "stages": [{"name": "phantom", "seconds": 3.5, "status": "ok"},
                   {"name": "baseline", "seconds": 20.125, "status": "ok"},
                   {"name": "distill", "seconds": 0.0, "status": "skipped"}],
        "phantom": {"n": 400, "size": 32, "file": 'a&"<>.png'}})
    y = (rng.random((200, k)) < np.linspace(0.4, 0.1, k)).astype(float)
    y[:, 1] = np.where(y[:, 0] > 0, 0.0, y[:, 1])  # 0 and 1 never co-occur
    st = label_statistics(y, names, spec="phantom:x", split="train")
    st.save(root / "data/stats/stats.json")
    st.plot_heatmap(root / "data/stats/jaccard.png", "jaccard")
    logits = rng.normal(size=(120, k)) + 1.5 * (yt := (rng.random((120, k)) < 0.3)).astype(float)
    preds = Predictions(logits, yt.astype(float), ids=tuple(f"i{i}" for i in range(120)),
                        class_names=tuple(names), task="multilabel", split="test")
    write_json(root / "baseline/metrics.json", evaluate(preds, n_boot=20, seed=0).to_dict())
    from medscalpel.data.transforms import Preprocess
    from medscalpel.models.checkpoint import make_card
    from medscalpel.models.zoo import create_model

    card = make_card(create_model("densenet_tiny", num_classes=k, img_size=32), names,
                     "multilabel", Preprocess(size=32)).to_dict()
    write_json(root / "baseline/model/model.json", {**card, "num_parameters": 123456,
                                                    "model_id": "abc123"})
    write_json(root / "calibrate/calibration.json", calibrate_thresholds(preds, preds).to_dict())
    from medscalpel.compress.contract import CompressionTable

    dense = {"method": "dense", "params": 100000, "params_ratio": 1.0, "macs": 5_000_000,
             "latency_ms": 4.25, "dense_latency_ms": 4.25, "speedup": 1.0, "macro_auroc": 0.8123,
             "macro_auroc_ci": [0.79, 0.83], "delta_macro_auroc": 0.0,
             "delta_macro_auroc_ci": None, "max_abs_delta_logit": 0.0,
             "model_dir": "calibrate/model"}
    rows = [
        {**dense, "method": "lossless", "params": 52000, "params_ratio": 0.52, "latency_ms": 3.9,
         "speedup": 1.09, "max_abs_delta_logit": 3.1e-6, "delta_macro_auroc": 0.0},
        {**dense, "method": "structured-l1", "params": 40000, "params_ratio": 0.4,
         "latency_ms": 2.1, "speedup": 2.02, "macro_auroc": 0.7911,
         "macro_auroc_ci": [0.76, 0.81], "delta_macro_auroc": -0.0212,
         "delta_macro_auroc_ci": [-0.035, -0.008], "max_abs_delta_logit": 1.7},
        {"method": "lossless-refused", "refused": "outputs changed by 0.3 > 1e-4"},
        {**{k_: None for k_ in dense}, "method": "structured-lrp", "params": 41000,
         "params_ratio": 0.41, "macro_auroc": 0.8011},
    ]
    write_artifact(root, "compress", CompressionTable(dense, tuple(rows), {"split": "test",
                                                                          "n": 120}))
    _site_shift(root, preds)
    levels = [0.0, 0.5, 0.9]
    med = [[0.0] * k, [-0.01 * (j + 1) for j in range(k)], [-0.1 * (j + 1) for j in range(k)]]
    write_json(root / "audit/forgettability/forgettability.json", {
        "kind": "forgettability", "method": "l1", "level_name": "sparsity", "levels": levels,
        "seeds": ["0"], "drop_threshold": 0.1, "n_images": 120, "class_names": names,
        "median_rel_ap": med, "forgotten_first_to_last": names[::-1],
        "table": [{"class": n, "prevalence": float(st.prevalence[j]), "n_pos_eval": 30 + j,
                   "ap_ref_median": 0.5 + 0.01 * j, "first_drop": 0.9 if j else None,
                   "delta_at_max": -0.1 * (j + 1), "abs_delta_ap_at_max": -0.05 * (j + 1)}
                  for j, n in enumerate(names)],
        "correlations": {"first_drop_vs_log_prevalence": {
            "n": k, "spearman_rho": 0.8, "spearman_ci": [0.1, 1.0], "spearman_p": 0.0012,
            "pearson_r": 0.75}}})
    _png(root / "audit/forgettability/audit_curves.png", 1, "curves")
    write_json(root / "audit/pies/pies.json", {
        "kind": "pies", "method": "l1", "level": 0.9, "score": "pearson", "quantile": 0.05,
        "threshold": 0.31, "n_images": 120, "n_pies": 6, "n_flips": 9, "n_flips_among_pies": 4,
        "class_names": names,
        "class_overrepresentation": [{"name": n, "n_pie_with": 2, "n_with": 20 + j,
                                      "share_pie": 0.333, "share_overall": 0.1 + 0.01 * j,
                                      "ratio": 3.33 - j, "ratio_ci": [1.2, 6.5], "fisher_p": 0.004}
                                     for j, n in enumerate(names)],
        "findings_overrepresentation": [{"name": "3+", "n_pie_with": 2, "n_with": 10,
                                         "share_pie": 0.333, "share_overall": 0.083, "ratio": 4.0,
                                         "ratio_ci": [1.5, 8.0], "fisher_p": 0.02}],
        "pies": [{"id": 'img&"<>1.png', "score": 0.12, "pie": True, "labels": [names[2]],
                  "flip": True, "dense_top": [[names[2], 0.9]],
                  "compressed_top": [[names[0], 0.6]]}]})
    _png(root / "audit/pies/pie_gallery.png", 2, "gallery")
    write_json(root / "audit/pies/pie_ground_truth.json", {
        "kind": "pie_ground_truth", "label_noise": {"p": 0.038, "odds_ratio": 2.346},
        "quality": {"n_pie": 47, "p": 4.7e-06, "rank_biserial": -0.396},
        "supports": {"label_noise_enriched": True, "lower_severity": False}})
    _png(root / "explain/cams/cam_overlay.png", 3, "cams")
    w = rng.normal(size=(k, 32))
    write_json(root / "explain/polarity/polarity.json",
               polarity_analysis(w, y, names, n_null=5, seed=0).to_dict())
    write_json(root / "repair/surgery/surgery.json", {
        "success": True, "message": "5 weights zeroed", "applied": True, "goal": "below",
        "delta_prob": None, "false_positives_still_above_threshold": {"k": 0, "n": 4,
                                                                      "text": "0/4"},
        "plan": {"class": names[1], "class_index": 1, "channels": [3, 7],
                 "old_weights": [0.52, 0.31], "scores": [0.2, 0.1]},
        "n_weights_changed": 2,
        "targets": {"n": 4, "delta_prob_mean": -0.131, "delta_prob_max": -0.05},
        "true_positives": {"n": 10, "lost": 0},
        "auroc_before": {n: 0.8 for n in names},
        "auroc_after": {n: (0.81 if j == 1 else 0.8) for j, n in enumerate(names)},
        "other_logits_identical": True, "seconds": 0.042})
    write_json(root / "repair/triage/decision_log.json", {
        "classes": [{"class": names[0], "issues": [], "attempts": [], "chosen": ["none"]},
                    {"class": names[2], "issues": [{"kind": "low_recall"}],
                     "attempts": [{"treatment": "calibrate", "status": "helped", "cost": 1.0,
                                   "seconds": 0.012, "gain": {"youden": 0.05, "auroc": 0.0}}],
                     "chosen": ["calibrate"]}],
        "settings": {"n_selection": 60, "n_report": 60},
        "costs_after": {"initial": {"none": 0.0, "calibrate": 1.0},
                        "current": {"none": 0.0, "calibrate": 0.95},
                        "runs": {"calibrate": 1}},
        "seconds": 1.5})
    (root / "repair/triage/decision_log.md").write_text("| class |\n|---|\n", encoding="utf-8")
    write_json(root / "distill/distill.json", {
        "teacher": {"arch": "densenet_tiny", "parameters": 100000, "macs": 5_000_000,
                    "latency_ms": 4.0, "metrics": {"auroc": 0.81, "ap": 0.4,
                                                   "auroc_ci": [0.78, 0.84]}},
        "students": {"distilled": {"arch": "resnet_tiny", "parameters": 9000, "macs": 400_000,
                                   "latency_ms": 0.7, "param_ratio": 0.09, "speedup": 5.71,
                                   "auroc_drop": 0.008,
                                   "metrics": {"auroc": 0.802, "ap": 0.38}}},
        "targets": {"max_param_ratio": 0.1, "min_speedup": 5.0, "max_auroc_drop": 0.01,
                    "all_met": True}, "config": {"soft_weight": 0.5, "temperature": 4.0}})
    if clinical:
        c = root / "reports/clinical"
        write_json(c / "img_1.json", {
            "kind": "clinical_report", "id": 'img&"<>1.png', "html": "img_1.html",
            "disclaimer": "Decision support only, not a diagnosis.",
            "findings": [{"class": names[2], "probability": 0.91, "threshold": 0.4,
                          "location": "right lower zone"}],
            "excluded": [{"class": names[0], "excluded_by": names[2], "jaccard": 0.004}]})
        (c / "img_1.html").write_text("<html></html>", encoding="utf-8")
    return root


def _site_shift(root: Path, preds) -> None:
    """The site-shift artifact through the real result types (external validation, shift
    check, k-shot recalibration on Predictions only)."""
    from medscalpel.engine.external import external_validation
    from medscalpel.engine.predictions import Predictions
    from medscalpel.repair.shift import recalibrate_site, shift_check
    from medscalpel.repair.shift_flow import SiteShiftReport

    ext = Predictions(preds.logits + 0.8, preds.labels, tuple(f"ext{i}" for i in range(preds.n)),
                      preds.class_names, preds.task, split="test")
    rec, _ = recalibrate_site(None, preds, ext, k=5, n_boot=20)
    rep = SiteShiftReport("phantom:a", "phantom:a?site=B",
                          external_validation(None, preds, ext, n_boot=20),
                          shift_check(preds, ext), rec,
                          {"share_external_above_99": 0.5, "share_internal_above_99": 0.01},
                          preds.class_names, 1.0, ("a note",))
    write_artifact(root, "site_shift", rep)


# ----------------------------------------------------------------------------- HTML parsing
class _Cells(HTMLParser):
    """Collects every element with data-src (its attributes and text) and each section."""

    def __init__(self):
        super().__init__()
        self.cells: list[dict] = []
        self.sections: dict[str, dict] = {}
        self.imgs: list[str] = []
        self._open: list[dict] = []
        self._section: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section" and "data-section" in a:
            self._section = a["data-section"]
            self.sections[self._section] = {"present": a.get("data-present"), "text": ""}
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if "data-src" in a:
            self._open.append({"tag": tag, "attrs": a, "text": "", "section": self._section})

    def handle_endtag(self, tag):
        if self._open and self._open[-1]["tag"] == tag:
            self.cells.append(self._open.pop())

    def handle_data(self, data):
        if self._open:
            self._open[-1]["text"] += data
        if self._section:
            self.sections[self._section]["text"] += data


def parse(html: str) -> _Cells:
    p = _Cells()
    p.feed(html)
    return p


def _numbers(s: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", s.replace(",", ""))]


def check_cells_against_json(run_dir: Path, cells: list[dict]) -> int:
    """Every numeric cell's value equals the JSON value at its data-src, and its text shows that
    value rounded to the digits shown. Returns the number of cells checked."""
    docs: dict[str, object] = {}
    for c in cells:
        rel, _, ptr = c["attrs"]["data-src"].partition("#")
        doc = docs.setdefault(rel, json.loads((run_dir / rel).read_text()))
        truth = resolve_pointer(doc, ptr)
        truth = [float(t) for t in truth] if isinstance(truth, list) else [float(truth)]
        vals = [float(v) for v in c["attrs"]["data-value"].split(",")]
        assert vals == truth, c
        shown = c["text"].strip()
        got = _numbers(shown)
        assert len(got) == len(truth), (shown, c)
        scale = 100.0 if c["attrs"]["data-fmt"] == "pct" else 1.0
        toks = re.findall(r"\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?", shown)
        for g, tok, v in zip(got, toks, truth):
            if "e" in tok:
                assert abs(g - v) <= abs(v) * 1e-2, (shown, v)
            else:
                dec = len(tok.split(".")[1]) if "." in tok else 0
                assert abs(g / scale - v) <= 0.5 * 10 ** -dec / scale + 1e-12, \
                    (shown, v, c["attrs"]["data-src"])
    return len(cells)


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Path, object, str]:
    run = make_run_dir(tmp_path_factory.mktemp("run") / 'run&"<>')
    rep = experiment_report(run)
    return run, rep, Path(rep.html_path).read_text(encoding="utf-8")


def test_every_section_present_and_numbers_match_json(full_run):
    run, rep, html = full_run
    p = parse(html)
    assert [cls.key for cls in page_sections()] == list(p.sections)
    # deployment and what-compression-changed are built from real runs in tests/test_demo.py
    real_only = {"deployment", "changes"}
    assert all(v["present"] == "yes" for k, v in p.sections.items() if k not in real_only), \
        p.sections
    n = check_cells_against_json(run, p.cells)
    assert n > 150
    srcs = {c["attrs"]["data-src"].split("#")[0] for c in p.cells}
    for rel in ("demo.json", "data/stats/stats.json", "baseline/metrics.json",
                "calibrate/calibration.json", "compress/compress.json",
                "audit/forgettability/forgettability.json", "audit/pies/pies.json",
                "audit/pies/pie_ground_truth.json",
                "explain/polarity/polarity.json", "repair/surgery/surgery.json",
                "repair/triage/decision_log.json", "distill/distill.json",
                "reports/clinical/img_1.json"):
        assert rel in srcs, rel
    # every figure embedded, none linked
    assert p.imgs and all(s.startswith("data:image/png;base64,") for s in p.imgs)
    # jaccard, AUROC forest, Pareto, curves, PIE gallery, CAMs
    assert len(p.imgs) == 6
    assert "not drawn" not in html


def test_specific_numbers(full_run):
    run, rep, html = full_run
    p = parse(html)
    metrics = json.loads((run / "baseline/metrics.json").read_text())
    by_src = {c["attrs"]["data-src"]: c["text"].strip() for c in p.cells}
    macro = metrics["macro"]["auroc"]
    assert by_src[pointer("baseline/metrics.json", "macro", "auroc")] == f"{macro:.3f}"
    c2 = metrics["classes"][2]
    lo, hi = c2["auroc_ci"]
    assert by_src[pointer("baseline/metrics.json", "classes", 2, "auroc_ci")] == \
        f"[{lo:.3f}, {hi:.3f}]"
    assert by_src[pointer("compress/compress.json", "rows", 1, "speedup")] == "x2.02"
    assert by_src[pointer("compress/compress.json", "rows", 0, "max_abs_delta_logit")] == "3.10e-06"
    assert by_src[pointer("compress/compress.json", "dense", "params")] == "100,000"
    assert by_src[pointer("repair/surgery/surgery.json", "auroc_after", NAMES[3])] == "0.8000"
    # the refused row and the row with missing numbers
    comp = p.sections["compression"]["text"]
    assert "refused: outputs changed by 0.3 &gt; 1e-4" not in comp  # text, not double-escaped
    assert "refused: outputs changed by 0.3 > 1e-4" in comp
    assert rep.section("compression").present and rep.section("distill").present


def test_missing_sections_say_not_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_json(run / "demo.json", {"profile": "micro", "stages": []})
    _png(run / "audit/pies/pie_gallery.png")
    write_json(run / "compress/compress.json", {"rows": [{"method": "x"}]})  # keys missing
    rep = experiment_report(run, tmp_path / "out" / "r.html")
    html = Path(rep.html_path).read_text()
    p = parse(html)
    present = {k for k, v in p.sections.items() if v["present"] == "yes"}
    assert present == {"overview", "pies", "compression"}
    for k, v in p.sections.items():
        if k not in present:
            assert "Not run in this profile." in v["text"], k
    assert set(rep.to_dict()["not_run"]) == set(p.sections) - present
    # a compress.json that does not match its declared artifact is shown as unreadable, with
    # the declaration's message (and fails the demo test that builds the run with the writers)
    comp = p.sections["compression"]["text"]
    assert "unreadable file" in comp and "declared artifact 'compress'" in comp
    assert rep.section("compression").badge == "unreadable file"
    assert p.imgs and all(s.startswith("data:image/png;base64,") for s in p.imgs)


def test_damaged_json_is_a_note_not_a_crash(tmp_path):
    run = tmp_path / "run"
    (run / "baseline").mkdir(parents=True)
    (run / "baseline" / "metrics.json").write_text("{not json", encoding="utf-8")
    write_json(run / "distill" / "distill.json", {"teacher": "oops", "students": [1, 2]})
    rep = experiment_report(run)
    html = Path(rep.html_path).read_text()
    assert "could not be read" in parse(html).sections["baseline"]["text"]
    assert rep.section("distill").present  # a table of dashes, no exception


def test_user_text_is_escaped(full_run):
    run, rep, html = full_run
    assert EVIL not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'a&"<>.png' not in html and "img&\"<>1.png" not in html
    assert "img&amp;&#34;&lt;&gt;1.png" in html or "img&amp;&quot;&lt;&gt;1.png" in html
    assert "run&amp;&#34;&lt;&gt;" in html or "run&amp;&quot;&lt;&gt;" in html
    # the only <script> elements are none at all: the page needs no JavaScript
    assert "<script" not in html.lower()


def test_run_dir_must_exist(tmp_path):
    from medscalpel.errors import DataError

    with pytest.raises(DataError, match="Run directory not found"):
        experiment_report(tmp_path / "nope")


def test_pareto_front():
    assert pareto_front([1.0, 0.5, 0.5, 0.2], [0.90, 0.88, 0.80, 0.70]) == [3, 1, 0]
    assert pareto_front([0.3, 0.3], [0.5, 0.9]) == [1]
    assert pareto_front([float("nan"), 1.0], [0.9, 0.1]) == [1]


def test_cli_experiment(tmp_path):
    from typer.testing import CliRunner
    import typer

    from medscalpel.cli.report_cmd import experiment

    run = make_run_dir(tmp_path / "run", clinical=False)
    app = typer.Typer()
    app.command()(experiment)
    app.command("noop")(lambda: None)
    res = CliRunner().invoke(app, ["experiment", str(run), "--out", str(tmp_path / "e.html")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "e.html").is_file()
    summary = json.loads((tmp_path / "e.summary.json").read_text())
    assert "clinical" in summary["not_run"] and "baseline" in summary["present"]


def test_single_command_runs_render_their_sections(tmp_path):
    """'report experiment' renders any run directory holding a known artifact, e.g. the
    metrics.json of 'evaluate --out' and the model/ of 'train', at their own paths."""
    from medscalpel.data.transforms import Preprocess
    from medscalpel.engine.metrics import evaluate
    from medscalpel.engine.predictions import Predictions
    from medscalpel.models.checkpoint import make_card
    from medscalpel.models.zoo import create_model

    rng = np.random.default_rng(0)
    y = (rng.random((60, 2)) < 0.4).astype(float)
    preds = Predictions(rng.normal(size=(60, 2)) + 2 * y, y, tuple(f"i{i}" for i in range(60)),
                        ("a", "b"), "multilabel", split="test")
    write_json(tmp_path / "run" / "metrics.json", evaluate(preds, n_boot=20).to_dict())
    card = make_card(create_model("densenet_tiny", num_classes=2, img_size=32), ["a", "b"],
                     "multilabel", Preprocess(size=32))
    write_json(tmp_path / "run" / "model" / "model.json", card.to_dict())
    rep = experiment_report(tmp_path / "run")
    base = rep.section("baseline")
    assert base.present and not base.notes and "metrics.json" in base.sources
    assert "model/model.json" in base.sources
    p = parse(Path(rep.html_path).read_text(encoding="utf-8"))
    assert check_cells_against_json(tmp_path / "run", p.cells) > 5
