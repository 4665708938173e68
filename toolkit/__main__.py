"""`python -m toolkit` (used by `accelerate launch -m toolkit` and `torchrun -m toolkit`)."""

from toolkit.cli import main

main()
