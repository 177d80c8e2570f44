"""Start `facecloak serve` in a subprocess on a free loopback port, for the service and browser tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


MOUNTED = """
import sys
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

run = uvicorn.run


def mounted(app, **options):
    # the service mounted in another ASGI app at a path prefix, its lifespan run by the parent
    parent = Starlette(routes=[Mount(PREFIX, app=app)], lifespan=lambda _: app.router.lifespan_context(app))
    run(parent, **options)


uvicorn.run = mounted
from facecloak.cli import main

main()
"""


@contextlib.contextmanager
def running_service(workdir: Path, *args: str, startup_s: float = 180.0, prefix: str = ""):
    """Yield (base URL, the server's TMPDIR, process); the server is stopped afterwards.

    The server gets a TMPDIR of its own, so a test can check that no temporary file is left.
    ``prefix`` (``/fc``): the service mounted there in another app, as behind a proxy's path
    prefix; the base URL ends with it.
    """
    temporary = workdir / "server-tmp"
    temporary.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TMPDIR=str(temporary), PYTHONPATH=str(REPO / "src"))
    env["TORCHINDUCTOR_CACHE_DIR"] = str(workdir / "torch-cache")  # torch caches there, not in TMPDIR
    script = MOUNTED.replace("PREFIX", repr(prefix)) if prefix else "from facecloak.cli import main; main()"
    log_path = workdir / "server.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    process = None
    try:
        for _ in range(3):  # the free port can be taken by another process before the server binds it
            port = free_port()
            command = [sys.executable, "-c", script, "serve", "--host", "127.0.0.1"]
            command += ["--port", str(port), "--device", "cpu", *args]
            log.seek(0)
            log.truncate()
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            url = f"http://127.0.0.1:{port}{prefix}"
            if _started(process, url, log_path, startup_s):
                break
        else:
            raise RuntimeError(f"no free port to start on: {log_path.read_text()[-3000:]}")
        yield url, temporary, process
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


def _started(process: subprocess.Popen, url: str, log_path: Path, startup_s: float) -> bool:
    """Wait for ``/healthz``: True once it answers, False if the port was taken; else raise."""
    deadline = time.monotonic() + startup_s
    while True:
        if process.poll() is not None:
            log = log_path.read_text()
            if "address already in use" in log.lower():
                return False
            raise RuntimeError(f"the service exited: {log[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the service did not start: {log_path.read_text()[-3000:]}")
        time.sleep(0.5)


@contextlib.contextmanager
def serving_in_thread(app, startup_s: float = 60.0):
    """Yield the base URL of ``app`` served by a real uvicorn server in this process (stopped after).

    For what the in-process ``TestClient`` does not show: how uvicorn itself hands requests over
    (a path prefix, a client that hangs up mid-upload).
    """
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_s
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the in-thread server did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)
