"""The `pdserve` command: `serve` (Ray-placed prefill and decode pools behind the OpenAI gateway),
`router` (one more gateway over the workers in Redis), `scale` and `status` (the pools, through the
admin API), `bench` and `demo-model` (write the small random checkpoint that `serve` uses by default)."""

from __future__ import annotations

import argparse
import asyncio
import codecs
import json
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from pdserve.deploy import exit_guard
from pdserve.engine.config import EngineConfig
from pdserve.proto.deadlines import Deadlines
from pdserve.router.config import DEFAULT_MAX_REQUEST_BODY_BYTES, CorsOptions, GatewayConfig, TLSOptions
from pdserve.router.reasoning import PARSERS as REASONING_PARSERS
from pdserve.router.tools import ToolOptions

if TYPE_CHECKING:
    from pdserve.deploy.config import ServeConfig
    from pdserve.proto.cluster_secret import ClusterSecret

DEMO_MODEL_NAME = "pdserve-demo"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
API_KEY_ENV = "PDSERVE_API_KEY"  # comma-separated keys, added to --api-key
VLLM_API_KEY_ENV = "VLLM_API_KEY"  # vLLM's: one key, when neither --api-key nor $PDSERVE_API_KEY gives one
DTYPE_ALIASES = {"half": "float16", "float": "float32"}  # vLLM's other --dtype names
KV_CACHE_DTYPE_ALIASES = {"fp8_e4m3": "fp8"}
QUANTIZATION_ALIASES = {"awq_marlin": "awq", "gptq_marlin": "gptq"}  # vLLM's kernel-named methods: the same formats
logger = logging.getLogger(__name__)
RAY_CONNECT_TIMEOUT_S = 5.0  # --ray-address: how long the head may take to accept a connection


