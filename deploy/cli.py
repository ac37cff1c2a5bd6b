"""The `pdserve` command: `serve` (Ray-placed prefill and decode pools behind the OpenAI gateway),
`router` (one more gateway over the workers in Redis), `scale` and `status` (the pools, through the
admin API), `bench` and `demo-model` (write the small random checkpoint that `serve` uses by default)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from engine.config import EngineConfig

DEMO_MODEL_NAME = "pdserve-demo"


def build_parser(config_file: str | None = None) -> argparse.ArgumentParser:
    """`config_file`: a `--config` YAML whose settings become `serve`'s defaults (flags override it)."""
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model over the OpenAI API")
    serve.add_argument("--config", default=None, help="YAML file of settings (flags' names, pools, autoscaler); flags override it")
    serve.add_argument("--model", default=None, help="HF checkpoint directory or Hub id (default: the demo model)")
    serve.add_argument("--served-model-name", default=None, help="model name in the API (default: --model)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    serve.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--prefill-workers", type=int, default=1)
    serve.add_argument("--decode-workers", type=int, default=1)
    serve.add_argument("--redis-url", default=None, help="share the worker registry through Redis (several gateways)")
    serve.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    serve.add_argument("--worker-host", default="127.0.0.1", help="address workers bind (0.0.0.0 across hosts)")
    serve.add_argument("--block-size", type=int, default=16)
    serve.add_argument("--max-model-len", type=int, default=None)
    serve.add_argument("--max-num-seqs", type=int, default=256)
    serve.add_argument("--max-num-batched-tokens", type=int, default=8192)
    serve.add_argument("--kv-cache-memory-gib", type=float, default=None)
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    serve.add_argument("--no-prefix-caching", action="store_true")
    serve.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    serve.add_argument(
        "--kv-transport", default="auto", choices=["auto", "cuda_ipc", "nccl", "grpc", "local"],
        help="how KV moves from prefill to decode workers (auto: CUDA IPC on one host, NCCL across hosts, else gRPC)",
    )
    serve.add_argument("--load-format", default="auto", choices=["auto", "dummy"], help="dummy: random weights (benchmarks)")
    serve.add_argument("--colocated", action="store_true", help="one engine in this process, no workers (baseline)")
    serve.add_argument("--admin-token", default=None, help="bearer token of /admin/* (default: $PDSERVE_ADMIN_TOKEN; none: admin off)")
    serve.add_argument("--autoscale", action=argparse.BooleanOptionalAction, default=False, help="size the pools from their load")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(prefill_pool=None, decode_pool=None, autoscaler=None, drain=None)  # set by --config only
    if config_file is not None:
        from deploy.config_file import file_defaults

        serve.set_defaults(**file_defaults(config_file, serve))
    demo = commands.add_parser("demo-model", help="write the demo checkpoint into DIR")
    demo.add_argument("directory")
    demo.add_argument("--seed", type=int, default=0)
    from bench.serve import add_arguments
    from deploy import admin_client, router_gateway

    add_arguments(commands.add_parser("bench", help="load-test an OpenAI-compatible server"))
    router_gateway.add_arguments(commands.add_parser("router", help="one more gateway, over the workers registered in Redis"))
    admin_client.add_scale_arguments(commands.add_parser("scale", help="set the prefill and/or decode pool's size"))
    admin_client.add_status_arguments(commands.add_parser("status", help="the pools, their workers and load"))
    return parser


def main(argv: list[str] | None = None) -> int:
    from deploy.config_file import ConfigFileError

    args = build_parser().parse_args(argv)
    if args.command == "serve" and args.config:
        try:
            args = build_parser(args.config).parse_args(argv)
        except ConfigFileError as exc:
            print(f"pdserve: {exc}", file=sys.stderr)
            return 2
    level = args.log_level.upper() if args.command in ("serve", "router") else "INFO"
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in ("router", "scale", "status"):
        from deploy import admin_client, router_gateway

        return {"router": router_gateway.main, "scale": admin_client.scale, "status": admin_client.status}[args.command](args)
    if args.command == "demo-model":
        from engine.demo_model import write_demo_model

        print(write_demo_model(args.directory, args.seed))
        return 0
    if args.command == "bench":
        from bench.serve import main as bench_main

        return bench_main(args)
    return serve(args)


def serve(args: argparse.Namespace) -> int:
    from deploy.cluster import Cluster, StartupError
    from deploy.controller_client import ControllerClient
    from deploy.gateway import run_gateway
    from engine.config import ConfigError

    try:
        config = serve_config(args)
    except (ConfigError, ValueError, TypeError) as exc:
        print(f"pdserve: {exc}", file=sys.stderr)
        return 2
    if config.colocated:
        return asyncio.run(run_gateway(config, registry=None))
    cluster = Cluster(config)
    _stop_on_sigterm()
    try:
        controller = ControllerClient(cluster.start())
        _stop_on_sigterm()  # again: ray.init installs its own handler (sys.exit(15))
        return asyncio.run(run_gateway(config, registry=controller, controller=controller))
    except (KeyboardInterrupt, _Shutdown):
        return 0
    except ConfigError as exc:
        print(f"pdserve: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"pdserve: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()


def serve_config(args: argparse.Namespace) -> object:
    from deploy.config import AutoscaleConfig, DrainConfig, PoolConfig, ServeConfig
    from engine.demo_model import default_demo_model_dir
    from engine.loader import resolve_model_path

    model = args.model or str(default_demo_model_dir())
    model_dir = resolve_model_path(model)  # fails early, and downloads once for every local worker
    engine = EngineConfig(
        model=str(model_dir),
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory_gib=args.kv_cache_memory_gib,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=not args.no_prefix_caching,
        enforce_eager=args.enforce_eager,
        load_format=args.load_format,
    )
    return ServeConfig(
        engine=engine,
        served_model_name=args.served_model_name or args.model or DEMO_MODEL_NAME,
        host=args.host,
        port=args.port,
        num_prefill_workers=args.prefill_workers,
        num_decode_workers=args.decode_workers,
        redis_url=args.redis_url,
        ray_address=args.ray_address,
        worker_host=args.worker_host,
        kv_transport=args.kv_transport,
        colocated=args.colocated,
        admin_token=args.admin_token or os.environ.get("PDSERVE_ADMIN_TOKEN"),
        prefill_pool=args.prefill_pool or PoolConfig(),
        decode_pool=args.decode_pool or PoolConfig(),
        autoscale=AutoscaleConfig(enabled=args.autoscale, **(args.autoscaler or {})),
        drain=DrainConfig(**(args.drain or {})),
    )


class _Shutdown(Exception):
    """SIGTERM: stop the gateway and the workers, then exit 0."""


def _stop_on_sigterm() -> None:
    """uvicorn handles SIGINT/SIGTERM while it serves and re-raises them once it has stopped;
    outside of it (model loading, shutdown) this handler unwinds to `cluster.stop()`."""

    def handler(signum: int, frame: object) -> None:
        raise _Shutdown

    signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
