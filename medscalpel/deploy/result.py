"""Result types of :func:`medscalpel.deploy.flow.deploy`: one :class:`VariantResult` per
runtime x precision and the :class:`DeployResult` (``deploy.json``) with its markdown table."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from medscalpel.errors import DataError
from medscalpel.layout import artifact, write_artifact_at
from medscalpel.runs import read_json, write_text

SCHEMA = 1
DEPLOY_JSON = artifact("deploy").filename
DEPLOY_MD = "deploy.md"

#: statuses: ``go`` (may be served), ``no-go`` (measured, not recommended), ``undecided`` (the
#: accuracy floor was neither shown met nor shown missed: not served), ``refused`` (failed
#: parity: artifact removed), ``error`` (export / compile failed), ``unavailable`` (not here)
STATUSES = ("go", "no-go", "undecided", "refused", "error", "unavailable")


@dataclass(frozen=True)
class VariantResult:
    """One runtime x precision as measured by :func:`~medscalpel.deploy.flow.deploy`.

    Attributes:
        latency: per batch key ``"b1"``, ``"b8"``: ``median_ms`` over the rounds, ``min_ms``,
            ``max_ms``, ``spread`` ((max - min) / median) and ``rounds_ms``.
        speedup_vs_torch: torch eager fp32 median / this median, per batch key.
        speedup_vs_fp32: the same runtime's fp32 median / this median (reduced precisions).
        parity_abs, parity_rel: max |delta logit| vs torch fp32 on the evaluation images, and the
            same divided by the reference logit scale (max |logit|).
        comparison: :class:`~medscalpel.engine.compare.PairedComparison` as a dict (per-class and
            macro delta AUROC with paired bootstrap CIs), or ``None``.
        mac_rate: effective GMAC/s per batch key (model MACs x batch / latency).
        peak_fraction: ``mac_rate`` / the peak measured in this run for this precision (the
            fastest GEMM of a size sweep at the same threads; above 1 the GEMM was no peak).
        theoretical_fraction: ``mac_rate`` / the theoretical bound from the CPU's features and
            nominal clock (``DeployResult.peak["theoretical"]`` states its assumptions).
        speed: per batch key, ``vs_torch`` and ``vs_fp32``:
            :class:`~medscalpel.deploy.timing.SpeedRatio` dicts (per-round ratios of one
            alternated run, their median, order-statistic interval, spread, noisy, outcome).
            ``speedup_vs_torch`` / ``speedup_vs_fp32`` are their medians.
    """

    name: str
    runtime: str
    precision: str
    status: str
    reasons: tuple[str, ...] = ()
    latency: dict[str, dict[str, Any]] = field(default_factory=dict)
    speedup_vs_torch: dict[str, float] = field(default_factory=dict)
    speedup_vs_fp32: dict[str, float] = field(default_factory=dict)
    parity_abs: float | None = None
    parity_rel: float | None = None
    parity_tolerance: float | None = None
    comparison: dict[str, Any] | None = None
    mac_rate: dict[str, float] = field(default_factory=dict)
    peak_fraction: dict[str, float] = field(default_factory=dict)
    peak_used: str = ""
    theoretical_fraction: dict[str, float] = field(default_factory=dict)
    speed: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the accuracy verdicts (:class:`~medscalpel.engine.decision.Verdict` dicts): "internal"
    #: (the evaluation split) and "external" (the second site, when given)
    verdicts: dict[str, dict[str, Any]] = field(default_factory=dict)
    external_comparison: dict[str, Any] | None = None
    #: the model card's guarantee re-certified on this variant's own logits
    #: (:class:`~medscalpel.repair.conformal.Recertification` dicts): "internal" / "external";
    #: empty when the card carries no guarantee or the variant did not meet the floor
    recertification: dict[str, dict[str, Any]] = field(default_factory=dict)
    prepare_seconds: float | None = None
    file_bytes: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def go(self) -> bool:
        return self.status == "go"

    @property
    def macro_delta_auroc(self) -> float | None:
        return None if self.comparison is None else self.comparison["macro"].get("delta_auroc")

    @property
    def worst_class_delta_auroc(self) -> float | None:
        if self.comparison is None:
            return None
        vals = [c["delta_auroc"] for c in self.comparison["classes"]
                if c.get("delta_auroc") is not None]
        return min(vals) if vals else None

    def median_ms(self, batch: int) -> float | None:
        return self.latency.get(f"b{batch}", {}).get("median_ms")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        d["macro_delta_auroc"] = self.macro_delta_auroc
        d["worst_class_delta_auroc"] = self.worst_class_delta_auroc
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VariantResult":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["reasons"] = tuple(kw.get("reasons", ()))
        return cls(**kw)


def export_line(export: dict[str, Any] | None) -> str:
    """Which torch ONNX exporter wrote the served graph, and why (``serve.json``'s ``export``)."""
    if not export:
        return "not exported (a torch variant is served, or a deploy from before this was kept)"
    line = f"torch's {export.get('exporter')} ONNX exporter, opset {export.get('opset')}"
    reason = export.get("reason")
    return line + (f" ({reason})" if reason else "") + (
        " -- a FALLBACK after the dynamo exporter failed" if export.get("fallback") else "")


def explanation_line(e: dict[str, Any]) -> str:
    """One sentence on the served artifact's CAM output (deploy.md, the CLI, the report)."""
    status = e.get("status", "off")
    if status != "served":
        return f"{status}: {e.get('reason', '')}".strip()
    cost = e.get("latency_cost", {})
    maps = e.get("maps_latency_cost")
    agree = e.get("served_vs_torch_fp32", {})
    eq = e.get("gradcam_equivalence", {})

    def pct(c: dict[str, Any]) -> str:
        return (f"{100 * c.get('cost', float('nan')):+.1f}% [{100 * c.get('low', float('nan')):+.1f}"
                f", {100 * c.get('high', float('nan')):+.1f}] vs target <= "
                f"{100 * c.get('target', 0.05):.0f}%: {c.get('outcome', 'not measured')}")

    # deploy.json from before the prediction path ran the logits-only subgraph: one cost, of a
    # call returning the maps
    costs = (f"latency cost at batch 1 of a prediction (logits-only subgraph) {pct(cost)}; of a "
             f"call returning the maps {pct(maps)}" if maps else
             f"latency cost at batch 1 {pct(cost)}")
    return (f"served (output 'cam', {e.get('support', {}).get('layer', '')} "
            f"{e.get('support', {}).get('map_shape')}); {costs}; "
            f"served vs torch fp32 CAM: median Spearman {_f(agree.get('median_spearman'))}, max "
            f"|delta| {_f(agree.get('max_abs_delta_maps'))}; torch CAM vs Grad-CAM max |delta| "
            f"{_f(eq.get('max_abs_delta'))} on {eq.get('images', 0)} images"
            + ("; the CAM output costs predictions more latency than the target: "
               "serve/logits_only/ holds the same variant without it (or deploy again with "
               "--no-explain)" if cost.get("outcome") == "fail" else ""))


def guarantee_lines(res: "DeployResult") -> list[str]:
    """The guarantee's headline, then one line per variant and set (deploy.md, the CLI)."""
    g = res.guarantee or {}
    if g.get("status") != "re-certified":
        return [g.get("reason") or f"not recorded ({DEPLOY_JSON} written before guarantees "
                                   "were re-certified)"]
    on = g.get("certified_on", {})
    head = (f"{g.get('spec')} (alpha {g.get('alpha')}), certified on {on.get('n_images')} "
            f"images of '{on.get('split')}'; {g.get('rule')}"
            + "".join(f"; {n}" for n in g.get("notes") or ()))
    lines = [head]
    for v in res.variants:
        if not v.recertification:
            lines.append(f"{v.name}: not re-certified ({v.status}: it did not meet the floor "
                         "or was not measured)")
            continue
        for where, d in v.recertification.items():
            rows = "; ".join(
                f"{r['name']} {r['outcome']} {_f(r.get('observed'))} "
                f"[{_f((r.get('ci') or [None])[0])}, {_f((r.get('ci') or [None, None])[1])}] "
                f"of {r.get('n')}" for r in d.get("rows", ()) if r.get("n") is not None)
            lines.append(f"{v.name} ({where}, {d.get('n_images')} images): "
                         f"{str(d.get('outcome')).upper()}: {rows}; "
                         f"{(d.get('min_k') or {}).get('statement', '')}")
    return lines


@dataclass(frozen=True)
class DeployResult:
    """What ``deploy`` measured and chose (``deploy.json``).

    Attributes:
        variants: every runtime x precision tried, in benchmark order.
        recommended: name of the fastest ``go`` variant at the first batch size (``None`` when
            no variant meets the floor: ``deploy`` then raises).
        reason: why it was chosen, in one sentence.
        peak: GMAC/s of an fp32 matmul (and int8 where measurable) measured in this run.
        loadavg: ``os.getloadavg()`` at the start and end; ``under_load`` labels the latency.
        serve: the served artifact: directory, files, runtime, precision, input contract.
    """

    model_id: str
    arch: str
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    task: str
    macs: int
    params: int
    batches: tuple[int, ...]
    rounds: int
    repeats: int
    threads: int
    split: str
    n_images: int
    n_calib: int
    calib_split: str
    floor: dict[str, float]
    variants: tuple[VariantResult, ...]
    recommended: str | None
    reason: str
    peak: dict[str, Any]
    cpu: dict[str, bool]
    loadavg: dict[str, list[float]]
    under_load: bool
    serve: dict[str, Any]
    notes: tuple[str, ...] = ()
    versions: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)
    #: the served artifact's CAM output: status (served / torch / not available / refused /
    #: off), why, the head check, agreement with Grad-CAM and torch fp32, latency cost
    explanation: dict[str, Any] = field(default_factory=dict)
    #: the external (second-site) set every variant was also judged on: split, n_images, spec
    external: dict[str, Any] = field(default_factory=dict)
    #: the model card's guarantee: ``status`` (re-certified / none), spec, where it was
    #: certified, the rule applied to the variants
    guarantee: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA

    def variant(self, name: str) -> VariantResult:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"no variant {name!r}; have {[v.name for v in self.variants]}")

    @property
    def chosen(self) -> VariantResult | None:
        return None if self.recommended is None else self.variant(self.recommended)

    def table(self) -> list[dict[str, Any]]:
        """One row per variant for the CLI / markdown."""
        rows = []
        for v in self.variants:
            row: dict[str, Any] = {"variant": v.name, "status": v.status}
            for b in self.batches:
                row[f"b{b} ms"] = v.median_ms(b)
                row[f"b{b} spread"] = v.latency.get(f"b{b}", {}).get("spread")
                row[f"b{b} x torch"] = v.speedup_vs_torch.get(f"b{b}")
            b0 = f"b{self.batches[0]}"
            st = v.speed.get(b0, {}).get("vs_torch")
            row[f"{b0} x torch interval"] = (None if st is None else
                                             f"[{st['low']:.2f}, {st['high']:.2f}] "
                                             f"{st['outcome']}")
            row.update({"x fp32 same rt": v.speedup_vs_fp32.get(b0), "parity rel": v.parity_rel,
                        "accuracy verdict": " / ".join(
                            f"{k} {d.get('outcome')}" for k, d in v.verdicts.items()) or None,
                        "guarantee": " / ".join(
                            f"{k} {d.get('outcome')}" for k, d in v.recertification.items())
                        or None,
                        "macro dAUROC": v.macro_delta_auroc,
                        "worst class dAUROC": v.worst_class_delta_auroc,
                        f"{b0} % peak": (None if v.peak_fraction.get(b0) is None
                                         else 100 * v.peak_fraction[b0]),
                        f"{b0} % theoretical": (None if v.theoretical_fraction.get(b0) is None
                                                else 100 * v.theoretical_fraction[b0]),
                        "why": "; ".join(v.reasons)})
            rows.append(row)
        return rows

    def markdown(self) -> str:
        rows = self.table()
        head = list(rows[0]) if rows else []
        out = [f"# Deployment of {self.arch} ({self.model_id})", "",
               f"Input {list(self.input_shape)}, {self.macs / 1e6:.1f} M MACs, "
               f"{self.params:,} parameters; {self.threads} thread(s); {self.rounds} alternated "
               f"rounds x {self.repeats} repeats; accuracy on {self.n_images} images of split "
               f"'{self.split}' (calibration: {self.n_calib} images of '{self.calib_split}')"
               + (f"; external: {self.external.get('n_images')} images of "
                  f"{self.external.get('spec') or self.external.get('split')}"
                  if self.external else "; no external set (internal floor only)") + ". "
               f"Floor: macro dAUROC >= {self.floor['macro']:+g}, every class >= "
               f"{self.floor['per_class']:+g}, shown by paired intervals (Holm over classes + "
               "macro); an undecided verdict is never served.", "",
               f"Load average (1/5/15 min) start {self.loadavg.get('start')}, end "
               f"{self.loadavg.get('end')}" + (" — latencies MEASURED UNDER LOAD."
                                               if self.under_load else "."), "",
               f"CPU: {self.machine.get('cpu', {}).get('model', 'not recorded')} (features: "
               f"{', '.join(self.machine.get('cpu', {}).get('features', [])) or 'not recorded'}"
               "); every speed below holds for this CPU only.", "",
               f"Peak fp32 GEMM: {_f(self.peak.get('fp32_gmacs'))} GMAC/s"
               + (f"; int8: {_f(self.peak.get('int8_gmacs'))} GMAC/s"
                  if self.peak.get("int8_gmacs") else "")
               + f" ({self.peak.get('method', 'one size')}); theoretical fp32 bound "
               f"{_f(self.peak.get('theoretical', {}).get('fp32_gmacs'))} GMAC/s "
               f"({self.peak.get('theoretical', {}).get('assumption', 'not computed')}).", "",
               "Speed ratios are medians of per-round ratios of one alternated run with an "
               "order-statistic interval; a variant is no-go for speed only when decisively "
               "slower, and variants within timing noise of the fastest are served by "
               "precision (fp32 > bf16 > int8).", "",
               "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(_f(r[k]) for k in head) + " |" for r in rows]
        out += ["", f"**Recommended:** {self.recommended or 'none'}: {self.reason}"]
        out += ["", "**Guarantee:** " + guarantee_lines(self)[0]]
        out += [f"- {line}" for line in guarantee_lines(self)[1:]]
        out += ["", "**Exported by:** " + export_line(self.serve.get("export"))]
        out += ["", "**Explanation output:** " + explanation_line(self.explanation)]
        out += [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["variants"] = [v.to_dict() for v in self.variants]
        for k in ("input_shape", "class_names", "batches", "notes"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DeployResult":
        if d.get("schema_version", 1) > SCHEMA:
            raise DataError(f"{DEPLOY_JSON} has schema version {d['schema_version']}, newer than "
                            f"this medscalpel ({SCHEMA}); upgrade medscalpel.")
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("variants", "recommended", "batches") if k not in d]
        if missing:
            raise DataError(f"{DEPLOY_JSON} lacks {missing}; it was not written by "
                            "medscalpel compress deploy or is damaged.")
        kw = {k: v for k, v in d.items() if k in known}
        kw["variants"] = tuple(VariantResult.from_dict(v) for v in d["variants"])
        for k in ("input_shape", "class_names", "batches", "notes"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        path = write_artifact_at(directory, "deploy", self)
        write_text(directory / DEPLOY_MD, self.markdown())
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "DeployResult":
        path = Path(directory)
        return cls.from_dict(read_json(path / DEPLOY_JSON if path.is_dir() else path))


def _f(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"
    return str(v)


__all__ = ["DEPLOY_JSON", "DEPLOY_MD", "DeployResult", "STATUSES", "VariantResult",
           "guarantee_lines"]
