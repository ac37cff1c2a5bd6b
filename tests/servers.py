"""Real servers for tests: free ports, a throwaway `redis-server`, waiting for an HTTP endpoint, the
tests' cluster secret."""
from __future__ import annotations

import contextlib
import os
import shutil
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

from proto.cluster_secret import ENV_VAR, ClusterSecret

CLUSTER_SECRET = ClusterSecret("pdserve-tests-cluster-secret-" + "0" * 16)  # every worker the tests start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redis_server(enabled: bool = True, password: str | None = None, tls: bool = False) -> Iterator[str | None]:
    """A fresh redis-server on a free port (no persistence; `--requirepass` when `password` is
    given; TLS only, with a self-signed certificate, when `tls`); yields its URL (with the password;
    `rediss://` trusting that certificate). Skips the test when redis-server is missing, unless
    PDSERVE_REQUIRE_REDIS=1 (CI), where that is a failure."""
    if not enabled:
        yield None
        return
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed (apt-get install -y redis-server)"
        if os.environ.get("PDSERVE_REQUIRE_REDIS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir]
        args += ["--requirepass", password] if password else []
        args += _tls_args(Path(workdir), port) if tls else []
        process = subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for_port(port, 10)
            scheme, query = ("rediss", f"?ssl_cert_reqs=required&ssl_ca_certs={workdir}/cert.pem") if tls else ("redis", "")
            yield f"{scheme}://{f':{password}@' if password else ''}127.0.0.1:{port}/0{query}"
        finally:
            process.terminate()
            process.wait(10)


def _tls_args(workdir: Path, port: int) -> list[str]:
    """A self-signed certificate for 127.0.0.1 (openssl), and redis-server serving TLS only."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(workdir / "key.pem"), "-out",
         str(workdir / "cert.pem"), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(workdir / "cert.pem"),
            "--tls-key-file", str(workdir / "key.pem"), "--tls-ca-cert-file", str(workdir / "cert.pem"), "--tls-auth-clients", "no"]


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


def _echo(stream: object, role: str) -> None:
    for line in stream:
        print(f"[{role} worker] {line}", end="", file=sys.stderr)


# Every series vLLM's Grafana dashboard (examples/online_serving/prometheus_grafana/grafana.json) and
# issue 10's list query; each must have samples after a little load.
DASHBOARD_SERIES = (
    "vllm:e2e_request_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_sum", "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total", "vllm:time_per_output_token_seconds_bucket", "vllm:num_requests_running",
    "vllm:num_requests_waiting", "vllm:time_to_first_token_seconds_bucket", "vllm:gpu_cache_usage_perc",
    "vllm:kv_cache_usage_perc", "vllm:request_prompt_tokens_bucket", "vllm:request_generation_tokens_bucket",
    "vllm:request_success_total", "vllm:request_queue_time_seconds_sum", "vllm:request_prefill_time_seconds_sum",
    "vllm:request_decode_time_seconds_sum", "vllm:request_inference_time_seconds_sum",
    "vllm:request_max_num_generation_tokens_sum", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
    "vllm:request_params_n_bucket", "vllm:request_params_max_tokens_bucket", "vllm:iteration_tokens_total_bucket",
    "vllm:cache_config_info", "vllm:request_time_per_output_token_seconds_bucket", "http_requests_total",
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
