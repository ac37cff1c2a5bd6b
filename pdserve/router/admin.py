"""Operator routes, behind a bearer token: `GET /admin/workers` (the workers this gateway routes to,
as it polls them, and those that left while its requests on them run), `GET /admin/pools` and `POST /admin/pools/{prefill|decode}` (the controller's
pools: desired and actual replicas, each worker's state, node, pid and load; 503 while the controller
cannot be reached). No token configured: the whole admin API is off (403). A colocated gateway
(`pdserve serve --colocated`) has neither workers nor pools: its admin routes, behind the same token,
say so (404, `colocated_admin_routes`)."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any, Protocol

from fastapi import APIRouter, Depends, Request
from google.protobuf.json_format import MessageToDict
from pydantic import BaseModel, ConfigDict, Field

from pdserve.router.errors import APIError
from pdserve.router.workers import WorkerHandle, WorkerPool

POOLS = ("prefill", "decode")


class ScaleError(ValueError):
    """A scale request the controller refuses (a count outside the pool's bounds...): HTTP 400."""


class ControllerUnavailableError(RuntimeError):
    """The controller cannot be reached now (stopped, restarting, its Ray cluster gone): HTTP 503."""


class PoolAdmin(Protocol):
    """The controller as the gateway reaches it (`deploy/controller_client.py`); both calls raise
    ControllerUnavailableError while it cannot be reached."""

    async def pools(self) -> dict:
        """{"pools": {name: {desired, min, max, workers: [...], gone: [...]}}, "autoscaler": {...}}"""
        ...

    async def scale(self, pool: str, replicas: int) -> dict:
        """Sets the pool's desired replicas (raises ScaleError); returns the pools as `pools()`."""
        ...


class ScaleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    replicas: int = Field(strict=True)


def admin_routes(pool: WorkerPool, token: str | None, admin: PoolAdmin | None = None) -> APIRouter:
    routes = APIRouter(prefix="/admin", dependencies=[Depends(_bearer_check(token))])

    @routes.get("/workers")
    async def workers() -> dict:
        await pool.refresh()
        return {"workers": [_worker_view(handle, handle not in pool.retired) for handle in pool.known()]}

    @routes.get("/pools")
    async def pools() -> dict:
        try:
            return await _controller(admin).pools()
        except ControllerUnavailableError as exc:
            raise APIError(503, str(exc)) from exc

    @routes.post("/pools/{name}")
    async def scale(name: str, body: ScaleRequest) -> dict:
        if name not in POOLS:
            raise APIError(400, f"unknown pool {name!r}: the pools are {' and '.join(POOLS)}", "pool")
        if body.replicas < 0:
            raise APIError(400, f"replicas must be >= 0; got {body.replicas}", "replicas")
        try:
            return await _controller(admin).scale(name, body.replicas)
        except ScaleError as exc:
            raise APIError(400, str(exc), "replicas") from exc
        except ControllerUnavailableError as exc:
            raise APIError(503, str(exc)) from exc

    return routes


COLOCATED = "this gateway runs one colocated engine (--colocated): it has no controller, workers or pools"


def colocated_admin_routes(token: str | None) -> APIRouter:
    """/admin/* of a colocated gateway: 403 without a configured token, 401 without it, else 404."""
    routes = APIRouter(prefix="/admin", dependencies=[Depends(_bearer_check(token))])

    @routes.api_route("/{path:path}", methods=["GET", "POST"])
    async def nothing_to_administer(path: str) -> None:
        raise APIError(404, COLOCATED)

    return routes


def _bearer_check(token: str | None) -> Callable[..., Any]:
    async def check(request: Request) -> None:
        if not token:
            raise APIError(403, "the admin API is off: start the gateway with --admin-token or PDSERVE_ADMIN_TOKEN")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise APIError(401, "admin calls need the header `Authorization: Bearer <admin token>`")

    return check


def _controller(admin: PoolAdmin | None) -> PoolAdmin:
    if admin is None:
        raise APIError(
            404,
            "this gateway has no controller: pools are managed through `pdserve serve`'s gateway "
            "or a `pdserve router` started with --ray-address",
        )
    return admin


def _worker_view(handle: WorkerHandle, in_pool: bool) -> dict:
    """`in_pool`: false for a worker that left the pool and still runs this gateway's requests."""
    status = handle.status
    return {
        "worker_id": handle.record.worker_id,
        "role": handle.record.role,
        "address": handle.record.address,
        "healthy": handle.is_healthy,
        "draining": handle.is_draining,
        "listed": handle.is_listed,
        "in_pool": in_pool,
        "num_in_flight": handle.num_in_flight,
        "num_prefill_tokens": handle.num_prefill_tokens,
        "status": MessageToDict(status, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        if status is not None
        else None,
    }
