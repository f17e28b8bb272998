"""Datasets: one adapter per on-disk format, all giving :class:`CXRDataset`."""

from medscalpel.data.base import ArrayDataset, CXRDataset, SubsetDataset, split_by_patient
from medscalpel.data.spec import DATASETS, DatasetSpec, open_dataset
from medscalpel.data.transforms import Augment, Preprocess

__all__ = ["ArrayDataset", "Augment", "CXRDataset", "DATASETS", "DatasetSpec", "Preprocess",
           "SubsetDataset", "open_dataset", "split_by_patient"]

# file-format adapters register themselves with DATASETS on import
from medscalpel.data import (chexpert, csvfile, dicom, folder, medmnist, mimic_lt,  # noqa: E402,F401
                             nih, nih_lt)
from medscalpel.data.phantom import adapter as _phantom_adapter  # noqa: E402,F401
