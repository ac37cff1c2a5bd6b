"""The admin API's rules on the real FastAPI app (no workers needed): a bearer token on every admin
route, 403 when none is configured, 400 for unknown pools and bad counts, the controller's refusals
as 400; and the per-pool series on /metrics."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from pdserve.engine.tokenizer import Tokenizer
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.admin import ScaleError, admin_routes, colocated_admin_routes
from pdserve.router.app import create_app
from pdserve.router.backend import ColocatedBackend
from pdserve.router.metrics import Metrics
from pdserve.router.pool_metrics import PoolCollector
from pdserve.router.registry import InMemoryRegistry, WorkerRecord
from pdserve.router.workers import WorkerHandle, WorkerPool
from tests.servers import CLUSTER_SECRET

TOKEN = "let-me-in"


class FakeController:
    """A PoolAdmin answering like the controller does."""

    def __init__(self) -> None:
        self.sizes = {"prefill": 1, "decode": 1}

    async def pools(self) -> dict:
        return {
            "pools": {name: {"desired": n, "workers": []} for name, n in self.sizes.items()},
            "autoscaler": {"enabled": False},
        }

    async def scale(self, pool: str, replicas: int) -> dict:
        if replicas > 4:
            raise ScaleError(f"the {pool} pool takes 1 to 4 replicas; got {replicas}")
        self.sizes[pool] = replicas
        return await self.pools()


class NoEngine(ColocatedBackend):
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.model_name, self.max_model_len, self.tokenizer = "m", 64, tokenizer


def app_with(token: str | None, tokenizer: Tokenizer, pool: WorkerPool | None = None) -> object:
    pool = pool or WorkerPool(InMemoryRegistry(), CLUSTER_SECRET)
    metrics = Metrics("m")
    app = create_app(NoEngine(tokenizer), metrics)
    app.include_router(admin_routes(pool, token, FakeController()))
    metrics.registry.register(
        PoolCollector(
            pool,
            "m",
            lambda: {
                "pools": {
                    "prefill": {"desired": 2, "num_workers": {"starting": 1, "ready": 1, "draining": 0}},
                    "decode": {"desired": 1, "num_workers": {"starting": 0, "ready": 1, "draining": 1}},
                },
                "autoscaler": {"enabled": True, "num_decisions": {"prefill": {"up": 3, "down": 2}}},
            },
        )
    )
    return app


def call(
    app: object, method: str, path: str, token: str | None = None, headers: dict | None = None, **kwargs: object
) -> httpx.Response:
    async def main() -> httpx.Response:
        nonlocal headers
        if headers is None:
            headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
            return await client.request(method, path, headers=headers, **kwargs)

    return asyncio.run(main())


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(demo_model_dir)


@pytest.mark.parametrize("method, path", [("GET", "/admin/workers"), ("GET", "/admin/pools"), ("POST", "/admin/pools/decode")])
def test_admin_routes_need_the_bearer_token(tokenizer: Tokenizer, method: str, path: str) -> None:
    app = app_with(TOKEN, tokenizer)
    body = {"json": {"replicas": 2}} if method == "POST" else {}
    for token in (None, "wrong", ""):
        response = call(app, method, path, token, **body)
        assert response.status_code == 401, (token, response.text)
        assert "Bearer" in response.json()["error"]["message"]
    assert call(app, method, path, TOKEN, **body).status_code == 200
    for header in (TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x"):
        assert call(app, method, path, headers={"Authorization": header}, **body).status_code == 401


@pytest.mark.parametrize("method, path", [("GET", "/admin/workers"), ("GET", "/admin/pools"), ("POST", "/admin/pools/decode")])
def test_without_a_configured_token_the_admin_api_is_off(tokenizer: Tokenizer, method: str, path: str) -> None:
    app = app_with(None, tokenizer)
    for token in (None, "anything"):
        response = call(app, method, path, token, json={"replicas": 1})
        assert response.status_code == 403 and "admin API is off" in response.json()["error"]["message"]


@pytest.mark.parametrize("method, path", [("GET", "/admin/workers"), ("GET", "/admin/pools"), ("POST", "/admin/pools/decode")])
def test_a_colocated_gateway_says_it_has_no_pools_behind_the_same_token(tokenizer: Tokenizer, method: str, path: str) -> None:
    """`pdserve serve --colocated`: the admin API is off without a token (403, as documented), needs
    the token when one is set (401), and then says why there is nothing to administer (404)."""
    off, on = create_app(NoEngine(tokenizer), Metrics("m")), create_app(NoEngine(tokenizer), Metrics("m"))
    off.include_router(colocated_admin_routes(None))
    on.include_router(colocated_admin_routes(TOKEN))
    assert call(off, method, path, TOKEN, json={"replicas": 1}).status_code == 403
    assert call(on, method, path, "wrong", json={"replicas": 1}).status_code == 401
    response = call(on, method, path, TOKEN, json={"replicas": 1})
    assert response.status_code == 404 and "colocated" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "path, body, fragment",
    [
        ("/admin/pools/embedding", {"replicas": 1}, "unknown pool"),
        ("/admin/pools/decode", {"replicas": -1}, "replicas must be >= 0"),
        ("/admin/pools/decode", {"replicas": "2"}, "replicas"),
        ("/admin/pools/decode", {"replicas": 1.5}, "replicas"),
        ("/admin/pools/decode", {}, "replicas"),
        ("/admin/pools/decode", {"replicas": 1, "extra": True}, "extra"),
        ("/admin/pools/decode", {"replicas": 9}, "1 to 4 replicas"),  # the controller's bounds
    ],
)
def test_bad_scale_requests_are_400_in_openais_error_shape(tokenizer: Tokenizer, path: str, body: dict, fragment: str) -> None:
    response = call(app_with(TOKEN, tokenizer), "POST", path, TOKEN, json=body)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"] and response.json()["error"]["code"] == 400


def test_scale_answers_the_pools(tokenizer: Tokenizer) -> None:
    response = call(app_with(TOKEN, tokenizer), "POST", "/admin/pools/prefill", TOKEN, json={"replicas": 3})
    assert response.status_code == 200 and response.json()["pools"]["prefill"]["desired"] == 3


def test_pool_series_on_metrics(tokenizer: Tokenizer) -> None:
    pool = WorkerPool(InMemoryRegistry(), CLUSTER_SECRET)
    for name, role, used in (("p0", "prefill", 2), ("d0", "decode", 30), ("d1", "decode", 10)):
        handle = WorkerHandle(WorkerRecord(name, role, "127.0.0.1:1"), channel=None, stub=None, is_healthy=True)
        handle.status = pb.WorkerStatus(role=role, num_running=1, num_waiting=2, num_used_blocks=used, num_total_blocks=100)
        pool.workers[name] = handle
    pool.workers["d1"].status.is_draining = True
    text = call(app_with(TOKEN, tokenizer, pool), "GET", "/metrics").text
    assert 'pdserve:pool_kv_cache_usage_perc{model_name="m",pool="decode"} 0.2' in text
    assert 'pdserve:pool_num_requests_waiting{model_name="m",pool="decode"} 4.0' in text
    assert 'pdserve:pool_healthy_workers{model_name="m",pool="decode"} 1.0' in text  # the draining one takes nothing new
    assert 'pdserve:pool_replicas{model_name="m",pool="decode",state="draining"} 1.0' in text
    assert 'pdserve:pool_desired_replicas{model_name="m",pool="prefill"} 2.0' in text
    assert 'pdserve:autoscaler_decisions_total{direction="up",model_name="m",pool="prefill"} 3.0' in text


def test_the_scale_command_resizes_no_pool_when_it_cannot_resize_them_all(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from pdserve.deploy import admin_client
    from pdserve.deploy.cli import build_parser

    posted: list[tuple[str, int]] = []

    class Gateway:
        def __init__(self, url: str, token: str | None) -> None:
            pass

        def pools(self) -> dict:
            return {"pools": {"prefill": {"min": 1, "max": 8}, "decode": {"min": 1, "max": 8}}}

        def scale(self, pool: str, replicas: int) -> dict:
            posted.append((pool, replicas))
            return self.pools()

    monkeypatch.setattr(admin_client, "AdminClient", Gateway)
    args = build_parser().parse_args(["scale", "--prefill", "2", "--decode", "0"])
    assert admin_client.scale(args) == 1 and posted == []
    assert "the decode pool takes 1 to 8 replicas; got 0; no pool was resized" in capsys.readouterr().err
    assert admin_client.scale(build_parser().parse_args(["scale", "--prefill", "2", "--wait", "-5"])) == 2 and posted == []


def test_status_shows_a_gateway_without_a_controller_its_workers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`pdserve status` against `pdserve router` without --ray-address: /admin/pools is 404 there,
    so it shows that gateway's own view of its workers rather than failing."""
    from pdserve.deploy import admin_client
    from pdserve.deploy.cli import build_parser
    from pdserve.router.admin import _worker_view

    handles = []
    for name, role, used, draining in (("prefill-1", "prefill", 2, False), ("decode-1", "decode", 30, True)):
        handle = WorkerHandle(WorkerRecord(name, role, "127.0.0.1:1"), channel=None, stub=None, is_healthy=True)
        handle.status = pb.WorkerStatus(
            role=role, num_running=3, num_used_blocks=used, num_total_blocks=100, is_draining=draining
        )
        handle.num_in_flight = 2
        handles.append(handle)

    class Router:
        def __init__(self, url: str, token: str | None) -> None:
            pass

        def pools(self) -> dict:
            raise admin_client.AdminError("HTTP 404: this gateway has no controller", 404)

        def workers(self) -> dict:
            return {"workers": [_worker_view(handles[0], True), _worker_view(handles[1], False)]}

    monkeypatch.setattr(admin_client, "AdminClient", Router)
    assert admin_client.status(build_parser().parse_args(["status"])) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "no pools here" in lines[0]
    assert lines[2].split() == ["prefill-1", "prefill", "healthy", "127.0.0.1:1", "2", "3", "0", "2.0%"]
    assert lines[3].split() == ["decode-1", "decode", "left", "127.0.0.1:1", "2", "3", "0", "30.0%"]
    assert admin_client.status(build_parser().parse_args(["status", "--json"])) == 0
    assert [w["worker_id"] for w in json.loads(capsys.readouterr().out)["workers"]] == ["prefill-1", "decode-1"]
