"""Writing what ``deploy`` chose: the served artifact (``serve/``) with its input contract
(``serve.json``) and the float32 exports (``export/``)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from torch import nn

from medscalpel.deploy.result import VariantResult
from medscalpel.errors import ConfigError
from medscalpel.models.checkpoint import save_model

OWNER = "deploy"


def serve_metadata(model: nn.Module, shape, variant: VariantResult,
                   files: list[str], explanation: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """The contract a server needs: runtime, precision, files, input name/shape/layout,
    normalisation, class names, task and decision thresholds (from the ModelCard), the
    operating point the decisions follow (``operating_point``: the card's, or the one derived
    from its thresholds / the uncalibrated default, which says so), and the
    outputs: ``logits`` and, when the artifact explains itself, ``cam`` (``explanation`` says
    what it is and how it was checked), and ``export``: which torch ONNX exporter wrote the
    served graph and why."""
    card = getattr(model, "card", None)
    inp = dict(card.input) if card is not None else {}
    op = card.decision_point() if card is not None else None
    served_cam = (explanation or {}).get("status") == "served"
    return {"schema_version": 1, "runtime": variant.runtime, "precision": variant.precision,
            "outputs": ["logits", "cam"] if served_cam else ["logits"],
            "explanation": explanation or {"status": "off"},
            "logits_only_files": ([f for f in files if f.startswith("logits_only/")]
                                  if served_cam else files),
            "variant": variant.name, "files": files, "input_name": "images",
            # which torch ONNX exporter wrote the served graph, and why (None: a torch variant)
            "export": ((explanation or {}).get("export") if served_cam
                       else variant.info.get("export")),
            "output_name": "logits", "input_shape": ["batch", *[int(s) for s in shape]],
            "layout": "NCHW", "mean": inp.get("mean"), "std": inp.get("std"), "input": inp,
            "class_names": list(card.class_names) if card is not None else None,
            "task": card.task if card is not None else None,
            "thresholds": card.effective_thresholds() if card is not None else None,
            "operating_point": op.to_dict() if op is not None else None,
            "model_id": card.model_id if card is not None else None,
            "output": "logits (sigmoid per class for multilabel, softmax for multiclass)"}


def _copy_files(files: list[Path], dest: Path) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    for f in files:
        target = "model" + "".join(f.suffixes[-1:])  # model.onnx / model.xml / model.bin
        shutil.copy2(f, dest / target)
        names.append(target)
    return names


def write_serve(dest: Path, model: nn.Module, chosen, shape, cam_rt=None) -> list[str]:
    """Copy the served artifact into ``dest``: the one with the CAM output when ``cam_rt`` was
    built (and the logits-only one in ``dest/logits_only``), else the logits-only one."""
    dest.mkdir(parents=True, exist_ok=True)
    if cam_rt is not None:
        names = _copy_files(cam_rt.serve_files(), dest)
        plain = _copy_files(chosen.rt.serve_files(), dest / "logits_only")
        return names + [f"logits_only/{n}" for n in plain]
    if chosen.rt.runtime.startswith("torch"):
        if getattr(model, "card", None) is None:
            raise ConfigError(f"{OWNER}: serving a torch variant needs a model with a ModelCard "
                              "(load it with load_model or set model.card).")
        save_model(model, dest)
        return sorted(p.name for p in dest.iterdir())
    return _copy_files(chosen.rt.serve_files(), dest)


def copy_exports(workdir: Path, dest: Path) -> list[str]:
    out = []
    for sub in ("onnx", "openvino"):
        for f in sorted((workdir / sub).glob("model.*")) if (workdir / sub).is_dir() else []:
            if f.name.startswith("model.int8") or ".int8" in f.name:
                continue  # quantised files live in serve/ when chosen
            (dest / "export").mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest / "export" / f.name)
            out.append(f"export/{f.name}")
    return out


__all__ = ["copy_exports", "serve_metadata", "write_serve"]
