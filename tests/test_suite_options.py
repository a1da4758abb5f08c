"""The suite's own option: ``--third-party-deprecations=warn`` (used by .ci/lowest, which runs the
suite at the lowest versions pyproject.toml allows) makes another library's DeprecationWarning
non-fatal, and only that: one raised in campaign_cli or in the tests stays an error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = '''
import warnings

import pytest


@pytest.mark.parametrize("module", ["somelib", "somelib.sub", "campaign_cli_extra",
                                    "campaign_cli", "campaign_cli.pipeline", "tests.test_x"])
@pytest.mark.parametrize("category", [DeprecationWarning, PendingDeprecationWarning])
def test_probe(module, category):
    warnings.warn_explicit("old", category, "x.py", 1, module=module)


def test_other_warnings_stay_errors():
    warnings.warn_explicit("leak", ResourceWarning, "x.py", 1, module="somelib")
'''


def run_probe(tmp_path: Path, *options: str) -> str:
    (tmp_path / "test_probe.py").write_text(PROBE, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT), "-rA", "-q",
         *options, str(tmp_path / "test_probe.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    return result.stdout + result.stderr


@pytest.mark.parametrize("options", [(), ("--third-party-deprecations=error",)])
def test_by_default_every_warning_is_an_error(tmp_path: Path, options: tuple[str, ...]) -> None:
    assert "13 failed" in run_probe(tmp_path, *options)


def test_warn_lets_only_other_libraries_deprecations_through(tmp_path: Path) -> None:
    out = run_probe(tmp_path, "--third-party-deprecations=warn")
    passed = sorted(line.split("[", 1)[1].rstrip("]") for line in out.splitlines()
                    if line.startswith("PASSED"))
    assert passed == sorted(f"{category}-{module}"
                            for category in ("DeprecationWarning", "PendingDeprecationWarning")
                            for module in ("somelib", "somelib.sub", "campaign_cli_extra")), out
    assert "7 failed, 6 passed" in out, out
