"""Shared test fixtures: offline, seeded, tiny."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("MEDSCALPEL_PROGRESS", "0")

import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Property tests must be reproducible in CI: derandomized (the same examples every run, no
# example database), no deadline (a shared 2-core machine is slow at times).
settings.register_profile("medscalpel", derandomize=True, database=None, deadline=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "medscalpel"))

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the checkout; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available: {SHARED_DATA} does not exist (it lives beside the "
                    "project checkout on development and CI machines only)")
    return SHARED_DATA


def shared_path(*parts: str) -> Path:
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: {p} does not exist")
    return p


@pytest.fixture
def refused_nothing_written(capsys):
    """``check(argv, out, match)``: the console entry point refuses ``argv + --out OUT`` with one
    ``error:`` line holding ``match`` and exit 2, and leaves no run directory at OUT, not even a
    half-written ``.OUT.*`` one."""
    from medscalpel.cli.main import run

    def check(argv, out: Path, match: str) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            run([str(a) for a in argv] + ["--out", str(out)])
        err = capsys.readouterr().err
        assert exc.value.code == 2, err
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
        assert match in err, err
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        return err

    return check
