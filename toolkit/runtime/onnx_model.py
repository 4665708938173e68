"""ONNX Runtime causal LM over an ONNX export: full-sequence logits and batched decoding.

The main venv needs only `onnxruntime` to verify, score and serve an ONNX export; optimum (and
its transformers 4.x) stays in the exporter venv. Two graph layouts share the names
`input_ids`, `attention_mask`, `past_key_values.{i}.key/value` in and `logits`,
`present.{i}.key/value` out:
- optimum's (`export_onnx`): `position_ids` too, left padding, and each present is a new
  `Concat(past, new)`;
- onnxruntime-genai's model builder (a `genai_config.json` beside it with
  `past_present_share_buffer`): fused `GroupQueryAttention`, right padding (the mask only
  gives each row's length), and past/present may be one buffer updated in place. Serving drives
  it with `onnx_shared_kv.SharedKvStepBackend`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import ModelSourceError
from toolkit.runtime.integer_weights import EXTERNAL_DATA_FOLDER, graph_for_this_cpu

log = logging.getLogger("toolkit.runtime")
ONNX_FILE = "model.onnx"
#: written by onnxruntime-genai's model builder beside its graph
GENAI_CONFIG = "genai_config.json"
_PAST_INPUT = re.compile(r"past_key_values\.(\d+)\.(key|value)")
_ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}

#: (sequence index in the batch, tokens generated so far for it) -> stop this sequence now
StopFn = Callable[[int, list[int]], bool]


@dataclass(frozen=True)
class DecodeStep:
    """What one decoding step produced for every sequence of the batch, in prompt order.

    Attributes:
        index: 0 for the first new token, then 1, 2...
        tokens: the new token of each sequence, or None for a sequence that finished on an
            earlier step. The EOS token that ends a sequence is included (as transformers'
            `generate` does); a server drops it when decoding with `skip_special_tokens`.
        finish_reasons: "stop" (EOS or `stop_fn`) or "length" (`max_new_tokens`) on the step
            where that sequence ends, else None.
    """

    index: int
    tokens: list[int | None]
    finish_reasons: list[str | None]


#: input of a builder graph that says which positions get logits (batch, k): serving asks for one
#: per row (prefill: the prompt's last token), scoring for all (`export.onnx_genai`)
LOGIT_POSITIONS = "logits_positions"
#: input of a builder graph giving each row's count of new tokens (batch,), int32: rows of one
#: run may then feed different numbers of tokens after their caches (right-padded), which
#: GroupQueryAttention otherwise allows one row at a time (`export.onnx_genai`)
QUERY_LENGTHS = "query_seqlens"


class OnnxCausalLM:
    """A decoder exported with past key values, run by one ONNX Runtime session.

    The cache layout (layers, KV heads, head dim, dtype) is read from the graph's own input
    shapes rather than config.json, so it cannot disagree with the graph it feeds (the
    builder leaves the head dim symbolic: its `genai_config.json` gives it).

    Attributes:
        is_shared_kv: a builder graph (see the module docstring): right padding, in-place KV.
    """

    def __init__(self, session: Any, path: Path) -> None:
        self.session = session
        self.path = path
        inputs = {i.name: i for i in session.get_inputs()}
        layers = sorted({int(m.group(1)) for n in inputs if (m := _PAST_INPUT.fullmatch(n))})
        if not layers:
            raise ModelSourceError(
                f"{path}: the ONNX model has no past_key_values inputs; re-export it with "
                "`toolkit export --quantize onnx` (task text-generation-with-past)"
            )
        first = inputs["past_key_values.0.key"]
        genai = _genai_decoder(path)
        self.is_shared_kv = bool(genai.get("past_present_share_buffer"))
        self.num_layers = len(layers)
        self.num_kv_heads = int(first.shape[1])
        self.head_dim = int(first.shape[3]) if isinstance(first.shape[3], int) \
            else int(genai["head_size"])
        vocab = next(o for o in session.get_outputs() if o.name == "logits").shape[-1]
        self.vocab_size = vocab if isinstance(vocab, int) else int(genai["vocab_size"])
        #: positions the graph supports (the builder's rotary cache length), when it says
        self.context_length: int | None = genai.get("context_length")
        self._kv_dtype = _ORT_FLOAT_TYPES[first.type]
        self._past_names = [f"past_key_values.{i}.{kind}" for i in layers for kind in ("key", "value")]
        self._present_names = [n.replace("past_key_values", "present") for n in self._past_names]
        self._has_position_ids = "position_ids" in inputs
        #: the graph computes logits only where asked (graphs exported before it: everywhere)
        self.has_logit_positions = LOGIT_POSITIONS in inputs
        #: rows of one run may feed different numbers of tokens after their caches
        self.has_query_lengths = QUERY_LENGTHS in inputs

    @classmethod
    def from_dir(cls, path: Path, threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> OnnxCausalLM:
        """Open `path/model.onnx` (its external data file is found next to it).

        Args:
            path: an export folder written by `export_onnx` or `quantize_onnx_int8`.
            threads: intra-op threads; None lets ONNX Runtime use every physical core. Pin it
                in benchmarks: on shared cores more threads can be slower.
            providers: ONNX Runtime execution providers, in order of preference.

        Raises:
            ModelSourceError: the folder holds no ONNX export with a KV cache.
            MissingExtraError: onnxruntime is not installed.
        """
        from toolkit.extras import require

        require("onnxruntime", "the ONNX Runtime engine")
        import onnxruntime as ort

        path = Path(path)
        if not (path / ONNX_FILE).is_file():
            raise ModelSourceError(
                f"{path}: no {ONNX_FILE}; export one with `toolkit export --quantize onnx`"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.inter_op_num_threads = 1
        if threads is not None:
            options.intra_op_num_threads = threads
        # the sign is measured on MLAS, ONNX Runtime's CPU kernels: other providers keep the graph
        cpu_only = list(providers) == ["CPUExecutionProvider"]
        retyped = graph_for_this_cpu(path / ONNX_FILE) if cpu_only else None
        if retyped is None:
            session = ort.InferenceSession(str(path / ONNX_FILE), options,
                                           providers=list(providers))
        else:
            options.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(path))
            session = ort.InferenceSession(retyped.graph, options, providers=list(providers))
            log.info("%s: %d integer GEMM(s) get %s weights, the sign this CPU multiplies "
                     "exactly and fastest (toolkit.runtime.integer_weights)", path,
                     retyped.gemms, retyped.sign)
        return cls(session, path)

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Logits for every position of a batch, without cache: what verification compares.

        Args:
            input_ids: int64 array (batch, seq).
            attention_mask: 1 for real tokens, 0 for (left) padding; None means all ones, which
                makes this method an `evaluation.LogitsFn`.

        Returns:
            float32 array (batch, seq, vocab).
        """
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        if self.is_shared_kv and not mask.all():
            raise ValueError(f"{self.path}: this GroupQueryAttention graph reads row lengths, not "
                             "left padding; score rows of equal length (attention_mask=None)")
        feed = self._feed(ids, mask, _positions(mask), self._empty_past(len(ids)))
        (logits,) = self.session.run(["logits"], feed)
        return logits.astype(np.float32, copy=False)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        eos_token_ids: Iterable[int] = (),
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_fn: StopFn | None = None,
    ) -> Iterator[DecodeStep]:
        """Decode a batch of prompts together, yielding each step so a server can stream.

        Prompts are left-padded into one batch and share one KV cache; a sequence that ends
        (EOS, `stop_fn` or length) is dropped from the batch so the others run faster. Closing
        the generator early (a client disconnect) stops all work.

        Args:
            prompts: token ids of each prompt (lengths may differ; none empty).
            max_new_tokens: upper bound of new tokens per sequence (>= 1).
            eos_token_ids: tokens that end a sequence (it is still yielded).
            temperature: 0 decodes greedily (argmax); above 0 samples from softmax(logits / T).
            top_p: nucleus sampling: sample among the most likely tokens whose probabilities
                sum to `top_p`; 1.0 disables it. Ignored when greedy.
            seed: seed of the sampling generator, for reproducible samples.
            stop_fn: called after each new token with (sequence index, its tokens so far);
                True ends that sequence with finish reason "stop" (stop strings, cancel).

        Yields:
            One `DecodeStep` per step until every sequence has finished.
        """
        _check_decode_args(prompts, max_new_tokens, temperature, top_p)
        if self.is_shared_kv:
            raise ValueError(f"{self.path}: a GroupQueryAttention graph decodes through "
                             "onnx_steps.step_backend (shared KV buffers), not generate()")
        ids, mask = left_pad(prompts)
        positions = _positions(mask)
        past = self._empty_past(len(prompts))
        eos = frozenset(eos_token_ids)
        rng = np.random.default_rng(seed)
        active = list(range(len(prompts)))  # batch row -> prompt index
        generated: list[list[int]] = [[] for _ in prompts]
        for step in range(max_new_tokens):
            outputs = self.session.run(["logits", *self._present_names],
                                       self._feed(ids, mask, positions, past))
            past = outputs[1:]
            chosen = _pick(outputs[0][:, -1], temperature, top_p, rng)
            tokens: list[int | None] = [None] * len(prompts)
            reasons: list[str | None] = [None] * len(prompts)
            keep: list[int] = []
            for row, seq in enumerate(active):
                token = int(chosen[row])
                generated[seq].append(token)
                tokens[seq] = token
                if token in eos or (stop_fn is not None and stop_fn(seq, generated[seq])):
                    reasons[seq] = "stop"
                elif step == max_new_tokens - 1:
                    reasons[seq] = "length"
                else:
                    keep.append(row)
            yield DecodeStep(step, tokens, reasons)
            if not keep:
                return
            if len(keep) < len(active):
                rows = np.asarray(keep)
                past = [p[rows] for p in past]
                mask, positions, chosen = mask[rows], positions[rows], chosen[rows]
                active = [active[r] for r in keep]
            ids = chosen[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((len(active), 1), dtype=np.int64)], axis=1)
            positions = positions[:, -1:] + 1

    def generate_all(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     **kwargs: Any) -> list[list[int]]:
        """Run `generate` to the end and return the new tokens of each prompt (no streaming)."""
        out: list[list[int]] = [[] for _ in prompts]
        for step in self.generate(prompts, max_new_tokens, **kwargs):
            for seq, token in enumerate(step.tokens):
                if token is not None:
                    out[seq].append(token)
        return out

    def _empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=self._kv_dtype) for _ in self._past_names]

    def _feed(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
              past: list[np.ndarray]) -> dict[str, np.ndarray]:
        feed = {"input_ids": ids, "attention_mask": mask, **dict(zip(self._past_names, past))}
        if self._has_position_ids:
            feed["position_ids"] = positions
        if self.has_logit_positions:  # every position: what scoring and verification compare
            feed[LOGIT_POSITIONS] = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
        if self.has_query_lengths:  # scoring feeds whole rows (no cache): every token is new
            feed[QUERY_LENGTHS] = default_query_lengths(ids.shape[1], mask.sum(axis=1))
        return feed