def build_parser(config_file: str | None = None) -> argparse.ArgumentParser:
    """`config_file`: a `--config` YAML whose settings become `serve`'s defaults (flags override it)."""
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model over the OpenAI API")
    serve.add_argument(
        "--config", default=None, help="YAML file of settings (flags' names, pools, autoscaler); flags override it"
    )
    serve.add_argument("model_tag", nargs="?", default=None, help="the model, as `vllm serve MODEL` takes it (= --model)")
    serve.add_argument("--model", default=None, help="HF checkpoint directory or Hub id (default: the demo model)")
    serve.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="the model's name(s) in the API: requests may name any; the first is the default (default: --model)",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    serve.add_argument("--dtype", default="auto", type=_alias(DTYPE_ALIASES), choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument(
        "--kv-cache-dtype",
        default="auto",
        type=_alias(KV_CACHE_DTYPE_ALIASES),
        choices=["auto", "fp8"],
        help="fp8: an e4m3 KV cache with per-layer scales, twice the blocks; hand-offs move half the bytes",
    )
    serve.add_argument("--prefill-workers", type=int, default=1)
    serve.add_argument("--decode-workers", type=int, default=1)
    serve.add_argument("--redis-url", default=None, help="share the worker registry through Redis (several gateways)")
    serve.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    serve.add_argument("--worker-host", default="127.0.0.1", help="address workers bind (0.0.0.0 across hosts)")
    serve.add_argument("--block-size", type=int, default=16)
    serve.add_argument("--max-model-len", type=token_count, default=None, help="tokens (vLLM's 32k, 1M too)")
    serve.add_argument("--max-num-seqs", type=int, default=256)
    serve.add_argument("--max-num-batched-tokens", type=token_count, default=8192, help="prompt tokens a step")
    serve.add_argument("--kv-cache-memory-gib", type=float, default=None)
    serve.add_argument(
        "--num-gpu-blocks-override", type=int, default=None, help="this many KV blocks, whatever the memory (vLLM's)"
    )
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    serve.add_argument(
        "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True, help="reuse cached prompt prefixes"
    )
    serve.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", help=argparse.SUPPRESS)
    serve.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False, help="no CUDA graphs")
    serve.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="launch each decode step before the last one's tokens are read back (default: on)",
    )
    serve.add_argument(
        "--scheduling-policy",
        default="fcfs",
        choices=["fcfs", "priority"],
        help="the order waiting requests are served in: arrival, or requests' `priority` (lower first), then arrival",
    )
    serve.add_argument(
        "--max-logprobs",
        type=int,
        default=20,
        help="the most logprobs (and prompt_logprobs) a request may ask for; -1: the whole vocabulary (vLLM's)",
    )
    serve.add_argument(
        "--kv-transport",
        default="auto",
        choices=["auto", "cuda_ipc", "nccl", "grpc", "local"],
        help="how KV moves from prefill to decode workers (auto: CUDA IPC on one host, NCCL across hosts, else gRPC)",
    )
    serve.add_argument(
        "--load-format",
        default="auto",
        type=_alias({"safetensors": "auto"}),
        choices=["auto", "dummy"],
        help="auto (= safetensors): the checkpoint's weights; dummy: random weights (benchmarks)",
    )
    serve.add_argument(
        "--quantization",
        "-q",
        default=None,
        type=_alias(QUANTIZATION_ALIASES),
        choices=["fp8", "int8", "awq", "gptq", "compressed-tensors"],
        help="fp8|int8: quantize an unquantized checkpoint's weights at load (per output channel); "
        "otherwise the checkpoint's own quantization_config is used (this flag then only checks it)",
    )
    serve.add_argument(
        "--colocated", action=argparse.BooleanOptionalAction, default=False, help="one engine in this process, no workers"
    )
    serve.add_argument(
        "--admin-token", default=None, help="bearer token of /admin/* (default: $PDSERVE_ADMIN_TOKEN; none: admin off)"
    )
    serve.add_argument("--autoscale", action=argparse.BooleanOptionalAction, default=False, help="size the pools from their load")
    serve.add_argument(
        "--seed", type=int, default=0, help="random seed: dummy weights, and sampling of requests without a seed of their own"
    )
    serve.add_argument("--log-level", default="info")
    add_vllm_arguments(serve)
    add_gateway_arguments(serve)
    serve.set_defaults(prefill_pool=None, decode_pool=None, autoscaler=None, drain=None)  # set by --config only
    if config_file is not None:
        from pdserve.deploy.config_file import file_defaults

        serve.set_defaults(**file_defaults(config_file, serve))
    demo = commands.add_parser("demo-model", help="write the demo checkpoint into DIR")
    demo.add_argument("directory")
    demo.add_argument("--seed", type=int, default=0)
    from pdserve.bench.serve import add_arguments
    from pdserve.deploy import admin_client, router_gateway

    add_arguments(commands.add_parser("bench", help="load-test an OpenAI-compatible server"))
    router = commands.add_parser("router", help="one more gateway, over the workers registered in Redis")
    router_gateway.add_arguments(router)
    for command in (serve, router):
        command.set_defaults(flag_names=flag_names(command))
    admin_client.add_scale_arguments(commands.add_parser("scale", help="set the prefill and/or decode pool's size"))
    admin_client.add_status_arguments(commands.add_parser("status", help="the pools, their workers and load"))
    return parser


