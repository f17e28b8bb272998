"""Settings for everything pytest collects, including the library's docstring examples
(``--doctest-modules`` over ``medscalpel/``): headless plots, no progress bars."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("MEDSCALPEL_PROGRESS", "0")
