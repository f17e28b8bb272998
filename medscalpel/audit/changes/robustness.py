"""Robustness: does the compressed model break sooner than the dense one under the
perturbations a chest X-ray really meets?

Corruptions (registry :data:`CORRUPTIONS`, three graded severities each) act on the grey image
in [0, 1] before normalisation: quantum ``noise``, ``blur`` (focal spot / motion), ``contrast``
(flat, over-penetrated film), ``gamma`` (a different LUT), ``jpeg`` (PACS compression),
``rotation`` (patient rotation), ``scale`` (magnification / collimation), ``lowres`` (a
down-sampled image brought back to size) and ``marker`` (a burned-in text / "AP" block).
Both models see the SAME corrupted images. Per class and severity: the AUROC of each model,
each model's drop from its clean AUROC with CIs, and the relative robustness ``drop(compressed)
- drop(dense)`` (below 0: the compressed model loses more) with a CI and a bootstrap p-value,
all from one joint resample of the images (the same multinomial image counts for every
corruption, severity and model), which also gives the compressed-vs-dense AUROC delta under the
corruption; the AUROC kernel is :func:`medscalpel.engine.compare.weighted_auroc` (vectorised over
replicates). All severities of one corruption go through each model in one batched pass.

"Less robust" is a family-wise claim: a cell is flagged when the decision primitive
(:func:`medscalpel.engine.decision.decide`, margin 0) shows ``relative < 0`` with Holm across the
family (the macro cells are one family, the per-class cells another), at one-sided
``(1 - confidence) / 2``. The old count of cells whose uncorrected interval lies below 0 is kept
as ``less_robust_uncorrected``, a labelled secondary number.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from medscalpel.audit.changes._util import (NAN, boot_weights, ci, fast_copy, logits_of, num,
                                            p_two_sided)
from medscalpel.engine.compare import weighted_auroc
from medscalpel.engine.decision import UnitInput, Verdict, decide
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError
from medscalpel.plotting import pyplot, save_figure
from medscalpel.progress import track
from medscalpel.registry import Registry
from medscalpel.validation import check_fraction, check_range

logger = logging.getLogger(__name__)

SCHEMA = 2   # 2: less_robust is Holm-corrected; less_robust_uncorrected, level_adj, verdicts

#: name -> ``fn(grey [N, H, W] in [0, 1], level, rng) -> grey``; :data:`LEVELS` holds the
#: parameter of severities 1, 2, 3.
CORRUPTIONS: Registry[Callable[..., torch.Tensor]] = Registry("corruption")
LEVELS: dict[str, tuple[float, float, float]] = {
    "noise": (0.03, 0.06, 0.12),      # gaussian sigma (grey levels / 1)
    "blur": (0.6, 1.2, 2.0),          # gaussian sigma in pixels at 64 px (scaled with size)
    "contrast": (0.75, 0.5, 0.3),     # contrast factor around the image mean
    "gamma": (1.5, 2.0, 3.0),         # gamma (>1 darkens the mid-tones)
    "jpeg": (40, 20, 8),              # JPEG quality
    "rotation": (4.0, 8.0, 12.0),     # degrees (alternating sign)
    "scale": (0.94, 0.88, 0.8),       # zoom-out factor (border filled with the edge mean)
    "lowres": (2, 3, 4),              # down-sampling factor
    "marker": (0.08, 0.12, 0.18),     # side of the burned-in block as a share of the image
}


@CORRUPTIONS.register("noise", help="additive gaussian noise")
def _noise(g: torch.Tensor, level: float, rng: np.random.Generator) -> torch.Tensor:
    z = torch.from_numpy(rng.standard_normal(tuple(g.shape)).astype(np.float32))
    return g + float(level) * z


def _gauss_kernel(sigma: float) -> torch.Tensor:
    r = max(1, int(np.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


@CORRUPTIONS.register("blur", help="gaussian blur (focal spot, motion)")
def _blur(g: torch.Tensor, level: float, rng: np.random.Generator) -> torch.Tensor:
    sigma = float(level) * g.shape[-1] / 64.0
    k = _gauss_kernel(sigma)
    r = (k.numel() - 1) // 2
    x = F.pad(g[:, None], (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x[:, 0]


@CORRUPTIONS.register("contrast", help="reduced contrast around the image mean")
def _contrast(g: torch.Tensor, level: float, rng: np.random.Generator) -> torch.Tensor:
    m = g.mean(dim=(-2, -1), keepdim=True)
    return m + float(level) * (g - m)


@CORRUPTIONS.register("gamma", help="a different display LUT (gamma)")
def _gamma(g: torch.Tensor, level: float, rng: np.random.Generator) -> torch.Tensor:
    return g.clamp(0, 1) ** float(level)


@CORRUPTIONS.register("jpeg", help="JPEG compression (PIL)")
def _jpeg(g: torch.Tensor, level: float, rng: np.random.Generator) -> torch.Tensor:

    out = []
    for img in (g.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy():
        buf = io.BytesIO()
        Image.fromarray(img, mode="L").save(buf, format="JPEG", quality=int(level))
        buf.seek(0)
        out.append(np.asarray(Image.open(buf).convert("L"), np.float32) / 255.0)
    return torch.from_numpy(np.stack(out))


def _affine(g: torch.Tensor, angle_deg: torch.Tensor, scale: float) -> torch.Tensor:
    a = angle_deg * np.pi / 180.0
    cos, sin = torch.cos(a) / scale, torch.sin(a) / scale
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, [g.shape[0], 1, *g.shape[-2:]], align_corners=False)
    edge = torch.cat([g[:, 0], g[:, -1], g[:, :, 0], g[:, :, -1]], 1).mean(1)
    x = F.grid_sample(g[:, None] - edge[:, None, None, None], grid, mode="bilinear",
                      padding_mode="zeros", align_corners=False)
    return x[:, 0] + edge[:, None, None]


@CORRUPTIONS.register("rotation", help="small in-plane rotation (alternating direction)")
def _rotation(g: torch.Tensor, level: float, rng: np.random.Generator) -> torch.Tensor:
    sign = torch.where(torch.arange(g.shape[0]) % 2 == 0, 1.0, -1.0)
    return _affine(g, sign * float(level), 1.0)


@CORRUPTIONS.register("scale", help="zoom out (magnification / collimation change)")
def _scale(g: torch.Tensor, level: float, rng: np.random.Generator) -> torch.Tensor:
    return _affine(g, torch.zeros(g.shape[0]), float(level))


@CORRUPTIONS.register("lowres", help="down-sampled then brought back to size")
def _lowres(g: torch.Tensor, level: float, rng: np.random.Generator) -> torch.Tensor:
    s = g.shape[-1]
    small = max(4, int(round(s / float(level))))
    x = F.interpolate(g[:, None], size=(small, small), mode="area")
    return F.interpolate(x, size=g.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


@CORRUPTIONS.register("marker", help="a burned-in bright text / 'AP' block, top right")
def _marker(g: torch.Tensor, level: float, rng: np.random.Generator) -> torch.Tensor:
    s = g.shape[-1]
    side = max(2, int(round(float(level) * s)))
    out = g.clone()
    y0, x0 = max(1, s // 32), s - side - max(1, s // 32)
    out[:, y0:y0 + side // 2, x0:x0 + side] = 0.97
    out[:, y0 + side // 4, x0 + side // 3:x0 + 2 * side // 3] = 0.3   # a 'letter' stroke
    return out


def corrupt(images: torch.Tensor, preprocess: Any, name: str, severity: int,
            seed: int = 0) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity`` (1-3) to normalised model input ``images``
    ``[N, C, H, W]`` (denormalise with ``preprocess``, corrupt the grey image, clip to [0, 1],
    normalise again)."""
    fn = CORRUPTIONS.get(name)
    check_range(severity, "severity", "corrupt", 1, 3, integer=True)
    grey = preprocess.denormalize(images.float())
    rng = np.random.default_rng([seed, severity, sum(map(ord, name))])
    g = fn(grey, LEVELS[name][severity - 1], rng).clamp(0, 1)
    return preprocess.normalize(g[:, None]).to(images.dtype)


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class RobustnessCell:
    """One corruption at one severity, one class (or ``cls == "macro"``)."""

    corruption: str
    severity: int
    cls: str
    auroc_ref: float
    auroc_new: float
    drop_ref: float                    # corrupted - clean AUROC of the dense model
    drop_ref_ci: tuple[float, float]
    drop_new: float
    drop_new_ci: tuple[float, float]
    relative: float                    # drop_new - drop_ref (< 0: compressed loses more)
    relative_ci: tuple[float, float]
    relative_p: float
    delta_auroc: float                 # compressed - dense under the corruption
    delta_auroc_ci: tuple[float, float]
    less_robust: bool                  # relative < 0 shown with Holm across the cell family
    less_robust_uncorrected: bool = False   # the uncorrected relative CI lies below 0
    level_adj: float = NAN             # one-sided Holm level the cell was judged at

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RobustnessCell":
        out = {}
        for k, v in d.items():
            if k.endswith("_ci"):
                out[k] = tuple(num(x) for x in v)
            elif k in ("corruption", "cls", "less_robust", "less_robust_uncorrected"):
                out[k] = bool(v) if k.startswith("less") else v
            elif k == "severity":
                out[k] = int(v)
            else:
                out[k] = num(v)
        return cls(**out)


