"""The GroupQueryAttention graph (onnxruntime-genai's builder) and its in-place KV backend on
the tiny model: same logits as torch, same greedy tokens as the optimum graph's path, rows
joining and leaving a running batch, cancel, and the gateway serving it."""

from __future__ import annotations

import concurrent.futures
import re
import shutil

import httpx
import numpy as np
import pytest

from tests.serve_helpers import live_gateway
from tests.test_serve_engines import (
    PROMPTS,
    chat,
    check_batched_equals_solo,
    check_disconnect_leaves_the_batch,
)


@pytest.fixture(scope="module")
def gqa_lm(tiny_gqa_dir):
    from toolkit.runtime.onnx_model import OnnxCausalLM

    return OnnxCausalLM.from_dir(tiny_gqa_dir, threads=1)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from toolkit.runtime.loading import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def _backend(lm, capacity: int = 64):
    from toolkit.runtime.onnx_shared_kv import SharedKvStepBackend
    from toolkit.runtime.onnx_steps import step_backend

    backend = step_backend(lm, capacity)
    assert isinstance(backend, SharedKvStepBackend)
    return backend


def test_graph_is_read_as_shared_kv(gqa_lm):
    assert gqa_lm.is_shared_kv and gqa_lm.head_dim == 16 and gqa_lm.num_kv_heads == 2
    assert gqa_lm.vocab_size == 512 and gqa_lm.num_layers == 2
    with pytest.raises(ValueError, match="left padding"):
        gqa_lm.logits(np.array([[0, 5, 6]]), np.array([[0, 1, 1]]))


