"""`pdserve serve`'s graceful stop when a second gateway (`pdserve router`) streams through the same
workers over Redis: the workers drain before they stop, so the router's streams in flight finish
within `--shutdown-timeout`, and end with an error past it, never hang; a stop with nothing in
flight stays prompt. And `--device cuda` on a machine without a GPU is reported as such."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from pdserve.proto.cluster_secret import ENV_VAR
from tests import servers
from tests.servers import CLUSTER_SECRET, redis_server, wait_for_http

pytestmark = pytest.mark.slow

MODEL = "demo"
ENV = {ENV_VAR: CLUSTER_SECRET.value, "RAY_USAGE_STATS_ENABLED": "0"}
PROMPT = "The key value cache is stored in fixed size blocks"
STOP_BOUND_S = 12.0  # SIGINT to exit with nothing in flight (uvicorn, the workers' stop, ray.shutdown)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        assert url is not None
        yield url


def pdserve(command: str, *args: str, log_path: Path) -> contextlib.AbstractContextManager[tuple[str, subprocess.Popen]]:
    """`pdserve COMMAND ARGS` started with this cluster's secret, not yet ready (`wait_for_http`)."""
    return servers.pdserve(command, *args, log_path=log_path, env=ENV, wait=False)


def serve_args(model_dir: Path, redis_url: str, shutdown_timeout_s: float) -> list[str]:
    return [
        *("--model", str(model_dir), "--served-model-name", MODEL, "--device", "cpu", "--max-model-len", "4096"),
        *("--redis-url", redis_url, "--shutdown-timeout", str(shutdown_timeout_s), "--log-level", "info"),
    ]


@dataclass
class Stream:
    """A streamed completion in a thread; `events`: its `data:` payloads as they come."""

    url: str
    max_tokens: int
    events: list[str] = field(default_factory=list)
    ended_at: float = 0.0

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        payload = {
            "model": MODEL,
            "prompt": PROMPT,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=payload, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line.removeprefix("data: "))
        finally:
            self.ended_at = time.monotonic()

    def wait_started(self, num_events: int = 20, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.events) < num_events:
            assert time.monotonic() < deadline and self.thread.is_alive(), f"the stream never started: {self.events[-2:]}"
            time.sleep(0.01)

    @property
    def chunks(self) -> list[dict]:
        return [json.loads(e) for e in self.events if e != "[DONE]"]


def wait_health(url: str, status: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2).status_code == status:
                return
        assert time.monotonic() < deadline, f"{url}/health did not answer {status} within {timeout_s} s"
        time.sleep(0.05)


@contextlib.contextmanager
def serve_and_router(
    model_dir: Path, redis_url: str, shutdown_timeout_s: float, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen, str]]:
    """`pdserve serve` and `pdserve router` over its workers, started together; yields serve's
    process and the router's URL once both answer."""
    serve_log, router_log = tmp_path / "serve.log", tmp_path / "router.log"
    router_args = ("--redis-url", redis_url, "--model", str(model_dir), "--served-model-name", MODEL)
    with (
        pdserve("serve", *serve_args(model_dir, redis_url, shutdown_timeout_s), log_path=serve_log) as (serve_url, serve),
        pdserve("router", *router_args, log_path=router_log) as (router_url, router),
    ):
        wait_for_http(serve_url + "/health", 240, serve, serve_log)
        wait_for_http(router_url + "/health", 60, router, router_log)
        yield serve, router_url


def test_a_stop_with_nothing_in_flight_stays_prompt(demo_model_dir: Path, redis_url: str, tmp_path: Path) -> None:
    """With Redis (other gateways may exist: the drain waits one of their status polls) and nothing
    in flight, SIGINT to exit takes a few seconds, as before the drain."""
    log_path = tmp_path / "serve.log"
    with pdserve("serve", *serve_args(demo_model_dir, redis_url, 30), log_path=log_path) as (url, serve):
        wait_for_http(url + "/health", 240, serve, log_path)
        signalled = time.monotonic()
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=60) == 0
        stop_s = time.monotonic() - signalled
    print(f"serve stopped {stop_s:.2f} s after SIGINT with nothing in flight")
    assert stop_s < STOP_BOUND_S, log_path.read_text()[-3000:]


def test_sigint_to_serve_lets_a_router_stream_finish(demo_model_dir: Path, redis_url: str, tmp_path: Path) -> None:
    """SIGINT to `pdserve serve` while the router streams through its workers: the workers turn
    draining (the router stops routing to them: its /health turns 503 and a new request gets 503)
    yet the stream runs to its length and ends with `[DONE]`, no error; serve then exits 0."""
    # A generous --shutdown-timeout: the stream's 1,200 tokens take ~10 s here, 30 s and more on a
    # loaded 2-core machine (one CI run cut it at 30); the drain must wait for it, however long.
    with serve_and_router(demo_model_dir, redis_url, 120, tmp_path) as (serve, router_url):
        stream = Stream(router_url, max_tokens=1200)
        stream.wait_started()
        signalled = time.monotonic()
        serve.send_signal(signal.SIGINT)
        wait_health(router_url, 503, 15)
        assert stream.thread.is_alive(), "the stream ended before the workers drained"
        refused = httpx.post(router_url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=30)
        assert refused.status_code == 503, refused.text
        stream.thread.join(150)
        print(f"the stream ended {stream.ended_at - signalled:.1f} s after SIGINT")
        assert not [c["error"] for c in stream.chunks if "error" in c], stream.events[-3:]
        assert stream.events[-1] == "[DONE]"
        assert stream.chunks[-1]["choices"][0]["finish_reason"] == "length", stream.events[-3:]
        assert sum(len(c["choices"][0]["text"]) > 0 for c in stream.chunks) > 0
        assert serve.wait(timeout=60) == 0


