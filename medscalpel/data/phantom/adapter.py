"""The ``phantom`` dataset adapter.

``phantom:/dir`` reads a directory written by ``medscalpel data phantom`` (or
:func:`~medscalpel.data.phantom.generate.generate_phantom` with ``out=``). Plain ``phantom``
(no path) generates the data from the options ``n``, ``size`` and ``seed`` and caches it under
``$MEDSCALPEL_CACHE`` (default ``~/.cache/medscalpel``) so that every split of one spec sees
the same images. Splits: ``train``, ``val``, ``test`` (plain), ``shifted`` (the shortcuts are
independent of the labels there) and ``all``. ``site=B`` shows the same images through a second
"scanner" (field of view, contrast curve, noise, a marker; see
:mod:`medscalpel.data.phantom.sites`): labels, patients and splits are unchanged.

The observed labels are the noisy ones (as NLP-mined labels are); the dataset also exposes the
ground truth of each image: :attr:`PhantomDataset.gt` (severity, clean labels, label flips,
quality, confounders), :meth:`PhantomDataset.masks` (lungs, heart and one mask per finding) and
:meth:`PhantomDataset.confounder` (per-image flags, e.g. ``chest_tube``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from medscalpel.data.base import CXRDataset
from medscalpel.data.phantom.generate import GENERATOR_VERSION, generate_phantom
from medscalpel.data.phantom.sites import apply_site, get_site, site_masks
from medscalpel.data.phantom.store import META, PhantomData
from medscalpel.data.spec import DATASETS
from medscalpel.data.transforms import Preprocess
from medscalpel.errors import DataError
from medscalpel.validation import check_range

logger = logging.getLogger(__name__)

_MEMORY: dict[tuple, PhantomData] = {}


class PhantomDataset(CXRDataset):
    """One split of a phantom, with its per-image ground truth."""

    name = "phantom"

    def __init__(self, data: PhantomData, split: str = "train",
                 preprocess: Preprocess | None = None, spec: str = "phantom", site: str = "A"):
        super().__init__(preprocess, spec=spec, split=split)
        self.phantom = data
        self.site = get_site(site)
        self.rows = data.rows(split)
        gt = data.gt.iloc[self.rows].reset_index(drop=True)
        self.gt: pd.DataFrame = gt
        self._set_tables(gt["id"].tolist(), data.labels[self.rows], data.class_names,
                         "multilabel", gt["patient_id"].tolist())
        self.meta = {"phantom": {k: v for k, v in data.meta.items() if k != "files"},
                     "path": str(data.path) if data.path else None,
                     "site": self.site.to_dict()}
        # site B's pixels are computed once per dataset (seeded per phantom row)
        self._images = (None if self.site.identity
                        else apply_site(data.images[self.rows], self.site, self.rows))

    def attributes(self) -> pd.DataFrame:
        """Per-image attributes (sex, age band, view), indexed like :attr:`ids`."""
        return self.phantom.attributes(self.rows)

    def load_raw(self, index: int) -> np.ndarray:
        if self._images is None:
            return self.phantom.images[int(self.rows[index])]
        return self._images[index]

    def masks(self, index: int) -> dict[str, np.ndarray]:
        """Ground-truth masks of item ``index``: ``lung_right``, ``lung_left``, ``heart`` and one
        per finding drawn in the image (at the phantom's resolution, through the site's field
        of view)."""
        return site_masks(self.phantom.masks(int(self.rows[index])), self.site)

    def confounder(self, name: str) -> np.ndarray:
        """Per-image boolean flags of a confounder: ``chest_tube`` or ``ap_marker``."""
        if name not in ("chest_tube", "ap_marker"):
            raise DataError(f"The phantom has no confounder {name!r}; it has 'chest_tube' and "
                            "'ap_marker'.")
        return self.gt[name].to_numpy().astype(bool)

    def clean_labels(self) -> np.ndarray:
        return self.phantom.clean_labels()[self.rows]

    def label_flips(self) -> np.ndarray:
        return self.phantom.label_flips()[self.rows]

    def severity(self) -> np.ndarray:
        return self.phantom.severity()[self.rows]


def _cache_dir() -> Path:
    return Path(os.environ.get("MEDSCALPEL_CACHE", Path.home() / ".cache" / "medscalpel"))


def load_or_generate(root: str | None, n: int, size: int, seed: int) -> PhantomData:
    """Read ``root``, or generate (and cache) the phantom of ``(n, size, seed)``."""
    if root:
        return PhantomData.load(root)
    key = (n, size, seed)
    if key in _MEMORY:
        return _MEMORY[key]
    cache = _cache_dir() / "phantom" / f"v{GENERATOR_VERSION}-n{n}-s{size}-seed{seed}"
    data = None
    if (cache / META).is_file():
        try:
            data = PhantomData.load(cache)
        except DataError as exc:  # a damaged cache is regenerated
            logger.warning("regenerating the phantom cache %s: %s", cache, exc)
    if data is None:
        data = generate_phantom(n=n, size=size, seed=seed)
        try:
            data.save(cache)
        except OSError as exc:  # a read-only home: keep it in memory only
            logger.warning("cannot cache the phantom in %s: %s", cache, exc)
    _MEMORY[key] = data
    return data


@DATASETS.register("phantom", help="Phantom CXR-14, the generated default (phantom:DIR or "
                                   "phantom?n=N&size=S&seed=K)")
def open_phantom(root: str | None, split: str = "train", preprocess: Preprocess | None = None,
                 n: int = 2000, size: int = 64, seed: int = 0, site: str = "A") -> PhantomDataset:
    """Open a split of a phantom directory (``root``) or of the generated default, as seen by
    acquisition site ``site`` (``A`` = as generated, ``B`` = the second scanner)."""
    check_range(n, "n", "the 'phantom' adapter", 1, integer=True)
    check_range(size, "size", "the 'phantom' adapter", 16, 1024, integer=True)
    check_range(seed, "seed", "the 'phantom' adapter", 0, integer=True)
    data = load_or_generate(root, n, size, seed)
    prof = get_site(site)
    spec = f"phantom:{root}" if root else f"phantom?n={n}&size={size}&seed={seed}"
    if prof.name != "A":
        spec += ("&" if "?" in spec else "?") + f"site={prof.name}"
    return PhantomDataset(data, split=split, preprocess=preprocess, spec=spec,
                          site=prof.name).require_nonempty()
