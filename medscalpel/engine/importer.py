"""Import predictions made elsewhere: a CSV of probabilities (or logits) keyed by image id,
with labels taken from a dataset spec."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from medscalpel.data.spec import open_dataset
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import DataError
from medscalpel.validation import check_in


def _match_column(columns: list[str], name: str) -> str | None:
    low = {c.lower(): c for c in columns}
    for cand in (name, f"prob_{name}", f"p_{name}", f"logit_{name}", name.replace("_", " "),
                 f"prob_{name.replace('_', ' ')}"):
        if cand.lower() in low:
            return low[cand.lower()]
    return None


def import_predictions(
    csv_path: str | os.PathLike,
    labels: str,
    id_column: str = "Image Index",
    values: str = "probability",
    split: str = "test",
    labels_split: str = "all",
    model_id: str | None = None,
    allow_missing: bool = False,
) -> Predictions:
    """Build a :class:`Predictions` from a CSV of per-class scores keyed by image id.

    Args:
        csv_path: CSV with an id column and one column per class (named as the class, or
            ``prob_<class>`` / ``logit_<class>``).
        labels: dataset spec giving ids and labels, e.g. ``nih:/data/nih14-labels?labels_only=true``.
        values: ``probability`` (converted to logits) or ``logit``.
        split: the split name recorded in the result.
        labels_split: which split of the labels dataset to read.
        allow_missing: drop CSV rows whose id has no label (else an error naming them).

    Raises:
        DataError: missing file/columns, ids without labels, probabilities outside [0, 1].
    """
    check_in(values, "values", "import_predictions", ("probability", "logit"))
    path = Path(csv_path)
    df = _read_scores_csv(path, id_column)
    ds = open_dataset(labels, split=labels_split)
    cols = _class_columns(df, ds.class_names, path)
    if df[id_column].duplicated().any():
        dup = df[id_column][df[id_column].duplicated()].iloc[0]
        raise DataError(f"{path}: image id {dup!r} appears more than once.")
    pos = {i: k for k, i in enumerate(ds.ids)}
    ids = df[id_column].astype(str).tolist()
    missing = [i for i in ids if i not in pos]
    if missing and not allow_missing:
        raise DataError(f"{path}: {len(missing)} id(s) have no label in {labels} (first: "
                        f"{missing[:3]}). Add --allow-missing (Python: allow_missing=True) to drop them.")
    keep = [k for k, i in enumerate(ids) if i in pos]
    if not keep:
        raise DataError(f"{path} has no rows with a labelled image id (it has {len(df)} data "
                        "rows). Check the file and the --data dataset spec.")
    logits = _to_logits(_numeric_scores(df, cols, keep, path), values, path)
    rows = [pos[ids[k]] for k in keep]
    return Predictions(logits=logits.astype(np.float32), labels=ds.labels[rows],
                       ids=tuple(ids[k] for k in keep), class_names=tuple(ds.class_names),
                       task=ds.task, split=split, model_id=model_id or path.stem,
                       meta={"source": str(path), "labels": labels, "dropped": len(missing)})


def _read_scores_csv(path: Path, id_column: str) -> pd.DataFrame:
    """The predictions CSV as a table that has ``id_column``.

    Raises:
        DataError: the file is missing, not a CSV, or lacks the id column.
    """
    if not path.is_file():
        raise DataError(f"Predictions CSV not found: {path}.")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"Cannot parse {path} as CSV: {exc}.") from exc
    if id_column not in df.columns:
        raise DataError(f"{path} has no id column '{id_column}'. Its columns are "
                        f"{list(df.columns)[:8]}...; pass --id-column.")
    return df


def _class_columns(df: pd.DataFrame, class_names: list[str] | tuple[str, ...],
                   path: Path) -> list[str]:
    """The CSV column of each class, in class order (:func:`_match_column`).

    Raises:
        DataError: a class without a column.
    """
    cols = []
    for name in class_names:
        c = _match_column(list(df.columns), name)
        if c is None:
            raise DataError(f"{path} has no column for class '{name}' (looked for '{name}', "
                            f"'prob_{name}', 'logit_{name}'). Its columns: {list(df.columns)}.")
        cols.append(c)
    return cols


def _numeric_scores(df: pd.DataFrame, cols: list[str], keep: list[int], path: Path
                    ) -> np.ndarray:
    """The scores ``[len(keep), len(cols)]`` of the kept rows as float64 (``df``'s class
    columns are converted to numbers in place).

    Raises:
        DataError: a value that is not a number (named by line and column), or not finite.
    """
    for c in cols:
        numeric = pd.to_numeric(df[c], errors="coerce")
        bad = numeric.isna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{path}, line {row + 2}, column '{c}': {df[c].iloc[row]!r} is not a "
                            "number.")
        df[c] = numeric
    scores = df.iloc[keep][cols].to_numpy(dtype=np.float64)
    if not np.isfinite(scores).all():
        row = int(np.argwhere(~np.isfinite(scores))[0][0])
        raise DataError(f"{path}: non-finite score in data row {keep[row] + 1}.")
    return scores


def _to_logits(scores: np.ndarray, values: str, path: Path) -> np.ndarray:
    """Logits of the scores: probabilities (clipped to [1e-7, 1 - 1e-7]) through the logit
    function, logits unchanged.

    Raises:
        DataError: a probability outside [0, 1].
    """
    if values != "probability":
        return scores
    if scores.min() < 0 or scores.max() > 1:
        raise DataError(f"{path}: probabilities outside [0, 1]; if the columns hold "
                        "logits, add --values logit (Python: values='logit').")
    eps = 1e-7
    p = np.clip(scores, eps, 1 - eps)
    return np.log(p) - np.log1p(-p)
