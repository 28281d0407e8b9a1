"""``python -m orchestrator schema-path``: where the shipped ``machines`` schema file is, for
``db.schema_paths`` of every node's corrosion config."""

from __future__ import annotations

import sys

USAGE = "usage: python -m orchestrator schema-path"


def main(argv: list[str]) -> int:
    if argv != ["schema-path"]:
        print(USAGE, file=sys.stderr)
        return 2
    from .publish import MACHINES_SCHEMA_PATH

    print(MACHINES_SCHEMA_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
