"""Prompt-lookup speculation: what is drafted, what is kept, and that a served answer is the
same token for token with it on and off (an fp32 graph) while drafts are really checked and
kept."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from toolkit.runtime.speculation import (
    DraftPolicy,
    NgramSpeculation,
    accepted,
    draft_width,
)


def _ids(*tokens: int) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int64)


def test_draft_continues_the_longest_suffix_seen_before():
    spec = NgramSpeculation(tokens=3, max_n=4, min_n=2)
    # the last 4 tokens never occurred before; the last 3 did, at the start
    assert spec.propose(_ids(1, 2, 3, 9, 1, 2, 3)).tolist() == [9, 1, 2]
    # a longer match wins over a more recent shorter one
    assert spec.propose(_ids(7, 5, 6, 1, 9, 5, 6, 2, 7, 5, 6)).tolist() == [1, 9, 5]


def test_draft_follows_the_most_recent_occurrence_and_is_cut_at_the_end():
    spec = NgramSpeculation(tokens=4, max_n=2, min_n=2)
    assert spec.propose(_ids(5, 6, 7, 5, 6, 8, 5, 6)).tolist() == [8, 5, 6]


def test_no_draft_without_a_repeat_of_min_n_tokens():
    assert NgramSpeculation(min_n=2).propose(_ids(1, 2, 3, 1)).size == 0
    assert NgramSpeculation(min_n=1).propose(_ids(1, 2, 3, 1)).tolist() == [2, 3, 1]
    assert NgramSpeculation().propose(_ids(4)).size == 0
    assert NgramSpeculation(tokens=0).propose(_ids(1, 2, 1, 2)).size == 0


def test_bad_settings_are_refused():
    for bad in ({"tokens": -1}, {"min_n": 0}, {"min_n": 3, "max_n": 2}):
        with pytest.raises(ValueError, match="speculation needs"):
            NgramSpeculation(**bad)


def test_accepted_counts_the_confirmed_prefix():
    assert accepted(_ids(4, 5, 6), _ids(4, 5, 7, 9)) == 2
    assert accepted(_ids(4, 5, 6), _ids(1, 5, 6, 9)) == 0
    assert accepted(_ids(4, 5, 6), _ids(4, 5, 6, 9)) == 3


def test_served_answers_are_unchanged_and_drafts_are_kept(tiny_gqa_dir, monkeypatch):
    """Lone greedy requests on the builder graph get the same answers with speculation off and
    on (to the length limit, to EOS, cut by a stop string), while /ready and /metrics show
    drafts proposed and kept and fewer steps than tokens; a sampled request drafts nothing.
    The draft cost is fixed here (not timed), so how much is drafted does not hang on this
    machine's speed; the same request twice drafts the same."""
    from tests.serve_helpers import live_gateway
    from tests.test_serve_engines import chat
    from toolkit.serve.engines import batching

    monkeypatch.setattr(batching, "measure_extra_cost", lambda backend, tokens, rows: 0.25)

    prompts = [" ".join(["le protocole de lavage des mains"] * 6),
               "step one step two step three step one step two"]
    requests = [{"max_tokens": 40, "ignore_eos": True}, {"max_tokens": 40}]
    answers, status = {}, {}
    for tokens in (0, 4):
        with live_gateway(tiny_gqa_dir, engine="onnxruntime", model_name="tiny", threads=1,
                          speculative_tokens=tokens) as live:
            answers[tokens] = [chat(live.base_url, p, temperature=0, **extra)["choices"][0]
                               for p in prompts for extra in requests]
            if tokens == 0:  # a stop string that cuts the first answer in its middle
                first = answers[0][0]["message"]["content"]
                stop = first[len(first) // 2:len(first) // 2 + 4]
                assert len(stop) == 4
            answers[tokens].append(chat(live.base_url, prompts[0], temperature=0, max_tokens=40,
                                        ignore_eos=True, stop=[stop])["choices"][0])
            status[tokens] = httpx.get(f"{live.base_url}/ready").json()
            metrics = httpx.get(f"{live.base_url}/metrics").text
            assert f'toolkit_spec_decode_accepted_tokens_total{{engine="onnxruntime",' \
                f'model="tiny"}} {float(status[tokens]["accepted_tokens"])}' in metrics
            chat(live.base_url, prompts[0], temperature=1.0, max_tokens=20, seed=3)
            sampled = httpx.get(f"{live.base_url}/ready").json()
            assert sampled["draft_tokens"] == status[tokens]["draft_tokens"]
            drafted = []  # the same request twice: the same draft lengths (no clock involved)
            for _ in range(2 if tokens else 0):
                chat(live.base_url, prompts[0], temperature=0, **requests[0])
                now = httpx.get(f"{live.base_url}/ready").json()
                drafted.append(now["draft_tokens"] - sampled["draft_tokens"])
                sampled = now
            if drafted:
                assert drafted[0] == drafted[1] > 0
                assert now["draft_token_cost"] == 0.25
    assert answers[4] == answers[0]
    assert answers[0][-1]["finish_reason"] == "stop"
    assert answers[0][-1]["message"]["content"] == first[:first.index(stop)]
    generated = status[0]["rows_decoded"]  # one token per step and row without drafts
    assert status[0]["draft_tokens"] == 0 and status[0]["steps"] == generated
    assert status[4]["accepted_tokens"] > 0
    assert status[4]["steps"] == generated - status[4]["accepted_tokens"]


def test_concurrent_requests_draft_in_one_run_and_answer_as_without_drafts(tiny_gqa_dir,
                                                                            monkeypatch):
    """Requests running together check their drafts in one several-row run, rows without a
    draft riding along; every answer is the one served without speculation (fp32 graph)."""
    import concurrent.futures

    from tests.serve_helpers import live_gateway
    from tests.test_serve_engines import chat
    from toolkit.runtime.onnx_shared_kv import SharedKvStepBackend
    from toolkit.serve.engines import batching

    monkeypatch.setattr(batching, "measure_extra_cost", lambda backend, tokens, rows: 0.05)
    rows_extended: list[int] = []
    extend = SharedKvStepBackend.extend

    def recorded(self, state, tokens, counts):
        rows_extended.append(len(state))
        return extend(self, state, tokens, counts)

    monkeypatch.setattr(SharedKvStepBackend, "extend", recorded)
    prompts = [" ".join(["le protocole de lavage des mains"] * 6),
               "wash hands, then gloves; wash hands, then gloves; wash"]
    answers = {}
    for tokens in (0, 4):
        with live_gateway(tiny_gqa_dir, engine="onnxruntime", model_name="tiny", threads=1,
                          speculative_tokens=tokens) as live, \
                concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            answers[tokens] = list(pool.map(
                lambda p, url=live.base_url: chat(url, p, temperature=0, max_tokens=160,
                                                  ignore_eos=True)["choices"][0]["message"],
                prompts))
            status = httpx.get(f"{live.base_url}/ready").json()
    assert answers[4] == answers[0]
    assert status["draft_rows"] == batching.DRAFT_ROWS[-1] and status["accepted_tokens"] > 0
    assert max(rows_extended) >= 2


def test_policy_drafts_long_when_drafts_are_kept_and_cheap():
    policy = DraftPolicy()
    for _ in range(10):
        policy.record_draft(4, 4)
    assert policy.keep_rate > 0.9
    assert draft_width([policy], [4], 0.2) == 4  # onnx-w8a8's measured cost
    assert draft_width([policy], [2], 0.2) == 2  # never more than proposed
    assert draft_width([policy], [0], 0.2) == 0


def test_policy_stops_drafting_when_drafts_miss_and_starts_again_when_they_would_hit():
    policy = DraftPolicy()
    for _ in range(10):
        policy.record_draft(1, 0)
    assert policy.keep_rate < 0.1 and draft_width([policy], [4], 0.38) == 0  # onnx-int4's
    for _ in range(10):  # plain steps whose token the draft's first token would have matched
        policy.record_draft(1, 1)
    assert draft_width([policy], [4], 0.38) >= 1


def test_policy_weighs_keep_rate_against_cost():
    """At a keep rate of ~0.67 one draft token pays at r = 0.2 and not at r = 1."""
    policy = DraftPolicy()
    for _ in range(20):
        policy.record_draft(2, 1)  # one kept, then a miss
        policy.record_draft(1, 1)
    assert 0.6 < policy.keep_rate < 0.7
    assert draft_width([policy], [4], 0.2) >= 1 and draft_width([policy], [4], 1.0) == 0


def test_a_batch_drafts_one_width_for_the_tokens_its_rows_would_keep():
    """Rows without a draft ride along: they add nothing to the tokens a wider run yields, so
    the same cost needs more kept drafts from the others; a row's short draft counts whole."""
    keen, missing = DraftPolicy(), DraftPolicy()
    for _ in range(10):
        keen.record_draft(4, 4)
        missing.record_draft(1, 0)
    assert draft_width([keen, keen], [4, 4], 0.3) == 4
    assert draft_width([keen, keen], [4, 1], 0.3) == 4
    # one keen row of four: 1 + ~4 tokens for four rows must beat r = 0.3 per token
    assert draft_width([keen, missing, missing, missing], [4, 0, 0, 0], 0.3) == 0
    assert draft_width([keen, missing, missing, missing], [4, 0, 0, 0], 0.05) == 4
    assert draft_width([], [], 0.2) == 0


def test_extra_cost_takes_the_fastest_runs(monkeypatch):
    """r from the fastest one-token and five-token runs: a slow first round (allocations) and
    a stalled round do not count."""
    from types import SimpleNamespace

    from toolkit.runtime import speculation

    now = [0.0]
    slow = iter([3.0, 3.0, 1.0, 1.0, 2.0, 2.0] + [1.0] * 20)  # per run: warm-up, normal, stall

    class FakeBackend:
        def prefill(self, prompts):
            return 0, None

        def extend(self, state, tokens, counts):
            assert tokens.shape == (1, counts[0])
            now[0] += next(slow) * (0.010 + 0.0025 * (tokens.shape[1] - 1))  # r = 0.25
            return state + counts[0], None

        def rewind(self, state, positions):
            return state - positions[0]

    monkeypatch.setattr(speculation, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    assert speculation.measure_extra_cost(FakeBackend(), 4) == pytest.approx(0.25)


def test_extra_cost_is_measured_on_a_real_backend(tiny_gqa_dir):
    """The builder graph's backend runs the dummy prompt: a finite, non-negative cost."""
    from toolkit.runtime.onnx_model import OnnxCausalLM
    from toolkit.runtime.onnx_steps import step_backend
    from toolkit.runtime.speculation import measure_extra_cost

    backend = step_backend(OnnxCausalLM.from_dir(tiny_gqa_dir, threads=1), 64)
    for rows in (1, 4):
        assert 0.0 <= measure_extra_cost(backend, 4, rows) < 100.0
