"""The gateway's metrics sink: plain numbers in, Prometheus metrics out.

The engines and the HTTP layer report numbers (a duration, a token count, a rating); only this
module knows about `prometheus_client`, and it builds every metric from `TOOLKIT_METRICS` so the
exposition cannot drift from the contract. The registry is passed in so each test and each app
instance has its own (no global default registry, no duplicate-registration errors).
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from toolkit.build_info import build_commit, toolkit_version
from toolkit.monitoring.contract import (
    ENDPOINTS,
    RATING_SCALES,
    TOOLKIT_METRICS,
    RatingScale,
)

__all__ = ["GatewayMetrics", "RatingScale", "feedback_score01"]

#: counters an embedded engine keeps itself (prefix cache, speculation), read at each scrape
ENGINE_TOTALS = ("toolkit_prefix_cache_queries", "toolkit_prefix_cache_hits",
                 "toolkit_spec_decode_draft_tokens", "toolkit_spec_decode_accepted_tokens")


def feedback_score01(rating: int, scale: RatingScale) -> float:
    """Normalise a rating to 0..1 so thumbs and stars share one `toolkit_feedback_score`.

    Raises:
        ValueError: a rating outside its scale (thumbs: -1 or 1; stars: 1..5).
    """
    if scale == "thumbs":
        if rating not in (-1, 1):
            raise ValueError(f"thumbs rating {rating} is invalid; send -1 or 1")
        return (rating + 1) / 2
    if not 1 <= rating <= 5:
        raise ValueError(f"stars rating {rating} is invalid; send 1 to 5")
    return (rating - 1) / 4


class GatewayMetrics:
    """The toolkit metrics plus process metrics, registered in one `CollectorRegistry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        specs = {kind: [s for s in TOOLKIT_METRICS if s.kind == kind]
                 for kind in ("counter", "gauge", "histogram")}
        self._counters = {s.name: Counter(s.name, s.documentation, s.labels, registry=registry)
                          for s in specs["counter"]}
        self._gauges = {s.name: Gauge(s.name, s.documentation, s.labels, registry=registry)
                        for s in specs["gauge"]}
        self._histograms = {
            s.name: Histogram(s.name, s.documentation, s.labels, registry=registry,
                              buckets=s.buckets or ())
            for s in specs["histogram"]
        }
        ProcessCollector(registry=registry)
        self._synced: dict[tuple[str, str, str], int] = {}

    def set_model_info(self, model: str, format: str, quantization: str, engine: str) -> None:
        """Publish the served model and the build serving it, and create the zero series.

        Creating the children up front means `rate()` and the queue alert see the series from
        the first scrape instead of only after the first request. The build is published here
        because the engine is one of its labels and this is where the gateway names it.
        """
        self._gauges["toolkit_model_info"].labels(model, format, quantization, engine).set(1)
        self._gauges["toolkit_build_info"].labels(toolkit_version(), build_commit(), engine).set(1)
        for name in ("toolkit_requests_running", "toolkit_requests_waiting"):
            self._gauges[name].labels(model, engine)
        for name in ("toolkit_prompt_tokens", "toolkit_generation_tokens", *ENGINE_TOTALS):
            self._counters[name].labels(model, engine)

    def request_finished(
        self, model: str, engine: str, endpoint: str, status: int | str, duration_s: float
    ) -> None:
        """Count one answered request and observe its end-to-end duration.

        Raises:
            ValueError: an endpoint outside `ENDPOINTS`, which would make the label unbounded.
        """
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint {endpoint!r} is not a metric endpoint; use one of "
                             f"{', '.join(ENDPOINTS)}")
        self._counters["toolkit_requests"].labels(model, engine, endpoint, str(status)).inc()
        self._histograms["toolkit_request_duration_seconds"].labels(
            model, engine, endpoint).observe(duration_s)

    def first_token(self, model: str, engine: str, seconds: float) -> None:
        """Observe the time to first token of one generation request."""
        ttft = self._histograms["toolkit_time_to_first_token_seconds"]
        ttft.labels(model, engine).observe(seconds)

    def tokens(
        self, model: str, engine: str, prompt: int, generated: int,
        per_output_token_s: float | None,
    ) -> None:
        """Add one request's token counts; `per_output_token_s` is None below two tokens."""
        self._counters["toolkit_prompt_tokens"].labels(model, engine).inc(prompt)
        self._counters["toolkit_generation_tokens"].labels(model, engine).inc(generated)
        if per_output_token_s is not None:
            self._histograms["toolkit_time_per_output_token_seconds"].labels(
                model, engine).observe(per_output_token_s)

    def running(self, model: str, engine: str, delta: int) -> None:
        """Move the running-requests gauge by `delta` (+1 on start, -1 on finish)."""
        self._gauges["toolkit_requests_running"].labels(model, engine).inc(delta)

    def waiting(self, model: str, engine: str, delta: int) -> None:
        """Move the queued-requests gauge by `delta` (+1 on enqueue, -1 on dequeue)."""
        self._gauges["toolkit_requests_waiting"].labels(model, engine).inc(delta)

    def feedback(self, model: str, rating: int, scale: RatingScale) -> None:
        """Count one rating on its scale and observe its normalised score.

        A thumbs up and one star are both `rating="1"`: the `scale` label tells them apart.

        Raises:
            ValueError: an unknown scale, or a rating not on the scale.
        """
        if scale not in RATING_SCALES:
            raise ValueError(f"feedback scale {scale!r} is unknown; use one of {RATING_SCALES}")
        score01 = feedback_score01(rating, scale)
        self._counters["toolkit_feedback"].labels(model, scale, str(rating)).inc()
        self._histograms["toolkit_feedback_score"].labels(model).observe(score01)

    def engine_totals(self, model: str, engine: str, totals: dict[str, int]) -> None:
        """Bring counters the engine keeps itself up to its running totals (metric -> total).

        The prefix cache and speculation count inside the engine's decode thread and report
        nothing per request; the gateway reads their totals at each scrape and the counters
        add what is new.

        Raises:
            ValueError: a name outside `ENGINE_TOTALS`.
        """
        for name, total in totals.items():
            if name not in ENGINE_TOTALS:
                raise ValueError(f"{name} is not an engine total; use one of {ENGINE_TOTALS}")
            seen = self._synced.get((name, model, engine), 0)
            if total > seen:
                self._counters[name].labels(model, engine).inc(total - seen)
                self._synced[name, model, engine] = total

    def render(self) -> tuple[bytes, str]:
        """The `/metrics` body and its content type, in the Prometheus text format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