@dataclass(frozen=True)
class RobustnessChange:
    """Dense vs compressed AUROC under graded corruptions, with relative robustness CIs."""

    cells: tuple[RobustnessCell, ...]
    clean: dict[str, Any]
    corruptions: tuple[str, ...]
    levels: dict[str, list[float]]
    n: int
    n_boot: int
    seed: int
    confidence: float
    schema_version: int = SCHEMA
    meta: dict[str, Any] = field(default_factory=dict)
    #: the "less robust" decisions, one Verdict per family ("macro", "per_class"); empty for a
    #: schema-1 file, whose flags are uncorrected
    verdicts: dict[str, Verdict] = field(default_factory=dict)

    def macro(self) -> list[RobustnessCell]:
        return [c for c in self.cells if c.cls == "macro"]

    def less_robust(self) -> list[RobustnessCell]:
        return [c for c in self.cells if c.less_robust]

    @property
    def correction(self) -> str:
        return ("holm" if self.verdicts else
                "none (schema-1 file: flags from uncorrected intervals)")

    def headline(self) -> str:
        """One line: Holm-corrected "less robust" count of the macro cells, the uncorrected
        count beside it as a labelled secondary number."""
        cells = self.macro()
        k = sum(c.less_robust for c in cells)
        if not self.verdicts:
            return (f"robustness: compressed less robust in {k} of {len(cells)} corruption x "
                    f"severity cells (macro; uncorrected {self.confidence:.0%} intervals, "
                    "schema-1 file)")
        v = self.verdicts["macro"]
        u = sum(c.less_robust_uncorrected for c in cells)
        return (f"robustness: compressed significantly less robust in {k} of {len(cells)} "
                f"corruption x severity cells (macro; Holm over {v.n_tests} cells, one-sided "
                f"alpha {v.alpha:g}); without correction ({self.confidence:.0%} intervals): "
                f"{u} of {len(cells)}")

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("cells", "verdicts")}
        d["cells"] = [c.to_dict() for c in self.cells]
        d["corruptions"] = list(self.corruptions)
        d["verdicts"] = {k: v.to_dict() for k, v in self.verdicts.items()}
        d["correction"] = self.correction
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RobustnessChange":
        cells = tuple(RobustnessCell.from_dict(c) for c in d["cells"])
        if int(d.get("schema_version", 1)) < 2:    # flags were uncorrected intervals
            cells = tuple(replace(c, less_robust_uncorrected=c.less_robust) for c in cells)
        return cls(cells=cells,
                   clean=dict(d["clean"]), corruptions=tuple(d["corruptions"]),
                   levels={k: list(v) for k, v in d["levels"].items()}, n=int(d["n"]),
                   n_boot=int(d["n_boot"]), seed=int(d["seed"]),
                   confidence=float(d["confidence"]), meta=dict(d.get("meta", {})),
                   schema_version=int(d.get("schema_version", 1)),
                   verdicts={k: Verdict.from_dict(v) for k, v in d.get("verdicts", {}).items()})

    def table(self) -> list[dict[str, Any]]:
        return [{"corruption": c.corruption, "severity": c.severity, "AUROC dense": c.auroc_ref,
                 "AUROC compressed": c.auroc_new, "drop dense": c.drop_ref,
                 "drop compressed": c.drop_new, "relative": c.relative,
                 "relative CI": c.relative_ci, "less robust (Holm)": c.less_robust,
                 "less robust (uncorrected)": c.less_robust_uncorrected}
                for c in self.macro()]


