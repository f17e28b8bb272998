"""Phantom chest anatomy: per-image parameters and a vectorised renderer.

Everything is computed for a whole batch at once on precomputed coordinate grids with analytic
shapes (superellipses, parabolic diaphragm domes, periodic rib bands, radial vessel markings)
and small cached noise textures, so a batch of 64x64 images costs a few milliseconds.

Coordinates: ``x`` runs from -1 (image left = the patient's RIGHT, as in a PA radiograph) to 1,
``y`` from -1 (top) to 1 (bottom). Each image has its own "body" frame (``X``, ``Y``): the grid
translated, rotated and scaled by the image's positioning parameters; anatomy lives in that frame.
Rendering works in *density* (white = dense, as on film); the tone curve in ``generate.py``
turns density into grey levels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

F32 = np.float32

#: lung centre |x| and half-width in the body frame, and the thoracic width they imply
LUNG_CX = 0.41
LUNG_AX = 0.32
THORAX_WIDTH = 2 * (LUNG_CX + LUNG_AX)


@lru_cache(maxsize=8)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(x, y)`` in [-1, 1], each ``[1, size, size]`` float32."""
    c = (np.arange(size, dtype=F32) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(c, c, indexing="ij")
    return x[None].astype(F32), y[None].astype(F32)


@lru_cache(maxsize=16)
def noise_bank(size: int, scale: float, count: int = 48) -> np.ndarray:
    """``count`` smooth random fields ``[count, size, size]`` (zero mean, unit std).

    ``scale`` is the correlation length as a fraction of the image side. The bank is built once
    per (size, scale) from a fixed seed, so phantoms stay deterministic."""
    rng = np.random.default_rng(12345 + int(scale * 1000))
    white = rng.standard_normal((count, size, size)).astype(F32)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.fftfreq(size)[None, :]
    sigma = max(scale * size, 0.5)
    kern = np.exp(-2 * (np.pi ** 2) * (sigma ** 2) * (fx ** 2 + fy ** 2))
    out = np.fft.ifft2(np.fft.fft2(white) * kern).real.astype(F32)
    out -= out.mean(axis=(1, 2), keepdims=True)
    out /= out.std(axis=(1, 2), keepdims=True) + 1e-6
    return out


def pick_noise(rng: np.random.Generator, n: int, size: int, scale: float) -> np.ndarray:
    """One field per image from the bank, randomly flipped (``[n, size, size]``)."""
    bank = noise_bank(size, scale)
    idx = rng.integers(0, len(bank), n)
    out = bank[idx]
    flip = rng.random(n) < 0.5
    out[flip] = out[flip, :, ::-1]
    flip = rng.random(n) < 0.5
    out[flip] = out[flip, ::-1, :]
    return out


def soft_inside(f: np.ndarray, width: float) -> np.ndarray:
    """Soft indicator of ``f < 1`` for an implicit shape value ``f`` (1 on the border)."""
    return np.clip((1.0 - f) / width, 0.0, 1.0)


def col(a: np.ndarray) -> np.ndarray:
    """Per-image parameter vector ``[B]`` -> broadcastable ``[B, 1, 1]``."""
    return np.asarray(a, dtype=F32)[:, None, None]


# ----------------------------------------------------------------------------- parameters
@dataclass
class Anatomy:
    """Per-image anatomy and acquisition parameters (each a ``[B]`` array)."""

    tx: np.ndarray
    ty: np.ndarray
    rot: np.ndarray
    scale: np.ndarray
    inspiration: np.ndarray       # lung height factor (poor inspiration < 1)
    ctr: np.ndarray               # cardiothoracic ratio
    heart_y: np.ndarray
    dome_r: np.ndarray            # right hemidiaphragm apex (y, body frame)
    dome_l: np.ndarray
    dome_curv: np.ndarray         # dome curvature (flat in emphysema)
    body_w: np.ndarray
    rib_phase: np.ndarray
    rib_spacing: np.ndarray
    vessel_n: np.ndarray
    vessel_phase: np.ndarray
    air: np.ndarray               # lung lucency (air depth)
    marking_gain: np.ndarray      # vascular marking strength
    exposure: np.ndarray          # tone-curve gain (under / over exposure)
    brightness: np.ndarray
    noise: np.ndarray             # quantum noise sigma (grey levels / 255)
    blur: np.ndarray              # 0..1 motion/defocus blur mix
    mediastinal_shift: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self):
        if self.mediastinal_shift is None:
            self.mediastinal_shift = np.zeros_like(self.tx)

    @property
    def n(self) -> int:
        return len(self.tx)

    def take(self, idx: np.ndarray) -> "Anatomy":
        return Anatomy(**{k: np.asarray(v)[idx].copy() for k, v in self.__dict__.items()})


