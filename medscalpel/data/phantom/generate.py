"""Generate the phantom CXR-14 dataset: labels, patients, splits, shortcuts and images.

Example:
    >>> from medscalpel.data.phantom import generate_phantom
    >>> data = generate_phantom(64, size=32, seed=0, progress=False)
    >>> data.images.shape, data.dataset("all").num_classes
    ((64, 32, 32), 14)
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from medscalpel.data.phantom.anatomy import (F32, Anatomy, apply_attributes, col, quality_score,
                                             render_anatomy, sample_anatomy)
from medscalpel.data.phantom.findings import (CLASS_NAMES, draw_chest_tube, draw_marker,
                                              modify_anatomy, render_finding, sample_severity,
                                              sample_side)
from medscalpel.data.phantom.labels import add_label_noise, sample_nih_labels
from medscalpel.data.phantom.store import ANATOMY_MASKS, PhantomData
from medscalpel.errors import ConfigError
from medscalpel.progress import track
from medscalpel.validation import check_fraction, check_range

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1.2"
#: age bands of the ``age_band`` attribute: (label, lowest age in years)
AGE_BANDS = (("<40", 0), ("40-59", 40), ("60+", 60))
CHUNK = 256
SPLITS = ("train", "val", "test", "shifted")
DEFAULT_SPLITS = {"train": 0.7, "val": 0.1, "test": 0.1, "shifted": 0.1}


@dataclass(frozen=True)
class ShortcutConfig:
    """Spurious cues and how strongly they are tied to labels.

    In ``train``/``val``/``test`` a chest tube is drawn in ``tube_pos`` of the images with a
    pneumothorax and ``tube_neg`` of the others, and a portable AP film (marker, magnified heart,
    poorer image) is taken for ``ap_pos`` of the images with edema or effusion and ``ap_neg`` of
    the others. In the ``shifted`` split both cues are independent of the labels
    (``tube_shifted``, ``ap_shifted``)."""

    tube_pos: float = 0.8
    tube_neg: float = 0.05
    tube_shifted: float = 0.5
    ap_pos: float = 0.7
    ap_neg: float = 0.15
    ap_shifted: float = 0.3

    def __post_init__(self):
        for k, v in asdict(self).items():
            check_fraction(v, k, "ShortcutConfig", allow_one=True)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShortcutConfig":
        return cls(**{k: float(v) for k, v in d.items()})


# ----------------------------------------------------------------------------- cohort
def _patients(rng: np.random.Generator, n: int) -> np.ndarray:
    """Patient index per image: 1-8 follow-up films per patient (mean ~2.2, as a long tail)."""
    sizes = np.minimum(rng.geometric(0.45, size=n), 8)
    ends = np.cumsum(sizes)
    k = int(np.searchsorted(ends, n)) + 1
    return np.repeat(np.arange(k), sizes[:k])[:n]


def _assign_splits(rng: np.random.Generator, patient: np.ndarray,
                   splits: dict[str, float]) -> np.ndarray:
    n_pat = int(patient.max()) + 1 if len(patient) else 0
    order = rng.permutation(n_pat)
    names = list(splits)
    frac = np.array([splits[s] for s in names], np.float64)
    cuts = np.round(np.cumsum(frac) / frac.sum() * n_pat).astype(int)
    pat_split = np.empty(n_pat, object)
    start = 0
    for name, end in zip(names, cuts):
        pat_split[order[start:end]] = name
        start = end
    return pat_split[patient].astype(str)


def _attributes(seed: int, patient: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image sex (True = female) and age in years, drawn per PATIENT from their own RNG
    stream (``[seed, 2]``) so that every other draw of the generator is unchanged."""
    rng = np.random.default_rng([seed, 2])
    n_pat = int(patient.max()) + 1 if len(patient) else 0
    female = rng.random(n_pat) < 0.45                       # NIH: 44% female
    age = np.clip(np.round(rng.normal(47.0, 16.5, n_pat)), 1, 95)   # NIH: mean 47, sd 17
    return female[patient], age[patient].astype(np.int16)


def age_band(age: np.ndarray) -> np.ndarray:
    """Age in years -> the :data:`AGE_BANDS` label."""
    lows = np.array([lo for _, lo in AGE_BANDS])
    names = np.array([name for name, _ in AGE_BANDS])
    return names[np.searchsorted(lows, np.asarray(age), side="right") - 1]


