"""A throwaway Ray cluster for tests: loopback only, its own temp dir and ports, token auth.

Started with ``ray start --block`` in a new session; stopped by killing that process group, so
the test only ever stops the cluster it started (never ``ray stop``, which would stop others).
"""

from __future__ import annotations

import contextlib
import os
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

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_range_start(taken: set[int], span: int = 200) -> int:
    """A worker port range that holds none of the other components' ports (Ray refuses overlaps)."""
    while True:
        start = free_port()
        if start + span < 65535 and not any(start <= p <= start + span for p in taken):
            return start


def loopback_env(**extra: str) -> dict[str, str]:
    """Environment for Ray processes that keeps every address on 127.0.0.1."""
    env = dict(
        os.environ,
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.update(extra)
    return env


@contextlib.contextmanager
def ray_cluster(num_cpus: int = 2):
    """Yield ``(dashboard_url, env)`` of a running head node; tear it down afterwards."""
    gcs, dash, client, agent = free_port(), free_port(), free_port(), free_port()
    workers = _worker_range_start({gcs, dash, client, agent})
    env = loopback_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    # Ray's AF_UNIX socket paths must stay under 107 bytes: pytest's tmp paths are too long.
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(gcs),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--include-dashboard",
        "true",
        "--ray-client-server-port",
        str(client),
        "--dashboard-agent-listen-port",
        str(agent),
        "--min-worker-port",
        str(workers),
        "--max-worker-port",
        str(workers + 200),
        "--num-cpus",
        str(num_cpus),
        "--temp-dir",
        str(temp),
        "--disable-usage-stats",
    ]
    log = open(temp / "start.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_for(url, proc, temp / "start.log")
        yield url, env
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without the auth token): up
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"Ray dashboard at {url} did not come up in {timeout}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the cluster's process group, then SIGKILL whatever is left of it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
