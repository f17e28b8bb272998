"""MedMNIST (``medmnist``): any 2D MedMNIST ``.npz`` (28, 64, 128 or 224 px).

The file holds ``train_images``/``train_labels``, ``val_*`` and ``test_*`` arrays (images
``[N, H, W]`` grey or ``[N, H, W, 3]`` colour; labels ``[N, 1]`` class index or ``[N, K]``
multi-hot). The flag (``chestmnist``, ``pneumoniamnist``, ...) is read from the file name
(``chestmnist_64.npz`` -> ``chestmnist``) or given with ``flag=``.

Tasks and class names: ``chestmnist`` is multi-label over the 14 NIH findings, named as the
``nih`` adapter names them (:data:`~medscalpel.data.labels.NIH_CLASSES`, same order), so models
move between the two; ``pneumoniamnist`` is binary multi-class ``NORMAL``/``PNEUMONIA`` (the
Kermany folder names, its source); the other 2D sets are multi-class with the names of the
MedMNIST ``INFO`` table (retinamnist's ordinal grades are treated as classes).

Splits: the file's own ``train`` / ``val`` / ``test``; ``all`` concatenates them. Ids are
``{split}_{row:06d}``; MedMNIST carries no patient ids. Colour sets (pathmnist, dermamnist,
bloodmnist, retinamnist) stay RGB only with ``Preprocess(colour=True)``.

Example:
    >>> ds = open_dataset("medmnist:/data/pneumoniamnist_64.npz", split="test")  # doctest: +SKIP
    >>> path = download_medmnist("chestmnist", 64, "/data")  # doctest: +SKIP
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from medscalpel.data.base import ArrayDataset, CXRDataset
from medscalpel.data.labels import NIH_CLASSES, check_common, require_dir
from medscalpel.data.spec import DATASETS
from medscalpel.data.transforms import Preprocess
from medscalpel.errors import DataError, optional_import
from medscalpel.validation import check_in

#: class names of the 2D MedMNIST sets (MedMNIST v2/v3 INFO; chest sets renamed, see above)
MEDMNIST_CLASSES: dict[str, tuple[str, ...]] = {
    "pathmnist": ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                  "normal colon mucosa", "cancer-associated stroma",
                  "colorectal adenocarcinoma epithelium"),
    "chestmnist": NIH_CLASSES,
    "dermamnist": ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                   "benign keratosis-like lesions", "dermatofibroma", "melanoma",
                   "melanocytic nevi", "vascular lesions"),
    "octmnist": ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
    "pneumoniamnist": ("NORMAL", "PNEUMONIA"),
    "retinamnist": ("0", "1", "2", "3", "4"),
    "breastmnist": ("malignant", "normal, benign"),
    "bloodmnist": ("basophil", "eosinophil", "erythroblast",
                   "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
                   "lymphocyte", "monocyte", "neutrophil", "platelet"),
    "tissuemnist": ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
                    "Glomerular endothelial cells", "Interstitial endothelial cells",
                    "Leukocytes", "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"),
    "organamnist": ("bladder", "femur-left", "femur-right", "heart", "kidney-left",
                    "kidney-right", "liver", "lung-left", "lung-right", "pancreas", "spleen"),
}
MEDMNIST_CLASSES["organcmnist"] = MEDMNIST_CLASSES["organamnist"]
MEDMNIST_CLASSES["organsmnist"] = MEDMNIST_CLASSES["organamnist"]
MULTILABEL_FLAGS = ("chestmnist",)
SIZES = (28, 64, 128, 224)
_FLAG = re.compile(r"^([a-z]+mnist)(?:_(\d+))?$")


def medmnist_class_names(flag: str) -> tuple[str, ...]:
    """Class names of a 2D MedMNIST flag (see the module docstring for the chest renames)."""
    if flag in MEDMNIST_CLASSES:
        return MEDMNIST_CLASSES[flag]
    try:  # a set newer than the table: ask the medmnist package when installed
        import medmnist  # type: ignore[import-not-found]

        info = medmnist.INFO[flag]
        return tuple(info["label"][str(k)] for k in range(len(info["label"])))
    except (ImportError, KeyError):
        raise DataError(f"Unknown MedMNIST flag {flag!r}: the 2D sets are "
                        f"{', '.join(sorted(MEDMNIST_CLASSES))}. Name the file "
                        "'<flag>[_<size>].npz' or add ?flag=<flag> to the spec.") from None


class MedMNISTDataset(ArrayDataset):
    """A MedMNIST split held in memory."""

    name = "medmnist"


def _flag_of(path: Path) -> str:
    m = _FLAG.match(path.stem.lower())
    if not m:
        raise DataError(f"Cannot tell the MedMNIST set from the file name {path.name!r}: expected "
                        "'<flag>[_<size>].npz' such as 'chestmnist_64.npz'. Add ?flag=<flag> to the spec.")
    return m.group(1)


@DATASETS.register("medmnist", help="any 2D MedMNIST .npz (chestmnist, pneumoniamnist, ...)")
def open_medmnist(root: str | None, split: str = "train", preprocess: Preprocess | None = None,
                  flag: str | None = None, skip_corrupt: bool = False) -> CXRDataset:
    """Open a 2D MedMNIST ``.npz`` (see the module docstring).

    Args:
        root: the ``.npz`` file.
        split: ``train``, ``val``, ``test`` or ``all``.
        flag: the MedMNIST set; default from the file name.
        skip_corrupt: accepted for uniformity with the file adapters (arrays cannot be corrupt
            image files; a damaged ``.npz`` raises :class:`DataError`).
    """
    check_common("medmnist", split)
    path = require_dir(root, "medmnist", "medmnist:/data/chestmnist_64.npz")
    if path.is_dir():
        raise DataError(f"{path} is a folder; the 'medmnist' adapter takes the .npz file itself, "
                        "e.g. 'medmnist:/data/chestmnist_64.npz'.")
    flag = (flag or _flag_of(path)).lower()
    names = medmnist_class_names(flag)
    task = "multilabel" if flag in MULTILABEL_FLAGS else "multiclass"
    splits = ("train", "val", "test") if split == "all" else (split,)
    images, labels, ids = [], [], []
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            for s in splits:
                need = [f"{s}_images", f"{s}_labels"]
                missing = [k for k in need if k not in keys]
                if missing:
                    raise DataError(f"{path} lacks the arrays {missing}; it has {sorted(keys)}. "
                                    "Use an official MedMNIST .npz (download_medmnist).")
                x, y = npz[need[0]], npz[need[1]]
                if len(x) != len(y):
                    raise DataError(f"{path}: {need[0]} has {len(x)} images but {need[1]} "
                                    f"has {len(y)} labels.")
                images.append(x)
                labels.append(y)
                ids += [f"{s}_{i:06d}" for i in range(len(x))]
    except (OSError, ValueError, EOFError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"Cannot read {path} as a .npz file: {exc}. Re-download it.") from exc
    x = np.concatenate(images) if len(images) > 1 else images[0]
    y = np.concatenate(labels) if len(labels) > 1 else labels[0]
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    y = _labels(y, task, names, path)
    ds = MedMNISTDataset(x, y, names, task, ids=ids, preprocess=preprocess, spec="medmnist",
                         split=split)
    ds.meta = {"flag": flag, "file": str(path), "image_size": int(x.shape[1])}
    return ds.require_nonempty()


def _labels(y: np.ndarray, task: str, names: tuple[str, ...], path: Path) -> np.ndarray:
    y = np.asarray(y)
    if task == "multilabel":
        if y.ndim != 2 or y.shape[1] != len(names):
            raise DataError(f"{path}: multi-label labels must be [N, {len(names)}]; got "
                            f"{y.shape}. Is the flag right?")
        return y.astype(np.float32)
    y = y.reshape(len(y), -1)
    if y.shape[1] != 1:
        raise DataError(f"{path}: multi-class labels must be [N, 1]; got {y.shape}. Is the flag "
                        "right?")
    y = y[:, 0].astype(np.int64)
    if len(y) and (y.min() < 0 or y.max() >= len(names)):
        raise DataError(f"{path}: class index {int(y.max())} out of range for the "
                        f"{len(names)} classes {list(names)}. Is the flag right?")
    return y


def download_medmnist(flag: str, size: int = 28, root: str | Path = ".") -> Path:
    """Download a 2D MedMNIST ``.npz`` with the ``medmnist`` package (extra ``medmnist``).

    Args:
        flag: e.g. ``"chestmnist"`` or ``"pneumoniamnist"``.
        size: 28, 64, 128 or 224.
        root: the folder to write into.

    Returns:
        The path of the ``.npz`` (``<flag>.npz`` for 28 px, else ``<flag>_<size>.npz``).

    Raises:
        MissingExtraError: the ``medmnist`` package is not installed.
        DataError: the download failed (e.g. no internet).
    """
    check_in(size, "size", "download_medmnist", SIZES)
    flag = str(flag).lower()
    medmnist_class_names(flag)  # validates the flag
    mm: Any = optional_import("medmnist", "medmnist", "downloading MedMNIST")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    info = mm.INFO[flag]
    cls = getattr(mm, info["python_class"])
    try:
        try:
            cls(split="train", download=True, root=str(root), size=size)
        except TypeError:  # medmnist < 3 has no size argument (28 px only)
            if size != 28:
                raise DataError("The installed medmnist package only offers 28 px; upgrade it "
                                f"(pip install -U 'medmnist>=3') for size {size}.") from None
            cls(split="train", download=True, root=str(root))
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - network/HTTP/checksum failures from medmnist
        raise DataError(
            f"Downloading MedMNIST '{flag}' ({size} px) into {root} failed: "
            f"{type(exc).__name__}: {exc}. This machine may have no internet access: download "
            f"{flag}{'' if size == 28 else f'_{size}'}.npz elsewhere (see https://medmnist.com) "
            "and open it with 'medmnist:/path/to/file.npz'.") from exc
    out = root / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")
    if not out.is_file():
        raise DataError(f"medmnist reported success but {out} does not exist; look in {root}.")
    return out
