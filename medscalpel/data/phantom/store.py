"""The phantom's in-memory form and its directory format.

A phantom directory holds:

* ``images.npz`` - ``images`` uint8 ``[N, S, S]``;
* ``masks.npz`` - packed-bit masks: ``anat_bits`` ``[N, 3, ceil(S*S/8)]`` (right lung, left lung,
  heart) and one row of ``mask_bits`` per present finding, with its image row (``mask_rows``)
  and class index (``mask_cls``);
* ``labels.csv`` - ``id, patient_id, split`` and the 14 *observed* (noisy) labels;
* ``groundtruth.csv`` - per image: view, patient attributes (``sex``, ``age``, ``age_band``;
  generator >= 1.2), confounders (``chest_tube``, ``ap_marker``), quality,
  acquisition parameters, and per finding ``clean_*``, ``flip_*``, ``sev_*``, ``side_*``;
* ``phantom.json`` - generator parameters, class names, file hashes.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medscalpel.errors import DataError
from medscalpel.layout import artifact
from medscalpel.runs import atomic_path, hash_file, read_json, write_json
from medscalpel.validation import check_in

ANATOMY_MASKS = ("lung_right", "lung_left", "heart")
#: per-image attributes with a known effect on appearance (generator >= 1.2) and the view
ATTRIBUTES = ("sex", "age_band", "view")
META = "phantom.json"
#: the observed-label table (the run directory's ``phantom_data`` artifact)
LABELS = artifact("phantom_data").filename
FILES = ("images.npz", "masks.npz", LABELS, "groundtruth.csv")


@dataclass
class PhantomData:
    """All phantom images of every split with labels, ground truth and masks."""

    images: np.ndarray
    labels: np.ndarray
    gt: pd.DataFrame
    anat_bits: np.ndarray
    mask_rows: np.ndarray
    mask_cls: np.ndarray
    mask_bits: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    tube_bits: np.ndarray | None = None

    def __post_init__(self):
        order = np.argsort(self.mask_rows, kind="stable")
        self.mask_rows = self.mask_rows[order]
        self.mask_cls = self.mask_cls[order]
        self.mask_bits = self.mask_bits[order]

    # ------------------------------------------------------------------ tables
    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def __len__(self) -> int:
        return len(self.images)

    def rows(self, split: str) -> np.ndarray:
        """Row indices of a split (``all`` = every row)."""

        names = ["all", *self.meta.get("splits", {})]
        check_in(split, "split", "the phantom dataset", names)
        if split == "all":
            return np.arange(len(self))
        return np.flatnonzero(self.gt["split"].to_numpy() == split)

    def clean_labels(self) -> np.ndarray:
        return self.gt[[f"clean_{c}" for c in self.class_names]].to_numpy(np.float32)

    def label_flips(self) -> np.ndarray:
        return self.gt[[f"flip_{c}" for c in self.class_names]].to_numpy(bool)

    def severity(self) -> np.ndarray:
        return self.gt[[f"sev_{c}" for c in self.class_names]].to_numpy(np.float32)

    def attributes(self, rows: np.ndarray | None = None) -> pd.DataFrame:
        """Per-image attributes (:data:`ATTRIBUTES`: ``sex``, ``age_band``, ``view``) of
        ``rows`` (default: all), indexed by image id. Phantoms of generator < 1.2 have only
        ``view``."""
        gt = self.gt if rows is None else self.gt.iloc[np.asarray(rows, dtype=np.int64)]
        cols = [c for c in ATTRIBUTES if c in gt.columns]
        out = gt[cols].astype(str).copy()
        out.index = pd.Index(gt["id"].astype(str).to_numpy(), name="id")
        return out

    def masks(self, row: int) -> dict[str, np.ndarray]:
        """Boolean ``[S, S]`` masks of image ``row``: ``lung_right`` / ``lung_left`` (the
        patient's sides: image left / right), ``heart``, one per finding drawn in it and
        ``chest_tube`` when a chest drain is drawn (generator >= 1.2)."""
        if not 0 <= row < len(self):
            raise DataError(f"phantom: image row {row} is out of range [0, {len(self)}).")
        s = self.size
        out = {}
        anat = np.unpackbits(self.anat_bits[row], axis=-1, count=s * s).astype(bool)
        for k, name in enumerate(ANATOMY_MASKS):
            out[name] = anat[k].reshape(s, s)
        lo, hi = np.searchsorted(self.mask_rows, [row, row + 1])
        names = self.class_names
        for j in range(lo, hi):
            bits = np.unpackbits(self.mask_bits[j], count=s * s).astype(bool)
            out[names[int(self.mask_cls[j])]] = bits.reshape(s, s)
        if self.tube_bits is not None:
            tube = np.unpackbits(self.tube_bits[row], count=s * s).astype(bool)
            if tube.any():
                out["chest_tube"] = tube.reshape(s, s)
        return out

    def dataset(self, split: str = "train", preprocess=None, spec: str = "phantom"):
        """A :class:`~medscalpel.data.phantom.adapter.PhantomDataset` view of one split."""
        # the adapter builds on this module (it imports PhantomData): importing it at the top
        # would be a cycle
        from medscalpel.data.phantom.adapter import PhantomDataset

        return PhantomDataset(self, split=split, preprocess=preprocess, spec=spec)

    def summary(self) -> "PhantomSummary":
        return PhantomSummary.from_data(self)

    # ------------------------------------------------------------------ files
    def save(self, out: str | os.PathLike) -> Path:
        """Write the directory format (each file atomically); returns the directory."""

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "images.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, images=self.images)
        extra = {} if self.tube_bits is None else {"tube_bits": self.tube_bits}
        with atomic_path(out / "masks.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, anat_bits=self.anat_bits, mask_rows=self.mask_rows,
                                    mask_cls=self.mask_cls, mask_bits=self.mask_bits, **extra)
        lab = self.gt[["id", "patient_id", "split"]].copy()
        for k, c in enumerate(self.class_names):
            lab[c] = self.labels[:, k].astype(np.int8)
        with atomic_path(out / LABELS) as tmp:
            lab.to_csv(tmp, index=False)
        with atomic_path(out / "groundtruth.csv") as tmp:
            self.gt.to_csv(tmp, index=False)
        meta = dict(self.meta)
        meta["files"] = {f: hash_file(out / f) for f in FILES}
        write_json(out / META, meta)
        self.path = out
        return out

    @classmethod
    def load(cls, root: str | os.PathLike, verify: bool = False) -> "PhantomData":
        """Read a phantom directory written by :meth:`save` / ``medscalpel data phantom``.

        Args:
            root: the directory.
            verify: also check the files' SHA-256 against ``phantom.json``.
        """

        root = Path(root)
        if not root.is_dir():
            raise DataError(f"Phantom directory not found: {root}. Generate one with "
                            f"`medscalpel data phantom --out {root}` or use the spec 'phantom' "
                            "(generated on the fly).")
        meta_path = root / META
        if not meta_path.is_file():
            raise DataError(f"{root} is not a phantom directory: {META} is missing. Generate it "
                            "with `medscalpel data phantom --out DIR`.")
        meta = read_json(meta_path)
        if not isinstance(meta, dict):
            raise DataError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}.")
        need = ["schema_version", "class_names", "size", "n", "splits"]
        missing = [k for k in need if k not in meta]
        if missing:
            raise DataError(f"{meta_path} lacks the key(s) {missing}; the directory is corrupt "
                            "or from another tool: regenerate it with `medscalpel data phantom`.")
        if meta["schema_version"] != 1:
            raise DataError(f"{meta_path}: schema_version {meta['schema_version']!r} is not "
                            "supported (expected 1); regenerate the phantom.")
        for f in FILES:
            if not (root / f).is_file():
                raise DataError(f"{root / f} is missing; the phantom directory is incomplete: "
                                "regenerate it with `medscalpel data phantom`.")
            if verify and meta.get("files", {}).get(f) not in (None, hash_file(root / f)):
                raise DataError(f"{root / f} does not match the hash in {meta_path}: the file "
                                "changed after generation; regenerate the phantom.")
        try:
            with np.load(root / "images.npz", allow_pickle=False) as z:
                images = z["images"]
            with np.load(root / "masks.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("anat_bits", "mask_rows", "mask_cls", "mask_bits")}
                arrays["tube_bits"] = z["tube_bits"] if "tube_bits" in z.files else None
            lab = pd.read_csv(root / LABELS)
            gt = pd.read_csv(root / "groundtruth.csv")
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"{root}: cannot read the phantom files ({exc}); regenerate the "
                            "directory with `medscalpel data phantom`.") from exc
        names = list(meta["class_names"])
        n, s = int(meta["n"]), int(meta["size"])
        if images.shape != (n, s, s) or images.dtype != np.uint8:
            raise DataError(f"{root / 'images.npz'}: images have shape {images.shape} "
                            f"({images.dtype}); {META} says {n} images of {s}x{s} uint8.")
        miss = [c for c in ["id", "patient_id", "split", *names] if c not in lab.columns]
        if miss or len(lab) != n:
            raise DataError(f"{root / LABELS}: expected {n} rows with columns id, "
                            f"patient_id, split and {names}; missing {miss}, {len(lab)} rows.")
        if len(gt) != n or list(gt["id"]) != list(lab["id"]):
            raise DataError(f"{root / 'groundtruth.csv'} does not match {LABELS} row by row "
                            "(ids or row count differ); regenerate the phantom.")
        labels = lab[names].to_numpy(np.float32)
        gt = gt.assign(split=lab["split"].astype(str), id=lab["id"].astype(str),
                       patient_id=lab["patient_id"].astype(str))
        return cls(images=images, labels=labels, gt=gt, meta=meta, path=root, **arrays)


@dataclass
class PhantomSummary:
    """What was generated: counts per split, prevalences, confounder rates, timing."""

    n: int
    size: int
    seed: int
    path: str | None
    split_counts: dict[str, int]
    prevalence: dict[str, float]
    label_noise_rate: float
    tube_rate: dict[str, dict[str, float]]
    ap_rate: dict[str, float]
    mean_quality: float
    seconds: float
    images_per_s: float

    @classmethod
    def from_data(cls, d: PhantomData) -> "PhantomSummary":
        gt = d.gt
        ptx = gt["clean_Pneumothorax"].to_numpy() == 1
        tube = gt["chest_tube"].to_numpy().astype(bool)
        ap = gt["ap_marker"].to_numpy().astype(bool)
        split = gt["split"].to_numpy()
        tube_rate, ap_rate = {}, {}
        for s in sorted(set(split)):
            m = split == s
            tube_rate[s] = {"pneumothorax": float(tube[m & ptx].mean()) if (m & ptx).any()
                            else float("nan"),
                            "no_pneumothorax": float(tube[m & ~ptx].mean()) if (m & ~ptx).any()
                            else float("nan")}
            ap_rate[s] = float(ap[m].mean())
        pos = d.labels.sum()
        sec = float(d.meta.get("seconds", float("nan")))
        return cls(
            n=len(d), size=d.size, seed=int(d.meta.get("seed", -1)),
            path=str(d.path) if d.path else None,
            split_counts={s: int((split == s).sum()) for s in sorted(set(split))},
            prevalence={c: float(v) for c, v in zip(d.class_names, d.labels.mean(0))},
            label_noise_rate=float(d.label_flips()[d.labels == 1].sum() / max(pos, 1)),
            tube_rate=tube_rate, ap_rate=ap_rate,
            mean_quality=float(gt["quality"].mean()),
            seconds=sec, images_per_s=float(len(d) / sec) if sec and sec > 0 else float("nan"),
        )

    def to_dict(self) -> dict[str, Any]:
    
        return asdict(self)