# ----------------------------------------------------------------------------- API
def robustness_change(
    dense: nn.Module,
    compressed: nn.Module,
    images: torch.Tensor,
    template: Predictions,
    preprocess: Any,
    *,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = (1, 2, 3),
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    batch_size: int = 64,
    clean_logits: tuple[np.ndarray, np.ndarray] | None = None,
    progress: bool | None = None,
) -> RobustnessChange:
    """AUROC of both models under each corruption and severity, relative robustness with CIs.

    Args:
        dense, compressed: the two models (called as ``model(x) -> logits``; left unchanged).
        images: normalised model input ``[N, C, H, W]`` of the audited images.
        template: a Predictions on those images (labels, ids, class names, task: e.g. the dense
            model's clean predictions).
        preprocess: the models' :class:`~medscalpel.data.transforms.Preprocess`.
        corruptions: names in :data:`CORRUPTIONS` (default: all).
        severities: subset of (1, 2, 3).
        clean_logits: the two models' logits on ``images`` when the caller has them (reused,
            not recomputed).

    Raises:
        ConfigError: unknown corruption or severity.
        DataError: images and template disagree.
    """
    names = _checked_grid(corruptions, severities, n_boot, confidence)
    if int(images.shape[0]) != template.n:
        raise DataError(f"robustness_change: {images.shape[0]} images but the template has "
                        f"{template.n} rows.")
    pred = lambda z: Predictions(z, template.labels, ids=template.ids,  # noqa: E731
                                 class_names=template.class_names, task=template.task,
                                 split=template.split)
    if clean_logits is None:
        clean_logits = (logits_of(dense, images, batch_size),
                        logits_of(compressed, images, batch_size))
    elif any(np.shape(z)[0] != template.n for z in clean_logits):
        raise DataError(f"robustness_change: clean_logits must have {template.n} rows each; "
                        f"got {[np.shape(z)[0] for z in clean_logits]}.")
    clean_r, clean_n = pred(np.asarray(clean_logits[0])), pred(np.asarray(clean_logits[1]))
    t = template.targets()
    w = boot_weights(template.n, n_boot, seed + 3)
    base = _aurocs(t, clean_r.probs(), clean_n.probs(), w)
    sevs = [int(s) for s in severities]
    n = template.n
    cells, rel_reps = _corrupted_cells(dense, compressed, images, preprocess, names, sevs, pred,
                                       t, base, w, seed, confidence, batch_size, progress)
    clean = _clean(base, w, confidence)
    cells, verdicts = _flag(cells, rel_reps, t, n, confidence)
    return RobustnessChange(
        cells=tuple(cells), verdicts=verdicts, clean=clean, corruptions=tuple(names),
        levels={c: list(LEVELS[c]) for c in names},
        n=template.n, n_boot=n_boot, seed=seed, confidence=confidence,
        meta={"severities": sevs, "bootstrap": "one joint resample of the images (seed + 3) "
                                               "for every corruption, severity and model"})


