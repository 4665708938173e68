"""Render examples with the model's chat template and mask everything but the answer.

The loss covers the response tokens only: the prompt (system + user turn + the assistant
header) is labelled -100. Prompt and answer are tokenized separately, exactly as the model
sees them at inference (prompt tokens, then generated tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from toolkit.data.schema import Example
from toolkit.errors import ToolkitError

IGNORE_INDEX = -100

#: Used when a base checkpoint ships no chat template (Mistral-7B-v0.1, Llama-2 base): a
#: ChatML layout, saved with the adapter so export and serve render prompts the same way.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class EncodedExample:
    """Token ids and labels of one example; `truncated` says max_seq_len cut it."""

    example: Example
    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    truncated: bool

    @property
    def response_tokens(self) -> int:
        """Tokens that carry loss."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def user_message(example: Example) -> str:
    """The user turn: the instruction, then the optional context."""
    return f"{example.instruction}\n\n{example.input}" if example.input else example.instruction


def chat_messages(example: Example, system_prompt: str | None) -> list[dict[str, str]]:
    """Messages for the prompt part of an example (no assistant turn)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": user_message(example)})
    return messages


def ensure_chat_template(tokenizer: Any) -> bool:
    """Give a template-less tokenizer the default one; returns True when it was added."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text up to and including the assistant header."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_example(
    tokenizer: Any, example: Example, system_prompt: str | None, max_seq_len: int
) -> EncodedExample:
    """Tokenize one example into input ids and response-only labels.

    Raises:
        ToolkitError: the chat template does not render the prompt as a prefix of the
            full conversation, so the answer cannot be located.
    """
    messages = chat_messages(example, system_prompt)
    prompt_text = render_prompt(tokenizer, messages)
    full_text = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": example.output}], tokenize=False
    )
    if not full_text.startswith(prompt_text):
        raise ToolkitError(
            "the tokenizer's chat template does not render the prompt as a prefix of the "
            "conversation; set a standard template (e.g. remove the tokenizer's chat_template "
            "to use the toolkit default)"
        )
    response_text = full_text[len(prompt_text):]
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in response_ids:
        response_ids = response_ids + [tokenizer.eos_token_id]
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    truncated = len(input_ids) > max_seq_len
    return EncodedExample(
        example=example,
        input_ids=input_ids[:max_seq_len],
        labels=labels[:max_seq_len],
        prompt_len=len(prompt_ids),
        truncated=truncated,
    )


def encode_examples(
    tokenizer: Any, examples: list[Example], system_prompt: str | None, max_seq_len: int
) -> list[EncodedExample]:
    """Encode every example (see `encode_example`)."""
    return [encode_example(tokenizer, e, system_prompt, max_seq_len) for e in examples]
