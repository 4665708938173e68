"""`toolkit feedback export`: rated completions -> training examples (the JSONL schema).

Each kept completion becomes one `Example`:
- `instruction`: the last user message (chat) or the prompt (text completions); no `input`;
- `output`: the reviewer's `correction` when one was sent, else the model's answer;
- `language`: `detect_language` on instruction + output (fr/en);
- `category`: the request's `metadata.category` when it is one of protocol/training/incident,
  else `training`: feedback comes from staff using the assistant, and a question that nobody
  tagged is most often a training one; tag requests to get protocol or incident lines;
- `id`: `feedback-<completion id>`.
Only completions whose text was recorded (`--record-completions`) can be exported.

`min_rating` is one threshold for both scales: a value in 0..1 is a normalised score (1 keeps
thumbs-up and 5 stars only; 0.75 also keeps 4 stars), a value in (1, 5] is a star count
(4 keeps 4-5 stars and thumbs-up).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

from toolkit.data.schema import CATEGORIES, Example, write_examples
from toolkit.errors import DataError
from toolkit.feedback.postgres import is_postgres_url
from toolkit.feedback.store import FeedbackStore, RatedCompletion

DEFAULT_CATEGORY = "training"
_FRENCH = frozenset(
    ["le", "la", "les", "un", "une", "des", "du", "de", "et", "est", "sont", "pour", "avec", "dans", "sur", "pas", "que", "qui", "quoi", "comment", "quel", "quelle", "quels", "quelles", "ce", "cette", "ces", "au", "aux", "il", "elle", "ils", "elles", "nous", "vous", "je", "tu", "en", "ou", "où", "mais", "donc", "car", "leur", "leurs", "son", "sa", "ses", "mon", "ma", "mes", "doit", "faut", "patient", "patiente", "selon", "après", "avant", "lors", "être", "avoir", "fait", "faire", "très", "plus", "moins", "si"]
)
_ENGLISH = frozenset(
    ["the", "a", "an", "and", "is", "are", "for", "with", "in", "on", "not", "that", "which", "what", "how", "who", "this", "these", "those", "to", "of", "it", "they", "we", "you", "i", "or", "but", "so", "their", "his", "her", "my", "must", "should", "be", "have", "has", "do", "does", "after", "before", "during", "when", "if", "more", "less", "very"]
)
_ACCENTS = re.compile(r"[àâäçéèêëîïôöùûüÿœæ]", re.IGNORECASE)
_WORD = re.compile(r"[a-zàâäçéèêëîïôöùûüÿœæ']+", re.IGNORECASE)


def detect_language(text: str) -> str:
    """"fr" or "en" from stop words and accented letters (good enough for whole answers)."""
    words = [w.strip("'").lower() for w in _WORD.findall(text)]
    french = sum(w in _FRENCH for w in words) + 0.5 * len(_ACCENTS.findall(text))
    french += sum(1 for w in words if w.startswith(("l'", "d'", "qu'", "n'", "s'", "j'")))
    english = sum(w in _ENGLISH for w in words)
    return "fr" if french > english else "en"


def score_threshold(min_rating: float) -> float:
    """`min_rating` as a normalised 0..1 threshold (see the module docstring).

    Raises:
        DataError: a value below 0 or above 5.
    """
    if 0 <= min_rating <= 1:
        return float(min_rating)
    if 1 < min_rating <= 5:
        return (min_rating - 1) / 4
    raise DataError(f"--min-rating {min_rating}: use 0..1 (normalised score) or 1..5 (stars)")


def parse_since(since: str | None) -> float | None:
    """A date (YYYY-MM-DD, UTC) or ISO datetime as a UNIX time.

    Raises:
        DataError: the value is not an ISO date.
    """
    if since is None:
        return None
    try:
        moment = datetime.fromisoformat(since)
    except ValueError:
        raise DataError(f"--since {since!r}: expected a date such as 2025-01-31") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _instruction(rated: RatedCompletion) -> str:
    if isinstance(rated.prompt, str):
        return rated.prompt.strip()
    for message in reversed(rated.prompt or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return str(message.get("content") or "").strip()
    return ""


def to_example(rated: RatedCompletion) -> Example | None:
    """The training example of one rated completion (None when it has no usable text)."""
    instruction = _instruction(rated)
    output = (rated.correction or rated.answer or "").strip()
    if not instruction or not output:
        return None
    category = rated.metadata.get("category", "")
    return Example(
        id=f"feedback-{rated.completion_id}",
        language=detect_language(f"{instruction}\n{output}"),
        category=category if category in CATEGORIES else DEFAULT_CATEGORY,
        instruction=instruction,
        output=output,
    )


def export_feedback(db: Path | str | None, min_rating: float, since: str | None, out: Path) -> int:
    """Write the rated, recorded completions as training JSONL; returns the example count.

    Args:
        db: the feedback store: a SQLite file (default `$TOOLKIT_HOME/feedback.db`) or the
            `postgresql://` URL the gateway replicas share.
        min_rating: threshold (see the module docstring).
        since: only ratings given on or after this date.
        out: the JSONL to write (replaced atomically; passes `toolkit data validate` when
            non-empty).

    Raises:
        DataError: no SQLite file at `db`, or a bad threshold or date.
        StoreError: the PostgreSQL server cannot be reached.
    """
    from toolkit.model_source import toolkit_home

    location = db if db is not None else toolkit_home() / "feedback.db"
    if not is_postgres_url(location) and not Path(location).is_file():
        raise DataError(f"{location}: no feedback store; start `toolkit serve` (it creates it) "
                        "or pass --db")
    threshold = score_threshold(min_rating)
    store = FeedbackStore(location)
    try:
        rated = store.rated_completions(min_score01=threshold, since=parse_since(since))
    finally:
        store.close()
    examples = [e for e in (to_example(r) for r in rated) if e is not None]
    write_examples(examples, Path(out))
    return len(examples)
