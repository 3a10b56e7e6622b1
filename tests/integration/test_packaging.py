"""The built wheel carries the package's data files, and works from the wheel alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from support.procs import REPO, gateway_env

# A few seconds (pip builds in an isolated environment); part of the normal suite.
pytestmark = pytest.mark.timeout(300)

DATA_FILES = (
    "sse_gateway/lua/publish.lua",  # read at import by sse_gateway.publish
    "sse_gateway/lua/disconnect.lua",  # read at import by sse_gateway.broker.control
    "sse_gateway/static/demo.html",  # the --dev demo page
    "sse_gateway/py.typed",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built by pip from a copy of the project (a build in place leaves build/ behind)."""
    root = tmp_path_factory.mktemp("packaging")
    project = root / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md", "setup.cfg", "setup.py", "MANIFEST.in"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, project / name)
    shutil.copytree(
        REPO / "src",
        project / "src",
        ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "*.pyc"),
    )
    dist = root / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(project)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, f"pip wheel failed:\n{result.stdout}\n{result.stderr}"
    wheels = list(dist.glob("sse_gateway-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {dist}: {list(dist.iterdir())}"
    return wheels[0]


def test_wheel_contains_package_data(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in DATA_FILES if name not in names]
    assert not missing, f"{wheel.name} lacks {missing}; it holds {sorted(names)}"


def test_wheel_alone_imports_publisher_and_demo_page(wheel: Path, tmp_path: Path) -> None:
    """Installed from the wheel (not the source tree), the publisher loads its Lua script."""
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import sse_gateway, sse_gateway.publish as p\n"
        "from importlib import resources\n"
        "assert sse_gateway.__file__.startswith(sys.argv[1]), sse_gateway.__file__\n"
        "assert 'XADD' in p.PUBLISH_SCRIPT.upper()\n"
        "page = resources.files('sse_gateway').joinpath('static/demo.html').read_text()\n"
        "assert 'EventSource' in page\n"
    )
    env = gateway_env()
    env.pop("PYTHONPATH", None)  # only the unpacked wheel provides sse_gateway first
    result = subprocess.run(
        [sys.executable, "-c", code, str(unpacked)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
