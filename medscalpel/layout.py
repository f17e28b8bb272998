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
    # where single-command runs write the same artifact (e.g. 'evaluate --out' -> metrics.json)
    aliases: tuple[str, ...] = ()

    @property
    def is_json(self) -> bool:
        return self.path.endswith(".json")

    def relpath(self, **fmt: Any) -> str:
        try:
            return self.path.format(**fmt)
        except KeyError as exc:
            raise DataError(f"Artifact '{self.key}' ({self.path}) needs the placeholder "
                            f"{exc.args[0]!r}; pass {exc.args[0]}=...") from None

    def path_in(self, run_dir: str | os.PathLike, **fmt: Any) -> Path:
        return Path(run_dir) / self.relpath(**fmt)

    @property
    def command_path(self) -> str:
        """Where the single command that makes this artifact writes it in ITS run directory
        (``compress prune --out RUN`` -> ``RUN/prune.json``): the first alias, else ``path``."""
        return self.aliases[0] if self.aliases else self.path

    def exists(self, run_dir: str | os.PathLike, **fmt: Any) -> bool:
        return self.path_in(run_dir, **fmt).exists()

    def locate(self, run_dir: str | os.PathLike, **fmt: Any) -> str | None:
        """The relative path where ``run_dir`` holds this artifact: its declared path, else the
        first alias that exists (a single-command run), else ``None``."""
        for rel in (self.relpath(**fmt), *self.aliases):
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
       keys: tuple[str, ...] = (), description: str = "",
       aliases: tuple[str, ...] = ()) -> tuple[str, Artifact]:
    return key, Artifact(key, path, stage, type_path, keys, description, aliases)


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
       "label statistics of the training split (prevalence, co-occurrence, evidence)",
       ("stats.json",)),
    _a("baseline_metrics", "baseline/metrics.json", "baseline", None,
       ("classes", "macro", "split", "n"), "EvalResult of the dense model on the test split",
       ("metrics.json",)),
    _a("baseline_train", "baseline/train.json", "baseline", None, ("history",),
       "training history"),
    _a("baseline_card", "baseline/model/model.json", "baseline",
       "medscalpel.models.checkpoint:ModelCard", (), "the dense model's card",
       ("model/model.json",)),
    _a("predictions", "baseline/predictions/{split}.npz", "baseline", None, (),
       "Predictions of the dense model per split"),
    _a("features", "baseline/predictions/{split}_features.npz", "baseline", None, (),
       "cached penultimate Features per split"),
    _a("calibrated_card", "calibrate/model/model.json", "calibrate",
       "medscalpel.models.checkpoint:ModelCard", (),
       "the card of the model with its calibrated thresholds (the model the later stages use)"),
    _a("calibration", "calibrate/calibration.json", "calibrate", None,
       ("fit_split", "calibrator", "evaluation"), "threshold calibration on the validation split",
       ("calibration.json",)),
    _a("guarantee", "calibrate/guarantee.json", "repair calibrate",
       "medscalpel.repair.conformal:GuaranteeResult", (),
       "per-class thresholds with a finite-sample guarantee (repair calibrate --guarantee)",
       ("guarantee.json",)),
    _a("guarantee_check", "calibrate/guarantee_check.json", "repair calibrate",
       "medscalpel.repair.conformal:Recertification", (),
       "the guarantee re-checked on held-out images: pass / fail / undecided",
       ("guarantee_check.json",)),
    _a("label_shift_transfer", "calibrate/label_shift_transfer.json", "repair calibrate",
       "medscalpel.repair.label_shift:LabelShiftTransfer", (),
       "the guarantee carried to a new site without labels (pure label shift), or why not",
       ("label_shift_transfer.json",)),
    _a("compress", "compress/compress.json", "compress",
       "medscalpel.compress.contract:CompressionTable", (),
       "one row per compressed model: params, MACs, latency, paired accuracy delta"),
    _a("export", "compress/export/export.json", "compress", None, ("onnx_path",),
       "ONNX export of the best structured model: parity and latency"),
    _a("external_comparison", "external_comparison.json", "compress prune", None,
       ("spec", "comparison", "verdict"),
       "compressed vs unpruned on a second site (compress prune --external): paired deltas "
       "and the non-inferiority verdict"),
    _a("deploy", "compress/deploy/deploy.json", "deploy",
       "medscalpel.deploy.result:DeployResult", (),
       "runtime x precision benchmark, parity, accuracy floor, recommendation",
       ("deploy.json",)),
    _a("sweep_index", "sweep/index.json", "sweep", "medscalpel.cells:CellIndex", (),
       "the unstructured sparsity sweep: one typed cell per (model, method, seed, ratio)"),
    _a("forgettability", "audit/forgettability/forgettability.json", "audit", None,
       ("class_names", "levels", "table"), "forgettability curves and FCD",
       ("forgettability.json",)),
    _a("pies", "audit/pies/pies.json", "audit", None, ("n_pies",),
       "pruning-identified exemplars", ("pies.json",)),
    _a("changes", "audit/changes/changes.json", "changes",
       "medscalpel.audit.changes:ChangesAudit", (),
       "what compression changed: calibration, explanations, subgroups, robustness",
       ("changes.json",)),
    _a("cams", "explain/cams/cams.json", "explain", None, ("method", "images"),
       "CAMs of example images with lung-zone reports"),
    _a("polarity", "explain/polarity/polarity.json", "explain", None,
       ("class_names", "counts"), "polarized classifier channels", ("polarity.json",)),
    _a("surgery", "repair/surgery/surgery.json", "repair", None,
       ("success", "goal", "false_positives_still_above_threshold"),
       "surgical correction of one classifier row (with every goal tried)", ("surgery.json",)),
    _a("triage", "repair/triage/decision_log.json", "repair", None,
       ("classes", "settings"), "the treatment router's decision log",
       ("decision_log.json",)),
    _a("site_shift", "shift/site_shift.json", "shift",
       "medscalpel.repair.shift_flow:SiteShiftReport", (),
       "internal vs external site, shift check, k-shot recalibration",
       ("site_shift.json",)),
    _a("distill", "distill/distill.json", "distill", None,
       ("teacher", "students", "config"), "knowledge distillation", ("distill.json",)),
    # results of single commands, at the top of their own run directory
    _a("fit", "train.json", "train", None, ("model_dir", "train", "test"),
       "what 'train' / 'scale train' did: model directory, training history, test metrics"),
    _a("predictions_meta", "predictions.json", "predict", None, ("class_names", "n"),
       "what 'predict' / 'predictions import' predicted (predictions.npz beside it)"),
    _a("external", "external.json", "evaluate --external", None, ("internal", "external"),
       "internal vs external set at the stored operating point"),
    _a("compression_report", "report.json", "compress METHOD", None,
       ("method", "settings", "verification", "params_before", "params_after"),
       "what one compressor did (model/ beside it): the compressor's own report"),
    _a("prune", "prune.json", "compress prune", None, ("params_before", "params_after"),
       "structured pruning: what was removed, MACs, latency, accuracy"),
    _a("onnx_export", "export.json", "compress export", None, ("onnx_path", "parity"),
       "ONNX export of one model: parity and latency"),
    _a("students", "students.json", "compress students", None, ("chosen", "candidates"),
       "candidate students under a latency budget"),
    _a("cam_result", "cams.json", "explain cam", None, ("method",),
       "CAMs of one class on a few images (and the artifact that made them)"),
    _a("attribution", "attribution.json", "explain attribute", None, ("method",),
       "attributions (IG, LRP, backtrace) of one class on a few images"),
    _a("channels", "channels.json", "explain channels", None, ("class", "rows"),
       "the classifier channels that carry one class's evidence"),
    _a("comparison", "comparison.json", "explain compare", None, ("classes",),
       "teacher vs student saliency agreement (explain compare), or a paired comparison with a "
       "reference (evaluate --reference)"),
    _a("polarity_stages", "stages.json", "audit polarity", None, ("stages",),
       "polarized channels across model stages (--compare-with)"),
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
])


