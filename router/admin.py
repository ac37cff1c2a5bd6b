"""Operator routes: `GET /admin/workers` lists the workers this gateway knows, their health and
load (requests, KV blocks), as polled from each worker."""
from __future__ import annotations

from fastapi import APIRouter
from google.protobuf.json_format import MessageToDict

from router.workers import WorkerPool


def admin_routes(pool: WorkerPool) -> APIRouter:
    routes = APIRouter(prefix="/admin")

    @routes.get("/workers")
    async def workers() -> dict:
        await pool.refresh()
        return {
            "workers": [
                {
                    "worker_id": handle.record.worker_id,
                    "role": handle.record.role,
                    "address": handle.record.address,
                    "healthy": handle.is_healthy,
                    "num_in_flight": handle.num_in_flight,
                    "status": MessageToDict(handle.status, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
                    if handle.status is not None
                    else None,
                }
                for handle in pool.workers.values()
            ]
        }

    return routes
