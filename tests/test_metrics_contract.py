"""GatewayMetrics against the contract: exact exposition names, and counters that count exactly."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from toolkit.monitoring.contract import (
    PROCESS_METRICS,
    TOOLKIT_METRICS,
    MetricSpec,
    exposed_series_names,
)
from toolkit.monitoring.metrics import GatewayMetrics, RatingScale, feedback_score01

M, E = "tiny", "transformers"


@pytest.fixture
def metrics() -> GatewayMetrics:
    metrics = GatewayMetrics(CollectorRegistry())
    metrics.set_model_info(M, "onnx", "int8", E)
    return metrics


def value(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def sample_names(metrics: GatewayMetrics) -> set[str]:
    body, _ = metrics.render()
    return {sample.name for family in text_string_to_metric_families(body.decode())
            for sample in family.samples}


def drive_everything(metrics: GatewayMetrics) -> None:
    metrics.request_finished(M, E, "chat", 200, 0.4)
    metrics.first_token(M, E, 0.05)
    metrics.tokens(M, E, prompt=12, generated=30, per_output_token_s=0.01)
    metrics.running(M, E, 1)
    metrics.waiting(M, E, 1)
    metrics.feedback(M, 1, "thumbs")


def test_exposition_is_exactly_the_contract(metrics: GatewayMetrics) -> None:
    drive_everything(metrics)
    names = sample_names(metrics)
    assert names == set(exposed_series_names())
    assert names >= PROCESS_METRICS


def test_no_undeclared_toolkit_series_even_before_traffic(metrics: GatewayMetrics) -> None:
    toolkit = {name for name in sample_names(metrics) if name.startswith("toolkit_")}
    assert toolkit <= exposed_series_names()
    # set_model_info creates the zero series the dashboard and the queue alert rely on.
    created = {"toolkit_model_info", "toolkit_requests_waiting", "toolkit_prompt_tokens_total"}
    assert created <= toolkit


def test_help_text_and_types_come_from_the_contract(metrics: GatewayMetrics) -> None:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for spec in TOOLKIT_METRICS:
        assert families[spec.name].type == spec.kind
        assert families[spec.name].documentation == spec.documentation


def test_request_counter_rises_by_exactly_n(metrics: GatewayMetrics) -> None:
    labels = {"model": M, "engine": E, "endpoint": "chat", "status": "200"}
    for _ in range(7):
        metrics.request_finished(M, E, "chat", 200, 0.5)
    metrics.request_finished(M, E, "chat", 500, 0.1)
    assert value(metrics, "toolkit_requests_total", **labels) == 7
    assert value(metrics, "toolkit_requests_total", **{**labels, "status": "500"}) == 1
    duration = {"model": M, "engine": E, "endpoint": "chat"}
    assert value(metrics, "toolkit_request_duration_seconds_count", **duration) == 8
    assert value(metrics, "toolkit_request_duration_seconds_sum", **duration) == pytest.approx(3.6)


def test_request_duration_lands_in_its_bucket(metrics: GatewayMetrics) -> None:
    metrics.request_finished(M, E, "completions", 200, 3.0)
    labels = {"model": M, "engine": E, "endpoint": "completions"}
    assert value(metrics, "toolkit_request_duration_seconds_bucket", **labels, le="2.5") == 0
    assert value(metrics, "toolkit_request_duration_seconds_bucket", **labels, le="5.0") == 1


def test_tokens_add_up(metrics: GatewayMetrics) -> None:
    for _ in range(3):
        metrics.tokens(M, E, prompt=10, generated=5, per_output_token_s=0.02)
    metrics.tokens(M, E, prompt=4, generated=1, per_output_token_s=None)
    assert value(metrics, "toolkit_prompt_tokens_total", model=M, engine=E) == 34
    assert value(metrics, "toolkit_generation_tokens_total", model=M, engine=E) == 16
    assert value(metrics, "toolkit_time_per_output_token_seconds_count", model=M, engine=E) == 3


def test_engine_counters_follow_the_engine_totals(metrics: GatewayMetrics) -> None:
    labels = {"model": M, "engine": E}
    assert value(metrics, "toolkit_prefix_cache_queries_total", **labels) == 0
    assert value(metrics, "toolkit_spec_decode_draft_tokens_total", **labels) == 0
    first = {"toolkit_prefix_cache_queries": 100, "toolkit_prefix_cache_hits": 48,
             "toolkit_spec_decode_draft_tokens": 30}
    metrics.engine_totals(M, E, first)
    metrics.engine_totals(M, E, first)  # a scrape with nothing new adds nothing
    metrics.engine_totals(M, E, {"toolkit_prefix_cache_queries": 160,
                                 "toolkit_prefix_cache_hits": 96,
                                 "toolkit_spec_decode_draft_tokens": 41,
                                 "toolkit_spec_decode_accepted_tokens": 12})
    assert value(metrics, "toolkit_prefix_cache_queries_total", **labels) == 160
    assert value(metrics, "toolkit_prefix_cache_hits_total", **labels) == 96
    assert value(metrics, "toolkit_spec_decode_draft_tokens_total", **labels) == 41
    assert value(metrics, "toolkit_spec_decode_accepted_tokens_total", **labels) == 12
    with pytest.raises(ValueError, match="not an engine total"):
        metrics.engine_totals(M, E, {"toolkit_generation_tokens": 1})


def test_time_to_first_token(metrics: GatewayMetrics) -> None:
    for seconds in (0.1, 0.2):
        metrics.first_token(M, E, seconds)
    assert value(metrics, "toolkit_time_to_first_token_seconds_count", model=M, engine=E) == 2
    assert value(metrics, "toolkit_time_to_first_token_seconds_sum", model=M,
                 engine=E) == pytest.approx(0.3)


def test_running_and_waiting_gauges_move_by_delta(metrics: GatewayMetrics) -> None:
    for _ in range(3):
        metrics.waiting(M, E, 1)
    metrics.waiting(M, E, -1)
    metrics.running(M, E, 2)
    metrics.running(M, E, -2)
    assert value(metrics, "toolkit_requests_waiting", model=M, engine=E) == 2
    assert value(metrics, "toolkit_requests_running", model=M, engine=E) == 0


def test_model_info_is_one(metrics: GatewayMetrics) -> None:
    labels = {"model": M, "format": "onnx", "quantization": "int8", "engine": E}
    assert metrics.registry.get_sample_value("toolkit_model_info", labels) == 1


def test_feedback_counts_ratings_per_scale_and_observes_scores(metrics: GatewayMetrics) -> None:
    ratings: list[tuple[int, RatingScale]] = [(1, "thumbs"), (-1, "thumbs"), (5, "stars"),
                                              (2, "stars"), (1, "stars")]
    for rating, scale in ratings:
        metrics.feedback(M, rating, scale)
    # a thumbs up and a 1-star rating are both rating="1", told apart by scale
    assert value(metrics, "toolkit_feedback_total", model=M, scale="thumbs", rating="1") == 1
    assert value(metrics, "toolkit_feedback_total", model=M, scale="stars", rating="1") == 1
    assert value(metrics, "toolkit_feedback_total", model=M, scale="thumbs", rating="-1") == 1
    assert value(metrics, "toolkit_feedback_score_count", model=M) == 5
    assert value(metrics, "toolkit_feedback_score_sum", model=M) == pytest.approx(2.25)
    assert value(metrics, "toolkit_feedback_score_bucket", model=M, le="0.0") == 2
    assert value(metrics, "toolkit_feedback_score_bucket", model=M, le="0.25") == 3


def test_build_info_names_version_commit_and_engine(metrics: GatewayMetrics) -> None:
    from toolkit import __version__
    from toolkit.build_info import build_commit

    commit = build_commit()
    assert commit == "unknown" or (7 <= len(commit) <= 12 and int(commit, 16) >= 0)
    labels = {"version": __version__, "commit": commit, "engine": E}
    assert metrics.registry.get_sample_value("toolkit_build_info", labels) == 1


def test_build_commit_comes_from_the_image_or_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    from toolkit.build_info import build_commit

    for given, expected in (("ABCDEF1234567890", "abcdef123456"), ("not a hash", "unknown")):
        monkeypatch.setenv("TOOLKIT_COMMIT", given)
        build_commit.cache_clear()
        assert build_commit() == expected
    build_commit.cache_clear()


@pytest.mark.parametrize(("rating", "scale", "score"), [
    (-1, "thumbs", 0.0), (1, "thumbs", 1.0), (1, "stars", 0.0), (3, "stars", 0.5),
    (5, "stars", 1.0),
])
def test_feedback_score01(rating: int, scale: RatingScale, score: float) -> None:
    assert feedback_score01(rating, scale) == score


@pytest.mark.parametrize(("rating", "scale"),
                         [(0, "thumbs"), (2, "thumbs"), (0, "stars"), (6, "stars")])
def test_feedback_score01_rejects_out_of_scale(rating: int, scale: RatingScale) -> None:
    with pytest.raises(ValueError, match="rating"):
        feedback_score01(rating, scale)


def test_bad_inputs_raise(metrics: GatewayMetrics) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        metrics.request_finished(M, E, "embeddings", 200, 0.1)
    with pytest.raises(ValueError, match="scale 'likert' is unknown"):
        metrics.feedback(M, 2, "likert")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="thumbs rating 5 is invalid"):
        metrics.feedback(M, 5, "thumbs")


def test_each_registry_is_independent() -> None:
    first, second = GatewayMetrics(CollectorRegistry()), GatewayMetrics(CollectorRegistry())
    first.request_finished(M, E, "models", 200, 0.001)
    labels = {"model": M, "engine": E, "endpoint": "models", "status": "200"}
    assert value(first, "toolkit_requests_total", **labels) == 1
    assert value(second, "toolkit_requests_total", **labels) == 0


def test_contract_names_follow_prometheus_conventions() -> None:
    names = [spec.name for spec in TOOLKIT_METRICS]
    assert len(names) == len(set(names))
    for spec in TOOLKIT_METRICS:
        assert spec.name.startswith("toolkit_") and spec.documentation
        assert set(spec.labels) <= {"model", "engine", "endpoint", "status", "format",
                                    "quantization", "scale", "rating", "version", "commit"}
        if spec.kind == "histogram":
            assert spec.buckets == tuple(sorted(spec.buckets or ()))
            assert spec.name.endswith(("_seconds", "_score"))


def test_metric_spec_rejects_inconsistent_entries() -> None:
    with pytest.raises(ValueError, match="_total"):
        MetricSpec("toolkit_x_total", "counter", "x", ())
    with pytest.raises(ValueError, match="buckets"):
        MetricSpec("toolkit_x_seconds", "histogram", "x", ())
    with pytest.raises(ValueError, match="buckets"):
        MetricSpec("toolkit_x", "gauge", "x", (), (1.0,))


def test_exposed_names_per_kind() -> None:
    counter = MetricSpec("toolkit_requests", "counter", "x", ())
    histogram = MetricSpec("toolkit_x_seconds", "histogram", "x", (), (1.0,))
    assert counter.exposed_names == {"toolkit_requests_total", "toolkit_requests_created"}
    assert histogram.exposed_names == {"toolkit_x_seconds_bucket", "toolkit_x_seconds_sum",
                                       "toolkit_x_seconds_count", "toolkit_x_seconds_created"}
    assert MetricSpec("toolkit_g", "gauge", "x", ()).exposed_names == {"toolkit_g"}
