"""Real servers for tests: free ports, a throwaway `redis-server` (restartable on its port), worker
processes a test can kill or freeze, waiting for an HTTP endpoint, a `pdserve` command in a
subprocess, the tests' cluster secret."""

from __future__ import annotations

import asyncio
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

from pdserve.proto.cluster_secret import ENV_VAR, ClusterSecret

CLUSTER_SECRET = ClusterSecret("pdserve-tests-cluster-secret-" + "0" * 16)  # every worker the tests start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str:
    """redis-server's path. Skips the test when it is missing, unless PDSERVE_REQUIRE_REDIS=1 (CI),
    where that is a failure."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed (apt-get install -y redis-server)"
        if os.environ.get("PDSERVE_REQUIRE_REDIS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return binary


class RedisServer:
    """A redis-server without persistence on a fixed port (`--requirepass` when `password` is given;
    TLS only, with a self-signed certificate, when `tls`): stopping and starting it again gives an
    empty Redis at the same URL, as a restarted Redis is."""

    def __init__(self, workdir: str, password: str | None = None, tls: bool = False) -> None:
        self.binary = redis_binary()
        self.port = free_port()
        self.workdir = workdir
        self.args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir]
        self.args += ["--requirepass", password] if password else []
        self.args += _tls_args(Path(workdir), self.port) if tls else []
        scheme, query = ("rediss", f"?ssl_cert_reqs=required&ssl_ca_certs={workdir}/cert.pem") if tls else ("redis", "")
        self.url = f"{scheme}://{f':{password}@' if password else ''}127.0.0.1:{self.port}/0{query}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen([self.binary, *self.args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_port(self.port, 10)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@contextlib.contextmanager
def redis_server(enabled: bool = True, password: str | None = None, tls: bool = False) -> Iterator[str | None]:
    """A fresh redis-server on a free port (see `RedisServer`); yields its URL (with the password;
    `rediss://` trusting its certificate)."""
    if not enabled:
        yield None
        return
    with redis_process(password, tls) as server:
        yield server.url


@contextlib.contextmanager
def redis_process(password: str | None = None, tls: bool = False) -> Iterator[RedisServer]:
    """A fresh redis-server that the test can stop and start again, empty, on the same port."""
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisServer(workdir, password, tls)
        server.start()
        try:
            yield server
        finally:
            server.stop()


def _tls_args(workdir: Path, port: int) -> list[str]:
    """A self-signed certificate for 127.0.0.1 (openssl), and redis-server serving TLS only."""
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(workdir / "key.pem"),
            "-out",
            str(workdir / "cert.pem"),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return [
        "--port",
        "0",
        "--tls-port",
        str(port),
        "--tls-cert-file",
        str(workdir / "cert.pem"),
        "--tls-key-file",
        str(workdir / "key.pem"),
        "--tls-ca-cert-file",
        str(workdir / "cert.pem"),
        "--tls-auth-clients",
        "no",
    ]


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
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).parent.parent,
        env={**os.environ, ENV_VAR: CLUSTER_SECRET.value},
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


class WorkerProcess:
    """`tests/run_worker.py` in a subprocess that a test can SIGKILL, SIGSTOP and SIGCONT. Start
    several, then `wait_ready` each: they load their models in parallel."""

    def __init__(self, name: str, role: str, model_dir: Path, *args: str) -> None:
        self.name = name
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.run_worker", role, str(model_dir), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=Path(__file__).parent.parent,
            env={**os.environ, ENV_VAR: CLUSTER_SECRET.value},
        )
        self.address = ""

    def wait_ready(self, timeout_s: float = 240) -> str:
        deadline, lines = time.monotonic() + timeout_s, []
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {self.name} exited with {self.process.wait()}:\n{''.join(lines)[-4000:]}")
            if line.startswith("ADDRESS "):
                self.address = line.split()[1]
                threading.Thread(target=_echo, args=(self.process.stdout, self.name), daemon=True).start()
                return self.address
            lines.append(line)
        raise TimeoutError(f"worker {self.name} did not start within {timeout_s} s")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    @property
    def is_alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.is_alive:
            self.process.kill()  # SIGKILL reaches a frozen (SIGSTOP) process too
        self.process.wait(30)


@contextlib.contextmanager
def gateway_in_thread(
    app: object,
    header_timeout_s: float = 30.0,
    shutdown_timeout_s: float = 30.0,
    loop: asyncio.AbstractEventLoop | None = None,
    gateway: object | None = None,
) -> Iterator[tuple[str, object]]:
    """`app` (from `router.app.create_app`) served as `pdserve serve` serves it (header timeout,
    drain on `server.handle_exit`; `gateway`, a `GatewayConfig`: its TLS and root path too), on a
    free local port: on `loop` (running in another thread: the one its backend's gRPC channels live
    on) or on a thread of its own. Yields its URL and the server."""
    from pdserve.deploy.http_server import GatewayServer, gateway_config
    from pdserve.router.config import GatewayConfig

    config = gateway if isinstance(gateway, GatewayConfig) else GatewayConfig(request_read_timeout_s=header_timeout_s)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = GatewayServer(gateway_config(app, "127.0.0.1", 0, config), app.state.drain, shutdown_timeout_s)
    if loop is None:
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        is_running = thread.is_alive
    else:
        serving = asyncio.run_coroutine_threadsafe(server.serve(sockets=[sock]), loop)

        def is_running() -> bool:
            return not serving.done()

    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and is_running(), "the gateway did not start"
        time.sleep(0.01)
    try:
        yield f"{'https' if config.tls else 'http'}://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        deadline = time.monotonic() + 15
        while is_running() and time.monotonic() < deadline:
            time.sleep(0.05)
        sock.close()


def _echo(stream: object, role: str) -> None:
    for line in stream:
        print(f"[{role} worker] {line}", end="", file=sys.stderr)


# Every series vLLM's Grafana dashboard (examples/online_serving/prometheus_grafana/grafana.json) and
# issue 10's list query; each must have samples after a little load.
DASHBOARD_SERIES = (
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_sum",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:time_per_output_token_seconds_bucket",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:gpu_cache_usage_perc",
    "vllm:kv_cache_usage_perc",
    "vllm:request_prompt_tokens_bucket",
    "vllm:request_generation_tokens_bucket",
    "vllm:request_success_total",
    "vllm:request_queue_time_seconds_sum",
    "vllm:request_prefill_time_seconds_sum",
    "vllm:request_decode_time_seconds_sum",
    "vllm:request_inference_time_seconds_sum",
    "vllm:request_max_num_generation_tokens_sum",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:request_params_n_bucket",
    "vllm:request_params_max_tokens_bucket",
    "vllm:iteration_tokens_total_bucket",
    "vllm:cache_config_info",
    "vllm:request_time_per_output_token_seconds_bucket",
    "http_requests_total",
    "pdserve:request_phase_seconds_bucket",
)


def observed_series(metrics_text: str) -> dict[str, float]:
    """Series name -> the largest sample among its label sets (0 where all are 0)."""
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            out[name] = max(out.get(name, 0.0), float(line.rsplit(" ", 1)[1]))
    return out


@contextlib.contextmanager
def private_ray_tmpdir(prefix: str) -> Iterator[str]:
    """A RAY_TMPDIR of this test's own while it runs (no other Ray user of the machine finds the
    Ray started under it by default, nor it theirs); the previous one restored after, the folder
    removed."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's socket paths live under it
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = path
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def pdserve(
    command: str, *args: str, log_path: Path, env: dict[str, str] | None = None, timeout_s: float = 240, wait: bool = True
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`pdserve COMMAND ARGS --port P` in a subprocess; yields its URL once /health answers 200 (at
    once with `wait` False: start several, then `wait_for_http` each) and the process. Afterwards
    SIGTERM must stop it with exit status 0."""
    port = free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pdserve.deploy.cli", command, *args, "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).parent.parent,
            env={**os.environ, **(env or {})},
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        if wait:
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


@contextlib.contextmanager
def colocated_gateway(checkpoint: Path, max_model_len: int) -> Iterator[str]:
    """The gateway over one in-process CPU engine (fp32) in a thread, with generous deadlines; yields its URL."""
    from pdserve.engine.async_engine import AsyncEngine
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.proto.deadlines import Deadlines
    from pdserve.router.app import create_app
    from pdserve.router.backend import ColocatedBackend
    from pdserve.router.config import GatewayConfig
    from tests.test_router_http import serve

    config = EngineConfig(model=str(checkpoint), device="cpu", dtype="float32", max_model_len=max_model_len, num_kv_blocks=64)
    engine = AsyncEngine(LLMEngine.from_config(config))
    try:
        gateway = GatewayConfig(Deadlines(first_token_s=120, request_s=120))
        with serve(create_app(ColocatedBackend(engine, "m"), config=gateway)) as url:
            yield url
    finally:
        engine.shutdown()


@contextlib.contextmanager
def disaggregated_gateway(checkpoint: Path, log_path: Path, max_model_len: int) -> Iterator[str]:
    """`pdserve serve` (a prefill and a decode worker) in a subprocess; it must stop cleanly after."""
    args = ("--model", str(checkpoint), "--served-model-name", "m", "--device", "cpu", "--max-model-len", str(max_model_len))
    with pdserve("serve", *args, "--log-level", "warning", log_path=log_path) as (url, _):
        yield url