def sample_anatomy(rng: np.random.Generator, n: int, patient_base: np.ndarray | None = None,
                   ap_view: np.ndarray | None = None) -> Anatomy:
    """Draw ``n`` anatomies. ``patient_base`` ``[n, 4]`` in N(0,1) makes follow-up images of one
    patient share body habitus (size, heart, diaphragm); ``ap_view`` marks portable AP films
    (magnified heart, poorer inspiration, lower quality)."""
    u = lambda lo, hi: rng.uniform(lo, hi, n).astype(F32)  # noqa: E731
    pb = patient_base if patient_base is not None else rng.standard_normal((n, 4))
    pb = pb.astype(F32)
    ap = np.zeros(n, bool) if ap_view is None else np.asarray(ap_view, bool)
    insp = np.clip(1.0 + 0.06 * pb[:, 2] + rng.normal(0, 0.04, n), 0.82, 1.12).astype(F32)
    insp[ap] -= F32(0.06)
    ctr = np.clip(0.43 + 0.025 * pb[:, 1] + rng.normal(0, 0.012, n), 0.35, 0.49).astype(F32)
    ctr[ap] += F32(0.035)  # AP projection magnifies the heart
    dome = (0.50 + 0.03 * pb[:, 3] + rng.normal(0, 0.02, n)).astype(F32)
    exposure = np.exp(rng.normal(0, 0.18, n)).astype(F32)
    noise = np.exp(rng.normal(np.log(0.035), 0.45, n)).astype(F32)
    noise[ap] *= F32(1.4)
    return Anatomy(
        tx=rng.normal(0, 0.03, n).astype(F32),
        ty=rng.normal(0.02, 0.03, n).astype(F32),
        rot=rng.normal(0, 0.035, n).astype(F32),
        scale=np.clip(1.0 + 0.04 * pb[:, 0] + rng.normal(0, 0.02, n), 0.88, 1.1).astype(F32),
        inspiration=insp,
        ctr=ctr,
        heart_y=u(0.24, 0.30),
        dome_r=dome,
        dome_l=(dome + u(0.02, 0.08)).astype(F32),
        dome_curv=u(0.9, 1.3),
        body_w=u(0.90, 1.02),
        rib_phase=u(0, 1),
        rib_spacing=u(0.15, 0.18),
        vessel_n=rng.integers(7, 11, n).astype(F32),
        vessel_phase=u(0, 2 * np.pi),
        air=u(0.30, 0.36),
        marking_gain=u(0.8, 1.2),
        exposure=exposure,
        brightness=rng.normal(0, 0.03, n).astype(F32),
        noise=noise,
        blur=np.clip(rng.normal(0.15, 0.15, n), 0, 1).astype(F32) + 0.25 * ap.astype(F32),
    )


def quality_score(an: Anatomy) -> np.ndarray:
    """Image quality in [0, 1] (1 = ideal): penalises noise, blur, rotation, poor inspiration
    and under/over exposure, the criteria a radiologist applies."""
    q = (1.0
         - 3.0 * np.clip(an.noise - 0.03, 0, None)
         - 0.25 * an.blur
         - 2.0 * np.abs(an.rot)
         - 1.2 * np.clip(0.98 - an.inspiration, 0, None)
         - 0.8 * np.abs(np.log(an.exposure)))
    return np.clip(q, 0.0, 1.0).astype(F32)


# ----------------------------------------------------------------------------- rendering
@dataclass
class Frame:
    """Body-frame coordinates of a batch and the anatomy masks derived from them."""

    X: np.ndarray
    Y: np.ndarray
    lung_r: np.ndarray        # soft masks [B,S,S] in [0,1]; patient's right = image left
    lung_l: np.ndarray
    heart: np.ndarray
    below_dome: np.ndarray    # abdomen (under the diaphragm)
    dome_y_r: np.ndarray      # diaphragm height under each pixel's column, [B,1,S] per side
    dome_y_l: np.ndarray