def _check_splits(splits: dict[str, float] | None) -> dict[str, float]:
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise ConfigError(f"The 'splits' parameter of generate_phantom must map names from "
                          f"{SPLITS} to fractions. Got {splits!r} instead.")
    for k, v in splits.items():
        check_range(v, f"splits[{k!r}]", "generate_phantom", 0.0, 1.0)
    if sum(splits.values()) <= 0:
        raise ConfigError("The 'splits' fractions of generate_phantom sum to 0; give at least "
                          "one split a positive fraction.")
    return splits


# ----------------------------------------------------------------------------- rendering
def _tone(dens: np.ndarray, an: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Density -> grey level in [0, 1]: film-like exposure curve, blur, quantum noise."""
    k = 2.0 * col(an.exposure)
    img = (1 - np.exp(-k * np.clip(dens, 0, None))) / (1 - np.exp(-k * 0.85))
    img = 0.03 + 0.92 * img + col(an.brightness)
    # blur: mix with a separable [1 2 1] smoothing (motion / focal spot)
    sm = img.copy()
    sm[:, 1:-1, :] = 0.25 * img[:, :-2, :] + 0.5 * img[:, 1:-1, :] + 0.25 * img[:, 2:, :]
    sm2 = sm.copy()
    sm2[:, :, 1:-1] = 0.25 * sm[:, :, :-2] + 0.5 * sm[:, :, 1:-1] + 0.25 * sm[:, :, 2:]
    b = col(np.clip(an.blur, 0, 1))
    return img * (1 - b) + sm2 * b


def render_chunk(rng: np.random.Generator, size: int, clean: np.ndarray,
                 patient_base: np.ndarray, ap: np.ndarray, tube: np.ndarray,
                 female: np.ndarray | None = None, age: np.ndarray | None = None,
                 ) -> dict[str, Any]:
    """Render one batch of images with their ground truth.

    Args:
        rng: the chunk's generator.
        size: image side.
        clean: ``[B, 14]`` clean labels (the findings drawn).
        patient_base: ``[B, 4]`` per-patient habitus.
        ap: ``[B]`` portable AP film.
        tube: ``[B]`` chest tube present.
        female, age: ``[B]`` patient sex (True = female) and age in years; their effects on
            the anatomy are :func:`~medscalpel.data.phantom.anatomy.apply_attributes`'s
            (``None``: no effect).
    """
    B = len(clean)
    an = sample_anatomy(rng, B, patient_base, ap)
    if female is not None and age is not None:
        apply_attributes(an, female, age)
    sev = np.zeros((B, len(CLASS_NAMES)), F32)
    side = np.full((B, len(CLASS_NAMES)), -1, np.int8)
    pos = {}
    for k, name in enumerate(CLASS_NAMES):
        idx = np.flatnonzero(clean[:, k])
        pos[name] = idx
        if len(idx):
            sev[idx, k] = sample_severity(rng, name, len(idx))
            side[idx, k] = sample_side(rng, name, len(idx))
            modify_anatomy(name, an, idx, sev[idx, k], side[idx, k], rng)
    dens, fr, parts = render_anatomy(an, size, rng)
    mask_rows, mask_cls, mask_list = [], [], []
    for k, name in enumerate(CLASS_NAMES):
        idx = pos[name]
        if not len(idx):
            continue
        m = render_finding(name, dens, fr, parts, an, idx, sev[idx, k], side[idx, k], rng)
        mask_rows.append(idx)
        mask_cls.append(np.full(len(idx), k, np.int8))
        mask_list.append(m.reshape(len(idx), -1))
    tube_idx = np.flatnonzero(tube)
    ptx = CLASS_NAMES.index("Pneumothorax")
    tube_side = np.where(side[:, ptx] >= 0, side[:, ptx], rng.integers(0, 2, B)).astype(np.int8)
    tube_side[~tube] = -1
    tube_mask = np.zeros((B, size * size), bool)
    if len(tube_idx):
        tube_mask[tube_idx] = draw_chest_tube(dens, fr, tube_idx,
                                              tube_side[tube_idx]).reshape(len(tube_idx), -1)
    img = _tone(dens, an, rng)
    draw_marker(img, np.flatnonzero(ap), "AP", size)
    draw_marker(img, np.flatnonzero(rng.random(B) < 0.5), "side", size)
    img += rng.standard_normal(img.shape, dtype=F32) * col(an.noise)
    images = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    anat = np.stack([fr.lung_r > 0.5, fr.lung_l > 0.5, fr.heart > 0.5], 1).reshape(B, 3, -1)
    packed = [np.packbits(m, axis=-1) for m in mask_list]
    return {
        "images": images,
        "anat_bits": np.packbits(anat, axis=-1),
        "tube_bits": np.packbits(tube_mask, axis=-1),
        "mask_rows": np.concatenate(mask_rows) if mask_rows else np.zeros(0, np.int64),
        "mask_cls": np.concatenate(mask_cls) if mask_cls else np.zeros(0, np.int8),
        "mask_bits": (np.concatenate(packed) if packed
                      else np.zeros((0, (size * size + 7) // 8), np.uint8)),
        "severity": sev,
        "side": side,
        "tube_side": tube_side,
        "quality": quality_score(an),
        "anatomy": an,
    }


# ----------------------------------------------------------------------------- public API
def generate_phantom(
    n: int = 2000,
    size: int = 64,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    splits: dict[str, float] | None = None,
    label_noise: float = 0.07,
    shortcut: ShortcutConfig | None = None,
    progress: bool | None = None,
) -> PhantomData:
    """Generate ``n`` phantom chest X-rays with NIH-distributed labels and full ground truth.

    Args:
        n: number of images (all splits together).
        size: image side in pixels (square).
        seed: the seed; the same arguments give byte-identical images and tables.
        out: directory to write (``images.npz``, ``masks.npz``, ``labels.csv``,
            ``groundtruth.csv``, ``phantom.json``); ``None`` keeps the data in memory only.
        splits: fractions of *patients* per split, from ``train``, ``val``, ``test`` (plain)
            and ``shifted`` (shortcuts independent of the labels). Default 0.7/0.1/0.1/0.1.
        label_noise: fraction of observed positive labels that are wrong (with as many missed
            positives per class), like NLP-mined report labels.
        shortcut: the spurious cues' strengths (:class:`ShortcutConfig`).
        progress: show a progress bar (``None``: the ``MEDSCALPEL_PROGRESS`` default).

    Returns:
        :class:`PhantomData`: images, noisy observed labels, ground truth and masks; use
        ``.dataset(split)`` for a :class:`~medscalpel.data.base.CXRDataset`.
    """
    check_range(n, "n", "generate_phantom", 1, integer=True)
    check_range(size, "size", "generate_phantom", 16, 1024, integer=True)
    check_range(seed, "seed", "generate_phantom", 0, integer=True)
    label_noise = check_fraction(label_noise, "label_noise", "generate_phantom")
    splits = _check_splits(splits)
    shortcut = shortcut or ShortcutConfig()
    t0 = time.perf_counter()

    rng = np.random.default_rng([seed, 0])
    observed = sample_nih_labels(rng, n)
    clean, flips = add_label_noise(rng, observed, label_noise)
    patient = _patients(rng, n)
    split = _assign_splits(rng, patient, splits)
    base = rng.standard_normal((int(patient.max()) + 1, 4)).astype(F32)[patient]
    tube, ap = _shortcut_cues(rng, clean, split == "shifted", shortcut)
    female, age = _attributes(seed, patient)
    chunks = _render_chunks(seed, size, clean, base, ap, tube, female, age, progress)
    gt = _ground_truth(n, patient, split, chunks, clean, flips, tube, ap, female, age)
    data = _phantom_data(chunks, observed, gt, meta={
        "schema_version": 1,
        "generator": "medscalpel.data.phantom",
        "generator_version": GENERATOR_VERSION,
        "n": n, "size": size, "seed": seed,
        "splits": splits,
        "label_noise": label_noise,
        "shortcut": shortcut.to_dict(),
        "class_names": CLASS_NAMES,
        "anatomy_masks": list(ANATOMY_MASKS),
        "seconds": round(time.perf_counter() - t0, 3),
    })
    if out is not None:
        data.save(out)
    logger.info("phantom: %d images %dx%d in %.2f s", n, size, size, data.meta["seconds"])
    return data


def _shortcut_cues(rng: np.random.Generator, clean: np.ndarray, shifted: np.ndarray,
                   shortcut: ShortcutConfig) -> tuple[np.ndarray, np.ndarray]:
    """Who gets a chest tube and a portable AP film: tied to pneumothorax / fluid (edema,
    effusion) by ``shortcut``'s strengths, independent of the labels in the ``shifted`` split."""
    n = len(clean)
    ptx = clean[:, CLASS_NAMES.index("Pneumothorax")] == 1
    fluid = (clean[:, CLASS_NAMES.index("Edema")] == 1) | (clean[:, CLASS_NAMES.index("Effusion")]
                                                           == 1)
    p_tube = np.where(shifted, shortcut.tube_shifted,
                      np.where(ptx, shortcut.tube_pos, shortcut.tube_neg))
    p_ap = np.where(shifted, shortcut.ap_shifted, np.where(fluid, shortcut.ap_pos, shortcut.ap_neg))
    tube = rng.random(n) < p_tube
    ap = rng.random(n) < p_ap
    return tube, ap


def _render_chunks(seed: int, size: int, clean: np.ndarray, base: np.ndarray, ap: np.ndarray,
                   tube: np.ndarray, female: np.ndarray, age: np.ndarray,
                   progress: bool | None) -> list[dict[str, Any]]:
    """:func:`render_chunk` over blocks of :data:`CHUNK` images, each with its own seeded
    generator (so a block's pixels do not depend on the others)."""
    n = len(clean)
    chunks = []
    starts = range(0, n, CHUNK)
    for c in track(starts, "phantom", total=len(starts), progress=progress):
        sl = slice(c, min(c + CHUNK, n))
        crng = np.random.default_rng([seed, 1, c // CHUNK])
        chunks.append(render_chunk(crng, size, clean[sl], base[sl], ap[sl], tube[sl],
                                   female[sl], age[sl]))
    return chunks


def _phantom_data(chunks: list[dict[str, Any]], observed: np.ndarray, gt: pd.DataFrame,
                  meta: dict[str, Any]) -> PhantomData:
    """The rendered blocks joined into one :class:`PhantomData` (mask rows offset to global
    image indices)."""
    mask_rows = np.concatenate([c["mask_rows"] + i * CHUNK for i, c in enumerate(chunks)])
    return PhantomData(
        images=np.concatenate([c["images"] for c in chunks]),
        labels=observed.astype(np.float32),
        gt=gt,
        anat_bits=np.concatenate([c["anat_bits"] for c in chunks]),
        tube_bits=np.concatenate([c["tube_bits"] for c in chunks]),
        mask_rows=mask_rows.astype(np.int32),
        mask_cls=np.concatenate([c["mask_cls"] for c in chunks]).astype(np.int8),
        mask_bits=np.concatenate([c["mask_bits"] for c in chunks]),
        meta=meta,
    )


def _ground_truth(n, patient, split, chunks, clean, flips, tube, ap, female, age
                  ) -> pd.DataFrame:
    sev = np.concatenate([c["severity"] for c in chunks])
    side = np.concatenate([c["side"] for c in chunks])
    an = [c["anatomy"] for c in chunks]
    cat = lambda attr: np.concatenate([getattr(a, attr) for a in an])  # noqa: E731
    cols: dict[str, Any] = {
        "id": [f"phantom_{i:06d}" for i in range(n)],
        "patient_id": [f"P{p:06d}" for p in patient],
        "split": split,
        "view": np.where(ap, "AP", "PA"),
        "sex": np.where(female, "F", "M"),
        "age": age,
        "age_band": age_band(age),
        "ap_marker": ap,
        "chest_tube": tube,
        "tube_side": np.concatenate([c["tube_side"] for c in chunks]),
        "quality": np.round(np.concatenate([c["quality"] for c in chunks]), 4),
        "noise": np.round(cat("noise"), 4),
        "exposure": np.round(cat("exposure"), 4),
        "rotation": np.round(cat("rot"), 4),
        "inspiration": np.round(cat("inspiration"), 4),
        "ctr": np.round(cat("ctr"), 4),
        "n_flipped": flips.sum(1),
    }
    for k, c in enumerate(CLASS_NAMES):
        cols[f"clean_{c}"] = clean[:, k]
        cols[f"flip_{c}"] = flips[:, k]
        cols[f"sev_{c}"] = np.round(sev[:, k], 4)
        cols[f"side_{c}"] = side[:, k]
    return pd.DataFrame(cols)
