"""The wheels provisioning uploads: the agent (built from this repository's `agents` package only) and its
dependencies, so nodes without internet install offline (`pip install --no-index --find-links`).

Cache layout under `{VAR_DIR}/wheels`:
  deps/   nvidia-ml-py, prometheus-client (the `agent` extra of pyproject.toml) and pip itself, which installs them
          into a venv made `--without-pip` (no dependency on the node's ensurepip / python3-venv package)
  build/  setuptools, the agent wheel's build backend, so rebuilding the agent wheel needs no network
  agent/<digest>/tokenmill_agent-<version>-py3-none-any.whl, keyed by a digest of the agent's sources

`python -m portal.provisioning.wheels` fills the cache (the Makefile runs it after installing the venv, while the
package index is reachable); later builds reuse it offline.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

from django.conf import settings

AGENT_DIST = "tokenmill-agent"
BUILD_REQUIREMENT = "setuptools>=69"
ALLOWED_REQUIREMENTS = {"nvidia-ml-py", "prometheus-client"}
PIP_TIMEOUT_S = 300


class WheelError(Exception):
    pass


@dataclass(frozen=True)
class WheelSet:
    agent: Path
    deps: tuple[Path, ...]
    pip: Path

    @property
    def all(self) -> tuple[Path, ...]:
        return (self.agent, *self.deps, self.pip)


def cache_dir() -> Path:
    return settings.VAR_DIR / "wheels"


def agent_source() -> Path:
    return settings.BASE_DIR / "agents"


def agent_requirements() -> list[str]:
    """The `agent` extra of the project: the single list of what a node needs."""
    with (settings.BASE_DIR / "pyproject.toml").open("rb") as fh:
        return list(tomllib.load(fh)["project"]["optional-dependencies"]["agent"])


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _normalize(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0])


def _wheel_name(path: Path) -> str:
    return _normalize(path.name.split("-", 1)[0])


def _find(directory: Path, name: str) -> Path | None:
    if not directory.is_dir():
        return None
    found = sorted(p for p in directory.glob("*.whl") if _wheel_name(p) == _normalize(name))
    return found[-1] if found else None


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise WheelError(f"{' '.join(cmd[2:])} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")


def _source_files(source: Path) -> list[Path]:
    return sorted(
        p for p in source.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in {".py", ".toml", ".service"}
    )


def agent_version(source: Path) -> str:
    match = re.search(r'^__version__ = "([^"]+)"', (source / "__init__.py").read_text(), re.M)
    if match is None:
        raise WheelError("agents/__init__.py has no __version__")
    return match.group(1)


def source_digest(source: Path) -> str:
    digest = hashlib.sha256()
    for path in _source_files(source):
        digest.update(str(path.relative_to(source)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _pyproject(version: str, requirements: list[str]) -> str:
    deps = ", ".join(f'"{r}"' for r in requirements)
    return f"""[build-system]
requires = ["{BUILD_REQUIREMENT}"]
build-backend = "setuptools.build_meta"

[project]
name = "{AGENT_DIST}"
version = "{version}"
description = "Tokenmill GPU node agent"
requires-python = ">=3.11"
dependencies = [{deps}]

[project.scripts]
tokenmill-agent = "agents.cli:main"

[tool.setuptools]
packages = ["agents"]

[tool.setuptools.package-data]
agents = ["systemd/*.service", "agent.example.toml"]
"""


def check_agent_wheel(wheel: Path) -> None:
    """The wheel holds the agent package with its unit and example config, and requires only the agent's own
    dependencies (never Django, pydantic or anything of the portal)."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta_name = next((n for n in names if n.endswith(".dist-info/METADATA")), None)
        if meta_name is None:
            raise WheelError(f"{wheel.name} has no METADATA")
        metadata = Parser().parsestr(zf.read(meta_name).decode())
    required = {_requirement_name(r) for r in metadata.get_all("Requires-Dist") or []}
    if required - ALLOWED_REQUIREMENTS:
        raise WheelError(f"{wheel.name} requires {sorted(required - ALLOWED_REQUIREMENTS)}; the agent may need only "
                         f"{sorted(ALLOWED_REQUIREMENTS)}")
    for needed in ("agents/cli.py", "agents/systemd/tokenmill-agent.service", "agents/agent.example.toml"):
        if needed not in names:
            raise WheelError(f"{wheel.name} lacks {needed}")
    if any(n.startswith("portal/") for n in names):
        raise WheelError(f"{wheel.name} contains the portal")


def build_agent_wheel(*, cache: Path, source: Path) -> Path:
    version = agent_version(source)
    out = cache / "agent" / source_digest(source)
    existing = sorted(out.glob("*.whl")) if out.is_dir() else []
    if existing:
        return existing[-1]
    build = cache / "build"
    offline = _find(build, "setuptools") is not None
    with tempfile.TemporaryDirectory(prefix="tm-agent-wheel-") as tmp:
        staging = Path(tmp) / "src"
        shutil.copytree(source, staging / "agents", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (staging / "pyproject.toml").write_text(_pyproject(version, agent_requirements()))
        built = Path(tmp) / "dist"
        index = ["--no-index", "--find-links", str(build)] if offline else []
        _pip("wheel", "--no-deps", *index, "--wheel-dir", str(built), str(staging))
        wheels = list(built.glob("*.whl"))
        if len(wheels) != 1:
            raise WheelError(f"pip wheel produced {len(wheels)} wheels")
        check_agent_wheel(wheels[0])
        out.mkdir(parents=True, exist_ok=True)
        # Rename into place last, so a concurrent reader never sees a half-written wheel.
        partial = out / (wheels[0].name + ".part")
        shutil.copy2(wheels[0], partial)
        os.replace(partial, out / wheels[0].name)
    return out / wheels[0].name


def ensure_dependency_wheels(*, cache: Path) -> None:
    """Download what is missing (this is the only part that needs the package index)."""
    deps, build = cache / "deps", cache / "build"
    wanted = [*agent_requirements(), "pip"]
    missing = [r for r in wanted if _find(deps, _requirement_name(r)) is None]
    if missing:
        deps.mkdir(parents=True, exist_ok=True)
        _pip("download", "--only-binary=:all:", "--dest", str(deps), *missing)
    if _find(build, "setuptools") is None:
        build.mkdir(parents=True, exist_ok=True)
        _pip("download", "--only-binary=:all:", "--no-deps", "--dest", str(build), BUILD_REQUIREMENT)


def ensure_wheels(*, cache: Path | None = None, source: Path | None = None) -> WheelSet:
    cache = cache or cache_dir()
    source = source or agent_source()
    ensure_dependency_wheels(cache=cache)
    agent = build_agent_wheel(cache=cache, source=source)
    deps_dir = cache / "deps"
    deps = []
    for requirement in agent_requirements():
        wheel = _find(deps_dir, _requirement_name(requirement))
        if wheel is None:
            raise WheelError(f"no wheel for {requirement} in {deps_dir}")
        deps.append(wheel)
    pip = _find(deps_dir, "pip")
    if pip is None:
        raise WheelError(f"no pip wheel in {deps_dir}")
    return WheelSet(agent=agent, deps=tuple(deps), pip=pip)


def main() -> int:
    try:
        wheels = ensure_wheels()
    except WheelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for wheel in wheels.all:
        print(wheel)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    sys.exit(main())
