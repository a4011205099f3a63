"""Two CPU processes under torchrun (gloo) for the distributed tests, killed as a group on timeout, and
the environment ``accelerate launch`` gives each process of a launch config."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_killable(cmd, timeout, **kw) -> subprocess.CompletedProcess:
    """subprocess.run in its own process group, all of it killed on timeout (torchrun's workers too)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout} s (a deadlock across processes?):\n{out[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def torchrun(worker: str, out: Path, port: int, timeout: float = 120, env: dict | None = None, args=()):
    """``tests/<worker> out *args`` on 2 processes; fails the test on a non-zero exit."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "tests" / worker), str(out), *args]
    res = run_killable(cmd, timeout=timeout, env=full_env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:]
    return res


def launch_env(path: Path) -> dict[str, str]:
    """The environment ``accelerate launch --config_file path`` gives each process (no process started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    out = _validate_launch_command(args)
    return prepare_multi_gpu_env(out[0] if isinstance(out, tuple) else args)
