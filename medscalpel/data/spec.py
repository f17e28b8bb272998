"""Dataset spec strings: ``name:path?key=value&key=value``.

Examples: ``nih:/data/nih``, ``folder:/data/kermany/train?dedup=true``,
``medmnist:/data/chestmnist_64.npz``, ``phantom:/runs/phantom``, plain ``phantom``.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from medscalpel.data.base import CXRDataset
from medscalpel.data.io import IMAGE_EXTENSIONS
from medscalpel.data.transforms import Preprocess
from medscalpel.errors import ConfigError, DataError, MedScalpelError
from medscalpel.registry import Registry

#: adapter name -> factory ``(root, split, preprocess, **options) -> CXRDataset``
DATASETS: Registry[CXRDataset] = Registry("dataset adapter")


def _register_adapters() -> None:
    """Register every built-in adapter before a spec is looked up. The adapters import this
    module (for :data:`DATASETS`), and the package ``medscalpel.data`` imports them; so the
    package is imported here, at first use, not at this module's top (that would be an import
    cycle): the one deliberate in-function import of the data layer."""
    import medscalpel.data  # noqa: F401


@dataclass(frozen=True)
class DatasetSpec:
    adapter: str
    root: str | None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> "DatasetSpec":
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigError("A dataset spec must be a non-empty string such as 'nih:/data/nih' "
                              "or 'phantom'.")
        spec = spec.strip()
        query = ""
        if "?" in spec:
            spec, query = spec.split("?", 1)
        if ":" in spec:
            adapter, root = spec.split(":", 1)
        else:
            adapter, root = spec, None
        adapter = adapter.strip().lower()
        _register_adapters()
        if adapter not in DATASETS:
            raise _not_a_spec(spec, adapter)
        options: dict[str, Any] = {}
        for k, v in parse_qsl(query, keep_blank_values=True):
            options[k] = _coerce(v)
        return cls(adapter=adapter, root=root or None, options=options)

    def __str__(self) -> str:
        s = self.adapter + (f":{self.root}" if self.root else "")
        if self.options:
            s += "?" + "&".join(f"{k}={v}" for k, v in self.options.items())
        return s


def _not_a_spec(spec: str, adapter: str) -> MedScalpelError:
    """The error for a spec whose adapter is unknown: a path that does not exist (``missing.png``,
    ``scans/``) gets a :class:`DataError` saying so; an unknown adapter name (``foldr:/data``)
    the registry's list of valid names."""
    valid = ", ".join(DATASETS.names())
    named_adapter = ":" in spec and len(adapter) > 1 and re.fullmatch(r"[a-z][a-z0-9_-]*", adapter)
    path = Path(spec).expanduser()
    if not named_adapter and (any(ch in spec for ch in "/\\*[") or path.suffix):
        where = f"looked in {path.absolute().parent}"
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            return DataError(f"No such image file: '{spec}' ({where}). Check the path.")
        return DataError(f"No such file or folder: '{spec}' ({where}). Check the path; a "
                         f"dataset spec starts with an adapter name ({valid}), e.g. "
                         "'folder:/data/kermany/train'.")
    hint = "" if named_adapter else f" (No file or folder named '{spec}' exists either.)"
    return ConfigError(f"Unknown dataset adapter '{adapter}'. Valid names: {valid}.{hint}")


def _coerce(v: str) -> Any:
    low = v.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v


def open_dataset(
    spec: str | DatasetSpec,
    split: str = "train",
    preprocess: Preprocess | None = None,
    **options: Any,
) -> CXRDataset:
    """Open a dataset from a spec string.

    Args:
        spec: ``adapter:path?opt=value`` (see :data:`DATASETS` for adapters).
        split: ``train``, ``val``, ``test`` or ``all`` (adapters may add more, e.g. the
            phantom's ``shifted``).
        preprocess: size / channels / normalisation; default :class:`Preprocess`.
        **options: adapter options; they override options given in the spec string.

    Example:
        >>> from medscalpel.data import open_dataset
        >>> ds = open_dataset("phantom?n=8&size=32", split="all")  # doctest: +SKIP
    """
    _register_adapters()
    parsed = spec if isinstance(spec, DatasetSpec) else DatasetSpec.parse(spec)
    opts = {**parsed.options, **options}
    factory = DATASETS.get(parsed.adapter)
    opts = _check_options(parsed.adapter, factory, opts)
    ds = factory(root=parsed.root, split=split, preprocess=preprocess or Preprocess(), **opts)
    ds.spec = str(parsed)
    return ds


def _kind(annotation: Any, default: Any) -> str | None:
    """'bool', 'int', 'float' or 'str' for an adapter option (from its annotation or default)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    for kind in ("bool", "int", "float", "str"):
        if kind in str(text).replace("|", " ").split():
            return kind
    if isinstance(default, bool):
        return "bool"
    for kind, typ in (("int", int), ("float", float), ("str", str)):
        if isinstance(default, typ):
            return kind
    return None


def _check_options(adapter: str, factory, opts: dict[str, Any]) -> dict[str, Any]:
    """Refuse unknown options and values of the wrong kind (``?dedup=maybe`` is not a
    yes/no answer); returns the options converted to the adapter's types."""

    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(opts)
    valid = [n for n in params if n not in ("root", "split", "preprocess")]
    bad = [k for k in opts if k not in params]
    if bad:
        raise ConfigError(f"Unknown option(s) {bad} for dataset adapter '{adapter}'. "
                          f"Valid options: {', '.join(valid) or '(none)'}.")
    out: dict[str, Any] = {}
    for key, value in opts.items():
        p = params[key]
        kind = _kind(p.annotation, p.default)
        if value is None or kind is None:
            out[key] = value
            continue
        if kind == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"Dataset option '{key}' of adapter '{adapter}' is true or "
                                  f"false; got {value!r} (e.g. '?{key}=true').")
        elif kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"Dataset option '{key}' of adapter '{adapter}' is a whole "
                                  f"number; got {value!r} (e.g. '?{key}={p.default!r}').")
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"Dataset option '{key}' of adapter '{adapter}' is a number; "
                                  f"got {value!r} (e.g. '?{key}={p.default!r}').")
            value = float(value)
        elif kind == "str" and not isinstance(value, str):
            value = str(value).lower() if isinstance(value, bool) else str(value)
        out[key] = value
    return out