def default_query_lengths(width: int, lengths: np.ndarray) -> np.ndarray:
    """`QUERY_LENGTHS` as GroupQueryAttention assumes it when not given: each row's whole
    `width` new tokens, or fewer where the row holds fewer tokens (`lengths`) in all."""
    return np.minimum(width, lengths).astype(np.int32)


def _genai_decoder(path: Path) -> dict[str, Any]:
    """The builder's decoder settings (`model.decoder` + `past_present_share_buffer`), or {}."""
    file = Path(path) / GENAI_CONFIG
    if not file.is_file():
        return {}
    config = json.loads(file.read_text(encoding="utf-8"))
    model = config.get("model", {})
    return {**model.get("decoder", {}), "vocab_size": model.get("vocab_size"),
            "context_length": model.get("context_length"),
            "past_present_share_buffer": config.get("search", {}).get("past_present_share_buffer")}


def left_pad(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad prompts into one batch (ids, attention mask) so every row ends at the last column."""
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def _positions(mask: np.ndarray) -> np.ndarray:
    """Position ids that restart at 0 after left padding (pads get 0, as they are masked)."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)


def _check_decode_args(prompts: Sequence[Sequence[int]], max_new_tokens: int,
                       temperature: float, top_p: float) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _pick(logits: np.ndarray, temperature: float, top_p: float,
          rng: np.random.Generator) -> np.ndarray:
    """Next token per row: argmax when greedy, else a temperature/top-p sample."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    order = np.argsort(-probs, axis=-1)
    ranked = np.take_along_axis(probs, order, axis=-1)
    cumulative = np.cumsum(ranked, axis=-1)
    ranked = np.where(cumulative - ranked < top_p, ranked, 0.0)  # always keeps the top token
    cumulative = np.cumsum(ranked, axis=-1)
    draws = rng.random(len(logits)) * cumulative[:, -1]
    picked = (cumulative > draws[:, None]).argmax(axis=-1)
    return order[np.arange(len(logits)), picked]