def test_logits_match_torch(gqa_lm, tiny_model_dir, tokenizer):
    """Also checks the builder read rope_theta 50000 from transformers 5's rope_parameters."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = np.array([tokenizer(PROMPTS[3])["input_ids"]])
    with torch.inference_mode():
        expected = model(input_ids=torch.tensor(ids)).logits.numpy()
    assert ids.shape[1] > 8
    np.testing.assert_allclose(gqa_lm.logits(ids), expected, atol=1e-4)
    np.testing.assert_allclose(_backend(gqa_lm).prefill([ids[0].tolist()])[1][0],
                               expected[0, -1], atol=1e-4)


def test_lm_head_runs_only_at_the_positions_asked(gqa_lm, tokenizer):
    """Serving asks for one position per row; the answer equals those rows of the full logits."""
    from toolkit.runtime.onnx_model import LOGIT_POSITIONS

    assert gqa_lm.has_logit_positions
    ids = np.array([tokenizer(PROMPTS[3])["input_ids"]] * 2)
    full = gqa_lm.logits(ids)
    feed = gqa_lm._feed(ids, np.ones_like(ids), None, gqa_lm._empty_past(2))
    feed[LOGIT_POSITIONS] = np.array([[3], [ids.shape[1] - 1]])
    (picked,) = gqa_lm.session.run(["logits"], feed)
    assert picked.shape == (2, 1, gqa_lm.vocab_size)
    np.testing.assert_allclose(picked[:, 0], full[[0, 1], [3, ids.shape[1] - 1]], atol=1e-5)


def _older_export(tiny_gqa_dir, out, *, logit_positions: bool = False,
                  query_lengths: bool = False):
    """A copy of the tiny graph as an earlier export wrote it: without the lm_head gather
    (unless `logit_positions`) and without per-row new-token counts (unless `query_lengths`)."""
    import onnx

    from toolkit.runtime.onnx_model import LOGIT_POSITIONS, QUERY_LENGTHS, OnnxCausalLM

    shutil.copytree(tiny_gqa_dir, out)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    graph = model.graph
    if not logit_positions:
        gather = next(n for n in graph.node if n.op_type == "GatherElements")
        head = next(n for n in graph.node if "logits" in n.output)
        head.input[0] = gather.input[0]
        for node in [n for n in graph.node if n.name.startswith("/logits_positions/")]:
            graph.node.remove(node)
        graph.input.remove(next(i for i in graph.input if i.name == LOGIT_POSITIONS))
    if not query_lengths:
        for node in graph.node:
            if node.op_type == "GroupQueryAttention":
                inputs = [name for name in node.input if name != QUERY_LENGTHS]
                del node.input[:]
                node.input.extend(inputs)
        graph.input.remove(next(i for i in graph.input if i.name == QUERY_LENGTHS))
    onnx.save(model, str(out / "model.onnx"))
    return OnnxCausalLM.from_dir(out, threads=1)


def test_a_graph_exported_without_logit_positions_still_serves(gqa_lm, tiny_gqa_dir, tmp_path,
                                                                tokenizer):
    """Exports made before the lm_head gather and the per-row token counts keep working, with
    the same tokens."""
    from toolkit.runtime.steps import greedy_generate

    old = _older_export(tiny_gqa_dir, tmp_path / "legacy")
    assert not old.has_logit_positions and not old.has_query_lengths
    ids = tokenizer(PROMPTS[1])["input_ids"]
    assert greedy_generate(_backend(old), ids, 12, stop_at_eos=False) == \
        greedy_generate(_backend(gqa_lm), ids, 12, stop_at_eos=False)


def test_prompts_after_cached_blocks_share_runs_and_get_the_logits_of_running_alone(
        gqa_lm, tiny_gqa_dir, tmp_path, monkeypatch):
    """The rests of prompts that start with cached blocks run as right-padded batches (one-token
    rests apart from the others), where an export without per-row token counts runs each
    alone; logits, and the caches decoded after, are the same."""
    import onnx

    from toolkit.runtime.onnx_model import QUERY_LENGTHS
    from toolkit.runtime.onnx_steps import step_backend

    graph = onnx.load(str(tiny_gqa_dir / "model.onnx"), load_external_data=False).graph
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert gqa_lm.has_query_lengths and len(attention) == 2
    assert all(node.input[16] == QUERY_LENGTHS for node in attention)
    old = _older_export(tiny_gqa_dir, tmp_path / "legacy", logit_positions=True)
    batched, alone = (step_backend(lm, 64, prefix_cache_bytes=1 << 20) for lm in (gqa_lm, old))
    rng = np.random.default_rng(5)
    system = rng.integers(4, 500, 40).tolist()  # two full blocks of 16
    wave = [system[:33], system + rng.integers(4, 500, 7).tolist(), system[:20],
            rng.integers(4, 500, 9).tolist(), system[:33] + [7], system[:17]]
    runs: list[list[int]] = []
    for backend in (batched, alone):
        backend.prefill([system])  # caches the blocks
        runs.append([0])

        def counted(*args, run=backend._run, count=runs[-1], **kwargs):
            count[0] += 1
            return run(*args, **kwargs)

        monkeypatch.setattr(backend, "_run", counted)
    # new tokens after the cache: 1, 15, 4, (cold 9), 2, 1: runs [1, 1], [2, 4] and [15]
    # (`padded_runs`: 15 would pad 2 and 4 by more than a run costs)
    state, logits = batched.prefill(wave)
    ref_state, ref = alone.prefill(wave)
    assert runs == [[1 + 3], [1 + 5]]
    np.testing.assert_allclose(logits, ref, atol=1e-5)
    for _ in range(6):
        tokens = ref.argmax(-1)
        state, logits = batched.decode(state, tokens)
        ref_state, ref = alone.decode(ref_state, tokens)
        np.testing.assert_allclose(logits, ref, atol=1e-5)
    # a run splits where a row's cache plus the padded width would overflow the arena
    # (rests sorted; lengths are whole prompts): 48 cached + 30 wide > 64
    assert batched._warm_runs([1, 1, 2, 30], [33, 17, 50, 46], 64) == \
        [range(2), range(2, 3), range(3, 4)]
    assert batched._warm_runs([28, 30], [44, 46], 64) == [range(2)]
    assert alone._warm_runs([28, 30], [44, 46], 64) == [range(1), range(1, 2)]


def test_runs_group_rows_of_similar_widths_at_the_least_padded_cost():
    from toolkit.runtime.onnx_shared_kv import RUN_COST_POSITIONS, padded_runs

    # one long rest among short ones runs apart: 15 x 30 + 400 + 2 runs, not 16 x 400
    assert padded_runs([30] * 15 + [400]) == [range(15), range(15, 16)]
    # a split that saves fewer padded positions than a run costs is not made
    assert padded_runs([2, 4, 8]) == [range(3)]
    near = RUN_COST_POSITIONS + 4  # the second row pads 12 positions: a split saves 4 net
    assert padded_runs([2, 2 + near]) == [range(1), range(1, 2)]
    # one-token rows never share a run with longer ones
    assert padded_runs([1, 1, 2, 3]) == [range(2), range(2, 4)]
    # every row's cache plus the run's width fits the arena: 48 cached + 20 > 64
    assert padded_runs([18, 20], [48, 10], 64) == [range(1), range(1, 2)]
    assert padded_runs([18, 20], [40, 10], 64) == [range(2)]
    assert padded_runs([]) == []


def test_prompts_of_very_different_lengths_run_apart_with_the_logits_of_running_alone(
        gqa_lm, monkeypatch):
    """Cold prompts are sorted by length and batched by `padded_runs`: two short prompts and
    two long ones make two runs, and every row's logits and cache are those of running alone."""
    backend = _backend(gqa_lm)
    rng = np.random.default_rng(8)
    prompts = [rng.integers(4, 500, n).tolist() for n in (40, 3, 5, 38)]
    solo = []
    for prompt in prompts:
        state, logits = backend.prefill([prompt])
        solo.append((logits[0], backend.decode(state, np.array([9]))[1][0]))
    widths: list[tuple[int, ...]] = []

    def counted(arena, ids, *args, run=backend._run, **kwargs):
        widths.append(ids.shape)
        return run(arena, ids, *args, **kwargs)

    monkeypatch.setattr(backend, "_run", counted)
    state, logits = backend.prefill(prompts)
    assert widths == [(2, 5), (2, 40)]
    _, stepped = backend.decode(state, np.full(len(prompts), 9))
    for row, (first, after) in enumerate(solo):
        np.testing.assert_allclose(logits[row], first, atol=1e-4)
        np.testing.assert_allclose(stepped[row], after, atol=1e-4)