def _checked_grid(corruptions: Sequence[str] | None, severities: Sequence[int], n_boot: int,
                  confidence: float) -> list[str]:
    """The corruption names to run (default: all), after checking the grid and the settings.

    Raises:
        ConfigError: unknown corruption or severity, bad ``n_boot`` / ``confidence``.
    """
    names = list(LEVELS) if corruptions is None else list(corruptions)
    for c in names:
        CORRUPTIONS.get(c)
    bad = [s for s in severities if s not in (1, 2, 3)]
    if bad or not severities:
        raise ConfigError(f"The 'severities' parameter of robustness_change must be a non-empty "
                          f"subset of (1, 2, 3). Got {list(severities)} instead.")
    check_range(n_boot, "n_boot", "robustness_change", 0, integer=True)
    check_fraction(confidence, "confidence", "robustness_change")
    return names


def _corrupted_cells(dense: nn.Module, compressed: nn.Module, images: torch.Tensor,
                     preprocess: Any, names: list[str], sevs: list[int],
                     pred: Callable[[np.ndarray], Predictions], t: np.ndarray,
                     base: dict[str, list[tuple[float, np.ndarray]]], w: np.ndarray, seed: int,
                     confidence: float, batch_size: int, progress: bool | None
                     ) -> tuple[list[RobustnessCell], list[np.ndarray]]:
    """Both models on every corruption x severity of ``images``: the cells (per class and
    macro) and their relative-robustness replicates, in the same order."""
    n = int(images.shape[0])
    # all severities of a corruption in one pass when they fit (~0.5 GB of float32 input)
    group = len(sevs) if images.numel() * len(sevs) <= 2 ** 27 else 1
    cells: list[RobustnessCell] = []
    rel_reps: list[np.ndarray] = []
    fast_r, fast_n = fast_copy(dense), fast_copy(compressed)
    for name in track(names, "robustness", progress=progress):
        for g in range(0, len(sevs), group):
            part = sevs[g:g + group]
            x = torch.cat([corrupt(images, preprocess, name, s, seed) for s in part])
            zr, zn = logits_of(fast_r, x, batch_size), logits_of(fast_n, x, batch_size)
            for i, sev in enumerate(part):
                cr, cn = pred(zr[i * n:(i + 1) * n]), pred(zn[i * n:(i + 1) * n])
                new, reps = _cells(name, sev, t, cr, cn, base, w, confidence)
                cells += new
                rel_reps += reps
    return cells, rel_reps


