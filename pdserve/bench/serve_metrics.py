"""What `pdserve bench` measures: one `RequestResult` per request, and the pure functions that turn
them into the report (throughput, goodput, TTFT/TPOT/ITL/E2E distributions), keyed as vLLM's."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)
LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E"))
NUM_ERRORS_SHOWN = 5


@dataclass
class RequestResult:
    """One streamed request. Times in seconds from when it was sent; token counts from `usage`."""

    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens the server found in its prefix cache (usage.prompt_tokens_details)
    ttft_s: float = 0.0
    itls_s: list[float] = field(default_factory=list)  # gaps between consecutive token-carrying chunks
    latency_s: float = 0.0
    error: str = ""  # empty: it succeeded

    @property
    def is_success(self) -> bool:
        return not self.error

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first; 0 for a single token."""
        if self.num_output_tokens < 2:
            return 0.0
        return (self.latency_s - self.ttft_s) / (self.num_output_tokens - 1)


def meets_slo(result: RequestResult, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    """Succeeded within both SLOs; an SLO that is not given does not constrain."""
    return (
        result.is_success
        and (slo_ttft_ms is None or result.ttft_s * 1000 <= slo_ttft_ms)
        and (slo_tpot_ms is None or result.tpot_s * 1000 <= slo_tpot_ms)
    )


def distribution(name: str, values_s: list[float]) -> dict[str, float]:
    """mean/median/std and percentiles of `values_s`, in ms, under vLLM's keys (`p99_ttft_ms`); 0 when empty."""
    values_ms = np.asarray(values_s, dtype=np.float64) * 1000
    if values_ms.size == 0:
        values_ms = np.zeros(1)
    stats = {
        f"mean_{name}_ms": float(values_ms.mean()),
        f"median_{name}_ms": float(np.median(values_ms)),
        f"std_{name}_ms": float(values_ms.std()),
    }
    stats.update({f"p{p}_{name}_ms": float(np.percentile(values_ms, p)) for p in PERCENTILES})
    return stats


def calculate_metrics(
    results: list[RequestResult], duration_s: float, slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None
) -> dict[str, object]:
    """The report's figures over the successful requests; failed ones are only counted."""
    done = [r for r in results if r.is_success]
    num_input = sum(r.num_prompt_tokens for r in done)
    num_output = sum(r.num_output_tokens for r in done)
    metrics: dict[str, object] = {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": num_input,
        "total_output_tokens": num_output,
        "total_cached_tokens": sum(r.num_cached_tokens for r in done),
        "request_throughput": len(done) / duration_s,
        "request_goodput": sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in done) / duration_s,
        "output_throughput": num_output / duration_s,
        "total_token_throughput": (num_input + num_output) / duration_s,
    }
    metrics.update(distribution("ttft", [r.ttft_s for r in done]))
    metrics.update(distribution("tpot", [r.tpot_s for r in done if r.num_output_tokens > 1]))
    metrics.update(distribution("itl", [gap for r in done for gap in r.itls_s]))
    metrics.update(distribution("e2el", [r.latency_s for r in done]))
    return metrics


def per_request(results: list[RequestResult]) -> dict[str, list]:
    """vLLM's per-request lists (seconds), plus `e2els`; failed requests keep their error."""
    return {
        "input_lens": [r.num_prompt_tokens for r in results],
        "output_lens": [r.num_output_tokens for r in results],
        "ttfts": [r.ttft_s for r in results],
        "itls": [r.itls_s for r in results],
        "e2els": [r.latency_s for r in results],
        "errors": [r.error for r in results],
    }


def distinct_errors(results: list[RequestResult], limit: int = NUM_ERRORS_SHOWN) -> list[str]:
    """The first `limit` different error texts, in the order they happened."""
    return list(dict.fromkeys(r.error for r in results if r.error))[:limit]


def format_report(metrics: dict[str, object]) -> str:
    """A compact table: counts and throughputs, then one row per latency."""
    m = metrics
    lines = [
        f"duration {m['duration']:.2f} s   completed {m['completed']}   failed {m['failed']}",
        (
            f"tokens: input {m['total_input_tokens']} ({m['total_cached_tokens']} from the prefix cache)   "
            f"output {m['total_output_tokens']}"
        ),
        (
            f"throughput: {m['request_throughput']:.2f} req/s   goodput {m['request_goodput']:.2f} req/s   "
            f"output {m['output_throughput']:.1f} tok/s   total {m['total_token_throughput']:.1f} tok/s"
        ),
        f"{'latency (ms)':<13}{'mean':>10}" + "".join(f"{f'p{p}':>10}" for p in PERCENTILES),
    ]
    for key, label in LATENCIES:
        row = [m[f"mean_{key}_ms"]] + [m[f"p{p}_{key}_ms"] for p in PERCENTILES]
        lines.append(f"{label:<13}" + "".join(f"{value:>10.2f}" for value in row))
    return "\n".join(lines)
