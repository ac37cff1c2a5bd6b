"""pdserve on a multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head, a node
carrying `prefill_pool`, one carrying `decode_pool`), driven like an operator would: every worker
on its pool's node; each pool rescaled 1 -> 2 -> 1 under a steady stream of greedy requests that
all come back exact; SIGKILLed workers replaced within 60 s; the admin API's auth; a second gateway
(`pdserve router`) over Redis while Redis stops, restarts empty, and a worker dies with it down."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from pdserve.deploy.admin_client import AdminClient
from pdserve.engine import LLM, SamplingParams
from pdserve.proto.cluster_secret import ENV_VAR
from tests.servers import CLUSTER_SECRET, RedisServer, pdserve, private_ray_tmpdir, redis_process
from tests.traffic import Case, RequestStream, ready, settled, wait_for_pools

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 256
MAX_TOKENS = 24
LONG_TOKENS = 220  # a long answer: seconds of decoding, longer than the drain's quiet period
DRAIN_QUIET_S = 1.0
TOKEN = "cluster-ops-admin"
MODEL = "tiny-llama"
ROOT = Path(__file__).resolve().parent.parent
WORDS = "the key value cache of every request is stored in fixed size blocks that a block table maps".split()  # noqa: SIM905


@dataclass(frozen=True)
class Nodes:
    address: str
    prefill: str  # node ids
    decode: str
    env: dict[str, str]  # what a process joining this cluster needs


@pytest.fixture(scope="module")
def nodes() -> Iterator[Nodes]:
    """Three Ray nodes on this machine, their files under a private RAY_TMPDIR (so that no other
    Ray user of the machine finds this cluster by default)."""
    from ray.cluster_utils import Cluster

    with private_ray_tmpdir("pdray") as ray_tmp:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        try:
            prefill = cluster.add_node(num_cpus=3, resources={"prefill_pool": 3})
            decode = cluster.add_node(num_cpus=3, resources={"decode_pool": 3})
            cluster.wait_for_nodes()
            yield Nodes(
                cluster.address,
                prefill.node_id,
                decode.node_id,
                {"RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0", ENV_VAR: CLUSTER_SECRET.value},
            )
        finally:
            cluster.shutdown()


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_process() as process:
        yield process


@pytest.fixture(scope="module")
def server(
    nodes: Nodes, redis: RedisServer, checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("serve")
    config = directory / "pdserve.yaml"
    config.write_text(f"drain: {{quiet_s: {DRAIN_QUIET_S}}}\n")  # shorter than the long requests below
    args = [
        "--config",
        str(config),
        "--model",
        str(checkpoints["llama"]),
        "--served-model-name",
        MODEL,
        "--device",
        "cpu",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--ray-address",
        nodes.address,
        "--redis-url",
        redis.url,
        "--admin-token",
        TOKEN,
    ]
    with pdserve("serve", *args, log_path=directory / "serve.log", env=nodes.env) as (url, _):
        yield url


@pytest.fixture(scope="module")
def admin(server: str) -> AdminClient:
    return AdminClient(server, TOKEN)


@pytest.fixture(scope="module")
def reference(checkpoints: dict[str, Path]) -> LLM:
    return LLM(model=str(checkpoints["llama"]), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def cases(reference: LLM) -> list[Case]:
    """Prompts from a few words to ~190 tokens, with the offline engine's greedy answers."""
    prompts = [" ".join(WORDS[: 3 + i] * (1 + 2 * i)) for i in range(8)]
    outputs = reference.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    return [Case(p, o.outputs[0].token_ids, o.outputs[0].text) for p, o in zip(prompts, outputs)]


def gateway_workers(server: str) -> dict[str, dict]:
    response = httpx.get(server + "/admin/workers", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    return {w["worker_id"]: w for w in response.json()["workers"]}


def test_every_worker_runs_on_its_pools_node(admin: AdminClient, nodes: Nodes) -> None:
    view = admin.pools()
    for pool, node in (("prefill", nodes.prefill), ("decode", nodes.decode)):
        workers = ready(view, pool)
        assert len(workers) == 1 and all(w["node_id"] == node for w in workers), workers
        assert workers[0]["pid"] > 0 and workers[0]["address"]


def test_admin_calls_need_the_token_and_valid_input(server: str) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}):
        assert httpx.get(server + "/admin/pools", headers=headers, timeout=10).status_code == 401
        assert httpx.post(server + "/admin/pools/decode", json={"replicas": 2}, headers=headers, timeout=10).status_code == 401
        assert httpx.get(server + "/admin/workers", headers=headers, timeout=10).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for path, body in (
        ("/admin/pools/gpu", {"replicas": 1}),
        ("/admin/pools/decode", {"replicas": -1}),
        ("/admin/pools/decode", {"replicas": 99}),
    ):
        response = httpx.post(server + path, json=body, headers=auth, timeout=10)
        assert response.status_code == 400 and response.json()["error"]["message"], response.text
    assert httpx.get(server + "/admin/pools", headers=auth, timeout=10).json()["pools"]["decode"]["desired"] == 1


