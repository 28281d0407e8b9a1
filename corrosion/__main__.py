"""``python -m corrosion`` runs the CLI (same as the ``corrosion`` console script)."""

from .cli import main

main()
