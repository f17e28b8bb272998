"""Phantom CXR-14: the embedded default dataset, generated with full ground truth."""

from medscalpel.data.phantom.findings import CLASS_NAMES
from medscalpel.data.phantom.generate import ShortcutConfig, generate_phantom
from medscalpel.data.phantom.store import PhantomData

__all__ = ["CLASS_NAMES", "PhantomData", "ShortcutConfig", "generate_phantom"]
