"""A `pdserve router` in front of a cluster that comes and goes, as an operator runs one behind a load
balancer: it listens before any worker exists (/health 503, then 200 once `pdserve serve` is up),
it says the controller is away in a 503 that names no internals, and it finds a restarted
`pdserve serve` (a new controller, on a restarted Ray head) by itself. A malformed Redis URL is a
one-line error, status 2."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pdserve.proto.cluster_secret import ENV_VAR
from tests.servers import CLUSTER_SECRET, RedisServer, free_port, pdserve, private_ray_tmpdir, redis_process

pytestmark = pytest.mark.slow

TOKEN = "router-resilience-admin"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
ROOT = Path(__file__).resolve().parent.parent
UNREACHABLE = "the cluster controller is not reachable (is `pdserve serve` running?)"
INTERNALS = ("ActorDiedError", "actor_id", "pid", "Traceback", "ray.", "192.", "127.0.0.1")


class RayHead:
    """A Ray head on a fixed port under a private RAY_TMPDIR (no other Ray user of the machine finds
    it, nor it theirs), carrying both pool resources; stopping and starting it again gives a new
    Ray instance at the same address, as a restarted head is."""

    def __init__(self, ray_tmp: str) -> None:
        self.port = free_port()
        self.ray_tmp = ray_tmp
        self.env = {"RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0", ENV_VAR: CLUSTER_SECRET.value}
        self.cluster: object | None = None
        self.address = ""

    def start(self) -> None:
        from ray.cluster_utils import Cluster

        resources = {"prefill_pool": 2, "decode_pool": 2}
        args = {"num_cpus": 4, "resources": resources, "include_dashboard": False, "gcs_server_port": self.port}
        for attempt in (1, 2):
            try:
                self.cluster = Cluster(initialize_head=True, head_node_args=args)
                break
            except Exception as e:  # Ray's fixed 30 s wait for its raylet, which a loaded 2-core CI machine can miss
                if attempt == 2 or "timed out during startup" not in str(e):
                    raise
                self.kill_leftovers(grace_s=0)  # the half-started node's processes hold the GCS port
        self.address = self.cluster.address  # type: ignore[attr-defined]
        assert self.address.endswith(f":{self.port}"), self.address

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()  # type: ignore[attr-defined]  # its own processes, by handle
            self.cluster = None
        self.kill_leftovers(grace_s=10)  # workers the raylet started, which it does not wait for

    def kill_leftovers(self, grace_s: float) -> None:
        """Ends the processes of this head's Ray instances (their command lines name its RAY_TMPDIR),
        after `grace_s` for them to exit by themselves."""
        deadline = time.monotonic() + grace_s
        while (pids := processes_naming(self.ray_tmp)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def processes_naming(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def head() -> Iterator[RayHead]:
    with private_ray_tmpdir("pdrr") as ray_tmp:
        head = RayHead(ray_tmp)
        head.start()
        try:
            yield head
        finally:
            head.stop()


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_process() as process:
        yield process


@pytest.fixture(scope="module")
def router(head: RayHead, redis: RedisServer, demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    """`pdserve router` started before any `pdserve serve`: it must listen at once."""
    log_path = tmp_path_factory.mktemp("router") / "router.log"
    args = ["--redis-url", redis.url, "--model", str(demo_model_dir), "--served-model-name", "demo"]
    args += ["--ray-address", head.address, "--admin-token", TOKEN]
    with pdserve("router", *args, log_path=log_path, env=head.env, wait=False) as (url, process):
        yield Router(url, process, log_path)


@dataclass(frozen=True)
class Router:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()


def get(url: str, **kwargs: object) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=15, **kwargs)  # type: ignore[arg-type]
    except httpx.HTTPError:
        return None


def wait_for(router: Router, path: str, status: int, timeout_s: float, headers: dict | None = None) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        assert router.process.poll() is None, f"the router exited with {router.process.returncode}:\n{router.log()[-3000:]}"
        response = get(router.url + path, headers=headers)
        if response is not None and response.status_code == status:
            return response
        seen = None if response is None else (response.status_code, response.text[:200])
        assert time.monotonic() < deadline, f"{path} is not {status} within {timeout_s} s (last: {seen})"
        time.sleep(0.25)


def health(router: Router, timeout_s: float = 60) -> httpx.Response:
    """/health's answer once the router listens."""
    deadline = time.monotonic() + timeout_s
    while (response := get(router.url + "/health")) is None:
        assert router.process.poll() is None, f"the router exited with {router.process.returncode}:\n{router.log()[-3000:]}"
        assert time.monotonic() < deadline, f"the router does not listen within {timeout_s} s"
        time.sleep(0.25)
    return response


