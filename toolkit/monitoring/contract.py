"""The metric contract: every series the gateway exposes and every series the dashboard reads.

One list, so the gateway (`GatewayMetrics`), the alert rules, the Grafana dashboard and the tests
cannot drift apart: the tests check that `/metrics` exposes exactly `exposed_series_names()` and
that every query under `monitoring/` names only metrics listed here (vLLM's `EXPECTED_METRICS_V1`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MetricKind = Literal["counter", "gauge", "histogram"]
Endpoint = Literal["chat", "completions", "models", "feedback"]
RatingScale = Literal["thumbs", "stars"]
#: The bounded values of the `endpoint` label.
ENDPOINTS: tuple[Endpoint, ...] = ("chat", "completions", "models", "feedback")
#: The bounded values of the feedback `scale` label; a rating means nothing without its scale
#: (`rating="1"` is a thumbs up or the worst star).
RATING_SCALES: tuple[RatingScale, ...] = ("thumbs", "stars")


@dataclass(frozen=True)
class MetricSpec:
    """One toolkit metric as `prometheus_client` declares it.

    Attributes:
        name: the declared name; counters omit `_total` because `prometheus_client` appends it.
        kind: the Prometheus metric type.
        documentation: the `# HELP` text, which is what a reader of `/metrics` sees.
        labels: label names; only bounded ones (model, engine, endpoint, status, scale and
            rating, the toolkit's version and commit).
        buckets: histogram upper bounds (`+Inf` is implicit); `None` for other kinds.
    """

    name: str
    kind: MetricKind
    documentation: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind == "counter" and self.name.endswith("_total"):
            raise ValueError(f"{self.name}: declare counters without _total; the client adds it")
        if (self.kind == "histogram") != (self.buckets is not None):
            raise ValueError(f"{self.name}: buckets are required for histograms and only for them")

    @property
    def exposed_names(self) -> frozenset[str]:
        """The sample names this metric produces in the text exposition format."""
        if self.kind == "counter":
            return frozenset({f"{self.name}_total", f"{self.name}_created"})
        if self.kind == "histogram":
            suffixes = ("_bucket", "_sum", "_count", "_created")
            return frozenset(f"{self.name}{suffix}" for suffix in suffixes)
        return frozenset({self.name})


MODEL_ENGINE = ("model", "engine")

TOOLKIT_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "toolkit_requests", "counter",
        "HTTP requests answered by the gateway; status is the HTTP status code.",
        ("model", "engine", "endpoint", "status"),
    ),
    MetricSpec(
        "toolkit_request_duration_seconds", "histogram",
        "End-to-end request latency, from request received to last byte sent.",
        ("model", "engine", "endpoint"),
        (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
         90.0, 120.0),
    ),
    MetricSpec(
        "toolkit_time_to_first_token_seconds", "histogram",
        "Time from request received to the first generated token.",
        MODEL_ENGINE,
        (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 60.0),
    ),
    MetricSpec(
        "toolkit_time_per_output_token_seconds", "histogram",
        "Mean time per generated token after the first one, one observation per request.",
        MODEL_ENGINE,
        (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
         1.0, 2.0),
    ),
    MetricSpec("toolkit_prompt_tokens", "counter", "Prompt tokens processed.", MODEL_ENGINE),
    MetricSpec("toolkit_generation_tokens", "counter", "Tokens generated.", MODEL_ENGINE),
    MetricSpec(
        "toolkit_prefix_cache_queries", "counter",
        "Prompt tokens looked up in the onnxruntime engine's prompt-prefix cache (0 for other "
        "engines; vLLM counts its own as vllm:prefix_cache_queries).", MODEL_ENGINE,
    ),
    MetricSpec(
        "toolkit_prefix_cache_hits", "counter",
        "Prompt tokens whose keys and values came from the prefix cache instead of a prefill.",
        MODEL_ENGINE,
    ),
    MetricSpec(
        "toolkit_spec_decode_draft_tokens", "counter",
        "Draft tokens the onnxruntime engine checked while one greedy request ran alone "
        "(prompt-lookup speculation; vLLM counts its own as vllm:spec_decode_num_draft_tokens).",
        MODEL_ENGINE,
    ),
    MetricSpec(
        "toolkit_spec_decode_accepted_tokens", "counter",
        "Draft tokens greedy decoding confirmed: tokens generated without a step of their own.",
        MODEL_ENGINE,
    ),
    MetricSpec(
        "toolkit_requests_running", "gauge", "Generation requests the engine is working on.",
        MODEL_ENGINE,
    ),
    MetricSpec(
        "toolkit_requests_waiting", "gauge",
        "Generation requests queued in the gateway, waiting for an engine slot.", MODEL_ENGINE,
    ),
    MetricSpec(
        "toolkit_model_info", "gauge",
        "The served model and its export format, quantization and engine; always 1.",
        ("model", "format", "quantization", "engine"),
    ),
    MetricSpec(
        "toolkit_build_info", "gauge",
        "The toolkit build serving: version, git commit (or unknown) and engine; always 1.",
        ("version", "commit", "engine"),
    ),
    MetricSpec(
        "toolkit_feedback", "counter",
        "Ratings received on /v1/feedback; scale is thumbs or stars, rating the value as sent.",
        ("model", "scale", "rating"),
    ),
    MetricSpec(
        "toolkit_feedback_score", "histogram",
        "Ratings normalised to 0..1 (thumbs -1 -> 0, +1 -> 1; stars 1..5 -> (r-1)/4).",
        ("model",),
        (0.0, 0.25, 0.5, 0.75, 1.0),
    ),
)

#: vLLM v1 series the dashboard and alerts read, scraped through the gateway's /metrics/engine.
VLLM_METRICS: frozenset[str] = frozenset({
    "vllm:kv_cache_usage_perc",
    "vllm:num_preemptions_total",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:request_queue_time_seconds_bucket",
})

#: What `prometheus_client.ProcessCollector` exposes on Linux.
PROCESS_METRICS: frozenset[str] = frozenset({
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_cpu_seconds_total",
    "process_start_time_seconds",
    "process_open_fds",
    "process_max_fds",
})


def exposed_series_names() -> frozenset[str]:
    """Every sample name the gateway's `/metrics` exposes: toolkit metrics plus process ones."""
    names: set[str] = set(PROCESS_METRICS)
    for spec in TOOLKIT_METRICS:
        names |= spec.exposed_names
    return frozenset(names)
