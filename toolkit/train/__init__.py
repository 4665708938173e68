"""Training stage: LoRA fine-tune of a causal LM into `runs/NAME/` (adapter, checkpoints,
manifest written through `toolkit.artifacts`); importing this package loads no torch.
"""

from toolkit.artifacts import MANIFEST_KEYS
from toolkit.train.manifest import read_manifest
from toolkit.train.runner import TrainResult, run_training

__all__ = ["MANIFEST_KEYS", "TrainResult", "read_manifest", "run_training"]
