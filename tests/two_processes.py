"""Runs a worker script as two local JAX processes joined by jax.distributed (the multi-host tests).

    run_two_processes(REPO / "tests" / "multihost_worker.py", [str(tmp_path), "5"], timeout=90)

Each process gets 2 virtual CPU devices and the JAXDIFF_* variables jaxdiff.sharding.initialize_distributed
reads; a peer that hangs or fails is killed before the assertion, so it never outlives the test.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(worker: Path, args: list[str], *, timeout: float) -> None:
    """Starts process 0 and 1 of `worker args`, waits up to `timeout` s each, asserts both exited 0."""
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
                   XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   JAX_DISABLE_MOST_OPTIMIZATIONS="1",  # compile time is most of these runs; as the suite does
                   JAXDIFF_COORDINATOR=f"127.0.0.1:{port}", JAXDIFF_NUM_PROCESSES="2", JAXDIFF_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, str(worker), *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
