"""NIH ChestX-ray14 label statistics for the phantom: the shipped label-combination table,
label resampling, NLP-like label noise, and the statistics the tests compare."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

import numpy as np

from medscalpel.data.phantom.findings import CLASS_NAMES
from medscalpel.errors import DataError

TABLE = "nih_label_combinations.json"


@lru_cache(maxsize=1)
def nih_label_table() -> tuple[np.ndarray, np.ndarray]:
    """The shipped NIH table as ``(combos [C, 14] uint8, counts [C] int64)``.

    Built by ``scripts/build_nih_label_table.py`` from the official Data_Entry_2017_v2020.csv."""
    try:
        text = resources.files("medscalpel.resources").joinpath(TABLE).read_text("utf-8")
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise DataError(f"The package resource medscalpel/resources/{TABLE} is missing; rebuild "
                        "it with scripts/build_nih_label_table.py or reinstall medscalpel.") from exc
    data = json.loads(text)
    if data.get("class_names") != CLASS_NAMES:
        raise DataError(f"medscalpel/resources/{TABLE}: class_names differ from the phantom's "
                        f"{CLASS_NAMES}; rebuild it with scripts/build_nih_label_table.py.")
    combos = np.zeros((len(data["combinations"]), len(CLASS_NAMES)), np.uint8)
    counts = np.zeros(len(data["combinations"]), np.int64)
    for r, (key, cnt) in enumerate(data["combinations"]):
        for name in filter(None, key.split("|")):
            combos[r, CLASS_NAMES.index(name)] = 1
        counts[r] = cnt
    return combos, counts


def nih_statistics() -> dict[str, np.ndarray]:
    """Exact NIH prevalence ``[14]``, pairwise intersection and union probabilities ``[14,14]``
    and Jaccard ``[14,14]`` computed from the table."""
    combos, counts = nih_label_table()
    w = counts / counts.sum()
    c = combos.astype(np.float64)
    prev = w @ c
    inter = (c * w[:, None]).T @ c
    union = prev[:, None] + prev[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        jac = np.where(union > 0, inter / union, 0.0)
    return {"prevalence": prev, "intersection": inter, "union": union, "jaccard": jac}


def label_statistics(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Prevalence and pairwise Jaccard of a 0/1 label matrix ``[N, K]``."""
    y = (np.asarray(labels) > 0.5).astype(np.float64)
    prev = y.mean(0)
    inter = y.T @ y / len(y)
    union = prev[:, None] + prev[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        jac = np.where(union > 0, inter / union, 0.0)
    return {"prevalence": prev, "intersection": inter, "union": union, "jaccard": jac}


def sample_nih_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` label vectors resampled from the real NIH label-combination distribution."""
    combos, counts = nih_label_table()
    rows = rng.choice(len(combos), size=n, p=counts / counts.sum())
    return combos[rows].copy()


def add_label_noise(rng: np.random.Generator, observed: np.ndarray,
                    rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Split observed (report-mined) labels into clean truth and flip flags.

    A fraction ``rate`` of the observed positives are false positives (the finding is not in the
    image), and, per class, an equal expected number of observed negatives are missed findings
    (present in the image), so the clean prevalence equals the observed one on average, as for
    NLP-mined labels with ~``1 - rate`` precision and recall.

    Returns:
        ``(clean [N,K] uint8, flipped [N,K] bool)``.
    """
    obs = np.asarray(observed, np.uint8)
    prev = nih_statistics()["prevalence"]
    p_fn = np.clip(rate * prev / np.clip(1 - prev, 1e-9, None), 0, 1)
    u = rng.random(obs.shape)
    flip = np.where(obs == 1, u < rate, u < p_fn[None, :])
    clean = np.where(flip, 1 - obs, obs).astype(np.uint8)
    return clean, flip
