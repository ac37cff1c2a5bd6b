"""`pdserve router --redis-url URL`: one more gateway, serving through the workers it finds in Redis
(registered there by `pdserve serve --redis-url URL`'s workers), so a load balancer can sit in front
of several. With `--ray-address` it also reaches the controller (`/admin/pools`, autoscaler inputs)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from pdserve.deploy.config import ServeConfig
from pdserve.engine.config import ConfigError, EngineConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", required=True, help="the Redis the workers register in")
    parser.add_argument("--model", default=None, help="the served checkpoint, for its tokenizer (default: the demo model)")
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="the model's name(s) in the API: requests may name any, replies carry the first (default: --model)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--admin-token", default=None, help="bearer token of /admin/* (default: $PDSERVE_ADMIN_TOKEN; none: admin off)"
    )
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster to reach its pdserve controller")
    parser.add_argument("--log-level", default="info")
    from pdserve.deploy.cli import add_gateway_arguments

    add_gateway_arguments(parser)


def router_config(args: argparse.Namespace) -> ServeConfig:
    from pdserve.deploy.cli import cluster_secret, served_model_names, tokenizer_path
    from pdserve.engine.demo_model import default_demo_model_dir
    from pdserve.engine.loader import resolve_model_path
    from pdserve.proto.cluster_secret import ENV_VAR

    if not os.environ.get(ENV_VAR):
        raise ConfigError(f"set {ENV_VAR} to the cluster's secret (the one `pdserve serve` was given)")
    model_dir = resolve_model_path(args.model or str(default_demo_model_dir()), args.revision, args.download_dir)
    return ServeConfig(
        engine=EngineConfig(model=str(model_dir), tokenizer=tokenizer_path(args)),
        served_model_name=served_model_names(args)[0],
        host=args.host,
        port=args.port,
        redis_url=args.redis_url,
        ray_address=args.ray_address,
        admin_token=args.admin_token or os.environ.get("PDSERVE_ADMIN_TOKEN"),
        cluster_secret=cluster_secret(),
    )


def main(args: argparse.Namespace) -> int:
    from pdserve.deploy.cli import gateway_config, in_flag_terms
    from pdserve.deploy.controller_client import ControllerClient
    from pdserve.deploy.gateway import run_gateway
    from pdserve.router.registry import RedisRegistry

    try:
        config = router_config(args)
        gateway = gateway_config(args, config.engine.model)
        registry = RedisRegistry(config.redis_url, config.cluster_secret)
    except (ConfigError, ValueError) as exc:
        print(f"pdserve router: {in_flag_terms(str(exc), args.flag_names)}", file=sys.stderr)
        return 2
    # It serves before its workers register and while the controller is away (503s until then). It
    # joins Ray later, off the main thread: Ray's crash handler must not take SIGTERM from the drain.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    controller = ControllerClient.find(config.ray_address) if config.ray_address else None
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return asyncio.run(run_gateway(config, registry, gateway, controller, can_serve_before_workers=True))
    except KeyboardInterrupt:
        return 0


def _interrupt(signum: int, frame: object) -> None:
    """uvicorn stops serving on SIGTERM, then raises the signal again: end like Ctrl-C, status 0."""
    raise KeyboardInterrupt
