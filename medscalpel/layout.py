"""The declared run-directory layout: every artifact a stage writes, its path and its type.

Stages write artifacts through :func:`write_artifact` and readers (report sections, ``show``,
tests) read them back through :func:`read_artifact`; no path string or top-level key is typed
twice. An artifact is either

* **typed**: its result class (named lazily as ``"module:Class"``, so that this low-level module
  imports nothing above it) has ``to_dict()`` and ``from_dict()``; reading returns the object, or
* **a checked dict**: a JSON object whose declared top-level ``keys`` must be present; writing
  and reading both check them, so a renamed key fails at once (and in the tests), never
  silently on a report page.

Paths may hold ``{placeholders}`` filled from keyword arguments (``split``, ``name``).

Example:
    >>> a = ARTIFACTS["compress"]
    >>> a.path, a.type_path
    ('compress/compress.json', 'medscalpel.compress.contract:CompressionTable')
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medscalpel import __version__
from medscalpel.errors import DataError
from medscalpel.runs import read_json, write_json


@dataclass(frozen=True)
class Artifact:
    """One file of a run directory.

    Attributes:
        key: the artifact's name (``ARTIFACTS[key]``).
        path: relative path in the run directory (``{placeholders}`` allowed).
        stage: the stage that writes it (``demo`` stage name or CLI command).
        type_path: ``"module:Class"`` of its result type (``from_dict`` / ``to_dict``), or
            ``None`` for a checked dict or a non-JSON file.
        keys: top-level keys a checked-dict JSON artifact must have.
        description: what it holds.
    """

    key: str
    path: str
    stage: str
    type_path: str | None = None
    keys: tuple[str, ...] = ()
    description: str = ""

    @property
    def is_json(self) -> bool:
        return self.path.endswith(".json")

    def relpath(self, **fmt: Any) -> str:
        try:
            return self.path.format(**fmt)
        except KeyError as exc:
            raise DataError(f"Artifact '{self.key}' ({self.path}) needs the placeholder "
                            f"{exc.args[0]!r}; pass {exc.args[0]}=...") from None

    @property
    def filename(self) -> str:
        """The artifact's file name (the last part of ``path``): what a library function that is
        given its output folder names the file (the stage passes ``ctx.dir_of(key)``)."""
        return self.path.rsplit("/", 1)[-1]

    def path_in(self, run_dir: str | os.PathLike, **fmt: Any) -> Path:
        return Path(run_dir) / self.relpath(**fmt)

    def dir_in(self, run_dir: str | os.PathLike, **fmt: Any) -> Path:
        """The folder of this artifact in ``run_dir``: what a stage or command passes to a
        library function that is given its output folder."""
        return self.path_in(run_dir, **fmt).parent

    def exists(self, run_dir: str | os.PathLike, **fmt: Any) -> bool:
        return self.path_in(run_dir, **fmt).exists()

    def locate(self, run_dir: str | os.PathLike, **fmt: Any) -> str | None:
        """The relative path where ``run_dir`` holds this artifact: its declared path, else
        where a single command of medscalpel < 0.2 wrote it (:data:`LEGACY_PATHS`, read only,
        until its ``removed_in`` version), else ``None``."""
        for rel in (self.relpath(**fmt), *legacy_paths(self.key)):
            if (Path(run_dir) / rel).is_file():
                return rel
        return None

    def result_type(self) -> type | None:
        if self.type_path is None:
            return None
        mod, _, name = self.type_path.partition(":")
        return getattr(importlib.import_module(mod), name)

    def check(self, doc: Any, where: str) -> None:
        """Raise :class:`DataError` when a checked-dict document lacks a declared key."""
        if not self.keys:
            return
        if not isinstance(doc, dict):
            raise DataError(f"{where}: artifact '{self.key}' must be a JSON object; got "
                            f"{type(doc).__name__}. It was not written by this medscalpel.")
        missing = [k for k in self.keys if k not in doc]
        if missing:
            raise DataError(f"{where}: artifact '{self.key}' lacks the key(s) {missing} "
                            f"declared in medscalpel/layout.py; re-run the stage "
                            f"'{self.stage}' with this medscalpel version.")


def _a(key: str, path: str, stage: str, type_path: str | None = None,
       keys: tuple[str, ...] = (), description: str = "") -> tuple[str, Artifact]:
    return key, Artifact(key, path, stage, type_path, keys, description)


#: every artifact of a run directory, by key
ARTIFACTS: dict[str, Artifact] = dict([
    _a("manifest", "manifest.json", "any", None, ("command", "config", "versions"),
       "command, config, package versions, seed, git commit, data spec and hash"),
    _a("demo", "demo.json", "demo", None, ("profile", "settings", "seconds", "stages"),
       "the demo's profile, its settings and each stage's name, seconds and status"),
    _a("phantom_data", "data/phantom/labels.csv", "phantom", None, (),
       "the phantom dataset: images.npz, masks.npz and this label table"),
    _a("phantom_preview", "data/phantom_preview.png", "phantom", None, (),
       "contact sheet of phantom images"),
    _a("label_stats", "data/stats/stats.json", "stats", "medscalpel.data.stats:LabelStats", (),
       "label statistics of the training split (prevalence, co-occurrence, evidence)"),
    _a("baseline_metrics", "baseline/metrics.json", "baseline", None,
       ("classes", "macro", "split", "n"), "EvalResult of the dense model on the test split"),
    _a("baseline_train", "baseline/train.json", "baseline", None, ("history",),
       "training history"),
    _a("baseline_card", "baseline/model/model.json", "baseline",
       "medscalpel.models.checkpoint:ModelCard", (), "the dense model's card"),
    _a("predictions", "baseline/predictions/{split}.npz", "baseline", None, (),
       "Predictions of the dense model per split"),
    _a("features", "baseline/predictions/{split}_features.npz", "baseline", None, (),
       "cached penultimate Features per split"),
    _a("calibrated_card", "calibrate/model/model.json", "calibrate",
       "medscalpel.models.checkpoint:ModelCard", (),
       "the card of the model with its calibrated thresholds (the model the later stages use)"),
    _a("calibration", "calibrate/calibration.json", "calibrate", None, ("fit_split",),
       "threshold calibration (calibrator, evaluation) or temperature scaling of the model "
       "(repair calibrate; the demo fits thresholds on the validation split)"),
    _a("guarantee", "calibrate/guarantee.json", "repair calibrate",
       "medscalpel.repair.conformal:GuaranteeResult", (),
       "per-class thresholds with a finite-sample guarantee (repair calibrate --guarantee)"),
    _a("guarantee_check", "calibrate/guarantee_check.json", "repair calibrate",
       "medscalpel.repair.conformal:Recertification", (),
       "the guarantee re-checked on held-out images: pass / fail / undecided"),
    _a("label_shift_transfer", "calibrate/label_shift_transfer.json", "repair calibrate",
       "medscalpel.repair.label_shift:LabelShiftTransfer", (),
       "the guarantee carried to a new site without labels (pure label shift), or why not"),
    _a("compress", "compress/compress.json", "compress",
       "medscalpel.compress.contract:CompressionTable", (),
       "one row per compressed model: params, MACs, latency, paired accuracy delta"),
    _a("export", "compress/export/export.json", "compress", None, ("onnx_path",),
       "ONNX export of the best structured model: parity and latency"),
    _a("external_comparison", "external_comparison.json", "compress prune", None,
       ("spec", "comparison", "verdict"),
       "compressed vs unpruned on a second site (compress prune --external): paired deltas "
       "and the non-inferiority verdict"),
    _a("deploy", "deploy/deploy.json", "deploy",
       "medscalpel.deploy.result:DeployResult", (),
       "runtime x precision benchmark, parity, accuracy floor, recommendation"),
    _a("sweep_index", "sweep/index.json", "sweep", "medscalpel.cells:CellIndex", (),
       "the unstructured sparsity sweep: one typed cell per (model, method, seed, ratio)"),
    _a("forgettability", "audit/forgettability/forgettability.json", "audit", None,
       ("class_names", "levels", "table"), "forgettability curves and FCD"),
    _a("pies", "audit/pies/pies.json", "audit", None, ("n_pies",),
       "pruning-identified exemplars"),
    _a("changes", "audit/changes/changes.json", "changes",
       "medscalpel.audit.changes:ChangesAudit", (),
       "what compression changed: calibration, explanations, subgroups, robustness"),
    _a("cams", "explain/cams/cams.json", "explain", None, ("method", "images"),
       "CAMs of example images with lung-zone reports"),
    _a("polarity", "explain/polarity/polarity.json", "explain", None,
       ("class_names", "counts"), "polarized classifier channels"),
    _a("polarity_stages", "explain/polarity/stages.json", "explain", None, ("stages",),
       "polarized channels across model stages (the demo's compressed models; explain "
       "polarity --compare-with)"),
    _a("surgery", "repair/surgery/surgery.json", "repair", None,
       ("success", "goal", "false_positives_still_above_threshold"),
       "surgical correction of one classifier row (with every goal tried)"),
    _a("triage", "repair/triage/decision_log.json", "repair", None,
       ("classes", "settings"), "the treatment router's decision log"),
    _a("site_shift", "shift/site_shift.json", "shift",
       "medscalpel.repair.shift_flow:SiteShiftReport", (),
       "internal vs external site, shift check, k-shot recalibration"),
    _a("distill", "distill/distill.json", "distill", None,
       ("teacher", "students", "config"), "knowledge distillation"),
    # results of single commands, at the top of their own run directory
    _a("model", "model/model.json", "any command that makes a model",
       "medscalpel.models.checkpoint:ModelCard", (),
       "the card of the model a single command made (train, compress, repair, ...): "
       "give its folder to --model"),
    _a("imported_model", "model.json", "models import / import-xrv",
       "medscalpel.models.checkpoint:ModelCard", (),
       "the card of an imported model: the run directory is the model directory "
       "(model.safetensors beside it), give it to --model"),
    _a("phantom_dataset", "labels.csv", "data phantom", None, (),
       "the phantom of 'data phantom --out DIR' (images.npz, masks.npz, groundtruth.csv, "
       "phantom.json beside it): the dataset the spec phantom:DIR opens"),
    _a("phantom_sheet", "preview.png", "data phantom --preview", None, (),
       "contact sheet of the phantom of 'data phantom': examples per finding, masks outlined"),
    _a("metrics", "metrics.json", "evaluate / train", None, ("classes", "macro", "split", "n"),
       "EvalResult of one model on one split (evaluate; train's test split)"),
    _a("fit", "train.json", "train", None, ("model_dir", "train", "test"),
       "what 'train' / 'scale train' did: model directory, training history, test metrics"),
    _a("predictions_meta", "predictions.json", "predict", None, ("class_names", "n"),
       "what 'predict' / 'predictions import' predicted (predictions.npz beside it)"),
    _a("predictions_file", "predictions.npz", "predict", None, (),
       "the Predictions of one model on one split (logits, labels, ids; predict)"),
    _a("findings_csv", "predictions.csv", "predict", None, (),
       "per-image table of every class's probability and the findings (predict)"),
    _a("external", "external.json", "evaluate --external", None, ("internal", "external"),
       "internal vs external set at the stored operating point"),
    _a("external_predictions", "external_predictions.npz", "evaluate --external", None, (),
       "the Predictions of the model on the external set"),
    _a("external_reliability", "reliability.png", "evaluate --external", None, (),
       "reliability diagram of the internal and the external set"),
    _a("compression_report", "report.json", "compress METHOD", None,
       ("method", "settings", "verification", "params_before", "params_after"),
       "what one compressor did (model/ beside it): the compressor's own report"),
    _a("prune", "prune.json", "compress prune", None, ("params_before", "params_after"),
       "structured pruning: what was removed, MACs, latency, accuracy"),
    _a("onnx_export", "export.json", "compress export", None, ("onnx_path", "parity"),
       "ONNX export of one model: parity and latency"),
    _a("students", "students.json", "compress students", None, ("chosen", "candidates"),
       "candidate students under a latency budget"),
    _a("sweep_grid", "index.json", "compress sweep / scale prune|distill|triage",
       "medscalpel.cells:CellIndex", (),
       "a grid that is its own run directory (compress sweep / scale prune|distill|triage "
       "--out, resumable in place): one typed cell per (model, method, seed, ratio), per "
       "student, per router setting; a sweep's or pruning grid's folder is what audit "
       "forgettability / pies read"),
    _a("cam_result", "cams.json", "explain cam", None, ("method",),
       "CAMs of one class on a few images (and the artifact that made them)"),
    _a("attribution", "attribution.json", "explain attribute", None, ("method",),
       "attributions (IG, LRP, backtrace) of one class on a few images"),
    _a("channels", "channels.json", "explain channels", None, ("class", "rows"),
       "the classifier channels that carry one class's evidence"),
    _a("comparison", "comparison.json", "explain compare", None, ("classes",),
       "teacher vs student saliency agreement (explain compare), or a paired comparison with a "
       "reference (evaluate --reference)"),
    _a("retrain", "retrain.json", "repair retrain", None,
       ("method", "auroc_before", "auroc_after"),
       "partial retraining of the classifier: AUROC before / after"),
    _a("recalibration", "recalibration.json", "repair recalibrate-site", None, ("kind",),
       "k-shot recalibration for a new site"),
    _a("clinical_reports", "clinical.json", "report clinical", None, ("reports",),
       "per-image clinical reports of 'report clinical'"),
    _a("clinical_index", "reports/clinical/index.json", "reports", None, ("reports",),
       "index of the per-image clinical reports"),
    _a("experiment_report", "reports/experiment.html", "reports", None, (),
       "the experiment report (one self-contained page)"),
    _a("experiment_page", "report.html", "report experiment", None, (),
       "the experiment report of a run directory, written into it (report experiment "
       "without --out; --out FILE.html writes it there)"),
    _a("experiment_summary", "report.summary.json", "report experiment", None,
       ("kind", "present", "not_run"),
       "what each section of the experiment page found, beside the page (FILE.summary.json "
       "of --out FILE.html; not report.json, which is a compressor's report in its run)"),
])


#: where single commands of medscalpel < 0.2 wrote artifacts that now sit at their declared
#: path (``compress deploy --out RUN`` wrote ``RUN/deploy.json``): read, never written, until
#: :data:`LEGACY_REMOVED_IN`, so that ``show`` and the report still open older run directories
LEGACY_PATHS: dict[str, str] = {
    "label_stats": "stats.json", "calibration": "calibration.json",
    "guarantee": "guarantee.json", "guarantee_check": "guarantee_check.json",
    "label_shift_transfer": "label_shift_transfer.json", "deploy": "deploy.json",
    "forgettability": "forgettability.json", "pies": "pies.json", "changes": "changes.json",
    "polarity": "polarity.json", "surgery": "surgery.json", "triage": "decision_log.json",
    "site_shift": "site_shift.json", "distill": "distill.json",
    "polarity_stages": "stages.json",
}
LEGACY_SINCE, LEGACY_REMOVED_IN = "0.1.0", "0.2.0"


def legacy_paths(key: str) -> tuple[str, ...]:
    """The old location of artifact ``key`` (:data:`LEGACY_PATHS`), until its removal."""
    def v(x: str) -> tuple[int, ...]:
        return tuple(int(p) for p in x.split(".")[:3])

    if key not in LEGACY_PATHS or v(__version__) >= v(LEGACY_REMOVED_IN):
        return ()
    return (LEGACY_PATHS[key],)


def artifact(key: str) -> Artifact:
    if key not in ARTIFACTS:
        raise DataError(f"Unknown artifact '{key}'. Valid names: {', '.join(sorted(ARTIFACTS))}.")
    return ARTIFACTS[key]


def write_artifact(run_dir: str | os.PathLike, key: str, obj: Any, **fmt: Any) -> Path:
    """Write a JSON artifact (an object with ``to_dict()`` or a dict) atomically at its declared
    ``path`` in ``run_dir``, checking it against its declaration first. The demo's stages and
    the single commands write the same relative paths."""
    a = artifact(key)
    return write_json(a.path_in(run_dir, **fmt), _checked_doc(a, obj, a.relpath(**fmt)))


def _checked_doc(a: Artifact, obj: Any, where: str) -> Any:
    """The JSON document of ``obj`` after checking it against artifact ``a``'s declaration."""
    if not a.is_json:
        raise DataError(f"'{a.key}' ({a.path}) is not a JSON artifact; write it to "
                        f"artifact('{a.key}').path_in(run_dir) with its own writer.")
    t = a.result_type()
    if t is not None and not isinstance(obj, t):
        raise DataError(f"Artifact '{a.key}' holds a {t.__name__}; got {type(obj).__name__}.")
    doc = obj.to_dict() if hasattr(obj, "to_dict") else obj
    a.check(doc, f"writing {where}")
    return doc


def write_artifact_at(folder: str | os.PathLike, key: str, obj: Any, **fmt: Any) -> Path:
    """Write a JSON artifact, checked as :func:`write_artifact` does, as ``folder/<its file
    name>``: for a library function that is given its output folder (a stage passes
    ``ctx.dir_of(key)``, so the file lands at its declared path)."""
    a = artifact(key)
    name = a.filename.format(**fmt)
    return write_json(Path(folder) / name, _checked_doc(a, obj, name))


def read_artifact(run_dir: str | os.PathLike, key: str, **fmt: Any) -> Any:
    """Read a JSON artifact: its typed object, or the checked dict.

    Raises:
        DataError: the file is missing, or lacks a declared key (the message names both).
    """
    a = artifact(key)
    rel = a.locate(run_dir, **fmt)
    if rel is None:
        raise DataError(f"{a.path_in(run_dir, **fmt)} does not exist: the stage '{a.stage}' did "
                        "not run in this run directory.")
    p = Path(run_dir) / rel
    doc = read_json(p)
    t = a.result_type()
    if t is not None:
        return t.from_dict(doc)
    a.check(doc, str(p))
    return doc
