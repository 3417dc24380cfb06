from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Stands in for `python3 -m venv DIR`: a venv whose python is the test's own and
# whose pip records its calls and fails while FAIL_PIP names an existing file.
FAKE_PYTHON = """#!/bin/sh
set -e
[ "$1" = "-m" ] && [ "$2" = "venv" ]
mkdir -p "$3/bin"
ln -s {python} "$3/bin/python"
cat > "$3/bin/pip" <<'PIP'
#!/bin/sh
echo "$@" >> "$(dirname "$0")/../pip.log"
[ ! -e "$FAIL_PIP" ]
PIP
chmod +x "$3/bin/pip"
"""


class TestMakefileVenv:
    """The Makefile rebuilds a .venv that a failed install or a lost interpreter left broken."""

    @pytest.fixture
    def project(self, tmp_path: Path) -> Path:
        shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
        shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
        fake = tmp_path / "fake-python"
        fake.write_text(FAKE_PYTHON.format(python=sys.executable))
        fake.chmod(0o755)
        return tmp_path

    def make(self, project: Path, fail: bool = False) -> int:
        env = dict(os.environ, FAIL_PIP=str(project / "fail") if fail else "/nonexistent")
        if fail:
            (project / "fail").touch()
        else:
            (project / "fail").unlink(missing_ok=True)
        return subprocess.run(
            ["make", "-s", f"PYTHON={project / 'fake-python'}", ".venv/.installed"],
            cwd=project, env=env, capture_output=True, text=True, timeout=60).returncode

    def test_failed_install_leaves_no_stamp_and_is_rebuilt(self, project: Path) -> None:
        venv = project / ".venv"
        assert self.make(project, fail=True) != 0
        assert venv.exists() and not (venv / ".installed").exists()
        (venv / "leftover").touch()
        assert self.make(project) == 0
        assert (venv / ".installed").exists()
        assert not (venv / "leftover").exists()

    def test_broken_python_is_rebuilt(self, project: Path) -> None:
        venv = project / ".venv"
        assert self.make(project) == 0
        (venv / "bin" / "python").unlink()
        (venv / "bin" / "python").symlink_to(project / "gone")
        os.utime(project / "pyproject.toml")
        (venv / "leftover").touch()
        os.utime(venv / ".installed", (0, 0))
        assert self.make(project) == 0
        assert (venv / "bin" / "python").resolve() == Path(sys.executable).resolve()
        assert not (venv / "leftover").exists()

    def test_installed_venv_is_left_alone(self, project: Path) -> None:
        assert self.make(project) == 0
        log = (project / ".venv" / "pip.log").read_text()
        assert self.make(project) == 0
        assert (project / ".venv" / "pip.log").read_text() == log


class TestProjectMetadata:
    """Tools are pinned and the package declares its license and its types."""

    def test_lint_and_type_tools_are_pinned(self) -> None:
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        dev = project["optional-dependencies"]["dev"]
        assert [d for d in dev if d.startswith(("ruff", "mypy"))] == [
            "ruff==0.17.6", "mypy==2.4.1"]
        assert project["license"] == "MIT"
        assert project["requires-python"] == ">=3.11"
        assert "MIT License" in (ROOT / "LICENSE").read_text()

    def test_wheel_ships_py_typed_and_license_without_warnings(self, tmp_path: Path) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(tmp_path),
             str(ROOT)],
            capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        (wheel,) = tmp_path.glob("infinario_router-0.1.0-*.whl")
        names = zipfile.ZipFile(wheel).namelist()
        assert "router/py.typed" in names
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
        metadata = zipfile.ZipFile(wheel).read(
            next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        assert "License-Expression: MIT" in metadata
        assert "deprecat" not in (result.stdout + result.stderr).lower()
