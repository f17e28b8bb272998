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
LUNG_CX = 0.43
LUNG_AX = 0.35
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


def sq(t: np.ndarray) -> np.ndarray:
    return t * t


def p4(t: np.ndarray) -> np.ndarray:
    """``t ** 4`` by multiplication (``np.power`` takes a slow path for negative bases)."""
    t2 = t * t
    return t2 * t2


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
    texture: np.ndarray           # index of the rib / vessel variant (skeleton_bank)
    air: np.ndarray               # lung lucency (air depth)
    marking_gain: np.ndarray      # vascular marking strength
    exposure: np.ndarray          # tone-curve gain (under / over exposure)
    brightness: np.ndarray
    noise: np.ndarray             # quantum noise sigma (grey levels / 255)
    blur: np.ndarray              # 0..1 motion/defocus blur mix
    mediastinal_shift: np.ndarray = field(default=None)  # type: ignore[assignment]
    bone_gain: np.ndarray = field(default=None)  # type: ignore[assignment]  # bone density

    def __post_init__(self):
        if self.mediastinal_shift is None:
            self.mediastinal_shift = np.zeros_like(self.tx)
        if self.bone_gain is None:
            self.bone_gain = np.ones_like(self.tx)

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
    ctr = np.clip(0.445 + 0.02 * pb[:, 1] + rng.normal(0, 0.012, n), 0.38, 0.495).astype(F32)
    ctr[ap] += F32(0.035)  # AP projection magnifies the heart
    dome = (0.50 + 0.03 * pb[:, 3] + rng.normal(0, 0.02, n)).astype(F32)
    exposure = np.exp(rng.normal(0, 0.18, n)).astype(F32)
    noise = np.exp(rng.normal(np.log(0.02), 0.4, n)).astype(F32)
    noise[ap] *= F32(1.3)
    return Anatomy(
        tx=rng.normal(0, 0.03, n).astype(F32),
        ty=rng.normal(0.02, 0.03, n).astype(F32),
        rot=rng.normal(0, 0.035, n).astype(F32),
        scale=np.clip(1.0 + 0.04 * pb[:, 0] + rng.normal(0, 0.02, n), 0.88, 1.1).astype(F32),
        inspiration=insp,
        ctr=ctr,
        heart_y=u(0.19, 0.25),
        dome_r=dome,
        dome_l=(dome + u(0.02, 0.08)).astype(F32),
        dome_curv=u(0.9, 1.3),
        body_w=u(0.86, 0.98),
        texture=rng.integers(0, 48, n).astype(np.int32),
        air=u(0.30, 0.36),
        marking_gain=u(0.8, 1.2),
        exposure=exposure,
        brightness=rng.normal(0, 0.03, n).astype(F32),
        noise=noise,
        blur=np.clip(rng.normal(0.15, 0.15, n), 0, 1).astype(F32) + 0.25 * ap.astype(F32),
    )


#: the patient attributes' effects on appearance (generator 1.2): a female thorax is narrower
#: (``body_w`` x ``FEMALE_WIDTH``: lungs and heart scale with it) with slightly shorter lungs
#: (``inspiration`` x ``FEMALE_HEIGHT``); bone density falls with age (``bone_gain`` =
#: ``1.1 - BONE_LOSS_PER_YEAR * (age - 20)``, clipped to [0.55, 1.1]) and lungs grow more lucent
#: (``air`` + ``AIR_PER_YEAR * (age - 45)``).
FEMALE_WIDTH = 0.93
FEMALE_HEIGHT = 0.97
BONE_LOSS_PER_YEAR = 0.008
AIR_PER_YEAR = 0.0006


def apply_attributes(an: Anatomy, female: np.ndarray, age: np.ndarray) -> None:
    """Apply the per-image sex and age effects (see :data:`FEMALE_WIDTH` etc.) in place."""
    female = np.asarray(female, bool)
    age = np.asarray(age, F32)
    an.body_w = np.where(female, an.body_w * F32(FEMALE_WIDTH), an.body_w).astype(F32)
    an.inspiration = np.where(female, an.inspiration * F32(FEMALE_HEIGHT),
                              an.inspiration).astype(F32)
    an.bone_gain = np.clip(1.1 - BONE_LOSS_PER_YEAR * (age - 20), 0.55, 1.1).astype(F32)
    an.air = (an.air + F32(AIR_PER_YEAR) * (age - 45)).astype(F32)


