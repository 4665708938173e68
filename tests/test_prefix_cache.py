"""The prompt-prefix KV cache: block matching, LRU eviction within its byte budget, and the
in-place KV backend giving the same logits and tokens with it as without it."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.runtime.prefix_cache import PrefixCache

BLOCK = 4


def _reader(tokens: list[int]):
    """KV arrays that encode their tokens, so a test sees which positions were cached."""
    def read(start: int, stop: int) -> list[np.ndarray]:
        values = np.asarray(tokens[start:stop], dtype=np.float32)
        return [np.broadcast_to(values[None, :, None], (1, stop - start, 2)).copy()]
    return read


def _store(cache: PrefixCache, tokens: list[int]) -> None:
    cache.store(tokens, _reader(tokens))


def _matched(cache: PrefixCache, tokens: list[int]) -> list[float]:
    return [float(v) for block in cache.match(tokens) for v in block.kv[0][0, :, 0]]


def test_a_prompt_reuses_the_full_blocks_of_a_common_start_and_runs_its_last_token():
    cache = PrefixCache(1 << 20, block=BLOCK)
    _store(cache, list(range(10)))  # blocks [0..3], [4..7]; 8, 9 are not a full block
    assert cache.stats.blocks == 2
    assert _matched(cache, list(range(8)) + [99]) == list(range(8))
    # the whole of a prompt is never reused: its last token must run to give logits
    assert _matched(cache, list(range(8))) == list(range(4))
    assert _matched(cache, [0, 1, 2, 3, 4, 5, 6, 99, 8]) == [0, 1, 2, 3]  # differs in block 2
    assert _matched(cache, [1, 1, 2, 3, 4, 5, 6, 7, 8]) == []  # differs in block 1
    # block 2 is keyed by its parent: the same tokens after another start do not match
    _store(cache, [9, 9, 9, 9, 4, 5, 6, 7])
    assert _matched(cache, [9, 9, 9, 9, 4, 5, 6, 7, 1]) == [9, 9, 9, 9, 4, 5, 6, 7]
    assert cache.stats.blocks == 4
    assert cache.stats.prompts == 5 and cache.stats.prompts_hit == 4
    assert cache.stats.tokens_reused == 8 + 4 + 4 + 8
    # a look at a prompt's first block changes no counter
    assert cache.holds([0, 1, 2, 3, 77]) and cache.holds([9, 9, 9, 9])
    assert not cache.holds([0, 1, 2, 4, 5]) and not cache.holds([0, 1, 2, 3], "tenant")
    assert cache.stats.prompts == 5


def test_a_salt_scopes_reuse_to_the_prompts_stored_under_it():
    cache = PrefixCache(1 << 20, block=BLOCK)
    tokens = list(range(9))
    cache.store(tokens, _reader(tokens), salt="tenant-a")
    assert _matched(cache, tokens) == []  # unsalted prompts do not see tenant-a's blocks
    assert cache.match(tokens, salt="tenant-b") == []
    assert [int(v) for b in cache.match(tokens, salt="tenant-a") for v in b.kv[0][0, :, 0]] == \
        list(range(8))
    _store(cache, tokens)  # the same tokens unsalted: blocks of their own
    assert cache.stats.blocks == 4 and _matched(cache, tokens) == list(range(8))


def test_eviction_keeps_the_budget_and_drops_children_before_their_parents():
    block_bytes = BLOCK * 2 * 4  # (1, BLOCK, 2) float32
    cache = PrefixCache(3 * block_bytes, block=BLOCK)
    _store(cache, list(range(12)))  # a chain of three blocks fills the budget
    _store(cache, [7] * 4 + [100])  # a fourth block: the deepest of the chain goes
    assert cache.stats.blocks == 3 and cache.stats.bytes == 3 * block_bytes
    assert cache.stats.evicted == 1
    assert _matched(cache, list(range(12)) + [1]) == list(range(8))
    assert _matched(cache, [7] * 4 + [1]) == [7] * 4


def test_a_prompt_longer_than_the_budget_keeps_its_first_blocks_within_it():
    block_bytes = BLOCK * 2 * 4
    cache = PrefixCache(3 * block_bytes, block=BLOCK)
    _store(cache, [9] * 8)  # two blocks of an older prompt
    peak = 0

    def read(start: int, stop: int) -> list[np.ndarray]:
        nonlocal peak
        peak = max(peak, cache.stats.bytes)
        return _reader(list(range(40)))(start, stop)

    cache.store(list(range(40)), read)  # ten blocks for a budget of three
    assert max(peak, cache.stats.bytes) <= 3 * block_bytes
    assert _matched(cache, list(range(40))) == list(range(12))  # its start, not its end
    assert _matched(cache, [9] * 9) == []  # the older prompt made room


def test_a_block_over_the_budget_is_not_kept():
    cache = PrefixCache(8, block=BLOCK)
    _store(cache, list(range(8)))
    assert cache.stats.blocks == 0 and cache.stats.bytes == 0
    with pytest.raises(ValueError, match="positive"):
        PrefixCache(0)


def test_backend_with_the_cache_gives_the_logits_and_tokens_of_whole_prefills(tiny_gqa_fp32):
    """Warm and cold prompts in one prefill, rows then decoded together: every row's logits are
    those of the backend without a cache, and the cache says what it reused."""
    from toolkit.runtime.onnx_model import OnnxCausalLM
    from toolkit.runtime.onnx_steps import step_backend

    lm = OnnxCausalLM.from_dir(tiny_gqa_fp32, threads=1)
    plain = step_backend(lm, 128)
    cached = step_backend(lm, 128, prefix_cache_bytes=1 << 20)
    assert plain.prefix_cache is None and cached.prefix_cache is not None
    rng = np.random.default_rng(3)
    system = rng.integers(4, 500, 37).tolist()  # two full blocks of 16, and 5 tokens
    first = [system + rng.integers(4, 500, n).tolist() for n in (3, 9)]
    _, logits = cached.prefill(first)
    np.testing.assert_allclose(logits, plain.prefill(first)[1], atol=1e-4)
    assert cached.prefix_cache.stats.blocks == 2  # both prompts share blocks 1 and 2
    # the second prompt starts like the first: it waited for the first's blocks, then used them
    assert cached.prefix_cache.stats.tokens_reused == 32
    later = [system + rng.integers(4, 500, 6).tolist(),  # warm: 32 tokens reused
             rng.integers(4, 500, 20).tolist(),  # cold
             system[:20],  # warm, one block
             first[1]]  # warm, its two full blocks (46 tokens)
    state, logits = cached.prefill(later)
    ref_state, ref = plain.prefill(later)
    np.testing.assert_allclose(logits, ref, atol=1e-4)
    assert cached.prefix_cache.stats.tokens_reused == 32 + 32 + 16 + 32
    fed: list[list[int]] = [[] for _ in later]
    for _ in range(18):
        tokens = ref.argmax(-1)
        assert (logits.argmax(-1) == tokens).all()
        state, logits = cached.decode(state, tokens)
        ref_state, ref = plain.decode(ref_state, tokens)
        np.testing.assert_allclose(logits, ref, atol=1e-4)
        for row, token in enumerate(tokens):
            fed[row].append(int(token))
    # a finished row's answer is kept too: the next turn of its chat reuses prompt and answer
    chosen = int(ref.argmax(-1)[1])  # chosen but never fed: it has no keys and values yet
    cached.retain(state, [1], [later[1] + fed[1] + [chosen]], [None])
    turn = later[1] + fed[1] + rng.integers(4, 500, 5).tolist()  # 20 + 18 + 5 tokens
    reused = cached.prefix_cache.stats.tokens_reused
    _, logits = cached.prefill([turn])
    assert cached.prefix_cache.stats.tokens_reused - reused == 32  # two blocks, answer included
    np.testing.assert_allclose(logits, plain.prefill([turn])[1], atol=1e-4)
    # a salt keeps a prompt off blocks cached without it, and its logits the same
    reused = cached.prefix_cache.stats.tokens_reused
    _, logits = cached.prefill(later[:1], ["tenant-a"])
    assert cached.prefix_cache.stats.tokens_reused == reused
    np.testing.assert_allclose(logits, plain.prefill(later[:1])[1], atol=1e-4)