def complete(url: str) -> httpx.Response:
    body = {"model": "demo", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


def serve(head: RayHead, redis: RedisServer, demo_model_dir: Path, log_path: Path) -> object:
    args = ["--model", str(demo_model_dir), "--served-model-name", "demo", "--device", "cpu", "--max-model-len", "256"]
    args += ["--ray-address", head.address, "--redis-url", redis.url, "--admin-token", TOKEN]
    return pdserve("serve", *args, "--log-level", "warning", log_path=log_path, env=head.env)


def assert_unreachable(response: httpx.Response) -> None:
    """A 503 an operator and a load balancer can act on, with nothing of Ray's insides."""
    assert response.status_code == 503, response.text
    assert response.headers.get("retry-after"), response.headers
    error = response.json()["error"]
    assert error["message"] == UNREACHABLE
    assert error["code"] == 503
    assert not [word for word in INTERNALS if word in response.text], response.text


@pytest.fixture(scope="module")
def serves() -> Iterator[contextlib.ExitStack]:
    """The `pdserve serve` running now, if any: the first test leaves its own to the second."""
    with contextlib.ExitStack() as stack:
        yield stack


def test_a_router_started_before_its_workers_serves_once_they_register(
    router: Router, head: RayHead, redis: RedisServer, demo_model_dir: Path, serves: contextlib.ExitStack, tmp_path: Path
) -> None:
    starting = health(router, 30)  # it listens within seconds, before any worker exists
    assert starting.status_code == 503 and starting.headers.get("retry-after"), starting
    refused = complete(router.url)
    assert refused.status_code == 503 and "no healthy" in refused.json()["error"]["message"], refused.text
    assert_unreachable(httpx.get(router.url + "/admin/pools", headers=ADMIN, timeout=15))

    serves.enter_context(serve(head, redis, demo_model_dir, tmp_path / "serve.log"))
    wait_for(router, "/health", 200, 30)
    answer = complete(router.url)
    assert answer.status_code == 200, answer.text
    models = httpx.get(router.url + "/v1/models", timeout=15).json()
    assert models["data"][0]["max_model_len"] == 256  # the workers' context length, not the model's
    assert (models["data"][0]["id"], models["data"][0]["root"]) == ("demo", str(demo_model_dir))  # vLLM's: --model
    wait_for(router, "/admin/pools", 200, 30, ADMIN)  # a controller started after the router


def test_a_router_says_the_controller_is_away_then_finds_a_restarted_serve(
    router: Router, head: RayHead, redis: RedisServer, demo_model_dir: Path, serves: contextlib.ExitStack, tmp_path: Path
) -> None:
    if health(router).status_code != 200:  # run alone, without the serve of the test before
        serves.enter_context(serve(head, redis, demo_model_dir, tmp_path / "serve1.log"))  # run alone
    first = wait_for(router, "/admin/pools", 200, 30, ADMIN).json()
    wait_for_metric(router, "pdserve:pool_desired_replicas", is_present=True)
    serves.close()  # `pdserve serve` stops: its controller and workers end

    assert_unreachable(httpx.get(router.url + "/admin/pools", headers=ADMIN, timeout=15))
    scale = httpx.post(router.url + "/admin/pools/decode", headers=ADMIN, json={"replicas": 2}, timeout=15)
    assert_unreachable(scale)
    wait_for_metric(router, "pdserve:pool_desired_replicas", is_present=False)  # not frozen at the old view

    head.stop()  # the Ray instance goes too, and a new one comes up at the same address
    time.sleep(3)  # a few of the router's reports find nothing there
    head.start()
    with serve(head, redis, demo_model_dir, tmp_path / "serve2.log"):
        second = wait_for(router, "/admin/pools", 200, 30, ADMIN).json()
        old_ids = {w["worker_id"] for w in first["pools"]["decode"]["workers"]}
        new_ids = {w["worker_id"] for w in second["pools"]["decode"]["workers"]}
        assert new_ids and not new_ids & old_ids, (old_ids, new_ids)
        wait_for(router, "/health", 200, 30)
        assert complete(router.url).status_code == 200
        log = router.log()
    # Logged once per outage (before the first serve, after it), each closed by its recovery; not every report.
    assert log.count(UNREACHABLE) == log.count("the cluster controller is reachable again") <= 2, log[-3000:]
    assert "SIGTERM handler" not in log, log[-3000:]


def wait_for_metric(router: Router, name: str, is_present: bool, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(router.url + "/metrics", timeout=15).text
        if ((name + "{") in text) == is_present:
            return
        assert time.monotonic() < deadline, f"{name} {'missing from' if is_present else 'still on'} /metrics"
        time.sleep(0.5)


def test_a_router_with_a_malformed_redis_url_says_so_in_one_line(demo_model_dir: Path) -> None:
    env = {**os.environ, ENV_VAR: CLUSTER_SECRET.value}
    args = ["router", "--redis-url", "nonsense://x", "--model", str(demo_model_dir), "--port", str(free_port())]
    done = subprocess.run(
        [sys.executable, "-m", "pdserve.deploy.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pdserve router: "), done.stderr
