"""The two torch ONNX exporters side by side on every zoo architecture (issue T): the
dynamo-based one (``torch.onnx.export(dynamo=True)`` + onnxscript, what ``export_onnx_file``
uses) and the TorchScript one (the fallback), each through ``export_onnx_file`` with the same
random weights (seed 0, 3 classes, 1 channel). Per exporter: whether it succeeded (the error
otherwise), the opset written, export seconds (one run, on a shared CPU: indicative only), the
file size, max |delta output| vs torch in onnxruntime at batch 1 and 3 (the export example has
batch 2 for dynamo, 1 for TorchScript: the batch axis is dynamic) and in OpenVINO (f32 hint) at
batch 3, and the ONNX op count. CamHead (logits + CAM) on densenet_tiny and resnet_tiny too.
``opset17_probe``: the dynamo exporter asked for opset 17 directly (its down-conversion from 18),
with the opset the file then declares (why ``export_onnx_file`` sends opset < 18 to TorchScript).

    nice -n 10 .venv/bin/python benchmarks/export_exporters_bench.py
    nice -n 10 .venv/bin/python benchmarks/export_exporters_bench.py --probe-only  # keeps rows

writes ``benchmarks/results/export_exporters.json``.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, save_result  # noqa: E402

from medscalpel.deploy.cam_head import CamHead  # noqa: E402
from medscalpel.deploy.export import export_onnx_file, ort_session  # noqa: E402
from medscalpel.models.zoo import ARCHS, create_model  # noqa: E402

SIZES = {"deit_tiny": 224, "visformer_small": 224, "densenet121": 64, "densenet_small": 64,
         "resnet50": 64, "vgg19_bn": 64, "mobilenetv3_large_100": 64,
         "mobilenetv3_small_100": 64, "efficientnet_b0": 64}


def _torch_out(model, x) -> list[np.ndarray]:
    with torch.no_grad():
        out = model.eval()(x)
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _one(model, size: int, exporter: str, tmp: Path) -> dict[str, Any]:
    path = tmp / f"{exporter}.onnx"
    t0 = time.perf_counter()
    try:
        info = export_onnx_file(model, path, (1, size, size), exporter=exporter)
    except Exception as exc:  # noqa: BLE001 - the error is the finding
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:600]}
    row: dict[str, Any] = {"ok": True, "opset": info["opset"],
                           "export_s": round(time.perf_counter() - t0, 2),
                           "file_bytes": path.stat().st_size,
                           "nodes": len(onnx.load(str(path)).graph.node)}
    gen = torch.Generator().manual_seed(1)
    sess = ort_session(path, 1)
    for b in (1, 3):
        x = torch.randn(b, 1, size, size, generator=gen)
        got = sess.run(None, {"images": x.numpy()})
        row[f"ort_max_abs_delta_b{b}"] = max(float(np.abs(g - r).max())
                                             for g, r in zip(got, _torch_out(model, x)))
    try:
        import openvino as ov

        from medscalpel.deploy.runtimes import compile_openvino

        compiled = compile_openvino(ov.Core().read_model(str(path)), "f32", 1)
        x = torch.randn(3, 1, size, size, generator=gen)
        res = compiled(x.numpy())
        row["openvino_f32_max_abs_delta_b3"] = max(
            float(np.abs(res[compiled.output(i)] - r).max())
            for i, r in enumerate(_torch_out(model, x)))
    except ImportError:
        row["openvino_f32_max_abs_delta_b3"] = None
    return row


def _opset17_probe(arch: str, tmp: Path) -> dict[str, Any]:
    """The dynamo exporter at opset 17: the opset the file declares and the converter's error
    (onnxscript logs it and keeps opset 18)."""
    torch.manual_seed(0)
    model = create_model(arch, 3, img_size=32).eval()
    errors: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info and record.exc_info[1] is not None:
                errors.append(f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}")

    handler = Catch(level=logging.DEBUG)
    root = logging.getLogger("onnxscript")
    root.addHandler(handler)
    try:
        with torch.no_grad():
            prog = torch.onnx.export(model, (torch.zeros(2, 1, 32, 32),), dynamo=True,
                                     opset_version=17, input_names=["images"],
                                     output_names=["logits"], verbose=False,
                                     dynamic_shapes=({0: torch.export.Dim("batch")},))
        prog.save(str(tmp / "p.onnx"), external_data=False)
    finally:
        root.removeHandler(handler)
    declared = [int(o.version) for o in onnx.load(str(tmp / "p.onnx")).opset_import
                if o.domain in ("", "ai.onnx")]
    return {"arch": arch, "requested": 17, "declared": declared[0] if declared else None,
            "converter_errors": [e[:300] for e in errors]}


def main(probe_only: bool = False) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        probe = [_opset17_probe(a, Path(tmp)) for a in ("densenet_tiny", "vit_test")]
    print(probe, flush=True)
    if probe_only:
        old = json.loads((RESULTS / "export_exporters.json").read_text())
        save_result("export_exporters", {"rows": old["results"]["rows"], "opset17_probe": probe,
                                         "rows_date": old["date"]}, old["config"])
        return
    rows = []
    cases = [(a, False) for a in sorted(ARCHS.names())] + [("densenet_tiny", True),
                                                            ("resnet_tiny", True)]
    for arch, cam in cases:
        size = SIZES.get(arch, 32)
        torch.manual_seed(0)
        model = create_model(arch, 3, img_size=size).eval()
        if cam:
            model = CamHead(model).eval()
        with torch.no_grad():
            scale = max(float(np.abs(o).max()) for o in _torch_out(model, torch.randn(
                3, 1, size, size, generator=torch.Generator().manual_seed(1))))
        row = {"model": f"CamHead({arch})" if cam else arch, "size": size,
               "max_abs_output": scale}
        with tempfile.TemporaryDirectory() as tmp:
            for exporter in ("dynamo", "torchscript"):
                row[exporter] = _one(model, size, exporter, Path(tmp))
        rows.append(row)
        print(row, flush=True)
    save_result("export_exporters", {"rows": rows, "opset17_probe": probe},
                {"classes": 3, "channels": 1, "seed": 0, "sizes": SIZES, "default_size": 32,
                 "opset": 18})


if __name__ == "__main__":
    main("--probe-only" in sys.argv[1:])
