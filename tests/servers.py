"""Real servers for tests: free ports, a throwaway `redis-server`, waiting for an HTTP endpoint, a
`pdserve` command in a subprocess."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redis_server(enabled: bool = True) -> Iterator[str | None]:
    """A fresh redis-server on a free port (no persistence); yields its URL. Skips the test when
    redis-server is missing, unless PDSERVE_REQUIRE_REDIS=1 (CI), where that is a failure."""
    if not enabled:
        yield None
        return
    with redis_process() as redis:
        yield redis.url


class RedisProcess:
    """A redis-server that a test can stop and start again, empty, on the same port."""

    def __init__(self, binary: str, workdir: str) -> None:
        self.binary, self.workdir, self.port = binary, workdir, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", self.workdir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait_for_port(self.port, 10)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@contextlib.contextmanager
def redis_process() -> Iterator[RedisProcess]:
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed (apt-get install -y redis-server)"
        if os.environ.get("PDSERVE_REQUIRE_REDIS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    with tempfile.TemporaryDirectory() as workdir:
        redis = RedisProcess(binary, workdir)
        redis.start()
        try:
            yield redis
        finally:
            redis.stop()


def _wait_for_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s} s")


def wait_for_http(url: str, timeout_s: float, process: subprocess.Popen, log_path: Path) -> None:
    """Polls `url` until it answers 200; fails early with the log if the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s} s:\n{log_path.read_text()[-4000:]}")


@contextlib.contextmanager
def worker_process(role: str, model_dir: Path, *args: str, timeout_s: float = 180) -> Iterator[tuple[subprocess.Popen, str]]:
    """`tests/run_worker.py` in a subprocess (so a test can SIGKILL it); yields it and its address."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.run_worker", role, str(model_dir), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).parent.parent,
    )
    try:
        deadline, lines = time.monotonic() + timeout_s, []
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                raise RuntimeError(f"the {role} worker exited with {process.wait()}:\n{''.join(lines)[-4000:]}")
            if line.startswith("ADDRESS "):
                break
            lines.append(line)
        else:
            raise TimeoutError(f"the {role} worker did not start within {timeout_s} s")
        threading.Thread(target=_echo, args=(process.stdout, role), daemon=True).start()  # keep its pipe drained
        yield process, line.split()[1]
    finally:
        process.kill()
        process.wait(30)


def _echo(stream: object, role: str) -> None:
    for line in stream:
        print(f"[{role} worker] {line}", end="", file=sys.stderr)


@contextlib.contextmanager
def pdserve(command: str, *args: str, log_path: Path, env: dict[str, str] | None = None, timeout_s: float = 240) -> Iterator[tuple[str, subprocess.Popen]]:
    """`pdserve COMMAND ARGS --port P` in a subprocess; yields its URL once /health answers 200 and
    the process. Afterwards SIGTERM must stop it with exit status 0."""
    port = free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", command, *args, "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent, env={**os.environ, **(env or {})},
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(base_url + "/health", timeout_s, process, log_path)
        yield base_url, process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            returncode = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            returncode = None
    assert returncode == 0, f"pdserve {command} did not shut down cleanly ({returncode}):\n{log_path.read_text()[-3000:]}"