def test_batched_rows_join_and_leave_like_solo(gqa_lm, tokenizer):
    check_batched_equals_solo(tokenizer, _backend(gqa_lm), atol=1e-4)


@pytest.mark.parametrize("join", ["merge", "prefill_into"])
def test_random_joins_and_leaves_keep_every_row_exact(gqa_lm, monkeypatch, join):
    """Rows join (merge, or prefilled straight into the batch's free rows) and leave from the
    middle (slot moves) at random while the arena grows in rows and positions; once the whole
    batch leaves and the next arrivals reuse its arena, stale keys and values included."""
    from toolkit.runtime import onnx_shared_kv

    monkeypatch.setattr(onnx_shared_kv, "MIN_LENGTH", 4)
    backend, alone = _backend(gqa_lm, capacity=48), _backend(gqa_lm, capacity=48)
    rng = np.random.default_rng(1)
    made: list[tuple[int, int]] = []  # (rows, length) of each arena `backend` made

    class CountedArena(onnx_shared_kv.KvArena):
        def __init__(self, owner, rows: int, length: int) -> None:
            super().__init__(owner, rows, length)
            if owner is backend:
                made.append((rows, length))

    monkeypatch.setattr(onnx_shared_kv, "KvArena", CountedArena)

    def solo_next(prompt: list[int], fed: list[int]) -> np.ndarray:
        state, logits = alone.prefill([prompt])
        for token in fed:
            state, logits = alone.decode(state, np.array([token]))
        return logits[0]

    rows: list[tuple[list[int], list[int]]] = []  # (prompt, tokens fed since)
    state = None
    for step in range(16):
        if step == 10:  # the whole batch leaves
            rows, state = [], None
        if step in (0, 3, 4, 8, 10, 11):  # arrivals: one to three new prompts
            prompts = [rng.integers(4, 500, rng.integers(1, 9)).tolist()
                       for _ in range(int(rng.integers(1, 4)))]
            if join == "merge":
                new_state, _ = backend.prefill(prompts)
                state = new_state if state is None else backend.merge(state, new_state)
            else:
                state, first = backend.prefill_into(state, prompts)
                for i, prompt in enumerate(prompts):
                    np.testing.assert_allclose(first[i], solo_next(prompt, []), atol=1e-4)
            rows += [(p, []) for p in prompts]
        if step in (5, 9, 12) and len(rows) > 1:  # a row in the middle leaves
            keep = [i for i in range(len(rows)) if i != len(rows) // 2]
            state = backend.select(state, keep)
            rows = [rows[i] for i in keep]
        tokens = rng.integers(4, 500, len(rows))
        state, logits = backend.decode(state, tokens)
        for i, token in enumerate(tokens):
            rows[i][1].append(int(token))
        for i, (prompt, fed) in enumerate(rows):
            np.testing.assert_allclose(logits[i], solo_next(prompt, fed), atol=1e-4)
    assert max(r for r, _ in made) >= 5 and max(n for _, n in made) >= 16  # it grew
    if join == "prefill_into":  # arenas only to grow, and one for the batch after the
        # emptying (its predecessor had grown past twice the positions the arrivals need)
        grew = [made[i][0] > made[i - 1][0] or made[i][1] > made[i - 1][1]
                for i in range(1, len(made))]
        assert grew.count(False) == 1 and backend._spare is state.arena


def test_scheduler_admits_into_a_running_batch_with_solo_answers(gqa_lm):
    """Requests arriving while another decodes are prefilled into its batch's free rows; one
    that ends at its first token leaves at once; every answer is its greedy answer alone, and
    the batch that follows reuses the arena."""
    import asyncio

    from toolkit.runtime.steps import greedy_generate
    from toolkit.serve.engines import GenerationRequest, SamplingParams
    from toolkit.serve.engines.base import PreparedRequest
    from toolkit.serve.engines.batching import BatchScheduler

    backend = _backend(gqa_lm, capacity=128)
    scheduler = BatchScheduler(backend, lambda ids: "".join(f"<{i}>" for i in ids),
                               frozenset(), max_batch=4)
    prompts = {"long": [5, 6, 7, 8], "one": [9, 10, 11], "mid": [12, 13, 14, 15, 16, 17],
               "next": [18, 19]}
    lengths = {"long": 100, "one": 1, "mid": 12, "next": 8}

    async def answer(handle, text: str = "") -> list[int]:
        while True:
            chunk = await handle.queue.get()
            text += chunk.text
            if chunk.finish_reason is not None:
                return [int(t) for t in re.findall(r"<(\d+)>", text)]

    def submit(name: str):
        sampling = SamplingParams(max_tokens=lengths[name], temperature=0.0, ignore_eos=True)
        return scheduler.submit(PreparedRequest(GenerationRequest(sampling, prompt=name),
                                                prompts[name], lengths[name]))

    async def scenario() -> dict[str, list[int]]:
        scheduler.start()
        first = submit("long")
        started = (await first.queue.get()).text  # it is decoding now
        joined = {name: submit(name) for name in ("one", "mid")}
        got = {name: await answer(handle) for name, handle in joined.items()}
        got["long"] = await answer(first, started)
        arena = backend._spare
        got["next"] = await answer(submit("next"))  # into the empty batch
        assert backend._spare is arena
        return got

    try:
        got = asyncio.run(scenario())
    finally:
        scheduler.stop()
    alone = _backend(gqa_lm, capacity=128)
    for name, prompt in prompts.items():
        expected = greedy_generate(alone, prompt, lengths[name], stop_at_eos=False)
        assert got[name] == expected, name
    assert scheduler.stats.max_rows == 2  # "mid" decoded beside "long"; "one" left at once


def test_an_empty_batch_keeps_its_arena_unless_it_grew_long(gqa_lm, monkeypatch):
    """The next batch reuses the last one's arena, but not one twice as long as it needs: the
    memory a burst of long answers took goes back once short chats follow."""
    from toolkit.runtime import onnx_shared_kv

    monkeypatch.setattr(onnx_shared_kv, "MIN_LENGTH", 8)
    backend = _backend(gqa_lm, capacity=64)
    state, _ = backend.prefill_into(None, [[5, 6, 7]])
    first = state.arena
    state, _ = backend.prefill_into(None, [[8, 9]])  # the batch emptied: same arena
    assert state.arena is first and first.length == 8
    for token in range(20):  # the answer grows the arena to 32 positions
        state, _ = backend.decode(state, np.array([token + 10]))
    assert state.arena.length == 32 and backend._spare is state.arena
    state, _ = backend.prefill_into(None, [[5, 6, 7]])  # needs 8: a new, short arena
    assert state.arena.length == 8 and backend._spare is state.arena
    short = state.arena
    state, logits = backend.prefill_into(None, [[11, 12]])  # over [5, 6, 7]'s stale row
    state, stepped = backend.decode(state, np.array([13]))
    assert state.arena is short
    alone = _backend(gqa_lm, capacity=64)
    solo, solo_logits = alone.prefill([[11, 12]])
    np.testing.assert_allclose(logits, solo_logits, atol=1e-4)
    np.testing.assert_allclose(stepped, alone.decode(solo, np.array([13]))[1], atol=1e-4)


def test_capacity_overflow_is_a_clear_error(gqa_lm):
    backend = _backend(gqa_lm, capacity=6)
    state, _ = backend.prefill([[5, 6, 7, 8, 9, 10]])
    with pytest.raises(ValueError, match="KV capacity 6"):
        backend.decode(state, np.array([11]))


def test_greedy_tokens_equal_the_optimum_graph_path(gqa_lm, tiny_onnx_dir, tokenizer):
    from toolkit.runtime.onnx_model import OnnxCausalLM
    from toolkit.runtime.onnx_steps import OrtStepBackend
    from toolkit.runtime.steps import greedy_generate

    old = OrtStepBackend(OnnxCausalLM.from_dir(tiny_onnx_dir, threads=1))
    new = _backend(gqa_lm)
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        assert greedy_generate(new, ids, 20, stop_at_eos=False) == \
            greedy_generate(old, ids, 20, stop_at_eos=False)


def test_gateway_serves_it_like_the_old_path(tiny_gqa_dir, tiny_onnx_dir):
    """Concurrent requests of different lengths get the optimum graph's answers, and a
    disconnected stream leaves the batch. (Whether the tiny model's requests overlap in one
    batch depends on timing, so joins and leaves are checked on the backend, deterministically,
    by the random join/leave test above.)"""
    lengths = [3, 12, 7, 16]
    with live_gateway(tiny_onnx_dir, engine="onnxruntime", model_name="tiny", threads=1) as live:
        before = [chat(live.base_url, p, max_tokens=n, temperature=0)["choices"][0]["message"]
                  for p, n in zip(PROMPTS, lengths)]
    with live_gateway(tiny_gqa_dir, engine="auto", model_name="tiny", threads=1) as live:
        assert live.app.state.gateway.info.engine == "onnxruntime"
        scheduler = live.app.state.gateway.engine.scheduler
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            now = list(pool.map(lambda a: chat(live.base_url, a[0], max_tokens=a[1],
                                               temperature=0), zip(PROMPTS, lengths)))
        assert [a["choices"][0]["message"] for a in now] == before
        engine = live.app.state.gateway.engine
        cache = engine.status()["prefix_cache"]  # what /ready shows
        assert cache["prompts"] == len(PROMPTS) and cache["blocks"] >= 1

        def reused(salt: str) -> int:
            """Tokens the prefix cache reused for one request sent with `salt`."""
            before = engine.status()["prefix_cache"]["tokens_reused"]
            chat(live.base_url, "la même longue question " * 8, max_tokens=2, cache_salt=salt)
            return engine.status()["prefix_cache"]["tokens_reused"] - before

        assert reused("tenant-a") == 0 and reused("tenant-b") == 0  # tenants share nothing
        assert reused("tenant-a") > 0
        # Prometheus sees the engine's totals at each scrape
        scraped = httpx.get(f"{live.base_url}/metrics").text
        hits = [line for line in scraped.splitlines()
                if line.startswith("toolkit_prefix_cache_hits_total{")]
        assert hits and float(hits[0].rsplit(" ", 1)[1]) == \
            engine.status()["prefix_cache"]["tokens_reused"] > 0

        def blocks_added(salt: str, max_tokens: int) -> int:
            before = engine.status()["prefix_cache"]["blocks"]
            chat(live.base_url, "une autre question " * 8, max_tokens=max_tokens,
                 ignore_eos=True, cache_salt=salt)
            return engine.status()["prefix_cache"]["blocks"] - before

        # a finished answer's blocks are kept for the chat's next turn: 40 tokens fill two
        assert blocks_added("answers", 40) - blocks_added("prompt-only", 1) >= 2
        check_disconnect_leaves_the_batch(live.base_url, scheduler)


def test_extend_feeds_several_tokens_like_steps_and_rewind_forgets_them(gqa_lm, tiny_gqa_dir,
                                                                       tmp_path):
    """Speculation's check: k tokens in one run give each position's logits of k steps, and
    after a rewind the next step sees only the tokens kept; rows of a batch feed different
    counts in one run, each as if alone (an export without per-row counts: one row only)."""
    backend = _backend(gqa_lm)
    prompt, fed = [5, 17, 230, 41, 9], [77, 301, 12, 450]
    state, _ = backend.prefill([prompt])
    stepped = []
    for token in fed:
        state, logits = backend.decode(state, np.array([token]))
        stepped.append(logits[0])
    state, _ = backend.prefill([prompt])
    state, together = backend.extend(state, np.array([fed]), np.array([4]))
    np.testing.assert_allclose(together[0], np.stack(stepped), atol=1e-4)
    state = backend.rewind(state, np.array([2]))  # keep 77, 301; then feed 99
    _, after = backend.decode(state, np.array([99]))
    solo, _ = backend.prefill([prompt + fed[:2]])
    _, expected = backend.decode(solo, np.array([99]))
    np.testing.assert_allclose(after, expected, atol=1e-4)
    # three rows, in a batch whose logical order differs from its physical one
    prompts = [prompt, [8, 8, 31, 7], prompt + [3, 3, 3]]
    batch, _ = backend.prefill(prompts)
    batch = backend.select(batch, [2, 0, 1])
    counts = np.array([1, 4, 2])
    tokens = np.array([[60, 0, 0, 0], fed, [44, 45, 0, 0]])
    batch, logits = backend.extend(batch, tokens, counts)
    batch = backend.rewind(batch, np.array([0, 1, 0]))
    _, next_logits = backend.decode(batch, np.array([1, 2, 3]))
    for row, source in enumerate([2, 0, 1]):
        alone, _ = backend.prefill([prompts[source]])
        alone, expected = backend.extend(alone, tokens[row:row + 1, :counts[row]],
                                         counts[row:row + 1])
        np.testing.assert_allclose(logits[row, :counts[row]], expected[0], atol=1e-4)
        alone = backend.rewind(alone, np.array([[0, 1, 0][row]]))
        _, expected = backend.decode(alone, np.array([row + 1]))
        np.testing.assert_allclose(next_logits[row], expected[0], atol=1e-4)
    old = _backend(_older_export(tiny_gqa_dir, tmp_path / "legacy"))
    assert backend.batch_extend and not old.batch_extend
    two, _ = old.prefill([prompt, prompt])
    with pytest.raises(ValueError, match="one row at a time"):
        old.extend(two, np.array([fed, fed]), np.array([4, 4]))
