"""The 14 NIH findings drawn into the phantom, each with its sign in its anatomical place.

Every finding has a severity in [0, 1] that sets its conspicuity (size and/or density). A finding
may change the anatomy before it is rendered (:func:`modify_anatomy`: cardiomegaly enlarges the
heart, emphysema flattens the diaphragm, atelectasis pulls the hemidiaphragm up) and then draws
its sign into the density map (:func:`render_finding`), returning the finding's mask.

Infiltration, pneumonia and consolidation use one airspace-opacity generator with overlapping
parameter ranges (patchy and ill-defined -> lobar and dense): as in reality they are confusable.
Nodule and mass differ by size. Difficulty is tuned through :data:`SPECS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medscalpel.data.phantom.anatomy import (F32, LUNG_AX, LUNG_CX, Anatomy, Frame, col,
                                             lung_shapes, pick_noise, soft_inside)

CLASS_NAMES = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
               "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
               "Pleural_Thickening", "Hernia"]
CLASS_INDEX = {c: i for i, c in enumerate(CLASS_NAMES)}


@dataclass(frozen=True)
class Spec:
    """Conspicuity of one finding: density amplitude ``amp_lo + (amp_hi - amp_lo) * severity``
    and the Beta(a, b) distribution its severity is drawn from."""

    amp_lo: float
    amp_hi: float
    beta_a: float = 1.6
    beta_b: float = 1.8


#: the difficulty knobs (density units: soft tissue ~0.5, aerated lung ~0.2)
SPECS: dict[str, Spec] = {
    "Atelectasis": Spec(0.05, 0.16),
    "Cardiomegaly": Spec(0.0, 0.12),        # amplitude = CTR excess over 0.5
    "Effusion": Spec(0.05, 0.17),
    "Infiltration": Spec(0.03, 0.10),
    "Mass": Spec(0.07, 0.20),
    "Nodule": Spec(0.08, 0.22),
    "Pneumonia": Spec(0.04, 0.12),
    "Pneumothorax": Spec(0.05, 0.22),       # amplitude = collapse depth (fraction of width)
    "Consolidation": Spec(0.05, 0.15),
    "Edema": Spec(0.04, 0.12),
    "Emphysema": Spec(0.04, 0.12),
    "Fibrosis": Spec(0.03, 0.09),
    "Pleural_Thickening": Spec(0.08, 0.20),
    "Hernia": Spec(0.14, 0.30),     # rarest class (0.2%): a bigger sign to be learnable
}


def amplitude(name: str, sev: np.ndarray) -> np.ndarray:
    s = SPECS[name]
    return (s.amp_lo + (s.amp_hi - s.amp_lo) * np.asarray(sev, F32)).astype(F32)


def sample_severity(rng: np.random.Generator, name: str, n: int) -> np.ndarray:
    s = SPECS[name]
    return rng.beta(s.beta_a, s.beta_b, n).astype(F32)


# ----------------------------------------------------------------------------- geometry
def _sgn(side: np.ndarray) -> np.ndarray:
    """side 0 = patient's right (image left, x < 0), 1 = patient's left."""
    return np.where(np.asarray(side) == 0, -1.0, 1.0).astype(F32)


def lung_point(an: Anatomy, side: np.ndarray, z: np.ndarray, lat: np.ndarray) -> tuple:
    """A point in a lung given vertical fraction ``z`` (0 apex, 1 base) and lateral fraction
    ``lat`` (0 medial, 1 lateral), in the body frame."""
    sgn = _sgn(side)
    top = -0.78 * an.inspiration + 0.05
    dome = np.where(side == 0, an.dome_r, an.dome_l)
    # the lung narrows toward the apex
    half = LUNG_AX * an.body_w * (0.55 + 0.45 * np.sqrt(np.clip(z, 0, 1)))
    x = sgn * (LUNG_CX + (lat * 2 - 1) * half * 0.85)
    y = top + 0.08 + z * (dome - top - 0.14)
    return x.astype(F32), y.astype(F32)


def _side_lung(fr: Frame, idx: np.ndarray, side: np.ndarray) -> np.ndarray:
    s = col(side)
    return np.where(s == 0, fr.lung_r[idx], fr.lung_l[idx])


def _blob(X, Y, px, py, rx, ry, edge, rough=None, rough_amp=0.0):
    f = ((X - col(px)) / col(rx)) ** 2 + ((Y - col(py)) / col(ry)) ** 2
    if rough is not None:
        f = f + rough_amp * rough
    return soft_inside(f, edge)


# ----------------------------------------------------------------------------- modifiers
def modify_anatomy(name: str, an: Anatomy, idx: np.ndarray, sev: np.ndarray,
                   side: np.ndarray, rng: np.random.Generator) -> None:
    """Anatomy changes a finding causes (applied in place before rendering)."""
    if len(idx) == 0:
        return
    if name == "Cardiomegaly":
        an.ctr[idx] = 0.505 + amplitude(name, sev) + rng.normal(0, 0.01, len(idx)).astype(F32)
    elif name == "Emphysema":
        a = amplitude(name, sev)
        an.air[idx] += a
        an.marking_gain[idx] *= (1 - 3.0 * a).clip(0.3, 1)
        an.dome_r[idx] += 0.8 * a
        an.dome_l[idx] += 0.8 * a
        an.dome_curv[idx] *= (1 - 4.0 * a).clip(0.25, 1)
        an.inspiration[idx] += 0.6 * a
    elif name == "Atelectasis":
        a = amplitude(name, sev)
        r = idx[side == 0]
        an.dome_r[r] -= 0.6 * a[side == 0]
        left = idx[side == 1]
        an.dome_l[left] -= 0.6 * a[side == 1]
        an.mediastinal_shift[idx] += _sgn(side) * 0.25 * a
    elif name == "Fibrosis":
        an.inspiration[idx] -= 0.5 * amplitude(name, sev)


# ----------------------------------------------------------------------------- renderers
def render_finding(name: str, dens: np.ndarray, fr: Frame, parts: dict, an: Anatomy,
                   idx: np.ndarray, sev: np.ndarray, side: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """Draw finding ``name`` into ``dens[idx]`` (in place); return its masks ``[len(idx),S,S]``."""
    fn = _RENDERERS[name]
    return fn(dens, fr, parts, an, idx, sev, side, rng)


def _cardiomegaly(dens, fr, parts, an, idx, sev, side, rng):
    return fr.heart[idx] > 0.5  # the enlargement itself is an anatomy change


def _emphysema(dens, fr, parts, an, idx, sev, side, rng):
    # hyperlucent lungs; a few bullae (thin-walled lucencies) in the upper zones
    X, Y = fr.X[idx], fr.Y[idx]
    lungs = parts["lungs"][idx]
    n = len(idx)
    a = amplitude("Emphysema", sev)
    bside = rng.integers(0, 2, n)
    bx, by = lung_point(an.take(idx), bside, rng.uniform(0.05, 0.35, n), rng.uniform(0.4, 0.9, n))
    br = (0.06 + 0.6 * a).astype(F32)
    bulla = _blob(X, Y, bx, by, br, br, 0.3) * lungs
    dens[idx] -= 0.5 * col(a) * bulla
    return lungs > 0.5


def _atelectasis(dens, fr, parts, an, idx, sev, side, rng):
    X, Y = fr.X[idx], fr.Y[idx]
    n = len(idx)
    sub = an.take(idx)
    a = amplitude("Atelectasis", sev)
    px, py = lung_point(sub, side, rng.uniform(0.55, 0.85, n), rng.uniform(0.3, 0.75, n))
    ang = rng.uniform(-0.35, 0.35, n).astype(F32)
    c, s = col(np.cos(ang)), col(np.sin(ang))
    dx, dy = X - col(px), Y - col(py)
    u = c * dx + s * dy
    v = -s * dx + c * dy
    length = (0.16 + 1.2 * a).astype(F32)
    thick = (0.025 + 0.25 * a).astype(F32)
    band = soft_inside((u / col(length)) ** 2 + (v / col(thick)) ** 2, 0.5)
    band *= _side_lung(fr, idx, side)
    dens[idx] += 1.6 * col(a) * band
    return band > 0.5


def _effusion(dens, fr, parts, an, idx, sev, side, rng):
    # side: 0 right, 1 left, 2 bilateral
    X, Y = fr.X[idx], fr.Y[idx]
    a = amplitude("Effusion", sev)
    height = (0.06 + 2.2 * a).astype(F32)      # fluid height above the dome apex
    mask = np.zeros(X.shape, bool)
    for s_id, sgn in ((0, -1.0), (1, 1.0)):
        on = (side == s_id) | (side == 2)
        if not on.any():
            continue
        dome = col(np.where(s_id == 0, an.dome_r[idx], an.dome_l[idx]))
        lat = np.clip((X * sgn - 0.15) / 0.6, 0, 1.2)
        # meniscus: the fluid climbs the lateral chest wall
        level = dome - col(height) - 0.5 * col(height) * lat ** 2
        fluid = np.clip((Y - level) / 0.05, 0, 1) * (X * sgn > 0.06)
        lung = fr.lung_r[idx] if s_id == 0 else fr.lung_l[idx]
        # the fluid fills the costophrenic recess: extend the lung field down to the dome
        recess = np.clip(1 - (Y - dome) / 0.06, 0, 1) * (np.abs(X * sgn - LUNG_CX) < LUNG_AX)
        region = fluid * np.maximum(lung, recess * (Y > dome - 0.1)) * col(on)
        dens[idx] += (0.35 + 1.5 * col(a)) * region * 0.35
        mask |= region > 0.5
    return mask


def _airspace(dens, fr, parts, an, idx, sev, side, rng, kind: str):
    X, Y = fr.X[idx], fr.Y[idx]
    n = len(idx)
    size = X.shape[-1]
    sub = an.take(idx)
    a = amplitude(kind, sev)
    lungs = parts["lungs"][idx]
    total = np.zeros(X.shape, F32)
    if kind == "Infiltration":
        n_patch, r_lo, r_hi, rough_amp, edge, z_lo, z_hi = 4, 0.07, 0.14, 1.2, 0.9, 0.1, 0.9
    elif kind == "Pneumonia":
        n_patch, r_lo, r_hi, rough_amp, edge, z_lo, z_hi = 2, 0.11, 0.20, 0.8, 0.7, 0.35, 0.95
    else:  # Consolidation: lobar, dense, homogeneous, sharp fissure border
        n_patch, r_lo, r_hi, rough_amp, edge, z_lo, z_hi = 1, 0.16, 0.26, 0.5, 0.4, 0.3, 0.95
    rough = pick_noise(rng, n, size, 0.06)
    for k in range(n_patch):
        present = rng.random(n) < (1.0 if k == 0 else 0.65)
        s = np.where(rng.random(n) < 0.5, side, 1 - side) if kind == "Infiltration" else side
        px, py = lung_point(sub, s, rng.uniform(z_lo, z_hi, n), rng.uniform(0.2, 0.85, n))
        r = rng.uniform(r_lo, r_hi, n).astype(F32) * (0.8 + 0.5 * sev)
        blob = _blob(X, Y, px, py, r, r * rng.uniform(0.7, 1.3, n).astype(F32), edge,
                     rough, rough_amp * 0.5)
        if kind == "Consolidation":
            # a fissure cuts the opacity along a straight line
            ang = rng.uniform(-0.5, 0.5, n).astype(F32)
            d = (np.sin(ang)[:, None, None] * (X - col(px)) + np.cos(ang)[:, None, None]
                 * (Y - col(py)) + col(r) * 0.35)
            blob *= np.clip(d / 0.02, 0, 1)
        total = np.maximum(total, blob * col(present))
    tex = 1.0 + (0.45 if kind == "Infiltration" else 0.25 if kind == "Pneumonia" else 0.08) \
        * pick_noise(rng, n, size, 0.03)
    region = total * lungs
    dens[idx] += 1.2 * col(a) * region * tex
    return region > 0.5


def _mass_or_nodule(dens, fr, parts, an, idx, sev, side, rng, kind: str):
    X, Y = fr.X[idx], fr.Y[idx]
    n = len(idx)
    sub = an.take(idx)
    a = amplitude(kind, sev)
    lungs = parts["lungs"][idx]
    mask = np.zeros(X.shape, bool)
    count = 1 if kind == "Mass" else 3
    for k in range(count):
        present = rng.random(n) < (1.0 if k == 0 else 0.35)
        s = np.where(rng.random(n) < 0.5, side, 1 - side) if k else side
        px, py = lung_point(sub, s, rng.uniform(0.1, 0.85, n), rng.uniform(0.2, 0.85, n))
        if kind == "Mass":
            r = (0.09 + 0.09 * sev + rng.uniform(0, 0.02, n)).astype(F32)
            edge = 0.35
        else:
            r = (0.032 + 0.025 * sev + rng.uniform(0, 0.008, n)).astype(F32)
            edge = 0.5
        blob = _blob(X, Y, px, py, r, r * rng.uniform(0.85, 1.15, n).astype(F32), edge)
        blob *= col(present) * np.clip(lungs * 1.5, 0, 1)
        dens[idx] += 1.5 * col(a) * blob
        mask |= blob > 0.5
    return mask


def _pneumothorax(dens, fr, parts, an, idx, sev, side, rng):
    X, Y = fr.X[idx], fr.Y[idx]
    sub = an.take(idx)
    depth = amplitude("Pneumothorax", sev)
    sgn = _sgn(side)
    # the collapsed lung: the lung shape shrunk toward its hilar-basal anchor
    ax_, ay_ = col(sgn * 0.18), col(np.where(side == 0, sub.dome_r, sub.dome_l) - 0.05)
    k = col(1.0 - depth * 1.4)
    Xc, Yc = (X - ax_) / k + ax_, (Y - ay_) / k + ay_
    cr, cl, _, _ = lung_shapes(Xc, Yc, sub)
    collapsed = np.where(col(side) == 0, cr, cl)
    lung = _side_lung(fr, idx, side)
    region = np.clip(lung - collapsed, 0, 1)
    # no vascular markings beyond the pleural line; extra lucency
    dens[idx] -= region * (0.06 * parts["markings"][idx] + 0.05 + 0.15 * col(depth))
    line = np.clip(1 - np.abs(collapsed - 0.5) / 0.25, 0, 1) * lung
    dens[idx] += (0.04 + 0.2 * col(depth)) * line
    return region > 0.5


def _edema(dens, fr, parts, an, idx, sev, side, rng):
    X, Y = fr.X[idx], fr.Y[idx]
    a = amplitude("Edema", sev)
    lungs = parts["lungs"][idx]
    # bilateral perihilar "bat-wing" haze + peribronchial cuffing (thicker markings)
    haze = np.exp(-((np.abs(X) - 0.22) / 0.26) ** 2 - ((Y - 0.05) / 0.36) ** 2)
    haze = haze * lungs
    dens[idx] += 1.3 * col(a) * haze + 0.6 * col(a) * parts["markings"][idx] * lungs * 0.3
    # Kerley B lines: short horizontal lines at the lateral bases
    kb = (np.cos(2 * np.pi * Y / 0.05) > 0.6) * (np.abs(X) > 0.62) * (Y > 0.2) * lungs
    dens[idx] += 0.5 * col(a) * kb
    return (haze > 0.45) & (lungs > 0.5)


def _fibrosis(dens, fr, parts, an, idx, sev, side, rng):
    X, Y = fr.X[idx], fr.Y[idx]
    n = len(idx)
    size = X.shape[-1]
    a = amplitude("Fibrosis", sev)
    lungs = parts["lungs"][idx]
    warp = pick_noise(rng, n, size, 0.04) * 0.25
    p = col(rng.uniform(0.07, 0.09, n).astype(F32))
    mesh = np.maximum(np.cos(2 * np.pi * (X + 0.02 * warp) / p),
                      np.cos(2 * np.pi * (Y - 0.02 * warp) / p))
    mesh = np.clip((mesh - 0.4) / 0.6, 0, 1)
    # basal and peripheral predominance
    where = (np.clip((Y + 0.05) / 0.35, 0, 1) * np.clip((np.abs(X) - 0.35) / 0.25, 0, 1))
    region = where * lungs
    dens[idx] += 1.6 * col(a) * mesh * region + 0.5 * col(a) * region
    return region > 0.4


def _pleural_thickening(dens, fr, parts, an, idx, sev, side, rng):
    X, Y = fr.X[idx], fr.Y[idx]
    n = len(idx)
    a = amplitude("Pleural_Thickening", sev)
    lung = _side_lung(fr, idx, side)
    sgn = col(_sgn(side))
    top = col(-0.78 * an.inspiration[idx] + 0.05)
    apical = rng.random(n) < 0.5
    t = col(0.04 + 0.5 * a)
    cap = np.clip(1 - (Y - top) / (t * 2.2), 0, 1)
    edge_x = col(LUNG_CX + LUNG_AX * an.body_w[idx])
    band = np.clip(1 - (edge_x - X * sgn) / t, 0, 1) * (Y > top + 0.2)
    shape = np.where(col(apical), cap, band)
    region = np.clip(shape * 1.6, 0, 1) * lung
    dens[idx] += (0.06 + 1.5 * col(a)) * region * 0.6
    return region > 0.5


def _hernia(dens, fr, parts, an, idx, sev, side, rng):
    X, Y = fr.X[idx], fr.Y[idx]
    n = len(idx)
    a = amplitude("Hernia", sev)
    cx = rng.uniform(0.0, 0.16, n).astype(F32)
    cy = (an.heart_y[idx] + rng.uniform(0.06, 0.14, n)).astype(F32)
    r = (0.06 + 0.5 * a).astype(F32)
    bubble = _blob(X, Y, cx, cy, r * 1.2, r, 0.35)
    rim = np.clip(1 - np.abs(bubble - 0.35) / 0.3, 0, 1)
    fluid = Y > col(cy + 0.2 * r)             # air-fluid level
    dens[idx] += -1.2 * col(a) * bubble * ~fluid + 0.6 * col(a) * rim
    return bubble > 0.5


_RENDERERS = {
    "Atelectasis": _atelectasis,
    "Cardiomegaly": _cardiomegaly,
    "Effusion": _effusion,
    "Infiltration": lambda *a: _airspace(*a, kind="Infiltration"),
    "Mass": lambda *a: _mass_or_nodule(*a, kind="Mass"),
    "Nodule": lambda *a: _mass_or_nodule(*a, kind="Nodule"),
    "Pneumonia": lambda *a: _airspace(*a, kind="Pneumonia"),
    "Pneumothorax": _pneumothorax,
    "Consolidation": lambda *a: _airspace(*a, kind="Consolidation"),
    "Edema": _edema,
    "Emphysema": _emphysema,
    "Fibrosis": _fibrosis,
    "Pleural_Thickening": _pleural_thickening,
    "Hernia": _hernia,
}

#: findings that may be bilateral (side 2); others pick one side
BILATERAL = {"Effusion": 0.3}


def sample_side(rng: np.random.Generator, name: str, n: int) -> np.ndarray:
    side = rng.integers(0, 2, n)
    p = BILATERAL.get(name, 0.0)
    if p:
        side = np.where(rng.random(n) < p, 2, side)
    return side.astype(np.int8)


# ----------------------------------------------------------------------------- devices
def draw_chest_tube(dens: np.ndarray, fr: Frame, idx: np.ndarray, side: np.ndarray) -> np.ndarray:
    """A chest drain: enters the lateral chest wall low and runs up toward the apex."""
    X, Y = fr.X[idx], fr.Y[idx]
    sgn = col(_sgn(side))
    pts = [(0.95, 0.30), (0.66, 0.18), (0.48, -0.25), (0.36, -0.58)]
    tube = np.zeros(X.shape, F32)
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
        dx, dy = x1 - x0, y1 - y0
        px = X * sgn - x0
        py = Y - y0
        t = np.clip((px * dx + py * dy) / (dx * dx + dy * dy), 0, 1)
        dist = np.sqrt((px - t * dx) ** 2 + (py - t * dy) ** 2)
        tube = np.maximum(tube, np.clip(1 - dist / 0.03, 0, 1))
    dens[idx] += 0.22 * tube
    return tube > 0.5


def draw_marker(img: np.ndarray, idx: np.ndarray, kind: str, size: int) -> None:
    """Burn a bright radiographer's marker into the (tone-mapped) image corner: ``AP`` (portable
    film, top-left: a two-block glyph) or a side marker (``L``, top-right, on every film)."""
    if len(idx) == 0:
        return
    px = max(1, size // 32)
    if kind == "AP":
        y0, x0 = 2 * px, 3 * px
        img[idx, y0:y0 + 3 * px, x0:x0 + 2 * px] = 0.97
        img[idx, y0:y0 + 3 * px, x0 + 3 * px:x0 + 5 * px] = 0.97
        img[idx, y0 + px:y0 + 2 * px, x0 + 3 * px + px // 2 + 1:x0 + 5 * px] = 0.6
    else:
        y0, x0 = 2 * px, size - 5 * px
        img[idx, y0:y0 + 3 * px, x0:x0 + px] = 0.97
        img[idx, y0 + 2 * px:y0 + 3 * px, x0:x0 + 2 * px] = 0.97