def test_rescaling_each_pool_under_load_loses_no_request(
    server: str, admin: AdminClient, nodes: Nodes, cases: list[Case], reference: LLM
) -> None:
    with RequestStream(server, MODEL, cases, MAX_TOKENS, num_threads=4) as stream:
        stream.wait_for(8)
        for pool, node in (("decode", nodes.decode), ("prefill", nodes.prefill)):
            [old] = ready(admin.pools(), pool)
            new = scale_up(server, admin, pool, node)
            stream.wait_for(8)
            with LongStreams(server, reference, num_streams=4) as long_streams:  # on both workers when one drains
                drained = scale_down(admin, pool, keep={old["worker_id"], new["worker_id"]})
            assert long_streams.texts == long_streams.expected  # none lost or cut short
            assert drained["end_reason"] == "drained" and drained["load"]["num_used_blocks"] == 0, drained
            if pool == "decode":  # it held long requests when told to drain, and finished them first
                assert drained["load_at_drain"]["num_running"] > 0, drained
            stream.wait_for(4)
    assert stream.num_done >= 40 and not stream.failures(), stream.failures()[:5]


class LongStreams:
    """Streams of LONG_TOKENS tokens, each past its first token when the block starts (so already on
    a decode worker); their whole texts once the block ends."""

    def __init__(self, server: str, reference: LLM, num_streams: int) -> None:
        prompts = [f"{' '.join(WORDS[: 5 + i])} and then" for i in range(num_streams)]
        params = SamplingParams(temperature=0.0, max_tokens=LONG_TOKENS, ignore_eos=True)
        self.expected = [o.outputs[0].text for o in reference.generate(prompts, params)]
        client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)
        self.streams = [
            iter(
                client.completions.create(
                    model=MODEL, prompt=p, max_tokens=LONG_TOKENS, temperature=0.0, stream=True, extra_body={"ignore_eos": True}
                )
            )
            for p in prompts
        ]
        self.texts: list[str] = []

    def __enter__(self) -> LongStreams:
        self.texts = [next(s).choices[0].text for s in self.streams]
        return self

    def __exit__(self, *exc: object) -> None:
        self.texts = [text + "".join(c.choices[0].text for c in s if c.choices) for text, s in zip(self.texts, self.streams)]


def scale_up(server: str, admin: AdminClient, pool: str, node: str) -> dict:
    """1 -> 2 through the CLI: the new worker starts without traffic, then is ready and gets some."""
    view = admin.scale(pool, 2)
    [starting] = [w for w in view["pools"][pool]["workers"] if w["state"] == "starting"]
    assert view["pools"][pool]["desired"] == 2 and len(ready(view, pool)) == 1
    assert starting["worker_id"] not in gateway_workers(server)  # no traffic before it is ready
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pdserve.deploy.cli",
            "scale",
            f"--{pool}",
            "2",
            "--url",
            server,
            "--token",
            TOKEN,
            "--wait",
            "120",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(rf"^{pool}\s+2\s+2\s+0\s+0\s", result.stdout, re.MULTILINE), (
        result.stdout
    )  # desired, ready, starting, draining
    view = wait_for_pools(admin, settled(pool, 2), 5, f"{pool} at 2")
    new = next(w for w in ready(view, pool) if w["worker_id"] == starting["worker_id"])
    assert new["node_id"] == node
    counter = "kv_bytes_received" if pool == "decode" else "kv_bytes_sent"
    deadline = time.monotonic() + 30
    while int(gateway_workers(server).get(new["worker_id"], {}).get("status", {}).get(counter, 0)) == 0:
        assert time.monotonic() < deadline, f"the new {pool} worker got no request"
        time.sleep(0.2)
    return new


def scale_down(admin: AdminClient, pool: str, keep: set[str]) -> dict:
    """2 -> 1: one worker drains (no new requests, finishes its own) and is gone; returns it."""
    view = admin.scale(pool, 1)
    [draining] = [w for w in view["pools"][pool]["workers"] if w["state"] == "draining"]
    assert draining["worker_id"] in keep and view["pools"][pool]["desired"] == 1
    view = wait_for_pools(admin, settled(pool, 1), 60, f"{pool} back at 1")
    return next(w for w in view["pools"][pool]["gone"] if w["worker_id"] == draining["worker_id"])


