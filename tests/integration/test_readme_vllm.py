"""The README's "Put kvroute in front of vLLM" example runs as written (engine_sim standing in for
vLLM): registry, engine, agent, gateway, then the official openai client through the gateway.
Only the fixed ports are swapped for free ones; every process it starts is stopped."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kvroute.procs import free_port

pytest.importorskip("openai")
pytestmark = pytest.mark.integration
README = Path(__file__).resolve().parents[2] / "README.md"


def _example() -> str:
    text = README.read_text()
    start = text.index("This block runs as a test (`tests/integration/test_readme_vllm.py`)")
    return re.search(r"```bash\n(.*?)```", text[start:], re.S)[1]  # type: ignore[index]


def test_readme_vllm_example_runs(tmp_path: Path) -> None:
    script = _example()
    for port in ("50051", "8001", "5557", "5558", "8080"):
        script = re.sub(rf"\b{port}\b", str(free_port()), script)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    guarded = "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n" + script
    proc = subprocess.Popen(["bash", "-c", guarded], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session this test started, nothing else
        out, _ = proc.communicate()
        pytest.fail(f"README example did not finish:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    found = re.search(r"served by engine-1 - cached prompt tokens: (\d+)", out)
    assert found and int(found[1]) > 0, out[-3000:]