def _aurocs(t: np.ndarray, pr: np.ndarray, pn: np.ndarray, w: np.ndarray
            ) -> dict[str, list[tuple[float, np.ndarray]]]:
    """Per class: (point AUROC, bootstrap replicates) of both models."""
    out: dict[str, list[tuple[float, np.ndarray]]] = {"ref": [], "new": []}
    for j in range(t.shape[1]):
        keep = np.isfinite(t[:, j])
        y = t[keep, j] > 0.5
        for key, p in (("ref", pr), ("new", pn)):
            if y.all() or not y.any():
                out[key].append((NAN, np.full(len(w), NAN)))
                continue
            s = p[keep, j].astype(np.float64)
            point = float(weighted_auroc(y, s, np.ones((1, y.size)))[0])
            reps = weighted_auroc(y, s, w[:, keep]) if len(w) else np.zeros(0)
            out[key].append((point, reps))
    return out


def _clean(base, w, confidence) -> dict[str, Any]:
    """Macro clean AUROC of both models and their paired delta (same replicates)."""
    ok = [j for j in range(len(base["ref"]))
          if np.isfinite(base["ref"][j][0]) and np.isfinite(base["new"][j][0])]
    if not ok:
        return {"auroc_ref": NAN, "auroc_new": NAN, "delta_auroc": NAN,
                "delta_auroc_ci": [NAN, NAN]}
    ar = float(np.mean([base["ref"][j][0] for j in ok]))
    an = float(np.mean([base["new"][j][0] for j in ok]))
    reps = (np.mean([base["new"][j][1] - base["ref"][j][1] for j in ok], 0) if len(w)
            else np.zeros(0))
    return {"auroc_ref": ar, "auroc_new": an, "delta_auroc": an - ar,
            "delta_auroc_ci": list(ci(reps, confidence))}


def _flag(cells: list[RobustnessCell], rel_reps: list[np.ndarray], t: np.ndarray, n: int,
          confidence: float) -> tuple[list[RobustnessCell], dict[str, Verdict]]:
    """Holm across each family of cells (macro; per class) through the decision primitive:
    "less robust" = the verdict's *fail* of ``relative >= 0`` (margin 0)."""
    known = np.isfinite(t)
    pos = {j: int((t[known[:, j], j] > 0.5).sum()) for j in range(t.shape[1])}
    neg = {j: int(known[:, j].sum()) - pos[j] for j in range(t.shape[1])}
    out = list(cells)
    verdicts: dict[str, Verdict] = {}
    for family, keep in (("macro", lambda c: c.cls == "macro"),
                         ("per_class", lambda c: c.cls != "macro")):
        idx = [i for i, c in enumerate(cells) if keep(c)]
        if not idx:
            continue
        units = []
        for i in idx:
            c = cells[i]
            j = _class_index(cells, c)
            units.append(UnitInput(f"{c.corruption}/s{c.severity}/{c.cls}", c.relative, n,
                                   n_pos=None if j is None else pos[j],
                                   n_neg=None if j is None else neg[j],
                                   replicates=rel_reps[i], kind="cell"))
        v = decide(units, margin=0.0, metric="relative robustness (drop compressed - drop "
                   "dense, AUROC)", level=confidence,
                   method=f"paired bootstrap, {len(rel_reps[idx[0]])} replicates")
        verdicts[family] = v
        for i, u in zip(idx, v.units):
            out[i] = replace(cells[i], less_robust=u.outcome == "fail", level_adj=u.level_adj)
    return out, verdicts