def token_count(text: str) -> int:
    """A number of tokens as vLLM reads one: 2048, or with a suffix, 32k (32,000) or 32K (32,768),
    m/M and g/G alike."""
    multiples = {"k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}
    try:
        if text and text[-1] in multiples:
            return round(float(text[:-1]) * multiples[text[-1]])
        return int(text)
    except (ValueError, OverflowError):  # OverflowError: "infk"
        raise ValueError(f"not a number of tokens: {text!r}") from None


def _alias(aliases: dict[str, str]) -> Callable[[str], str]:
    """An argparse `type` that reads vLLM's other names for a choice as pdserve's."""
    return lambda value: aliases.get(value, value)


def add_vllm_arguments(parser: argparse.ArgumentParser) -> None:
    """`vllm serve` flags that operators' command lines carry: parallel sizes (1 only: a worker is one
    GPU, pools scale out), and flags with nothing to change here, accepted so that the line runs."""
    for flag, short in (("--tensor-parallel-size", "-tp"), ("--pipeline-parallel-size", "-pp"), ("--data-parallel-size", "-dp")):
        parser.add_argument(flag, short, type=int, default=1, help="1 only: each worker holds the model on one GPU")
    parser.add_argument(
        "--enable-chunked-prefill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="always on: a prompt is computed --max-num-batched-tokens a step",
    )
    no_effect = {
        "--trust-remote-code": "no effect: pdserve runs no code from a checkpoint",
        "--disable-log-requests": "no effect: requests are not logged",
        "--disable-log-stats": "no effect: stats are on /metrics, not in the log",
        "--disable-uvicorn-access-log": "no effect: the HTTP server logs no access lines",
        "--disable-frontend-multiprocessing": "no effect: the engines run in worker processes already",
        "--enable-prompt-tokens-details": "no effect: usage always carries prompt_tokens_details.cached_tokens",
    }
    for flag, help in no_effect.items():
        parser.add_argument(flag, action="store_true", help=help)
    parser.add_argument(
        "--uvicorn-log-level", default=None, help="no effect: the HTTP server logs warnings only (see --log-level)"
    )
    parser.add_argument(
        "--swap-space", type=float, default=None, help="no effect: a preempted request is recomputed, never swapped out"
    )
    parser.add_argument(
        "--tokenizer-mode", default="auto", choices=["auto", "hf"], help="the checkpoint's tokenizer.json (a fast tokenizer)"
    )


def check_vllm_arguments(args: argparse.Namespace, argv: list[str]) -> None:
    """Raises ValueError for what pdserve cannot do; `vllm serve MODEL` becomes --model MODEL."""
    for name in ("tensor_parallel_size", "pipeline_parallel_size"):
        if getattr(args, name) != 1:
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{flag} {getattr(args, name)}: pdserve has no tensor or pipeline parallelism (each worker holds the "
                "model on one GPU); serve more traffic with --prefill-workers and --decode-workers"
            )
    if args.data_parallel_size != 1:
        raise ValueError(
            f"--data-parallel-size {args.data_parallel_size}: pdserve's replicas are its workers: "
            f"--prefill-workers and --decode-workers (e.g. --decode-workers {args.data_parallel_size})"
        )
    if not args.enable_chunked_prefill:
        raise ValueError("--no-enable-chunked-prefill: prefill is always chunked here (--max-num-batched-tokens a step)")
    if args.model_tag is not None:
        if any(a == "--model" or a.startswith("--model=") for a in argv) and args.model != args.model_tag:
            raise ValueError(f"the model is given twice: {args.model_tag!r} and --model {args.model!r}")
        args.model = args.model_tag


def vllm_spellings(argv: list[str]) -> list[str]:
    """vLLM also takes flags spelt with underscores (`--max_model_len`): the same flags here."""
    spelt = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            name, sep, value = arg.partition("=")
            arg = name.replace("_", "-") + sep + value
        spelt.append(arg)
    return spelt


def add_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    """The gateway's security, limits, admission, drain, reply parsing, response store and deadlines (`router/config.py`)."""
    from pdserve.router.tool_parsers import PARSERS

    g, d = GatewayConfig(), Deadlines()
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        help=f"required on /v1 as `Authorization: Bearer KEY` (repeatable; also ${API_KEY_ENV}, comma-separated; without either, vLLM's ${VLLM_API_KEY_ENV})",
    )
    parser.add_argument("--revision", default=None, help="the Hub revision (branch, tag or commit) of --model")
    parser.add_argument("--download-dir", default=None, help="the Hub cache to download into and read from (default: HF's)")
    parser.add_argument(
        "--tokenizer", default=None, help="the tokenizer (and chat template) from this directory or Hub id, not --model's"
    )
    parser.add_argument("--tokenizer-revision", default=None, help="the Hub revision of --tokenizer")
    parser.add_argument(
        "--chat-template",
        default=None,
        help="the chat template instead of the checkpoint's: a file, or the template itself (vLLM's)",
    )
    parser.add_argument(
        "--generation-config",
        default="auto",
        help="requests' defaults for the sampling fields they leave out: auto (the checkpoint's "
        "generation_config.json, as vLLM), vllm (none: temperature 1, ...), or a directory holding one",
    )
    parser.add_argument(
        "--protect-metrics", action=argparse.BooleanOptionalAction, default=False, help="/metrics and /health need an API key too"
    )
    parser.add_argument(
        "--max-num-queued-reqs",
        type=int,
        default=g.max_num_queued_reqs,
        help="requests without a first token yet, beyond which new ones get 503 + Retry-After",
    )
    parser.add_argument("--max-num-queued-tokens", type=int, default=g.max_num_queued_tokens, help="and their prompt tokens")
    parser.add_argument(
        "--max-request-body-bytes", type=int, default=DEFAULT_MAX_REQUEST_BODY_BYTES, help="larger bodies get 413"
    )
    parser.add_argument(
        "--request-read-timeout",
        type=float,
        default=g.request_read_timeout_s,
        help="seconds a client has to send a request's headers, and then its body",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=g.shutdown_timeout_s,
        help="on SIGTERM, seconds in-flight requests may still run before they are ended",
    )
    parser.add_argument(
        "--enable-auto-tool-choice",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="read tool calls out of replies (tool_choice auto)",
    )
    parser.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS), help="how the model writes tool calls")
    parser.add_argument(
        "--reasoning-parser",
        default=None,
        choices=REASONING_PARSERS,
        help="return a reasoning model's thinking (<think>...</think>) apart from its answer",
    )
    parser.add_argument(
        "--responses-store-max-entries",
        type=int,
        default=g.responses_store_max_entries,
        help="/v1/responses kept for previous_response_id and GET (in memory; 0: none, the API stateless)",
    )
    parser.add_argument(
        "--responses-store-max-bytes",
        type=int,
        default=g.responses_store_max_bytes,
        help="their JSON in memory, least recently used evicted first",
    )
    parser.add_argument(
        "--responses-store-ttl",
        type=float,
        default=g.responses_store_ttl_s,
        help="seconds a stored response is kept (in Redis: its expiry)",
    )
    parser.add_argument(
        "--return-tokens-as-token-ids",
        action="store_true",
        help='logprobs name each token "token_id:N" (as a request\'s return_tokens_as_token_ids does), unless it says false',
    )
    parser.add_argument(
        "--responses-store-redis-url",
        default=None,
        help="keep them in this Redis instead, shared by the gateways (best not the registry's: its maxmemory bounds them)",
    )
    parser.add_argument(
        "--allowed-origins",
        type=string_list,
        default=None,
        help="origins whose browser pages may call the API (CORS): a JSON list as vLLM takes it, "
        "'[\"https://app.example\"]' or '[\"*\"]', or comma-separated; default none (vLLM's: any)",
    )
    parser.add_argument("--allowed-methods", type=string_list, default=None, help='with --allowed-origins (default ["*"])')
    parser.add_argument("--allowed-headers", type=string_list, default=None, help='with --allowed-origins (default ["*"])')
    parser.add_argument("--allow-credentials", action="store_true", help="with --allowed-origins: cookies and HTTP auth")
    parser.add_argument("--root-path", default="", help="the path prefix a proxy serves the API under (e.g. /llm)")
    parser.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this private key (and --ssl-certfile)")
    parser.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate chain")
    parser.add_argument("--ssl-ca-certs", default=None, help="CA certificates that client certificates are checked against")
    parser.add_argument(
        "--ssl-cert-reqs", type=int, default=0, help="client certificates: 0 not asked, 1 optional, 2 required (Python's ssl)"
    )
    parser.add_argument("--first-token-timeout", type=float, default=d.first_token_s, help="seconds to the first token")
    parser.add_argument(
        "--prefill-timeout",
        type=float,
        default=d.prefill_s,
        help="seconds for one hand-off attempt (reservation + prefill); a failed one is retried once",
    )
    parser.add_argument(
        "--kv-lease-timeout",
        type=float,
        default=d.kv_lease_s,
        help="seconds a decode worker's reservation waits for the prompt's KV",
    )
    parser.add_argument("--stall-timeout", type=float, default=d.stall_s, help="seconds allowed between two tokens")
    parser.add_argument("--request-timeout", type=float, default=d.request_s, help="seconds for a whole request")


