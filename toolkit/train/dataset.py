"""Training rows: encoded examples, packing, and the collator that turns rows into batches.

Two layouts share one collator:

- unpacked: one example per row, padded to the longest row of the batch (dynamic padding),
  with an attention mask;
- packed: several examples per row, up to `max_seq_len` tokens. Position ids restart at 0
  for each example and no attention mask is passed, which is how transformers 5 recognises
  packed rows (`masking_utils.find_packed_sequence_indices`) and builds a block-diagonal
  causal mask: an example never attends to its neighbours. The pad tail of a row is one
  more "sequence" with its own positions and no labels.

A label is never set on the first token of an example (it is a prompt token), so the
shifted loss never asks one example to predict the next example's first token.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.data.prompts import IGNORE_INDEX, EncodedExample, encode_examples
from toolkit.data.schema import Example, load_examples
from toolkit.errors import DataError


@dataclass
class EncodedSplit:
    """A data file encoded for training or evaluation, with what truncation did to it."""

    path: Path
    examples: list[EncodedExample]
    truncated: int = 0
    #: truncated so far that no answer token was left; left out of training
    dropped: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        """Tokens in the split (after truncation)."""
        return sum(len(e.input_ids) for e in self.examples)


def load_split(path: Path, role: str) -> list[Example]:
    """Load a data file that must exist, be non-empty and pass `toolkit data validate`.

    Raises:
        DataError: one line naming the file and the problem.
    """
    if not path.is_file():
        raise DataError(f"{path}: no such {role} data file (data.{role} in the config)")
    if path.stat().st_size == 0 or not path.read_text(encoding="utf-8").strip():
        raise DataError(f"{path}: {role} data file is empty: add one JSON example per line")
    return load_examples(path)


def encode_split(
    tokenizer: Any, path: Path, examples: list[Example], system_prompt: str | None,
    max_seq_len: int,
) -> EncodedSplit:
    """Encode examples; count the truncated ones and set aside those left with no answer."""
    encoded = encode_examples(tokenizer, examples, system_prompt, max_seq_len)
    kept = [e for e in encoded if e.response_tokens > 0]
    dropped = [e.example.id for e in encoded if e.response_tokens == 0]
    return EncodedSplit(
        path=path, examples=kept, truncated=sum(e.truncated for e in encoded), dropped=dropped
    )


@dataclass(frozen=True)
class Row:
    """One training row: the examples it holds, in order."""

    segments: tuple[EncodedExample, ...]

    @property
    def length(self) -> int:
        """Tokens in the row (before padding)."""
        return sum(len(s.input_ids) for s in self.segments)


def pack_rows(examples: Sequence[EncodedExample], max_seq_len: int, seed: int) -> list[Row]:
    """First-fit packing of the examples (in a seeded random order) into rows.

    Seeded so every process of a data-parallel run builds the same rows; the trainer's
    sampler then shuffles whole rows each epoch.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    bins: list[list[EncodedExample]] = []
    room: list[int] = []
    for index in order:
        item = examples[index]
        size = len(item.input_ids)
        for b, free in enumerate(room):
            if size <= free:
                bins[b].append(item)
                room[b] -= size
                break
        else:
            bins.append([item])
            room.append(max_seq_len - size)
    return [Row(tuple(b)) for b in bins]


def unpacked_rows(examples: Sequence[EncodedExample]) -> list[Row]:
    """One example per row."""
    return [Row((e,)) for e in examples]


class RowDataset:
    """A map-style dataset over rows (what `Trainer`'s sampler indexes)."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Row:
        return self.rows[index]


@dataclass
class RowCollator:
    """Pad rows to the longest one of the batch; packed rows get per-example position ids.

    `num_tokens` (non-pad tokens in the batch) rides along for the throughput meter; the
    trainer removes it before the forward pass.
    """

    pad_token_id: int
    packed: bool

    def __call__(self, rows: list[Row]) -> dict[str, Any]:
        import torch

        width = max(row.length for row in rows)
        input_ids, labels, positions, masks = [], [], [], []
        for row in rows:
            ids: list[int] = []
            labs: list[int] = []
            pos: list[int] = []
            for segment in row.segments:
                ids.extend(segment.input_ids)
                labs.extend(segment.labels)
                pos.extend(range(len(segment.input_ids)))
            pad = width - len(ids)
            masks.append([1] * len(ids) + [0] * pad)
            input_ids.append(ids + [self.pad_token_id] * pad)
            labels.append(labs + [IGNORE_INDEX] * pad)
            positions.append(pos + list(range(pad)))
        batch: dict[str, Any] = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "num_tokens": torch.tensor(sum(row.length for row in rows), dtype=torch.long),
        }
        if self.packed:
            batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
        else:
            batch["attention_mask"] = torch.tensor(masks, dtype=torch.long)
        return batch


def padding_waste(rows: Sequence[Row], batch_size: int) -> float:
    """Share of pad tokens if rows were batched in order (a rough figure for reports)."""
    total = padded = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(r.length for r in chunk)
        total += sum(r.length for r in chunk)
        padded += width * len(chunk)
    return 1.0 - total / padded if padded else 0.0
