"""Repository habits: one version, docs that stand alone, extras that match the code, CI that lints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import preftune
from preftune.extras import EXTRAS

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TEXT_DIRS = ("src", "tests", "docs", "bench", "experiments", "scripts", "examples")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt"}


def _text_files() -> list[Path]:
    files = [ROOT / name for name in ("README.md", "CONTRIBUTING.md", "CHANGELOG.md", "pyproject.toml")]
    for folder in TEXT_DIRS:
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()]
    return [p for p in files if "__pycache__" not in p.parts]


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~\[;]", req, maxsplit=1)[0].lower() for req in requirements}


def test_the_version_is_written_once():
    import setuptools
    from packaging.version import Version
    from setuptools.config.pyprojecttoml import read_configuration

    # pyproject.toml's SPDX license string (PEP 639) is valid from setuptools 77 on, the build's own
    # floor ([build-system] requires); an older one (a fresh venv's bundled setuptools) rejects the
    # whole file. The dev extra asks for the same floor, so `pip install -e ".[dev]"` brings it.
    floor = next(r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools"))
    assert Version(setuptools.__version__) >= Version(floor.split(">=")[1]), (
        f"setuptools {setuptools.__version__} cannot read pyproject.toml ({floor} needed): "
        'pip install -e ".[dev]"'
    )
    assert floor in PYPROJECT["project"]["optional-dependencies"]["dev"]
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    resolved = read_configuration(ROOT / "pyproject.toml", expand=True)["project"]["version"]
    assert resolved == preftune.__version__


def test_the_changelog_has_unreleased_changes_and_the_current_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## \[([^\]]+)\]", text, flags=re.M)
    assert releases[0] == "Unreleased"
    assert releases[1] == preftune.__version__, (
        "the newest release in CHANGELOG.md is not preftune.__version__"
    )


def test_no_reference_to_documents_outside_the_repository():
    spec = "SPEC"  # spelled apart so this file does not match itself
    pattern = re.compile(rf"{spec} ?§|{spec}\.md|{spec} section|{spec} \d|the {spec}'s")
    hits = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in _text_files()
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, hits


def test_every_link_into_methods_md_names_a_section_that_exists():
    from test_registry import _anchors

    anchors = _anchors((ROOT / "docs" / "methods.md").read_text())
    links = {}
    for path in _text_files():
        for anchor in re.findall(
            r"methods\.md#([\w\-]+)", path.read_text(encoding="utf-8", errors="replace")
        ):
            links.setdefault(anchor, str(path.relative_to(ROOT)))
    assert links, "no links into docs/methods.md found: the pattern is wrong"
    missing = {anchor: where for anchor, where in links.items() if anchor not in anchors}
    assert not missing, missing


def test_extras_in_the_code_match_pyproject():
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    core = _requirement_names(project["dependencies"])
    for extra in EXTRAS.values():
        assert extra.name in extras, f"pyproject.toml has no extra {extra.name!r}"
        assert set(extra.packages.values()) <= _requirement_names(extras[extra.name]), extra.name
        assert not set(extra.packages.values()) & core, f"{extra.name}'s packages are core dependencies"
    # The tests get every optional package (pip resolves preftune[...] to this project); the demo
    # every one but the trackers of report_to, which it does not use.
    trackers = {"trackio", "wandb", "mlflow"}
    for bundle, wanted in (("demo", set(EXTRAS) - trackers), ("dev", set(EXTRAS))):
        pulled = {
            name for req in extras[bundle] if req.startswith("preftune[") for name in req[9:-1].split(",")
        }
        assert pulled == wanted, bundle
    assert {"pytest", "ruff", "mypy", "pre-commit", "trl"} <= _requirement_names(extras["dev"])


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, flags=re.S).group(1)
    return [line for line in block.splitlines() if line.startswith("pip install")]


def test_ci_lints_then_runs_the_readme_test_command_exactly():
    demo, tests = _readme_commands()
    assert '".[demo]"' in demo and "preftune demo" in demo
    ci = (ROOT / ".ci" / "run").read_text()
    lines = [line.strip() for line in ci.splitlines()]
    assert tests in lines, "the README's test command is not in .ci/run as the README gives it"
    last = lines.index(tests)
    for check in ("ruff check .", "ruff format --check .", "&& mypy"):
        position = next((i for i, line in enumerate(lines) if check in line), None)
        assert position is not None and position < last, f"{check!r} must run before the tests"


def test_pre_commit_runs_the_same_checks():
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = {hook["id"]: hook for repo in config["repos"] for hook in repo["hooks"]}
    assert hooks["ruff"]["entry"].startswith("ruff check")
    assert hooks["ruff-format"]["entry"].startswith("ruff format")
    # mypy takes its files from [tool.mypy], like CI; the hook triggers on those files.
    assert hooks["mypy"]["entry"] == "mypy" and hooks["mypy"]["pass_filenames"] is False
    trigger = re.compile(hooks["mypy"]["files"])
    for path in PYPROJECT["tool"]["mypy"]["files"]:
        assert trigger.search(path if path.endswith(".py") else path + "/x.py"), path


def test_contributing_maps_every_module():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    package = ROOT / "src" / "preftune"
    missing = [
        str(path.relative_to(package))
        for path in sorted(package.rglob("*.py"))
        if "__pycache__" not in path.parts and path.name != "__init__.py" and f"`{path.name}`" not in text
    ]
    assert not missing, f"CONTRIBUTING.md's module map misses {missing}"