def string_list(text: str) -> tuple[str, ...]:
    """A JSON list of strings as vLLM's list flags take it ('["a", "b"]'), or plain comma-separated text."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = [part.strip() for part in text.split(",") if part.strip()]
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not value or not all(isinstance(item, str) and item for item in value):
        raise ValueError(f"not a list of names: {text!r}")
    return tuple(value)


def cors_options(args: argparse.Namespace) -> CorsOptions | None:
    if args.allowed_origins is None:
        given = [flag for flag in ("allowed_methods", "allowed_headers", "allow_credentials") if getattr(args, flag)]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} applies to cross-origin requests: give --allowed-origins too")
        return None
    return CorsOptions(
        args.allowed_origins, args.allowed_methods or ("*",), args.allowed_headers or ("*",), args.allow_credentials
    )


def tls_options(args: argparse.Namespace) -> TLSOptions | None:
    if args.ssl_keyfile is None and args.ssl_certfile is None:
        if args.ssl_ca_certs is not None or args.ssl_cert_reqs:
            raise ValueError("--ssl-ca-certs and --ssl-cert-reqs need HTTPS: give --ssl-keyfile and --ssl-certfile")
        return None
    if args.ssl_keyfile is None or args.ssl_certfile is None:
        raise ValueError("HTTPS needs both --ssl-keyfile and --ssl-certfile")
    for flag, path in (
        ("--ssl-keyfile", args.ssl_keyfile),
        ("--ssl-certfile", args.ssl_certfile),
        ("--ssl-ca-certs", args.ssl_ca_certs),
    ):
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"{flag} {path}: no such file")
    return TLSOptions(args.ssl_keyfile, args.ssl_certfile, args.ssl_ca_certs, args.ssl_cert_reqs)


def root_path(given: str) -> str:
    if given and not given.startswith("/"):
        raise ValueError(f"--root-path must start with '/', got {given!r}")
    return given.rstrip("/")


def chat_template(given: str | None) -> str | None:
    """--chat-template: a file's text, or the template given inline (vLLM's: escapes such as \\n
    read as what they mean); checked to compile. Raises ValueError naming the flag."""
    from pdserve.engine.tokenizer import compile_chat_template

    if given is None:
        return None
    if os.path.isfile(given):
        with open(given, encoding="utf-8") as file:
            template = file.read()
    elif not any(c in given for c in "{}\n"):
        raise ValueError(f"--chat-template {given!r} looks like a file, but there is no such file")
    else:
        template = codecs.decode(given, "unicode_escape")
    try:
        compile_chat_template(template)
    except ValueError as exc:
        raise ValueError(f"--chat-template: {exc}") from None
    return template


def sampling_defaults(generation_config: str, model_dir: str | None) -> dict[str, float]:
    """--generation-config's defaults for requests' sampling fields (logged, as vLLM does)."""
    from pdserve.engine.config import generation_defaults

    if generation_config == "vllm":
        return {}
    if generation_config != "auto" and not os.path.isdir(generation_config):
        raise ValueError(f"--generation-config must be auto, vllm or a directory; got {generation_config!r}")
    source = model_dir if generation_config == "auto" else generation_config
    defaults = generation_defaults(source) if source is not None else {}
    if defaults:
        logger.info(
            "requests that leave them out sample with the checkpoint's generation config %s "
            "(--generation-config vllm: without it)",
            ", ".join(f"{k}={v}" for k, v in defaults.items()),
        )
    return defaults


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """The configs' field names a message may use (`max_model_len`, `shutdown_timeout_s`, the
    deadlines' `request_s`) -> the flag that sets each (`--max-model-len`, `--shutdown-timeout`...)."""
    names: dict[str, str] = {}
    for action in parser._actions:
        dest = action.dest
        own = "--" + dest.replace("_", "-")  # the flag named after the field, else its first positive form
        flags = [own] if own in action.option_strings else [o for o in action.option_strings if o.startswith("--")]
        flags = [f for f in flags if not f.startswith("--no-")]
        if flags and "_" in dest and dest not in names:
            names |= {dest: flags[0], f"{dest}_s": flags[0], f"{dest.removesuffix('_timeout')}_s": flags[0]}
    return names


