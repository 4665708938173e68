"""toolkit: LoRA fine-tune -> quantize -> serve -> monitor, for open causal LMs."""

__version__ = "0.1.0"
