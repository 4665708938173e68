"""Phase 3: compare base models, training runs and exports on the held-out split."""

from toolkit.compare.runner import run_compare

__all__ = ["run_compare"]