def body_frame(an: Anatomy, size: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = grid(size)
    c, s = col(np.cos(an.rot)), col(np.sin(an.rot))
    sc = col(an.scale)
    dx, dy = x - col(an.tx), y - col(an.ty)
    X = (c * dx + s * dy) / sc
    Y = (-s * dx + c * dy) / sc
    return X.astype(F32), Y.astype(F32)


def dome_height(X: np.ndarray, an: Anatomy, side: str) -> np.ndarray:
    """Diaphragm dome: highest near the lung's mid-line, falling off laterally and medially."""
    sgn = -1.0 if side == "r" else 1.0
    apex = col(an.dome_r if side == "r" else an.dome_l)
    cx = sgn * (LUNG_CX - 0.02)
    return apex + col(an.dome_curv) * 0.55 * (X - cx) ** 2


def lung_shapes(X: np.ndarray, Y: np.ndarray, an: Anatomy) -> tuple[np.ndarray, ...]:
    """Soft lung fields (right, left), cut below by the diaphragm domes and medially by the
    mediastinum; plus the per-side dome heights."""
    insp = col(an.inspiration)
    top = -0.78 * insp + 0.05
    out = []
    domes = []
    for side, sgn in (("r", -1.0), ("l", 1.0)):
        dome = dome_height(X, an, side)
        cy = (top + dome) / 2
        by = (dome - top) / 2 + 0.08
        shift = col(an.mediastinal_shift) if side == "r" else col(an.mediastinal_shift)
        dx = (X - sgn * LUNG_CX - shift * 0.5) / (LUNG_AX * col(an.body_w))
        dy = (Y - cy) / by
        # apex rounder than base: the exponent grows toward the base (costophrenic angle)
        f = np.abs(dx) ** 2.2 + np.where(dy < 0, np.abs(dy) ** 2.0, np.abs(dy) ** 4.0)
        lung = soft_inside(f, 0.25)
        lung *= np.clip((dome - Y) / 0.03, 0.0, 1.0)
        out.append(lung.astype(F32))
        domes.append(dome)
    return out[0], out[1], domes[0], domes[1]


def heart_shape(X: np.ndarray, Y: np.ndarray, an: Anatomy) -> np.ndarray:
    """Cardiac silhouette: a tilted ellipse whose transverse width is ``ctr * thorax width``."""
    width = col(an.ctr) * THORAX_WIDTH * col(an.body_w)
    hw = width / 2
    hx = 0.22 * width - 0.04 + col(an.mediastinal_shift)   # heart sits left of the mid-line
    hy = col(an.heart_y)
    t = 0.25
    dx, dy = X - hx, Y - hy
    u = dx * np.cos(t) + dy * np.sin(t)
    v = -dx * np.sin(t) + dy * np.cos(t)
    f = (np.abs(u) / (hw * 1.02)) ** 2.3 + (np.abs(v) / 0.30) ** 2.3
    return soft_inside(f, 0.10).astype(F32)


def render_anatomy(an: Anatomy, size: int, rng: np.random.Generator) -> tuple[np.ndarray, Frame,
                                                                              dict]:
    """Density map ``[B, S, S]`` of the normal anatomy, the body frame and the lung/heart masks.

    Returns ``(density, frame, parts)`` where ``parts`` keeps the layers findings modify
    (``markings``: vessel markings inside the lungs; ``air``: lung lucency term)."""
    X, Y = body_frame(an, size)
    B = an.n
    ax = np.abs(X)
    lung_r, lung_l, dome_r, dome_l = lung_shapes(X, Y, an)
    lungs = np.maximum(lung_r, lung_l)

    # body: soft tissue with shoulders and neck; dark air outside
    bw = col(an.body_w)
    body = soft_inside((X / (0.98 * bw)) ** 4 + ((Y - 0.15) / 1.25) ** 4, 0.12)
    shoulders = soft_inside((ax / (1.02 * bw)) ** 2 + ((Y + 0.95) / 0.35) ** 2, 0.3)
    neck = soft_inside((X / 0.22) ** 2 + ((Y + 1.0) / 0.3) ** 2, 0.3)
    body = np.maximum(np.maximum(body, shoulders * (Y > -1.05)), neck)
    dens = 0.50 * body
    # soft tissue thicker laterally (chest wall) and at the bases (breasts, abdomen)
    dens += 0.10 * body * np.clip(ax - 0.55, 0, None) * 3
    dens += 0.08 * body * np.clip(Y - 0.0, 0, None)

    # lungs: air lowers density; darkest mid-lateral, whiter at apex and base
    zone = 1.0 - 0.35 * np.clip(-Y - 0.4, 0, None) - 0.25 * np.clip(Y - 0.1, 0, None)
    texture = pick_noise(rng, B, size, 0.05)
    air = col(an.air) * zone * (1.0 + 0.06 * texture)
    # vessel markings radiate from the hila and fade toward the periphery
    markings = np.zeros_like(X)
    for sgn in (-1.0, 1.0):
        hx, hy = sgn * 0.17, -0.02
        dx, dy = X - hx, Y - hy
        r = np.sqrt(dx * dx + dy * dy) + 1e-3
        phi = np.arctan2(dy, dx * sgn)
        wob = 0.35 * np.sin(6.0 * r + col(an.vessel_phase))
        br = np.cos(col(an.vessel_n) * phi + wob + col(an.vessel_phase) * sgn)
        branch = np.clip(br, 0, None) ** 6
        markings += branch * np.exp(-r / 0.28) + 0.8 * np.exp(-(r / 0.10) ** 2)
    markings *= col(an.marking_gain)

    # ribs: posterior arcs (rise laterally, curve down at the wall) and fainter anterior ribs
    cage = soft_inside((ax / 0.74) ** 2 + ((Y + 0.05) / 0.85) ** 2, 0.3) * (ax > 0.06)
    sp = col(an.rib_spacing)
    g1 = (Y + 0.55 * ax - 0.55 * ax * ax) / sp + col(an.rib_phase)
    post = np.clip(np.cos(2 * np.pi * g1) + 0.1, 0, 0.6) / 0.6
    g2 = (Y - 0.35 * ax) / (sp * 1.1) + col(an.rib_phase) * 0.7
    ant = np.clip(np.cos(2 * np.pi * g2) - 0.2, 0, 0.5) / 0.5
    ribs = cage * (0.055 * post + 0.025 * ant) * (Y < col(np.maximum(an.dome_r, an.dome_l)) + 0.1)

    # clavicles: two bars from the sternal notch up and out
    clav = np.zeros_like(X)
    for sgn in (-1.0, 1.0):
        p0 = np.array([sgn * 0.08, -0.72], F32)
        p1 = np.array([sgn * 0.62, -0.86], F32)
        d = p1 - p0
        t = np.clip(((X - p0[0]) * d[0] + (Y - p0[1]) * d[1]) / float(d @ d), 0, 1)
        dist = np.sqrt((X - p0[0] - t * d[0]) ** 2 + (Y - p0[1] - t * d[1]) ** 2)
        clav = np.maximum(clav, np.clip(1 - dist / 0.045, 0, 1))

    heart = heart_shape(X, Y, an)
    # mediastinum (wider at the aortic knob on the left), spine behind it
    med_w = 0.15 + 0.06 * np.exp(-((X - 0.14) / 0.08) ** 2 - ((Y + 0.30) / 0.08) ** 2)
    medi = soft_inside((np.abs(X - 0.02) / med_w) ** 2 + ((Y + 0.25) / 0.80) ** 8, 0.3)
    spine = np.clip(1 - ax / 0.075, 0, 1) ** 0.5 * (1 + 0.15 * np.cos(2 * np.pi * Y / 0.12))

    # abdomen under the domes, with a stomach gas bubble under the left dome
    below = np.maximum(np.clip((Y - dome_r) / 0.03, 0, 1) * (X < 0.05),
                       np.clip((Y - dome_l) / 0.03, 0, 1) * (X >= 0.05))
    stomach = soft_inside(((X - 0.42) / 0.12) ** 2 + ((Y - col(an.dome_l) - 0.1) / 0.07) ** 2,
                          0.5)

    dens = dens - air * lungs * (1 - 0.6 * heart) * (1 - 0.6 * medi) + 0.06 * markings * lungs
    dens += 0.22 * heart + 0.22 * medi * (1 - 0.5 * heart) + 0.08 * spine * (Y > -1.0)
    dens += ribs + 0.16 * clav * body
    dens += 0.12 * below * body - 0.12 * stomach * below
    frame = Frame(X=X, Y=Y, lung_r=lung_r, lung_l=lung_l, heart=heart, below_dome=below,
                  dome_y_r=dome_r, dome_y_l=dome_l)
    parts = {"markings": markings, "lungs": lungs, "body": body, "air": air}
    return dens.astype(F32), frame, parts
