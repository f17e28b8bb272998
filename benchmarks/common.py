"""Helpers for benchmark scripts: the JSON they write states the machine, versions and numbers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from medscalpel.runs import machine_info, package_versions, write_json

RESULTS = Path(__file__).resolve().parent / "results"


def save_result(name: str, numbers: dict[str, Any], config: dict[str, Any]) -> Path:
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "machine": machine_info(), "versions": package_versions(), "config": config,
               "results": numbers}
    return write_json(RESULTS / f"{name}.json", payload)
