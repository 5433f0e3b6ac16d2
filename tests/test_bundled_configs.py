"""Every config the project ships loads in pyenvoy and in real Envoy."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted(
    (ROOT / "benchmarks" / "configs").glob("*.yaml")
)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_pyenvoy_validates(path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pyenvoy", "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"configuration '{path}' OK"


@pytest.mark.skipif(shutil.which("envoy") is None, reason="envoy not installed")
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_real_envoy_validates(path: Path) -> None:
    r = subprocess.run(
        ["envoy", "--mode", "validate", "-c", str(path), "-l", "error", "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_there_is_a_bundled_demo() -> None:
    assert (ROOT / "configs" / "demo.yaml") in CONFIGS
