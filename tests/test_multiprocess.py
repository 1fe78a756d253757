"""Beyond one process: the vocabulary-parallel losses under ``jax.distributed``.

Two processes on localhost, four host CPU devices each, CPU collectives over gloo, one
global (2, 4) mesh. ``tests/multiprocess_worker.py`` checks values and gradients against
the single-process losses; this test starts both workers and checks that both agree.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("multiprocess_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one():
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(WORKER.parent.parent), env.get("PYTHONPATH", "")]
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=240)
            outputs.append((p.returncode, out))
    finally:
        for p in procs:
            p.kill()
    for i, (code, out) in enumerate(outputs):
        assert code == 0, f"process {i} failed:\n{out[-4000:]}"
        assert f"OK {i}" in out, out[-4000:]
