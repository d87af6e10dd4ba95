"""The container image: entry point is the real ``kvroute`` command, installed by the same
script CI uses, from exactly the packages pyproject.toml ships, as a non-root user.

No Docker engine runs here, so the build stage's install step is replayed for real in a temp dir
(``test_build_stage_install_step_works``): same files, same command, then the entry point runs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def last(word: str) -> str:
    return [rest for w, rest in instructions() if w == word][-1]


def pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_entrypoint_is_the_kvroute_console_script() -> None:
    assert json.loads(last("ENTRYPOINT")) == ["kvroute"]
    scripts = pyproject()["project"]["scripts"]  # type: ignore[index]
    assert scripts["kvroute"] == "cli.main:main"
    cmd = json.loads(last("CMD"))
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(cmd)
    assert exc.value.code == 0


def test_multi_stage_slim_python_311_non_root() -> None:
    args = dict(rest.split("=", 1) for w, rest in instructions() if w == "ARG" and "=" in rest)
    base = args["PYTHON_IMAGE"]
    assert base.startswith("python:3.11-") and "slim" in base
    stages = [rest for w, rest in instructions() if w == "FROM"]
    assert len(stages) >= 2 and all(s.startswith("${PYTHON_IMAGE}") for s in stages)
    user = last("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or int(gid) > 0), user
    assert "COPY --from=build /opt/kvroute /opt/kvroute" in (ROOT / "Dockerfile").read_text()
    env = " ".join(rest for w, rest in instructions() if w == "ENV")
    assert "PATH=/opt/kvroute/bin:" in env


def test_install_step_is_the_script_ci_uses() -> None:
    runs = [rest for w, rest in instructions() if w == "RUN" and "install.sh" in rest]
    assert len(runs) == 1
    assert re.search(r"VENV=/opt/kvroute EDITABLE=0 scripts/install.sh \"\"", runs[0])
    assert "scripts/install.sh" in (ROOT / ".ci" / "run").read_text()
    assert "scripts/install.sh" in (ROOT / "scripts" / "test.sh").read_text()


def copied_sources() -> list[str]:
    out = []
    for w, rest in instructions():
        if w == "COPY" and not rest.startswith("--from"):
            out += shlex.split(rest)[:-1]
    return out


def test_image_copies_every_shipped_package_and_ignores_none_of_them() -> None:
    find = pyproject()["tool"]["setuptools"]["packages"]["find"]  # type: ignore[index]
    packages = {p.rstrip("*") for p in find["include"]}
    sources = copied_sources()
    assert packages <= set(sources), f"not copied into the image: {packages - set(sources)}"
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for src in sources:
        assert src.split("/")[0] not in ignored and src not in ignored, src


@pytest.mark.integration
@pytest.mark.slow
def test_build_stage_install_step_works(tmp_path: Path) -> None:
    """Replay the build stage: copy what the Dockerfile copies, run its install command."""
    ctx = tmp_path / "src"
    for src in copied_sources():
        target = ctx / src
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / src).is_dir():
            shutil.copytree(ROOT / src, target,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / src, target)
    venv = tmp_path / "opt-kvroute"
    env = {**os.environ, "VENV": str(venv), "EDITABLE": "0", "PIP_NO_CACHE_DIR": "1"}
    env.pop("VIRTUAL_ENV", None)
    run = subprocess.run(["scripts/install.sh", ""], cwd=ctx, env=env, capture_output=True,
                         text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    kvroute = venv / "bin" / "kvroute"
    for role in ("registry", "router", "agent", "engine-sim"):
        out = subprocess.run([str(kvroute), "serve", role, "--help"], capture_output=True,
                             text=True, timeout=60, check=False, cwd=tmp_path)
        assert out.returncode == 0 and "--listen" in out.stdout, out.stderr
    # A regular install: the code runs from the venv, not from the build context.
    shutil.rmtree(ctx)
    out = subprocess.run([str(kvroute), "--version"], capture_output=True, text=True,
                         timeout=60, check=False, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
