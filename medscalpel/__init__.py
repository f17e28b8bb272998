"""medscalpel: make medical image classifiers small, understood and safe.

compress -> audit -> explain -> repair -> report.
"""

__version__ = "0.1.0"

from medscalpel.errors import MedScalpelError  # noqa: E402

__all__ = ["__version__", "MedScalpelError"]
