"""What an install gets: the dependency ranges in pyproject.toml and the files of the package.

The lowest versions the ranges allow were installed in a fresh virtual environment (with the
newest versions of everything they leave open, as pip resolves them) and the suite run there; the
floors below are the versions that worked. Installing them takes a minute, so the suite checks
the declared floors themselves."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def declared_floors(name: str = "dependencies") -> dict[str, Version]:
    """Each dependency's lowest allowed version in the list ``name`` of pyproject.toml (the
    runtime ``dependencies``, or ``test``, the extra; tomllib is 3.11+ and the project supports
    3.10: the lists are plain enough to read with a pattern)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    block = re.search(rf"^{name} = \[\n(.*?)^\]", text, re.MULTILINE | re.DOTALL)
    assert block is not None, f"no {name} list in pyproject.toml"
    floors: dict[str, Version] = {}
    for line in re.findall(r'^\s*"([^"]+)"', block.group(1), re.MULTILINE):
        requirement = Requirement(line)
        lows = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        assert lows, f"{requirement.name}: no lower bound"
        floors[requirement.name.lower()] = max(lows)
    return floors


def test_typer_floor_works_with_the_click_pip_installs_beside_it() -> None:
    """typer declares click>=8.0 with no upper bound, so pip installs the newest click. With it,
    typer 0.12 ran the eager --version callback on every command line (`campaign send x.yaml`
    printed "campaign-cli 0.1.0" and exited 0, nothing sent), 0.13-0.15.3 crashed on --help and
    on every command-line mistake (make_metavar() takes 1 positional argument), and 0.16-0.17
    turned a missing argument into "a bug: please report it" (exit 1, not 2)."""
    assert declared_floors()["typer"] >= Version("0.18")


def test_aiohttp_floor_has_the_exceptions_the_http_transport_maps() -> None:
    """map_aiohttp_error (campaign_cli/providers/http.py) reads aiohttp.ClientConnectionResetError,
    which aiohttp added in 3.10.6: at 3.10.0-3.10.5 every failure that reached that line (a
    connection reset or broken while reading) raised AttributeError in place of the in-doubt
    error. The tests also use ClientConnectorDNSError. 3.10.11 has both and needs yarl>=1.12."""
    floors = declared_floors()
    assert floors["aiohttp"] >= Version("3.10.11")
    assert floors["yarl"] >= Version("1.12")


def test_test_extra_floors_pass_the_quality_gates() -> None:
    """tests/test_quality.py runs ruff and strict mypy on the tree; at the floors the test extra
    declared they failed. ruff 0.6-0.8 refused the configuration (unknown rule selector UP045),
    0.9-0.12 flagged UP038 (dropped in 0.13) and up to 0.15.14 a false F821 (a closure's name
    declared later in the enclosing function, tests/test_policy_runtime.py); mypy 1.10 gave 11
    errors, 1.16-1.19 still one (set - frozenset in cli/send.py); types-PyYAML before
    6.0.12.20260510 leaves yaml's Composer and BaseConstructor untyped (no-untyped-call)."""
    floors = declared_floors("test")
    assert floors["ruff"] >= Version("0.15.15")
    assert floors["mypy"] >= Version("1.20")
    assert floors["types-pyyaml"] >= Version("6.0.12.20260510")


def test_the_package_says_it_is_typed() -> None:
    """README offers campaign_cli.pipeline.run_campaign and campaign_cli.testing to other code,
    and the package is typed throughout (strict mypy); without a py.typed marker (PEP 561) mypy
    in a project that installed it skips every import ("module is installed, but missing library
    stubs or py.typed marker"). The wheel ships every file under campaign_cli/."""
    import campaign_cli

    assert (Path(campaign_cli.__file__).parent / "py.typed").is_file()


def test_the_version_is_written_in_one_place() -> None:
    """pyproject.toml said 0.1.0 and so did campaign_cli/__init__.py (what --version prints),
    with nothing tying them: a release bumping one would publish the other. The build reads it
    from the package (hatch's dynamic version)."""
    from importlib.metadata import version

    import campaign_cli

    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r"^version\s*=", text, re.MULTILINE) is None
    assert 'dynamic = ["version"]' in text
    assert 'path = "campaign_cli/__init__.py"' in text
    assert version("campaign-cli") == campaign_cli.__version__