def quality_score(an: Anatomy) -> np.ndarray:
    """Image quality in [0, 1] (1 = ideal): penalises noise, blur, rotation, poor inspiration
    and under/over exposure, the criteria a radiologist applies."""
    q = (1.0
         - 6.0 * np.clip(an.noise - 0.015, 0, None)
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
        f = sq(dx) + np.where(dy < 0, sq(dy), p4(dy))
        lung = soft_inside(f, 0.25)
        lung *= np.clip((dome - Y) / 0.03, 0.0, 1.0)
        out.append(lung.astype(F32))
        domes.append(dome)
    return out[0], out[1], domes[0], domes[1]


def heart_shape(X: np.ndarray, Y: np.ndarray, an: Anatomy) -> np.ndarray:
    """Cardiac silhouette: a tilted ellipse whose transverse width is ``ctr * thorax width``."""
    width = col(an.ctr) * THORAX_WIDTH * col(an.body_w)
    hw = width / 2
    hx = 0.15 * width + col(an.mediastinal_shift)   # heart sits left of the mid-line
    hy = col(an.heart_y)
    t = 0.45
    dx, dy = X - hx, Y - hy
    ct, st = F32(np.cos(t)), F32(np.sin(t))
    u = dx * ct + dy * st
    v = dy * ct - dx * st
    f = sq(u / (hw * 0.95)) + sq(v / 0.36)
    return soft_inside(f, 0.10).astype(F32)


@lru_cache(maxsize=8)
def skeleton_bank(size: int, count: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Rigid layers rendered once per size in the body frame at twice the resolution:
    ``bones`` (ribs, clavicles, spine, mediastinum) and vessel ``markings``, ``count`` variants
    each (rib phase/spacing, vessel branching), ``[count, 2S, 2S]`` float32. Images pick a
    variant and sample it through their own body frame (:func:`warp`), so the layers move with
    the patient's position at the cost of one gather."""
    rng = np.random.default_rng(4242)
    x, y = grid(2 * size)
    X = np.repeat(x, count, 0)
    Y = np.repeat(y, count, 0)
    ax = np.abs(X)
    n = count
    v_n = col(rng.integers(7, 11, n))
    v_ph = col(rng.uniform(0, 2 * np.pi, n))
    markings = np.zeros_like(X)
    for sgn in (-1.0, 1.0):
        dx, dy = X - sgn * 0.17, Y + 0.02
        r = np.sqrt(dx * dx + dy * dy) + 1e-3
        phi = np.arctan2(dy, dx * sgn)
        wob = 0.35 * np.sin(6.0 * r + v_ph)
        b = np.clip(np.cos(v_n * phi + wob + v_ph * sgn), 0.01, None)
        markings += p4(b) * b * b * np.exp(-r / 0.28) + 0.8 * np.exp(-sq(r / 0.10))
    # ribs: posterior arcs (rise laterally, curve down at the wall) and fainter anterior ribs
    sp = col(rng.uniform(0.15, 0.18, n))
    ph = col(rng.uniform(0, 1, n))
    cage = soft_inside(sq(ax / 0.76) + sq((Y + 0.05) / 0.85), 0.3) * (ax > 0.06) * (Y < 0.62)
    g1 = (Y + 0.55 * ax - 0.55 * ax * ax) / sp + ph
    post = np.clip(np.cos(2 * np.pi * g1) + 0.1, 0, 0.6) / 0.6
    g2 = (Y - 0.35 * ax) / (sp * 1.1) + ph * 0.7
    ant = np.clip(np.cos(2 * np.pi * g2) - 0.2, 0, 0.5) / 0.5
    bones = cage * (0.055 * post + 0.025 * ant)
    # clavicles: two bars from the sternal notch up and out
    for sgn in (-1.0, 1.0):
        p0 = (sgn * 0.08, -0.72)
        d = (sgn * 0.54, -0.14)
        dd = d[0] * d[0] + d[1] * d[1]
        t = np.clip(((X - p0[0]) * d[0] + (Y - p0[1]) * d[1]) / dd, 0, 1)
        dist = np.sqrt(sq(X - p0[0] - t * d[0]) + sq(Y - p0[1] - t * d[1]))
        bones += 0.16 * np.clip(1 - dist / 0.045, 0, 1)
    # mediastinum (wider at the aortic knob on the left) and the spine behind it
    med_w = 0.15 + 0.06 * np.exp(-sq((X - 0.14) / 0.08) - sq((Y + 0.30) / 0.08))
    medi = soft_inside(sq((X - 0.02) / med_w) + sq(p4((Y + 0.25) / 0.80)), 0.3)
    spine = np.sqrt(np.clip(1 - ax / 0.075, 0, 1)) * (1 + 0.15 * np.cos(2 * np.pi * Y / 0.12))
    bones += 0.06 * spine
    return (np.ascontiguousarray(bones, F32), np.ascontiguousarray(markings, F32),
            np.ascontiguousarray(medi, F32))


def warp(banks: tuple[np.ndarray, ...], k: np.ndarray, X: np.ndarray, Y: np.ndarray
         ) -> list[np.ndarray]:
    """Sample variant ``k[b]`` of each bank at body-frame coordinates (nearest neighbour)."""
    s2 = banks[0].shape[-1]
    ix = np.clip(((X + 1) * (0.5 * s2)).astype(np.int32), 0, s2 - 1)
    iy = np.clip(((Y + 1) * (0.5 * s2)).astype(np.int32), 0, s2 - 1)
    lin = iy * s2 + ix + col(k).astype(np.int64).astype(np.int32) * (s2 * s2)
    return [b.reshape(-1).take(lin) for b in banks]


def render_anatomy(an: Anatomy, size: int, rng: np.random.Generator) -> tuple[np.ndarray, Frame,
                                                                              dict]:
    """Density map ``[B, S, S]`` of the normal anatomy, the body frame and the lung/heart masks.

    Returns ``(density, frame, parts)`` where ``parts`` keeps the layers findings modify
    (``markings``: vessel markings; ``lungs``: soft lung fields; ``body``; ``air``)."""
    X, Y = body_frame(an, size)
    B = an.n
    ax = np.abs(X)
    lung_r, lung_l, dome_r, dome_l = lung_shapes(X, Y, an)
    lungs = np.maximum(lung_r, lung_l)

    # body: soft tissue with shoulders; dark air outside
    bw = col(an.body_w)
    body = soft_inside(p4(X / bw) + p4((Y - 0.15) / 1.25), 0.12)
    shoulders = soft_inside(sq(ax / (1.02 * bw)) + sq((Y + 0.95) / 0.35), 0.3)
    body = np.maximum(body, shoulders * (Y > -1.05))
    # soft tissue thicker laterally (chest wall) and at the bases (breasts, abdomen)
    dens = body * (0.50 + 0.3 * np.clip(ax - 0.55, 0, None) + 0.08 * np.clip(Y, 0, None))

    # lungs: air lowers density; darkest mid-lateral, whiter at apex and base
    zone = 1.0 - 0.35 * np.clip(-Y - 0.4, 0, None) - 0.25 * np.clip(Y - 0.1, 0, None)
    texture = pick_noise(rng, B, size, 0.05)
    air = col(an.air) * zone * (1.0 + 0.06 * texture)
    bones, markings, medi = warp(skeleton_bank(size), an.texture, X, Y)
    markings *= col(an.marking_gain)
    heart = heart_shape(X, Y, an)

    # abdomen under the domes, with a stomach gas bubble under the left dome
    below = np.maximum(np.clip((Y - dome_r) / 0.03, 0, 1) * (X < 0.05),
                       np.clip((Y - dome_l) / 0.03, 0, 1) * (X >= 0.05))
    stomach = soft_inside(sq((X - 0.42) / 0.12) + sq((Y - col(an.dome_l) - 0.1) / 0.07), 0.5)

    dens -= air * lungs * (1 - 0.6 * heart) * (1 - 0.6 * medi)
    dens += 0.06 * markings * lungs
    dens += 0.22 * heart + 0.17 * medi * (1 - 0.6 * heart)
    dens += bones * body * col(an.bone_gain)
    dens += (0.12 * body - 0.12 * stomach) * below
    frame = Frame(X=X, Y=Y, lung_r=lung_r, lung_l=lung_l, heart=heart, below_dome=below,
                  dome_y_r=dome_r, dome_y_l=dome_l)
    parts = {"markings": markings, "lungs": lungs, "body": body, "air": air}
    return dens.astype(F32, copy=False), frame, parts
