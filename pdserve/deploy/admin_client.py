"""`pdserve scale` and `pdserve status`: the gateway's admin API from the command line (bearer token
from `--token` or `PDSERVE_ADMIN_TOKEN`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the gateway (default {DEFAULT_URL})")
    parser.add_argument("--token", default=None, help="admin token (default: $PDSERVE_ADMIN_TOKEN)")


def add_scale_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--prefill", type=int, default=None, metavar="N", help="prefill pool replicas")
    parser.add_argument("--decode", type=int, default=None, metavar="M", help="decode pool replicas")
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to this long until each pool is settled (ready = desired, nothing draining)",
    )


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print /admin/pools' JSON")


class AdminClient:
    def __init__(self, url: str, token: str | None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=30)

    def pools(self) -> dict:
        return _checked(self.client.get("/admin/pools"))

    def scale(self, pool: str, replicas: int) -> dict:
        return _checked(self.client.post(f"/admin/pools/{pool}", json={"replicas": replicas}))

    def workers(self) -> dict:
        return _checked(self.client.get("/admin/workers"))


class AdminError(RuntimeError):
    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


def _checked(response: httpx.Response) -> dict:
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise AdminError(f"HTTP {response.status_code}: {message}", response.status_code)
    return response.json()


def scale(args: argparse.Namespace) -> int:
    sizes = {pool: n for pool, n in (("prefill", args.prefill), ("decode", args.decode)) if n is not None}
    if not sizes:
        print("pdserve scale: give --prefill N and/or --decode M", file=sys.stderr)
        return 2
    if args.wait < 0:
        print(f"pdserve scale: --wait must be >= 0 seconds; got {args.wait:g}", file=sys.stderr)
        return 2
    client = AdminClient(args.url, args.token or os.environ.get("PDSERVE_ADMIN_TOKEN"))
    try:
        refused = out_of_bounds(client.pools(), sizes)  # all or nothing: no pool resized if one cannot be
        if refused:
            print(f"pdserve scale: {refused}; no pool was resized", file=sys.stderr)
            return 1
        for pool, replicas in sizes.items():
            view = client.scale(pool, replicas)
        if args.wait > 0:
            view = _wait_settled(client, args.wait)
    except (AdminError, httpx.HTTPError, TimeoutError) as exc:
        print(f"pdserve scale: {exc}", file=sys.stderr)
        return 1
    print(render(view))
    return 0


def out_of_bounds(view: dict, sizes: dict[str, int]) -> str | None:
    """Why the gateway would refuse one of `sizes` (pool -> replicas), as it would say it; None when
    it would take them all."""
    for pool, replicas in sizes.items():
        bounds = view["pools"][pool]
        if replicas < 0:
            return f"replicas must be >= 0; got {replicas} for the {pool} pool"
        if not bounds["min"] <= replicas <= bounds["max"]:
            return f"the {pool} pool takes {bounds['min']} to {bounds['max']} replicas; got {replicas}"
    return None


def status(args: argparse.Namespace) -> int:
    client = AdminClient(args.url, args.token or os.environ.get("PDSERVE_ADMIN_TOKEN"))
    try:
        try:
            view, show = client.pools(), render
        except AdminError as exc:
            if exc.status_code != 404 or "no controller" not in str(exc):
                raise
            view, show = client.workers(), render_workers  # a gateway without a controller (`pdserve router`)
    except (AdminError, httpx.HTTPError) as exc:
        print(f"pdserve status: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(view, indent=2) if args.json else show(view))
    return 0


def is_settled(view: dict) -> bool:
    return all(p["num_workers"]["ready"] == p["desired"] and len(p["workers"]) == p["desired"] for p in view["pools"].values())


def _wait_settled(client: AdminClient, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while not is_settled(view := client.pools()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the pools did not settle within {timeout_s:g} s:\n{render(view)}")
        time.sleep(0.5)
    return view


def render(view: dict) -> str:
    lines = [f"{'POOL':8} {'DESIRED':>7} {'READY':>5} {'STARTING':>8} {'DRAINING':>8} {'MIN':>4} {'MAX':>4}"]
    for name, pool in view["pools"].items():
        n = pool["num_workers"]
        lines.append(
            f"{name:8} {pool['desired']:>7} {n['ready']:>5} {n['starting']:>8} {n['draining']:>8} {pool['min']:>4} {pool['max']:>4}"
        )
        for worker in pool["workers"]:
            load = worker["load"] or {}
            lines.append(
                f"  {worker['worker_id']:18} {worker['state']:9} {worker['address'] or '-':22} node {(worker['node_id'] or '-')[:12]:12} "
                f"pid {worker['pid'] or '-':>7}  running {load.get('num_running', '-')}  waiting {load.get('num_waiting', '-')}  "
                f"kv {100 * load.get('kv_cache_usage', 0):.1f}%"
            )
    autoscaler = view.get("autoscaler", {})
    if autoscaler.get("enabled"):
        counts = autoscaler["num_decisions"]
        summary = ", ".join(f"{pool} +{c['up']}/-{c['down']}" for pool, c in counts.items())
        lines.append(f"autoscaler: on ({summary})")
        lines += [f"  {d['pool']} -> {d['replicas']}: {d['reason']}" for d in autoscaler["recent"][-5:]]
    else:
        lines.append("autoscaler: off")
    return "\n".join(lines)


def render_workers(view: dict) -> str:
    """`/admin/workers`: the workers a gateway without a controller routes to, as it polls them."""
    lines = [
        "no pools here (this gateway has no controller: start it with --ray-address); the workers it routes to:",
        f"  {'WORKER':18} {'ROLE':7} {'STATE':9} {'ADDRESS':22} {'IN FLIGHT':>9} {'RUNNING':>7} {'WAITING':>7} {'KV':>6}",
    ]
    for worker in view["workers"]:
        status = worker["status"] or {}
        state = "draining" if worker["draining"] else "healthy" if worker["healthy"] else "unhealthy"
        used, total = int(status.get("num_used_blocks", 0)), int(status.get("num_total_blocks", 0))
        lines.append(
            f"  {worker['worker_id']:18} {worker['role']:7} {state if worker['in_pool'] else 'left':9} {worker['address']:22} "
            f"{worker['num_in_flight']:>9} {status.get('num_running', '-'):>7} {status.get('num_waiting', '-'):>7} "
            f"{100 * used / max(1, total):>5.1f}%"
        )
    return "\n".join(lines)
