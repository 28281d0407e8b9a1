"""The CLI tests' helpers live in cli_helpers.py (importable by test modules)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
