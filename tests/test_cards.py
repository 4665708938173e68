"""Model card metadata: the licence each known base carries and the front matter checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.cards import HUB_LICENSES, UNKNOWN_LICENSE, base_license, render_card
from toolkit.model_source import ResolvedModel


def _base(source: str, kind: str = "hub") -> ResolvedModel:
    return ResolvedModel(source, Path("/cache") / source.replace("/", "--"), None, kind)


@pytest.mark.parametrize(("source", "license_id"), [
    ("mistralai/Mistral-7B-Instruct-v0.2", "apache-2.0"),
    ("meta-llama/Llama-2-7b-chat-hf", "llama2"),
    ("codellama/CodeLlama-7b-Instruct-hf", "llama2"),
    ("deepseek-ai/deepseek-coder-1.3b-instruct", "other"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    ("embedded:smollm2-135m", "apache-2.0"),
    ("someone/private-model", "other"),
])
def test_known_bases_carry_their_licence(source: str, license_id: str) -> None:
    kind = "embedded" if source.startswith("embedded:") else "hub"
    license_ = base_license(_base(source, kind))
    assert license_.id == license_id and license_.id in HUB_LICENSES
    if license_.id == "other":
        assert license_.name  # the Hub needs a name for "other"
    if source.startswith("deepseek"):
        assert license_.name == "deepseek" and license_.link
    if "private" in source:
        assert license_ is UNKNOWN_LICENSE and "check the base's terms" in license_.note


def test_rendered_card_front_matter_parses_back() -> None:
    from huggingface_hub import ModelCard

    text = render_card(_base("meta-llama/Llama-2-7b-chat-hf"), "transformers", ["gptq"],
                       ["# demo", "", "body"])
    card = ModelCard(text)
    assert card.data.base_model == "meta-llama/Llama-2-7b-chat-hf"
    assert card.data.license == "llama2" and "gptq" in card.data.tags
    assert "Llama 2 Community License" in card.text


def test_portable_ids() -> None:
    embedded = _base("embedded:smollm2-135m", "embedded")
    assert embedded.portable == "embedded:smollm2-135m"
    assert embedded.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    local = ResolvedModel("../models/x", Path("/srv/models/x"), None, "local")
    assert local.portable == "/srv/models/x" and local.hub_id is None