def in_flag_terms(message: str, names: dict[str, str]) -> str:
    """A config's error message with each field it names written as its flag (a word on its own:
    not inside a path, a dotted name or a quoted value)."""
    return re.sub(r"(?<![\w\-/.'\"])[a-z]+(?:_[a-z]+)+(?![\w\-/.'\"])", lambda m: names.get(m.group(), m.group()), message)


def served_model_names(args: argparse.Namespace) -> list[str]:
    """`--served-model-name`'s names, the first the default one (vLLM's); default: --model."""
    given = [name for name in args.served_model_name or () if name is not None]  # a config file's null: not given
    names = list(dict.fromkeys(given or [args.model or DEMO_MODEL_NAME]))
    if not all(name.strip() for name in names):
        raise ValueError("--served-model-name: a name must not be empty")
    return names


def gateway_config(args: argparse.Namespace, model_dir: str | None = None) -> GatewayConfig:
    """Raises ValueError for a bad value. The only place PDSERVE_API_KEY and VLLM_API_KEY are read.
    `model_dir`: the served checkpoint's directory, whose generation_config.json gives requests'
    sampling defaults under `--generation-config auto` (None: no defaults from it)."""
    keys = [*args.api_key, *(k.strip() for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip())]
    if not keys and os.environ.get(VLLM_API_KEY_ENV):  # vLLM's fallback: a key given otherwise replaces it
        keys.append(os.environ[VLLM_API_KEY_ENV])
    deadlines = Deadlines(
        first_token_s=args.first_token_timeout,
        prefill_s=args.prefill_timeout,
        kv_lease_s=args.kv_lease_timeout,
        stall_s=args.stall_timeout,
        request_s=args.request_timeout,
    )
    return GatewayConfig(
        model_aliases=tuple(served_model_names(args)[1:]),
        model_root=args.model or model_dir,
        sampling_defaults=sampling_defaults(args.generation_config, model_dir),
        chat_template=chat_template(args.chat_template),
        deadlines=deadlines,
        api_keys=tuple(dict.fromkeys(keys)),
        protect_metrics=args.protect_metrics,
        max_num_queued_reqs=args.max_num_queued_reqs,
        max_num_queued_tokens=args.max_num_queued_tokens,
        max_request_body_bytes=args.max_request_body_bytes,
        request_read_timeout_s=args.request_read_timeout,
        shutdown_timeout_s=args.shutdown_timeout,
        tool_options=ToolOptions(args.enable_auto_tool_choice, args.tool_call_parser, args.reasoning_parser),
        responses_store_max_entries=args.responses_store_max_entries,
        responses_store_max_bytes=args.responses_store_max_bytes,
        responses_store_ttl_s=args.responses_store_ttl,
        responses_store_redis_url=args.responses_store_redis_url,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        cors=cors_options(args),
        tls=tls_options(args),
        root_path=root_path(args.root_path),
    )


