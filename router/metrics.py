"""Prometheus metrics under vLLM's names (`vllm:*`, labelled `model_name`) so existing dashboards
work, plus `pdserve:kv_transfer_*`. Each `Metrics` owns its registry, so tests can build several."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from router.backend import BackendStats

# vLLM's bucket boundaries (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort", "error")
KV_TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            # prometheus_client appends "_total" to counter names itself
            return Counter(name, doc, [*labels, *extra], registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

        self.num_requests_running = gauge("vllm:num_requests_running", "Requests being prefilled or decoded.")
        self.num_requests_waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("vllm:kv_cache_usage_perc", "KV cache usage: blocks in use over all blocks of the decode workers (1 = full).")
        self.num_preemptions = counter("vllm:num_preemptions", "Requests preempted by the schedulers.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generated tokens.")
        self.request_success = counter("vllm:request_success", "Finished requests.", ("finished_reason",))
        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.inter_token_latency = histogram(
            "vllm:inter_token_latency_seconds", "Time between output tokens.", ITL_BUCKETS)
        self.e2e_request_latency = histogram(
            "vllm:e2e_request_latency_seconds", "Request latency, arrival to last token.", E2E_BUCKETS)
        self.kv_transfer_bytes = counter(
            "pdserve:kv_transfer_bytes", "KV cache bytes moved from prefill to decode workers, by transport.", ("transport",))
        self.kv_transfer_seconds = histogram(
            "pdserve:kv_transfer_seconds",
            "KV hand-off time of one request not hidden behind its prefill (first token to the decode worker's ack).",
            KV_TRANSFER_BUCKETS)
        self._num_preemptions_seen = 0
        # Create every series now, so that dashboards see zeros rather than nothing before traffic.
        for metric in (self.num_requests_running, self.num_requests_waiting, self.kv_cache_usage, self.num_preemptions,
                       self.prompt_tokens, self.generation_tokens, self.time_to_first_token, self.inter_token_latency,
                       self.e2e_request_latency, self.kv_transfer_seconds):
            self.labels(metric)
        for reason in FINISH_REASONS:
            self.request_success.labels(model_name=model_name, finished_reason=reason)

    def labels(self, metric: Gauge | Counter | Histogram) -> Gauge | Counter | Histogram:
        return metric.labels(model_name=self.model_name)

    def update_stats(self, stats: BackendStats) -> None:
        """Mirror the backend's scheduler state; called on every /metrics scrape."""
        self.labels(self.num_requests_running).set(stats.num_running)
        self.labels(self.num_requests_waiting).set(stats.num_waiting)
        self.labels(self.kv_cache_usage).set(stats.kv_cache_usage)
        if stats.num_preemptions > self._num_preemptions_seen:  # a restarted backend counts from 0 again
            self.labels(self.num_preemptions).inc(stats.num_preemptions - self._num_preemptions_seen)
        self._num_preemptions_seen = stats.num_preemptions

    def observe_kv_transfer(self, num_bytes: int, seconds: float, transport: str) -> None:
        self.kv_transfer_bytes.labels(model_name=self.model_name, transport=transport).inc(num_bytes)
        self.labels(self.kv_transfer_seconds).observe(seconds)

    def track_request(self, num_prompt_tokens: int) -> RequestTracker:
        return RequestTracker(self, num_prompt_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """Timings and token counts of one request, from its arrival at the router."""

    def __init__(self, metrics: Metrics, num_prompt_tokens: int) -> None:
        self._metrics = metrics
        self._num_prompt_tokens = num_prompt_tokens
        self._arrival = time.monotonic()
        self._last_token_time: float | None = None
        self._is_finished = False

    def on_tokens(self, num_tokens: int) -> None:
        if num_tokens == 0:
            return
        m, now = self._metrics, time.monotonic()
        if self._last_token_time is None:
            m.labels(m.time_to_first_token).observe(now - self._arrival)
            m.labels(m.prompt_tokens).inc(self._num_prompt_tokens)
        else:
            gap = (now - self._last_token_time) / num_tokens  # a multi-token delta spreads its interval
            for _ in range(num_tokens):
                m.labels(m.inter_token_latency).observe(gap)
        m.labels(m.generation_tokens).inc(num_tokens)
        self._last_token_time = now

    def on_finish(self, finish_reason: str) -> None:
        """`finish_reason`: stop | length | abort (cancelled, disconnected, timed out) | error."""
        if self._is_finished:
            return
        self._is_finished = True
        m = self._metrics
        m.labels(m.e2e_request_latency).observe(time.monotonic() - self._arrival)
        m.request_success.labels(model_name=m.model_name, finished_reason=finish_reason).inc()
