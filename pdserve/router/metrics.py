"""Prometheus metrics under vLLM's names (`vllm:*`, labelled `model_name`; the v1 set, plus the
names vLLM's own Grafana dashboard still queries) so existing dashboards work, `http_requests_total`
as prometheus-fastapi-instrumentator names it, and pdserve's own: KV transfer bytes by transport
and the disaggregated path's phases. Each `Metrics` owns its registry, so tests can build several."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily

from pdserve.engine.iteration_stats import IterationTokens
from pdserve.engine.outputs import RequestDelta
from pdserve.engine.sampling_params import SamplingParams
from pdserve.router.backend import BackendStats

_Metric = TypeVar("_Metric", Gauge, Counter, Histogram)

# vLLM's bucket boundaries.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
N_BUCKETS = (1, 2, 5, 10, 20)
FINISH_REASONS = ("stop", "length", "abort", "error")
KV_TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PHASES = ("queue", "prefill", "kv_transfer", "decode")


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self._iteration_tokens = IterationTokens()
        self._num_preemptions_seen = 0
        self._define()
        self.registry.register(_IterationTokensCollector(self))
        self._create_series()

    def _define(self) -> None:
        labels = ["model_name"]

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, [*labels, *extra], registry=self.registry)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            # prometheus_client appends "_total" to counter names itself
            return Counter(name, doc, [*labels, *extra], registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...], extra: tuple[str, ...] = ()) -> Histogram:
            return Histogram(name, doc, [*labels, *extra], buckets=buckets, registry=self.registry)

        self.num_requests_running = gauge("vllm:num_requests_running", "Requests being prefilled or decoded.")
        self.num_requests_waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge(
            "vllm:kv_cache_usage_perc", "KV cache usage: blocks in use over all blocks of the decode workers (1 = full)."
        )
        self.gpu_cache_usage = gauge(
            "vllm:gpu_cache_usage_perc", "vLLM's older name for kv_cache_usage_perc (its dashboard queries it)."
        )
        self.cache_config_info = gauge(
            "vllm:cache_config_info",
            "The KV cache's configuration (value 1).",
            ("block_size", "num_gpu_blocks", "enable_prefix_caching"),
        )
        self.num_preemptions = counter("vllm:num_preemptions", "Requests preempted by the schedulers.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generated tokens.")
        self.prefix_cache_queries = counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.request_success = counter("vllm:request_success", "Finished requests.", ("finished_reason",))
        self.time_to_first_token = histogram("vllm:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.inter_token_latency = histogram("vllm:inter_token_latency_seconds", "Time between output tokens.", ITL_BUCKETS)
        self.time_per_output_token = histogram(
            "vllm:time_per_output_token_seconds",
            "Time between output tokens (vLLM's older name; its dashboard queries it).",
            ITL_BUCKETS,
        )
        self.request_time_per_output_token = histogram(
            "vllm:request_time_per_output_token_seconds", "Per request: (end - first token) / (output tokens - 1).", ITL_BUCKETS
        )
        self.e2e_request_latency = histogram(
            "vllm:e2e_request_latency_seconds", "Request latency, arrival to last token.", E2E_BUCKETS
        )
        self.request_queue_time = histogram(
            "vllm:request_queue_time_seconds", "Time waiting before first scheduled.", E2E_BUCKETS
        )
        self.request_prefill_time = histogram("vllm:request_prefill_time_seconds", "First scheduled -> first token.", E2E_BUCKETS)
        self.request_decode_time = histogram("vllm:request_decode_time_seconds", "First token -> last token.", E2E_BUCKETS)
        self.request_inference_time = histogram(
            "vllm:request_inference_time_seconds", "First scheduled -> last token.", E2E_BUCKETS
        )
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS)
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Generated tokens per request.", TOKEN_BUCKETS
        )
        self.request_max_num_generation_tokens = histogram(
            "vllm:request_max_num_generation_tokens", "Most tokens generated by one sequence of a request.", TOKEN_BUCKETS
        )
        self.request_params_n = histogram("vllm:request_params_n", "The n parameter of requests.", N_BUCKETS)
        self.request_params_max_tokens = histogram(
            "vllm:request_params_max_tokens", "The max_tokens parameter of requests.", TOKEN_BUCKETS
        )
        self.http_requests = Counter(
            "http_requests",
            "HTTP requests by route, method and status class.",
            ["handler", "method", "status"],
            registry=self.registry,
        )
        self.kv_transfer_bytes = counter(
            "pdserve:kv_transfer_bytes", "KV cache bytes moved from prefill to decode workers, by transport.", ("transport",)
        )
        self.kv_transfer_kept_blocks = counter(
            "pdserve:kv_transfer_kept_blocks",
            "Prompt KV blocks not moved: the decode worker already held them, from the same prefill worker.",
        )
        self.kv_transfer_seconds = histogram(
            "pdserve:kv_transfer_seconds",
            "KV hand-off time of one request not hidden behind its prefill (first token to the decode worker's ack).",
            KV_TRANSFER_BUCKETS,
        )
        self.request_phase = histogram(
            "pdserve:request_phase_seconds",
            "Time of each phase of a request (queue, prefill, kv_transfer, decode).",
            E2E_BUCKETS,
            ("phase",),
        )

    def _create_series(self) -> None:
        """Every series now, so that dashboards see zeros rather than nothing before traffic."""
        for metric in (
            self.num_requests_running,
            self.num_requests_waiting,
            self.kv_cache_usage,
            self.gpu_cache_usage,
            self.num_preemptions,
            self.prompt_tokens,
            self.generation_tokens,
            self.prefix_cache_queries,
            self.prefix_cache_hits,
            self.time_to_first_token,
            self.inter_token_latency,
            self.time_per_output_token,
            self.request_time_per_output_token,
            self.e2e_request_latency,
            self.request_queue_time,
            self.request_prefill_time,
            self.request_decode_time,
            self.request_inference_time,
            self.request_prompt_tokens,
            self.request_generation_tokens,
            self.request_max_num_generation_tokens,
            self.request_params_n,
            self.request_params_max_tokens,
            self.kv_transfer_seconds,
            self.kv_transfer_kept_blocks,
        ):
            metric.labels(model_name=self.model_name)
        for reason in FINISH_REASONS:
            self.request_success.labels(model_name=self.model_name, finished_reason=reason)
        for phase in PHASES:
            self.request_phase.labels(model_name=self.model_name, phase=phase)

    def labels(self, metric: _Metric) -> _Metric:
        return metric.labels(model_name=self.model_name)

    def update_stats(self, stats: BackendStats) -> None:
        """Mirror the backend's scheduler state; called on every /metrics scrape."""
        self.labels(self.num_requests_running).set(stats.num_running)
        self.labels(self.num_requests_waiting).set(stats.num_waiting)
        self.labels(self.kv_cache_usage).set(stats.kv_cache_usage)
        self.labels(self.gpu_cache_usage).set(stats.kv_cache_usage)
        if stats.num_preemptions > self._num_preemptions_seen:  # a restarted backend counts from 0 again
            self.labels(self.num_preemptions).inc(stats.num_preemptions - self._num_preemptions_seen)
        self._num_preemptions_seen = stats.num_preemptions
        if stats.block_size:
            self.cache_config_info.clear()
            self.cache_config_info.labels(
                model_name=self.model_name,
                block_size=str(stats.block_size),
                num_gpu_blocks=str(stats.num_total_blocks),
                enable_prefix_caching="True",
            ).set(1)
        self._iteration_tokens = stats.iteration_tokens

    def observe_kv_transfer(self, num_bytes: int, seconds: float, transport: str, kept_blocks: int = 0) -> None:
        self.kv_transfer_bytes.labels(model_name=self.model_name, transport=transport).inc(num_bytes)
        self.labels(self.kv_transfer_kept_blocks).inc(kept_blocks)
        self.labels(self.kv_transfer_seconds).observe(seconds)
        self.request_phase.labels(model_name=self.model_name, phase="kv_transfer").observe(seconds)

    def observe_http(self, handler: str, method: str, status_code: int) -> None:
        self.http_requests.labels(handler=handler, method=method, status=f"{status_code // 100}xx").inc()

    def track_request(
        self, num_prompt_tokens: int, params: SamplingParams | None = None, group: SequenceGroup | None = None, index: int = 0
    ) -> RequestTracker:
        """One sequence of a request. As vLLM counts a request with n > 1 (one child request a
        sequence): each sequence is a finished request of its own (`request_success`, latencies, its
        token counts); the request's n and its longest sequence are observed once, by their shared
        `group`. The prompt is computed once, and counted once: by sequence 0."""
        return RequestTracker(self, num_prompt_tokens, params, group, index)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _IterationTokensCollector:
    """`vllm:iteration_tokens_total`, a histogram of the tokens of each engine step, summed from the
    engines' own counts (the workers' when disaggregated) at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[HistogramMetricFamily]:
        counts = self._metrics._iteration_tokens
        family = HistogramMetricFamily("vllm:iteration_tokens_total", "Tokens per engine step.", labels=["model_name"])
        family.add_metric([self._metrics.model_name], counts.cumulative(), float(counts.total))
        yield family


class SequenceGroup:
    """The n sequences of one request (vLLM's ParentRequest): when the last finishes,
    `vllm:request_params_n` and the most tokens one of them generated."""

    def __init__(self, metrics: Metrics, n: int) -> None:
        self._metrics = metrics
        self._n = n
        self._num_unfinished = n
        self._max_output_tokens = 0

    def on_sequence_finish(self, num_output_tokens: int) -> None:
        self._max_output_tokens = max(self._max_output_tokens, num_output_tokens)
        self._num_unfinished -= 1
        if self._num_unfinished == 0:
            m = self._metrics
            m.labels(m.request_params_n).observe(self._n)
            m.labels(m.request_max_num_generation_tokens).observe(self._max_output_tokens)


class RequestTracker:
    """Timings and token counts of one sequence of a request, from its arrival at the router."""

    def __init__(
        self, metrics: Metrics, num_prompt_tokens: int, params: SamplingParams | None, group: SequenceGroup | None, index: int
    ) -> None:
        self._metrics = metrics
        self._group = group or SequenceGroup(metrics, 1)
        self._is_sequence_only = index > 0  # the prompt's work (tokens, prefix cache) is sequence 0's
        self._num_prompt_tokens = num_prompt_tokens
        self._params = params
        self._arrival = time.monotonic()
        self._first_token_time: float | None = None
        self._last_token_time: float | None = None
        self._num_output_tokens = 0
        self._engine_seconds: tuple[float | None, float | None] = (None, None)  # (queue, prefill) as the engine measured them
        self._is_finished = False

    def on_first_delta(self, delta: RequestDelta) -> None:
        self._engine_seconds = (delta.queue_seconds, delta.prefill_seconds)
        if self._is_sequence_only:
            return
        m = self._metrics
        m.labels(m.prefix_cache_queries).inc(self._num_prompt_tokens)
        m.labels(m.prefix_cache_hits).inc(delta.num_cached_tokens)

    def on_tokens(self, num_tokens: int) -> None:
        if num_tokens == 0:
            return
        m, now = self._metrics, time.monotonic()
        if self._last_token_time is None:
            self._first_token_time = now
            m.labels(m.time_to_first_token).observe(now - self._arrival)
            if not self._is_sequence_only:
                m.labels(m.prompt_tokens).inc(self._num_prompt_tokens)
        else:
            gap = (now - self._last_token_time) / num_tokens  # a multi-token delta spreads its interval
            for _ in range(num_tokens):
                m.labels(m.inter_token_latency).observe(gap)
                m.labels(m.time_per_output_token).observe(gap)
        m.labels(m.generation_tokens).inc(num_tokens)
        self._num_output_tokens += num_tokens
        self._last_token_time = now

    def on_finish(self, finish_reason: str) -> None:
        """`finish_reason`: stop | length | abort (cancelled, disconnected, timed out) | error."""
        if self._is_finished:
            return
        self._is_finished = True
        m, now = self._metrics, time.monotonic()
        m.labels(m.e2e_request_latency).observe(now - self._arrival)
        m.request_success.labels(model_name=m.model_name, finished_reason=finish_reason).inc()
        m.labels(m.request_prompt_tokens).observe(self._num_prompt_tokens)
        m.labels(m.request_generation_tokens).observe(self._num_output_tokens)
        if self._params is not None and self._params.max_tokens is not None:
            m.labels(m.request_params_max_tokens).observe(self._params.max_tokens)
        self._observe_phases(now)
        self._group.on_sequence_finish(self._num_output_tokens)

    def _observe_phases(self, now: float) -> None:
        if self._first_token_time is None:
            return
        m = self._metrics
        queue, prefill = self._engine_seconds
        decode = now - self._first_token_time
        if queue is None or prefill is None:  # the engine did not say: the gateway's view
            queue, prefill = 0.0, self._first_token_time - self._arrival
        for metric, value in (
            (m.request_queue_time, queue),
            (m.request_prefill_time, prefill),
            (m.request_decode_time, decode),
            (m.request_inference_time, prefill + decode),
        ):
            m.labels(metric).observe(value)
        for phase, value in (("queue", queue), ("prefill", prefill), ("decode", decode)):
            m.request_phase.labels(model_name=m.model_name, phase=phase).observe(value)
        if self._num_output_tokens > 1:
            m.labels(m.request_time_per_output_token).observe(decode / (self._num_output_tokens - 1))