def cluster_secret() -> ClusterSecret:
    """The cluster's secret: PDSERVE_CLUSTER_SECRET (the same for every gateway and worker of a
    cluster, so several gateways can share one Redis), else a fresh one. The only place it is read."""
    from pdserve.proto.cluster_secret import ENV_VAR, ClusterSecret

    return ClusterSecret(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else ClusterSecret.generate()


def main(argv: list[str] | None = None) -> int:
    from pdserve.deploy.config_file import ConfigFileError

    argv = vllm_spellings(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "serve" and args.config:
        try:
            args = build_parser(args.config).parse_args(argv)
        except ConfigFileError as exc:
            print(f"pdserve: {exc}", file=sys.stderr)
            return 2
    if args.command == "serve":
        try:
            check_vllm_arguments(args, argv)
        except ValueError as exc:
            print(f"pdserve: {exc}", file=sys.stderr)
            return 2
    # scale and status print their answer; the HTTP client's request lines would only hide it
    level = args.log_level.upper() if args.command in ("serve", "router") else "WARNING"
    if level not in LOG_LEVELS:
        print(f"pdserve {args.command}: --log-level must be one of {', '.join(LOG_LEVELS).lower()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in ("router", "scale", "status"):
        from pdserve.deploy import admin_client, router_gateway

        return {"router": router_gateway.main, "scale": admin_client.scale, "status": admin_client.status}[args.command](args)
    if args.command == "demo-model":
        from pdserve.engine.demo_model import write_demo_model

        print(write_demo_model(args.directory, args.seed))
        return 0
    if args.command == "bench":
        from pdserve.bench.serve import main as bench_main

        return bench_main(args)
    return serve(args)


def serve(args: argparse.Namespace) -> int:
    from pdserve.deploy.cluster import STOP_TIMEOUT_S, Cluster, StartupError
    from pdserve.deploy.controller_client import ControllerClient
    from pdserve.deploy.gateway import run_gateway
    from pdserve.deploy.watchdog import start_watchdog
    from pdserve.engine.config import ConfigError

    try:
        config = serve_config(args)
        gateway = gateway_config(args, config.engine.model)
        check_against_model(config.engine)
        check_can_listen(config.host, config.port)
        if config.colocated:
            pass
        elif config.ray_address is None:  # every worker runs on this machine and binds there
            check_can_listen(config.worker_host, 0, "--worker-host")
        else:
            check_ray_address(config.ray_address)
    except (ConfigError, ValueError, TypeError) as exc:
        print(f"pdserve: {in_flag_terms(str(exc), args.flag_names)}", file=sys.stderr)
        return 2
    if config.colocated:
        _stop_on_sigterm()  # uvicorn re-raises SIGTERM once it has stopped: exit 0, not -15
        try:
            return asyncio.run(run_gateway(config, None, gateway))
        except (KeyboardInterrupt, _Shutdown):
            return 0
    cluster = Cluster(config)
    _stop_on_sigterm()
    watchdog = start_watchdog() if config.ray_address is None else None  # noqa: F841 - lives as long as this process
    try:
        controller = ControllerClient(cluster.start())
        return asyncio.run(run_gateway(config, controller, gateway, controller))
    except (KeyboardInterrupt, _Shutdown, SystemError) as exc:
        if not _is_stop(exc):
            raise
        return 0
    except ConfigError as exc:
        print(f"pdserve: {in_flag_terms(str(exc), args.flag_names)}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"pdserve: {exc}", file=sys.stderr)
        return 1
    finally:
        exit_guard.arm(STOP_TIMEOUT_S + exit_guard.EXIT_TIMEOUT_S)  # covers the drain (MAX_DRAIN_S) too
        cluster.stop(drain_timeout_s=gateway.shutdown_timeout_s)  # the workers finish other gateways' requests


def tokenizer_path(args: argparse.Namespace) -> str | None:
    """--tokenizer as a local directory (a Hub id downloaded once, here, for every local worker)."""
    from pdserve.engine.loader import resolve_tokenizer_path

    if args.tokenizer is None:
        if args.tokenizer_revision is not None:
            raise ValueError("--tokenizer-revision is the revision of --tokenizer: give --tokenizer too")
        return None
    return str(resolve_tokenizer_path(args.tokenizer, args.tokenizer_revision, args.download_dir))


def serve_config(args: argparse.Namespace) -> ServeConfig:
    from pdserve.deploy.config import AutoscaleConfig, DrainConfig, PoolConfig, ServeConfig
    from pdserve.engine.demo_model import default_demo_model_dir
    from pdserve.engine.loader import resolve_model_path

    model = args.model or str(default_demo_model_dir())
    model_dir = resolve_model_path(model, args.revision, args.download_dir)  # fails early; downloads once for every local worker
    engine = EngineConfig(
        model=str(model_dir),
        tokenizer=tokenizer_path(args),
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        device=args.device,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory_gib=args.kv_cache_memory_gib,
        num_kv_blocks=args.num_gpu_blocks_override,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching,
        enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
        scheduling_policy=args.scheduling_policy,
        load_format=args.load_format,
        quantization=args.quantization,
        seed=args.seed,
        max_logprobs=args.max_logprobs,
    )
    return ServeConfig(
        engine=engine,
        served_model_name=served_model_names(args)[0],
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
        cluster_secret=cluster_secret(),
    )


def check_against_model(engine: EngineConfig) -> None:
    """What the workers would refuse once loaded, refused before any starts: the context length and
    --quantization against the checkpoint's config.json."""
    from pdserve.engine.config import ModelConfig

    model = ModelConfig.from_pretrained(engine.model)
    engine.model_len(model)
    engine.quantization_for(model)


def check_can_listen(host: str, port: int, flags: str = "--host, --port") -> None:
    """Raises ValueError when the gateway (or a worker) could not listen on host:port (in use, or no
    such address), before the workers start rather than after."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.create_server((host, port), family=family):
            pass
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port} ({flags}): {exc.strerror or exc}") from exc


def check_ray_address(address: str) -> None:
    """Raises ValueError when nothing answers at a `host:port` (or `ray://host:port`) --ray-address,
    where ray.init would keep retrying for minutes; `auto` and other forms are left to Ray."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or "://" in host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ValueError(f"no Ray cluster answers at {address} (--ray-address): {exc.strerror or exc}") from exc


class _Shutdown(Exception):
    """SIGTERM: stop the gateway and the workers, then exit 0."""


def _is_stop(exc: BaseException | None) -> bool:
    """Whether `exc` is a Ctrl-C or a SIGTERM (`_Shutdown`), or either raised inside Ray's C code
    (wrapped in SystemError)."""
    if isinstance(exc, SystemError):
        return exc.__cause__ is not None and _is_stop(exc.__cause__)
    return isinstance(exc, (KeyboardInterrupt, _Shutdown))


def _stop_on_sigterm() -> None:
    """uvicorn handles SIGINT/SIGTERM while it serves and re-raises them once it has stopped;
    outside of it (Ray's start, model loading, shutdown) this handler unwinds to `cluster.stop()`."""

    def handler(signum: int, frame: object) -> None:
        raise _Shutdown

    signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
