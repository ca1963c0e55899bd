"""Prometheus metrics of one server, with vLLM v1's names under a `fastserve:` prefix.

    metrics = ServerMetrics(model_name="small")
    metrics.observe_finished(request_output)       # latency histograms, once per engine request
    text = metrics.render(engine.stats())          # the /metrics body (Prometheus text format)

Gauges (`num_requests_running/waiting/swapped`, `kv_cache_usage_perc` as a 0..1 fraction) and
counters (`prefix_cache_queries/hits_total`, `prompt_tokens_total`, `generation_tokens_total`,
`num_preemptions_total`, `request_success_total{finished_reason}`) mirror the engine's own
cumulative `EngineStats` at scrape time, so they count every request the engine saw. Histograms
(`time_to_first_token_seconds`, `inter_token_latency_seconds`, `e2e_request_latency_seconds`,
`request_queue_time_seconds`) are observed by the server when a request finishes. Each instance owns
its registry (no global state: two apps in one process do not mix).

What this module does not know: HTTP and how stats are read from the engine thread.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fastserve.engine.engine import EngineStats
from fastserve.engine.request import RequestOutput

PREFIX = "fastserve:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)  # fmt: skip
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


class _EngineCollector(Collector):
    """Reports the last EngineStats snapshot handed to `ServerMetrics.render`."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats: EngineStats | None = None

    def collect(self):
        s = self.stats
        if s is None:
            return
        labels, values = ["model_name"], [self.model_name]
        for name, doc, value in (
            ("num_requests_running", "Requests holding device KV.", s.num_running),
            ("num_requests_waiting", "Requests waiting to run (new or preempted).", s.num_waiting),
            ("num_requests_swapped", "Requests whose KV is in the host tier.", s.num_swapped),
            ("kv_cache_usage_perc", "Fraction of device KV blocks in use (0..1).", s.kv_usage),
        ):
            g = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            g.add_metric(values, value)
            yield g
        for name, doc, value in (
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             s.prefix_cache_queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
            ("prompt_tokens", "Prompt tokens computed.", s.num_prompt_tokens),
            ("generation_tokens", "Tokens generated.", s.num_generation_tokens),
            ("num_preemptions", "Preemptions of running requests.", s.num_preemptions),
            ("num_swap_outs", "Requests whose KV moved to the host tier.", s.num_swap_outs),
            ("num_swap_ins", "Requests whose KV came back to the device.", s.num_swap_ins),
        ):  # fmt: skip
            c = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            c.add_metric(values, value)
            yield c
        c = CounterMetricFamily(
            PREFIX + "request_success",
            "Finished sequences by finish reason (stop, length, abort, error).",
            labels=["model_name", "finished_reason"],
        )
        for reason in sorted(set(s.finished_by_reason) | {"stop", "length", "abort"}):
            c.add_metric([self.model_name, reason], s.finished_by_reason.get(reason, 0))
        yield c


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self._engine = _EngineCollector(model_name)
        self.registry.register(self._engine)
        self.model_name = model_name

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(
                PREFIX + name, doc, ["model_name"], registry=self.registry, buckets=buckets
            ).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Inter-token latency.", _ITL_BUCKETS)
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Arrival to finish (JCT).", _E2E_BUCKETS
        )
        self.queue = histogram(
            "request_queue_time_seconds", "Arrival to first scheduled step.", _E2E_BUCKETS
        )

    def observe_finished(self, out: RequestOutput) -> None:
        """Latency histograms of a finished request (the metrics of its first sequence)."""
        m = out.metrics
        if m is None:
            return
        if m.ttft_s is not None:
            self.ttft.observe(m.ttft_s)
        for itl in m.itl_s:
            self.itl.observe(itl)
        if m.e2e_s is not None:
            self.e2e.observe(m.e2e_s)
        if m.queue_s is not None:
            self.queue.observe(m.queue_s)

    def render(self, stats: EngineStats) -> bytes:
        self._engine.stats = stats
        return generate_latest(self.registry)
