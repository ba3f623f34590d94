"""`ray start --head` on 127.0.0.1 and `ray job submit ... -- sana-ray ...` against it, as docs/hardware.md says.

Ray >= 2.59 turns token auth on: the head, `ray job submit` and the job all get RAY_AUTH_MODE=token
and the same RAY_AUTH_TOKEN. The token is unique to this test, which is also how teardown finds
every process this test started (and only those) to stop them: `ray stop` would stop every
Ray on the machine.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))

pytestmark = pytest.mark.e2e  # ~30-60 s on 2 cores, most of it Ray starting


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all held open together, so none is handed out twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _logs(temp: str) -> str:
    """The tail of the head's own logs, for a failure message."""
    parts = []
    for name in ("ray-start.log", "dashboard.log", "dashboard.err", "gcs_server.err", "raylet.err"):
        for path in Path(temp).rglob(name):
            parts.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-1500:])
    return "\n".join(parts)


def _pids_with_token(token: str) -> list[int]:
    """Processes whose environment holds our token: everything this test started, directly or not."""
    needle = f"RAY_AUTH_TOKEN={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _listening(pids: set[int]) -> list[str]:
    """Local addresses our processes listen on (TCP), from `ss -ltnpH`."""
    if shutil.which("ss") is None:
        return []
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    return [line.split()[3] for line in out.splitlines()
            if any(int(p) in pids for p in re.findall(r"pid=(\d+)", line))]


@pytest.fixture
def ray_head():
    token = secrets.token_hex(32)
    temp = tempfile.mkdtemp(prefix="sr-", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 chars
    env = os.environ | {
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # bind 127.0.0.1, not the machine's address (FIELD-NOTES)
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    dashboard, *free = _free_ports(7)
    ports = dict(zip(("--port", "--ray-client-server-port", "--dashboard-agent-listen-port",
                      "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"), map(str, free)))
    command = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(dashboard), "--num-cpus", "2", "--temp-dir", temp, "--disable-usage-stats",
               *[x for kv in ports.items() for x in kv]]
    log = open(Path(temp) / "ray-start.log", "w")
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/version", timeout=2):
                    break
            except urllib.error.HTTPError:
                break  # it answers (401 without the token: auth is on)
            except OSError:
                assert head.poll() is None, _logs(temp)
                assert time.time() < deadline, "ray start --head: dashboard did not answer within 120 s"
                time.sleep(0.5)
        yield env, f"http://127.0.0.1:{dashboard}", token, temp
    finally:
        # Stop exactly what we started: the `ray start` group, then anything else carrying our token.
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait(timeout=30)
        for _ in range(20):
            pids = _pids_with_token(token)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_runs_sana_ray_on_a_token_auth_head(ray_head):
    env, address, token, temp = ray_head
    quickstart = REPO / "manifests" / "quickstart.yaml"
    deadline = time.time() + 180
    while True:
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", address, "--",
             sys.executable, "-m", "sana_ray.cli", "validate", str(quickstart), "training.steps=3"],
            env=env, capture_output=True, text=True, timeout=180,
        )
        output = submit.stdout + submit.stderr
        # The dashboard answers before its agent has registered (seconds later on a busy machine),
        # and on a very busy one it has been seen restarting once: retry those, nothing else.
        transient = "No available agent" in output or "Failed to connect to Ray" in output
        if not transient or time.time() > deadline:
            break
        time.sleep(2)
    assert submit.returncode == 0, output[-2000:] + "\n" + _logs(temp)
    assert "steps: 3" in output and "quickstart.yaml: valid" in output and "succeeded" in output

    # Everything the head started listens on loopback only.
    addresses = _listening(set(_pids_with_token(token)))
    assert addresses, "found none of the head's listening sockets"
    hosts = {a.rsplit(":", 1)[0] for a in addresses}
    assert hosts <= {"127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"}, addresses

    # Without the token the job API refuses.
    anonymous = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    anonymous["RAY_AUTH_TOKEN_PATH"] = str(Path(tempfile.gettempdir()) / "sana-ray-no-such-token")
    refused = subprocess.run([RAY, "job", "list", "--address", address], env=anonymous, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode != 0
    assert re.search(r"auth|token|401|unauthori", refused.stdout + refused.stderr, re.IGNORECASE), refused.stderr[-2000:]