def test_a_router_stream_past_the_shutdown_timeout_ends_with_an_error(
    demo_model_dir: Path, redis_url: str, tmp_path: Path
) -> None:
    """With `--shutdown-timeout 1`, a router stream far from its end gets an error event and
    `[DONE]` within seconds of the signal: the drain is bounded, nothing hangs."""
    shutdown_timeout_s = 1.0
    with serve_and_router(demo_model_dir, redis_url, shutdown_timeout_s, tmp_path) as (serve, router_url):
        stream = Stream(router_url, max_tokens=3500)
        stream.wait_started()
        signalled = time.monotonic()
        serve.send_signal(signal.SIGINT)
        stream.thread.join(60)
        assert not stream.thread.is_alive(), "the stream hangs"
        assert stream.events[-1] == "[DONE]"
        errors = [c["error"] for c in stream.chunks if "error" in c]
        assert errors and errors[0]["code"] == 503, stream.events[-3:]
        assert stream.ended_at - signalled < shutdown_timeout_s + 10
        assert serve.wait(timeout=60) == 0


def test_device_cuda_without_a_gpu_says_so(demo_model_dir: Path) -> None:
    """`--device cuda` on a Ray cluster with no GPU names that cause, not another `pdserve serve`;
    so does `--kv-transport cuda_ipc` for workers that would run on the CPU, before any starts; a
    controller already there is still reported as one."""
    import ray

    from pdserve.deploy.cluster import Cluster
    from pdserve.deploy.config import ServeConfig
    from pdserve.deploy.controller import CONTROLLER_NAME, NAMESPACE
    from pdserve.engine.config import ConfigError, EngineConfig

    ray.init(address="local", num_cpus=1, include_dashboard=False, namespace=NAMESPACE, logging_level="WARNING")
    try:
        assert ray.cluster_resources().get("GPU", 0) == 0
        cuda = ServeConfig(EngineConfig(model=str(demo_model_dir), device="cuda"), MODEL)
        with pytest.raises(ConfigError) as cuda_error:
            Cluster(cuda).start()
        assert str(cuda_error.value) == "--device cuda was asked for but the Ray cluster has no GPU"
        for device in ("auto", "cpu"):
            ipc = ServeConfig(EngineConfig(model=str(demo_model_dir), device=device), MODEL, kv_transport="cuda_ipc")
            with pytest.raises(ConfigError, match="--kv-transport cuda_ipc needs GPU workers, and these run on the CPU"):
                Cluster(ipc).start()

        @ray.remote(num_cpus=0)
        class Other:
            pass

        other = Other.options(name=CONTROLLER_NAME, namespace=NAMESPACE).remote()  # noqa: F841 - held while checked
        cpu = ServeConfig(EngineConfig(model=str(demo_model_dir), device="cpu"), MODEL)
        with pytest.raises(ConfigError, match="another `pdserve serve` already controls this Ray cluster"):
            Cluster(cpu).start()
    finally:
        ray.shutdown()


def test_starting_ray_leaves_sigterm_to_pdserve(demo_model_dir: Path) -> None:
    """ray.init on the main thread puts its own SIGTERM handler (`sys.exit`) in place of the
    process's; a SIGTERM landing while Ray forks its processes then raised inside logging's
    at-fork hook, where Python only prints it, and `pdserve serve` went on starting. Cluster
    starts Ray with the process's handler left in place, so that handler sees every SIGTERM."""
    import ray

    from pdserve.deploy.cluster import Cluster
    from pdserve.deploy.config import ServeConfig
    from pdserve.engine.config import ConfigError, EngineConfig

    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    cluster = Cluster(ServeConfig(EngineConfig(model=str(demo_model_dir), device="cuda"), MODEL))
    try:
        with pytest.raises(ConfigError, match="no GPU"):  # Ray up, then refused before any worker starts
            cluster.start()
        assert ray.is_initialized()
        signal.raise_signal(signal.SIGTERM)
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
        cluster.stop()
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    "logged, absent",
    [
        # inside ray.init (its own SIGTERM handler, when it had one, could lose the signal)
        ("starting a local Ray instance", "starting prefill-"),
        # Ray up, workers loading (a pod deleted during start-up): Ray's handler used to abort (status 134)
        ("starting prefill-", "SIGTERM received"),
    ],
    ids=["while-ray-starts", "while-the-workers-load"],
)
def test_sigterm_during_start_up_stops_cleanly(demo_model_dir: Path, tmp_path: Path, logged: str, absent: str) -> None:
    """SIGTERM once the start-up has logged `logged`: exit 0 through pdserve's own stop."""
    log_path = tmp_path / "serve.log"
    args = ("--model", str(demo_model_dir), "--device", "cpu", "--log-level", "info")
    with pdserve("serve", *args, log_path=log_path) as (url, serve):
        deadline = time.monotonic() + 120
        while logged not in log_path.read_text():
            assert time.monotonic() < deadline and serve.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.02)
        time.sleep(0.2)  # well inside that step (ray.init sets its handler first, then takes seconds)
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    assert absent not in log_path.read_text()
