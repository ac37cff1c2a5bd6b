"""`pdserve bench`: load-test any OpenAI-compatible server, in the shape of `vllm bench serve`:
streamed completions or chats of random prompts with exact token lengths, sent as a Poisson/gamma
process and/or under a concurrency cap; reports throughput, goodput and TTFT/TPOT/ITL/E2E."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from datetime import datetime

import httpx

from pdserve.bench.serve_metrics import RequestResult, calculate_metrics, distinct_errors, format_report, per_request
from pdserve.bench.serve_prompts import PromptError, build_prompts

ENDPOINT_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
REQUEST_TIMEOUT_S = 600.0  # one request, start to end of stream
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class BenchConfig:
    """The command line, checked once; SLOs of None do not constrain goodput."""

    url: str
    model: str | None
    endpoint: str
    num_prompts: int
    input_len: int
    output_len: int
    max_concurrency: int | None
    request_rate: float
    burstiness: float
    slo_ttft_ms: float | None
    slo_tpot_ms: float | None
    seed: int
    prefix_len: int = 0
    num_prefixes: int = 1

    def __post_init__(self) -> None:
        for name in ("num_prompts", "input_len", "output_len", "request_rate", "burstiness", "num_prefixes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if not 0 <= self.prefix_len < self.input_len:
            raise ValueError(f"--prefix-len must be in 0..{self.input_len - 1} (below --input-len); got {self.prefix_len}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be at least 1")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchConfig:
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    parser.add_argument("--model", default=None, help="model name (default: the first of GET /v1/models)")
    parser.add_argument("--endpoint", default="completions", choices=sorted(ENDPOINT_PATHS))
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--input-len", type=int, default=1024, help="prompt tokens, exactly, as the endpoint counts them")
    parser.add_argument("--output-len", type=int, default=128, help="completion tokens (max_tokens, ignore_eos)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="requests per second (default: all at once)")
    parser.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrivals (1: Poisson)")
    parser.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput counts requests within this TTFT")
    parser.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput counts requests within this TPOT")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prefix-len",
        type=int,
        default=0,
        help="tokens at the start of every prompt shared with others (a system prompt); 0: none",
    )
    parser.add_argument("--num-prefixes", type=int, default=1, help="distinct shared prefixes, used in turn")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")


def main(args: argparse.Namespace) -> int:
    """0 when some request completed; 1 when none did or the prompts could not be built; 2 on bad flags."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    try:
        config = BenchConfig.from_args(args)
    except ValueError as exc:
        print(f"pdserve bench: {exc}", file=sys.stderr)
        return 2
    try:
        report, errors = asyncio.run(benchmark(config))
    except (PromptError, httpx.HTTPError, LookupError) as exc:
        print(f"pdserve bench: {config.url}: {exc}", file=sys.stderr)
        return 1
    print(format_report(report))
    for error in errors:
        print(f"error: {error}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["completed"] else 1


async def benchmark(config: BenchConfig) -> tuple[dict[str, object], list[str]]:
    """Builds the prompts, runs the load, and returns the JSON report and the first distinct errors."""
    limits = httpx.Limits(max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    async with httpx.AsyncClient(base_url=config.url, limits=limits, timeout=timeout) as client:
        model = config.model or await first_model(client)
        prompts = await build_prompts(
            client,
            config.endpoint,
            config.num_prompts,
            config.input_len,
            config.output_len,
            config.seed,
            config.prefix_len,
            config.num_prefixes,
        )
        print(f"pdserve bench: {config.num_prompts} {config.endpoint} requests to {model} at {config.url}", flush=True)
        results, duration_s = await run_load(client, config, model, prompts)
    report = {"date": datetime.now().isoformat(timespec="seconds"), **asdict(config), "model": model}
    report["request_rate"] = config.request_rate if math.isfinite(config.request_rate) else "inf"  # as vLLM: JSON has no inf
    report.update(calculate_metrics(results, duration_s, config.slo_ttft_ms, config.slo_tpot_ms))
    report.update(per_request(results))
    return report, distinct_errors(results)


async def first_model(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    response.raise_for_status()
    models = response.json()["data"]
    if not models:
        raise LookupError("GET /v1/models lists no model; give --model")
    return models[0]["id"]


async def run_load(
    client: httpx.AsyncClient, config: BenchConfig, model: str, prompts: list[str]
) -> tuple[list[RequestResult], float]:
    """Sends every prompt at its arrival time, at most `max_concurrency` in flight; (results, seconds)."""
    path = ENDPOINT_PATHS[config.endpoint]
    in_flight = asyncio.Semaphore(config.max_concurrency or len(prompts))

    async def one(prompt: str) -> RequestResult:
        async with in_flight:
            return await send_request(client, path, request_body(config, model, prompt))

    offsets_s = arrival_offsets(len(prompts), config.request_rate, config.burstiness, config.seed)
    start = time.perf_counter()
    tasks = []
    for prompt, offset_s in zip(prompts, offsets_s, strict=True):
        await asyncio.sleep(max(0.0, start + offset_s - time.perf_counter()))
        tasks.append(asyncio.create_task(one(prompt)))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def arrival_offsets(num_requests: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds from the start at which each request arrives: gamma-distributed gaps of mean
    1/rate and shape `burstiness` (1: Poisson), as vLLM draws them; all at 0 for an infinite rate."""
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    offsets, now = [], 0.0
    for _ in range(num_requests):
        offsets.append(now)
        now += rng.gammavariate(burstiness, 1.0 / (request_rate * burstiness))
    return offsets


def request_body(config: BenchConfig, model: str, prompt: str) -> dict[str, object]:
    body: dict[str, object] = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
        "ignore_eos": True,
    }
    if config.endpoint == "chat":
        return {**body, "messages": [{"role": "user", "content": prompt}], "max_completion_tokens": config.output_len}
    return {**body, "prompt": prompt, "max_tokens": config.output_len}


async def send_request(client: httpx.AsyncClient, path: str, body: dict[str, object]) -> RequestResult:
    """One streamed request; any failure (status, error event, transport, no usage) is in `.error`."""
    start = time.perf_counter()
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return RequestResult(error=f"HTTP {response.status_code}: {text[:500]}")
            return await read_stream(response.aiter_lines(), start)
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        return RequestResult(error=f"{type(exc).__name__}: {exc}")


async def read_stream(lines: AsyncIterator[str], start: float) -> RequestResult:
    """Times the token-carrying SSE chunks; counts come from the final `usage` chunk."""
    result, last_token_at, usage = RequestResult(), None, None
    async for line in lines:
        data = line.removeprefix("data:").strip()
        if not line.startswith("data:") or data == "[DONE]":
            continue
        chunk = json.loads(data)
        now = time.perf_counter()
        if "error" in chunk or chunk.get("object") == "error":
            result.error = error_text(chunk)
            return result
        if carries_token(chunk):
            if last_token_at is None:
                result.ttft_s = now - start
            else:
                result.itls_s.append(now - last_token_at)
            last_token_at = now
        usage = chunk.get("usage") or usage
    result.latency_s = time.perf_counter() - start
    if usage is None or last_token_at is None:
        result.error = "the stream ended without " + ("a usage chunk" if usage is None else "any token")
        return result
    result.num_prompt_tokens, result.num_output_tokens = usage["prompt_tokens"], usage["completion_tokens"]
    result.num_cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return result


def carries_token(chunk: dict) -> bool:
    """A chunk with generated text, chat content (not a role-only delta), logprobs or token ids."""
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if any(choice.get(key) for key in ("text", "logprobs", "token_ids")) or delta.get("content"):
            return True
    return False


def error_text(chunk: dict) -> str:
    error = chunk.get("error", chunk)
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)
