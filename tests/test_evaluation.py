"""`measure_speed`, the tok/s every export report prints: one slow run must not be the figure."""

from __future__ import annotations

import time

from toolkit.evaluation import measure_speed


def test_speed_is_the_median_run_after_a_warm_up() -> None:
    pauses = iter([0.0, 0.02, 0.4, 0.02])  # warm-up, then a run stalled by a neighbour
    calls: list[int] = []

    def generate(ids: list[int], new_tokens: int) -> int:
        calls.append(new_tokens)
        time.sleep(next(pauses))
        return new_tokens

    speed = measure_speed(generate, [1, 2, 3], new_tokens=8, threads=1, repeats=3)
    assert calls == [2, 8, 8, 8]
    assert speed.new_tokens == 8 and 0.02 <= speed.seconds < 0.4
    assert speed.tokens_per_s == 8 / speed.seconds