def test_a_killed_prefill_worker_is_replaced_and_requests_past_it_are_untouched(
    server: str, admin: AdminClient, nodes: Nodes, reference: LLM
) -> None:
    prompts = [f"{' '.join(WORDS[: 4 + i])} and so on" for i in range(3)]
    expected = reference.generate(prompts, SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)
    streams = [
        iter(
            client.completions.create(
                model=MODEL, prompt=p, max_tokens=200, temperature=0.0, stream=True, extra_body={"ignore_eos": True}
            )
        )
        for p in prompts
    ]
    texts = [next(s).choices[0].text for s in streams]  # first tokens: their prefill is done
    [victim] = ready(admin.pools(), "prefill")
    killed_at = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    texts = [text + "".join(c.choices[0].text for c in s if c.choices) for text, s in zip(texts, streams)]
    assert texts == [e.outputs[0].text for e in expected]
    view = wait_for_pools(
        admin,
        lambda v: len(ready(v, "prefill")) == 1 and ready(v, "prefill")[0]["worker_id"] != victim["worker_id"],
        60,
        "a new prefill worker",
    )
    assert ready(view, "prefill")[0]["node_id"] == nodes.prefill
    serve_one(server, reference, deadline=killed_at + 60)
    assert any(w["worker_id"] == victim["worker_id"] and w["end_reason"] == "died" for w in view["pools"]["prefill"]["gone"])


def serve_one(url: str, reference: LLM, deadline: float) -> None:
    """A request served exactly, retried until `deadline` (the gateway sees a new worker within a poll)."""
    [want] = reference.generate("Hello", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    while True:
        response = httpx.post(
            url + "/v1/completions",
            json={"model": MODEL, "prompt": "Hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True},
            timeout=60,
        )
        if response.status_code == 200:
            assert response.json()["choices"][0]["text"] == want.outputs[0].text
            return
        assert time.monotonic() < deadline, f"not serving: {response.status_code} {response.text}"
        time.sleep(0.25)


def health(url: str) -> int:
    try:
        return httpx.get(url + "/health", timeout=5).status_code
    except httpx.HTTPError:
        return 0


def wait_health(url: str, status: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while health(url) != status:
        assert time.monotonic() < deadline, f"{url}/health is not {status} within {timeout_s} s"
        time.sleep(0.1)


def test_a_router_gateway_over_redis_tells_the_truth_through_redis_outages(
    server: str,
    admin: AdminClient,
    nodes: Nodes,
    redis: RedisServer,
    reference: LLM,
    checkpoints: dict[str, Path],
    tmp_path: Path,
) -> None:
    args = ["--redis-url", redis.url, "--model", str(checkpoints["llama"]), "--served-model-name", MODEL]
    with pdserve("router", *args, log_path=tmp_path / "router.log", env=nodes.env) as (router, _):
        serve_one(router, reference, deadline=time.monotonic() + 10)
        for path in ("/admin/pools", "/admin/workers"):  # started without a token: admin is off
            assert httpx.get(router + path, headers={"Authorization": "Bearer x"}, timeout=10).status_code == 403

        redis.stop()  # Redis down: the router keeps the workers it knows, checking them itself
        time.sleep(2)
        assert health(router) == 200
        serve_one(router, reference, deadline=time.monotonic() + 5)

        redis.start()  # back, empty: nobody is dropped while the workers register again
        samples = []
        restarted_at = time.monotonic()
        while time.monotonic() - restarted_at < 3:
            samples.append(health(router))
            time.sleep(0.05)
        assert set(samples) == {200}, samples
        serve_one(router, reference, deadline=time.monotonic() + 5)

        redis.stop()  # down again, and the decode worker dies: the router must say so
        [victim] = ready(admin.pools(), "decode")
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        wait_health(router, 503, 5)
        wait_for_pools(
            admin,
            lambda v: len(ready(v, "decode")) == 1 and ready(v, "decode")[0]["worker_id"] != victim["worker_id"],
            60,
            "a new decode worker",
        )
        serve_one(server, reference, deadline=killed_at + 60)  # the controller's gateway needs no Redis
        assert health(router) == 503  # it cannot know the replacement: no registry

        redis.start()
        wait_health(router, 200, 10)
        serve_one(router, reference, deadline=time.monotonic() + 5)
