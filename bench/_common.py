"""Shared bits of the bench scripts: argument parsing and the one-JSON-object-per-metric output."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def parse_args(description: str, extra: Any = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smaller sizes; finishes in under a minute")
    p.add_argument("--json", action="store_true", help="print one JSON object per metric")
    if extra:
        extra(p)
    return p.parse_args()


class Report:
    """Collects metrics and prints them as text or JSON lines."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def metric(self, name: str, value: float, unit: str, baseline: str, **extra: Any) -> None:
        if self.as_json:
            print(
                json.dumps(
                    {
                        "metric": name,
                        "value": round(value, 4),
                        "unit": unit,
                        "baseline": baseline,
                        **extra,
                    }
                )
            )
        else:
            details = "".join(f"  {k}={v}" for k, v in extra.items())
            print(f"{name:40s} {value:12.3f} {unit:10s} (vs {baseline}){details}")
        sys.stdout.flush()

    def info(self, text: str) -> None:
        if not self.as_json:
            print(text)
            sys.stdout.flush()
