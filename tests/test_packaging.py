"""Packaging: pyproject.toml and environment.yml agree, the package imports, and a broken torchvision
pair is reported clearly."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def parse_environment_yml(path: Path) -> dict:
    """A small parser for environment.yml: ``name``, ``channels``, conda ``dependencies`` and the
    ``- pip:`` list (enough for the flat file conda reads; no anchors, flow style or multi-line values)."""
    out: dict = {"name": None, "channels": [], "dependencies": [], "pip": []}
    section = None
    pip_indent = None
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        text = line.strip()
        if indent == 0:
            key, _, value = text.partition(":")
            section = key
            if key == "name":
                out["name"] = value.strip()
            pip_indent = None
            continue
        if not text.startswith("- "):
            raise ValueError(f"unexpected line in {path.name}: {raw!r}")
        item = text[2:].strip()
        if pip_indent is not None and indent > pip_indent:
            out["pip"].append(item)
            continue
        pip_indent = None
        if section == "dependencies" and item == "pip:":
            pip_indent = indent
        elif section in ("channels", "dependencies"):
            out[section].append(item)
    return out


REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*$")


def normalise(requirement: str) -> tuple[str, str]:
    """``'Pillow >= 9.0'`` -> ``('pillow', '>=9.0')`` (PEP 503 name, specifiers without spaces, sorted)."""
    m = REQ.match(requirement)
    assert m, requirement
    name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
    specs = ",".join(sorted(s.replace(" ", "") for s in m.group(3).split(",") if s.strip()))
    return name, specs


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def environment() -> dict:
    return parse_environment_yml(ROOT / "environment.yml")


def test_environment_parser_on_a_sample(tmp_path):
    sample = tmp_path / "environment.yml"
    sample.write_text(
        "# comment\nname: demo\nchannels:\n  - conda-forge\ndependencies:\n  - python=3.11\n  - pip\n"
        "  - pip:\n      - torch>=2.4  # inline comment\n      - -e .\n  - numpy\n"
    )
    env = parse_environment_yml(sample)
    assert env == {"name": "demo", "channels": ["conda-forge"], "dependencies": ["python=3.11", "pip", "numpy"],
                   "pip": ["torch>=2.4", "-e ."]}


def test_environment_pins_python_311(environment):
    pythons = [d for d in environment["dependencies"] if re.match(r"python\b", d)]
    assert pythons == ["python=3.11"]
    assert "pip" in environment["dependencies"]
    assert environment["name"] == "liaf_lab"


def test_python_311_is_allowed_by_pyproject(pyproject):
    spec = pyproject["project"]["requires-python"]
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:  # pragma: no cover - packaging ships with pip/setuptools
        pytest.skip("packaging not importable")
    assert SpecifierSet(spec).contains("3.11")


def test_pip_list_matches_pyproject_dependencies(pyproject, environment):
    deps = [normalise(r) for r in pyproject["project"]["dependencies"]]
    pip = [normalise(r) for r in environment["pip"] if not r.startswith("-")]
    assert len(set(n for n, _ in deps)) == len(deps), "duplicate names in pyproject dependencies"
    assert dict(pip) == dict(deps)
    assert len(pip) == len(deps)
    assert "-e ." in environment["pip"], "environment.yml should install the package itself"


def test_normalise_requirement():
    assert normalise("Pillow >= 9.0") == ("pillow", ">=9.0")
    assert normalise("scikit_image>=0.21,<1") == ("scikit-image", "<1,>=0.21")
    assert normalise("grad-cam") == ("grad-cam", "")


def test_import_and_public_api():
    import liaf_lab

    assert liaf_lab.__version__
    for name in liaf_lab.__all__:
        assert hasattr(liaf_lab, name), name
    assert issubclass(liaf_lab.TorchvisionOpsError, ImportError)


def test_the_version_is_written_once(pyproject):
    """pyproject.toml reads the version from ``liaf_lab/utils/version.py`` (setuptools, without importing the
    package), which ``liaf_lab.__version__`` re-exports; no other file of the package writes one."""
    from setuptools.config.expand import read_attr

    import liaf_lab

    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "liaf_lab.utils.version.__version__"}
    assert read_attr("liaf_lab.utils.version.__version__", root_dir=ROOT) == liaf_lab.__version__
    writers = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "liaf_lab").rglob("*.py"))
               if re.search(r"^__version__\s*=", p.read_text(), re.M)]
    assert writers == ["liaf_lab/utils/version.py"]


def test_check_torchvision_ops_passes_with_a_working_pair():
    import liaf_lab

    liaf_lab.check_torchvision_ops()  # must not raise in this environment


def test_broken_torchvision_ops_raise_a_clear_error(monkeypatch):
    import torchvision.ops

    import liaf_lab

    def broken_nms(*args, **kwargs):
        raise RuntimeError("operator torchvision::nms does not exist")

    # the check does `from torchvision.ops import nms, roi_align` inside the function, so patching the
    # attribute on the module is what it sees
    monkeypatch.setattr(torchvision.ops, "nms", broken_nms)
    with pytest.raises(liaf_lab.TorchvisionOpsError, match="matching pair") as info:
        liaf_lab.check_torchvision_ops()
    message = str(info.value)
    assert "operator torchvision::nms does not exist" in message
    assert "torchvision" in message and "pip install" in message
    assert isinstance(info.value.__cause__, RuntimeError)
    assert isinstance(info.value, ImportError)
