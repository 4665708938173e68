"""Model cards for the folders toolkit writes (the trained adapter and every export).

The Hub, `huggingface_hub.ModelCard` and model pickers read a README's YAML front matter:
base model, languages, licence, library, pipeline and tags. Cards are assembled from
`ModelCardData` and parsed back through `ModelCard` before they are written, so a malformed
card fails when it is written, not when someone uploads the folder.

A fine-tune inherits its base model's licence: Llama 2 and Code Llama weights stay under
Meta's community licence (acceptable-use policy, user-count clause), DeepSeek-Coder under the
DeepSeek model licence. Each card therefore records the base's licence id and says what it
implies; an unknown base gets "other" and a sentence telling the reader to check its terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from toolkit.model_source import ResolvedModel

LANGUAGES = ["fr", "en"]
PIPELINE_TAG = "text-generation"
COMMON_TAGS = ("toolkit", "lora", "medical", "hospital", "bilingual")
#: licence ids the cards may carry (Hub ids); anything else is a bug in `KNOWN_BASES`
HUB_LICENSES = frozenset({"apache-2.0", "llama2", "other"})

INTENDED_USE = (
    "## Intended use and limits",
    "",
    ("- A bilingual (French/English) assistant for hospital staff: protocols, training "
    "questions, incident procedures. It drafts answers; it does not decide."),
    ("- Fine-tuned and evaluated on the project's **synthetic sample data**, not on real "
    "clinical records: the scores below say how faithfully this folder reproduces the "
    "fine-tune, not that its answers are clinically correct."),
    ("- Every answer that touches patient care must be reviewed by a clinician before it is "
    "acted on. Not a medical device; not for diagnosis, dosing or triage decisions."),
    "- Do not send identifiable patient data to a deployment that has not been approved for it.",
)


@dataclass(frozen=True)
class License:
    """A base model's licence as the Hub records it.

    Attributes:
        id: the Hub licence id (`license:` in the front matter).
        name: `license_name` for licences the Hub has no id for (id "other").
        link: where the terms are (`license_link`).
        note: what it means for this fine-tune, one sentence for the card.
    """

    id: str
    name: str | None
    link: str | None
    note: str


_LLAMA2 = License(
    "llama2", None, "https://ai.meta.com/llama/license/",
    "Derived from a Llama 2 family model: Meta's Llama 2 Community License and its "
    "Acceptable Use Policy apply to this model and to anything built with it.")
_APACHE = License("apache-2.0", None, None,
                  "Apache 2.0, inherited from the base model; keep its NOTICE and attribution.")
#: (substring of the lower-cased source, licence); the first match wins, so Code Llama
#: is tested before Llama 2 and the specific names before the generic ones
KNOWN_BASES: tuple[tuple[str, License], ...] = (
    ("codellama", _LLAMA2),
    ("code-llama", _LLAMA2),
    ("llama-2", _LLAMA2),
    ("llama2", _LLAMA2),
    ("mistral", _APACHE),
    ("deepseek-coder", License(
        "other", "deepseek", "https://github.com/deepseek-ai/DeepSeek-Coder/blob/main/LICENSE-MODEL",
        "Derived from DeepSeek-Coder: the DeepSeek License Agreement (use-based restrictions) "
        "applies to this model.")),
    ("smollm2", _APACHE),
)
UNKNOWN_LICENSE = License(
    "other", "unknown", None,
    "toolkit does not know this base model's licence: check the base's terms before sharing "
    "or deploying this model, they apply to it.")


def base_license(base: ResolvedModel) -> License:
    """The licence a fine-tune of `base` carries (see `KNOWN_BASES`)."""
    names = " ".join(n.lower() for n in (base.source, base.hub_id or "", base.path.name))
    for needle, license_ in KNOWN_BASES:
        if needle in names:
            return license_
    return UNKNOWN_LICENSE


def card_base_model(base: ResolvedModel) -> str:
    """`base_model` for the front matter: the hub id when there is one, else the portable id."""
    return base.hub_id or base.portable


def render_card(base: ResolvedModel, library_name: str, tags: list[str], body: list[str],
                **extra: Any) -> str:
    """Front matter + `body`, checked by parsing it back with `huggingface_hub.ModelCard`.

    Raises:
        ValueError: a licence id outside `HUB_LICENSES`, or front matter `ModelCard`
            rejects.
    """
    from huggingface_hub import ModelCard, ModelCardData

    license_ = base_license(base)
    if license_.id not in HUB_LICENSES:
        raise ValueError(f"licence id {license_.id!r} is not one of {sorted(HUB_LICENSES)}")
    data = ModelCardData(
        base_model=card_base_model(base), language=list(LANGUAGES), license=license_.id,
        license_name=license_.name if license_.id == "other" else None,
        license_link=license_.link, library_name=library_name, pipeline_tag=PIPELINE_TAG,
        tags=list(dict.fromkeys([*COMMON_TAGS, *tags])), **extra,
    )
    licence_section = ["", "## Licence", "", f"`{license_.id}`"
                       + (f" ({license_.name})" if license_.id == "other" else "")
                       + f": {license_.note}" + (f" Terms: {license_.link}" if license_.link else "")]
    text = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join([*body, *licence_section, ""])
    return str(ModelCard(text))