def _class_index(cells: list[RobustnessCell], c: RobustnessCell) -> int | None:
    if c.cls == "macro":
        return None
    names = list(dict.fromkeys(x.cls for x in cells if x.cls != "macro"))
    return names.index(c.cls)


def _cells(name, sev, t, cr, cn, base, w, confidence
           ) -> tuple[list[RobustnessCell], list[np.ndarray]]:
    """Per class and macro cells and their relative-robustness replicates; every CI from the
    same replicates ``w`` as the clean AUROCs, so drops, relative robustness and the
    compressed-vs-dense delta are all paired."""
    cur = _aurocs(t, cr.probs(), cn.probs(), w)
    out, reps = [], []
    acc: dict[str, list] = {k: [] for k in ("dr", "dn", "rel", "d", "dr_p", "dn_p", "ar", "an")}
    for j, cname in enumerate(cr.class_names):
        (ar, ar_b), (an, an_b) = cur["ref"][j], cur["new"][j]
        (br, br_b), (bn, bn_b) = base["ref"][j], base["new"][j]
        dr_b, dn_b, d_b = ar_b - br_b, an_b - bn_b, an_b - ar_b
        rel_b = dn_b - dr_b
        rel_ci = ci(rel_b, confidence)
        out.append(RobustnessCell(name, sev, cname, ar, an, ar - br, ci(dr_b, confidence),
                                  an - bn, ci(dn_b, confidence), (an - bn) - (ar - br), rel_ci,
                                  p_two_sided(rel_b), an - ar, ci(d_b, confidence),
                                  False, less_robust_uncorrected=bool(rel_ci[1] < 0)))
        reps.append(rel_b)
        if np.isfinite(ar) and np.isfinite(an):
            for k, v in (("dr", dr_b), ("dn", dn_b), ("rel", rel_b), ("d", d_b)):
                acc[k].append(v)
            for k, v in (("dr_p", ar - br), ("dn_p", an - bn), ("ar", ar), ("an", an)):
                acc[k].append(v)
    if acc["ar"]:
        mean = lambda k: np.mean(np.stack(acc[k]), 0) if len(w) else np.zeros(0)  # noqa: E731
        rel_b = mean("rel")
        rel_ci = ci(rel_b, confidence)
        dr, dn = float(np.mean(acc["dr_p"])), float(np.mean(acc["dn_p"]))
        ar, an = float(np.mean(acc["ar"])), float(np.mean(acc["an"]))
        out.append(RobustnessCell(name, sev, "macro", ar, an, dr, ci(mean("dr"), confidence), dn,
                                  ci(mean("dn"), confidence), dn - dr, rel_ci,
                                  p_two_sided(rel_b), an - ar, ci(mean("d"), confidence),
                                  False, less_robust_uncorrected=bool(rel_ci[1] < 0)))
        reps.append(rel_b)
    return out, reps


# ----------------------------------------------------------------------------- figure
def plot_robustness(res: RobustnessChange, path: str | os.PathLike) -> Path:
    """One panel per corruption: macro AUROC of dense (blue) and compressed (red) against
    severity (0 = clean), the relative-robustness CI in the title."""

    plt = pyplot()
    names = list(res.corruptions)
    cols = min(5, max(1, len(names)))
    rows = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.3 * rows), squeeze=False,
                             sharey=True)
    for i, name in enumerate(names):
        ax = axes[i // cols][i % cols]
        cells = sorted((c for c in res.macro() if c.corruption == name), key=lambda c: c.severity)
        xs = [0] + [c.severity for c in cells]
        ax.plot(xs, [res.clean["auroc_ref"]] + [c.auroc_ref for c in cells], "o-",
                color="tab:blue", ms=3, label="dense")
        ax.plot(xs, [res.clean["auroc_new"]] + [c.auroc_new for c in cells], "s-",
                color="tab:red", ms=3, label="compressed")
        worst = cells[-1] if cells else None
        title = name if worst is None else (
            f"{name}\nrel {worst.relative:+.3f} [{worst.relative_ci[0]:+.3f}, "
            f"{worst.relative_ci[1]:+.3f}]")
        ax.set_title(title, fontsize=7, color="tab:red" if worst and worst.less_robust
                     else "black")
        ax.set_xticks(xs)
        ax.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=6)
    for j in range(len(names), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.supxlabel("severity (0 = clean)", fontsize=8)
    fig.supylabel("macro AUROC", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