def artifact(key: str) -> Artifact:
    if key not in ARTIFACTS:
        raise DataError(f"Unknown artifact '{key}'. Valid names: {', '.join(sorted(ARTIFACTS))}.")
    return ARTIFACTS[key]


def write_artifact(run_dir: str | os.PathLike, key: str, obj: Any, *, command: bool = False,
                   **fmt: Any) -> Path:
    """Write a JSON artifact (an object with ``to_dict()`` or a dict) atomically, checking it
    against its declaration first: at its declared ``path`` in an experiment's run directory,
    or (``command=True``) at its :attr:`Artifact.command_path` in the run directory of the
    single command that made it."""
    a = artifact(key)
    if command:
        a = Artifact(a.key, a.command_path, a.stage, a.type_path, a.keys, a.description)
    if not a.is_json:
        raise DataError(f"write_artifact: '{key}' ({a.path}) is not a JSON artifact; write it "
                        f"to artifact('{key}').path_in(run_dir) with its own writer.")
    t = a.result_type()
    if t is not None and not isinstance(obj, t):
        raise DataError(f"write_artifact: '{key}' holds a {t.__name__}; got "
                        f"{type(obj).__name__}.")
    doc = obj.to_dict() if hasattr(obj, "to_dict") else obj
    a.check(doc, f"writing {a.relpath(**fmt)}")
    return write_json(a.path_in(run_dir, **fmt), doc)


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
