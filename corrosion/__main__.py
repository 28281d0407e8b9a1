"""``python -m corrosion`` runs the CLI (same as the ``corrosion`` console script)."""

from .ops.cli import main

main()
