"""corrosion's statement forms (``/v1/transactions``, ``/v1/queries``, ``Agent.execute``):

* ``"SQL"``
* ``["SQL", [params...]]`` or ``["SQL", {"name": value}]``
* ``{"query": "SQL", "params": [...], "named_params": {...}}``
* in Python also ``("SQL", params)``.

JSON parameters: null, booleans (bound as 0/1), integers, reals, strings, byte arrays (lists of
0..255 become blobs) and any other JSON value bound as its JSON text, as corrosion does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..errors import CorrosionError

Statement = tuple[str, Sequence[Any] | dict[str, Any]]


class StatementFormError(CorrosionError, ValueError):
    """A statement is not in one of the accepted forms."""


def json_type(value: Any) -> str:
    """A value's type as JSON names it, with its article (``a number``, ``null``, ``an
    object``): statements mostly come decoded from a client's JSON, which says ``5``, not
    ``int``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"  # only from Python callers: json.loads makes the above


def _param(v: Any) -> Any:
    if v is None or isinstance(v, str | float | bytes):
        return v
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        if not -(2**63) <= v < 2**63:
            raise StatementFormError(f"integer parameter {v} does not fit in 64 bits")
        return v
    if (
        isinstance(v, list)
        and v
        and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 255 for x in v)
    ):
        return bytes(v)
    return json.dumps(v)


def parse_statement(item: Any) -> Statement:
    if isinstance(item, str):
        return item, ()
    if isinstance(item, list | tuple):
        if len(item) == 1 and isinstance(item[0], str):
            return item[0], ()
        if len(item) == 2 and isinstance(item[0], str):
            params = item[1]
            if isinstance(params, dict):
                return item[0], {str(k).lstrip(":@$"): _param(v) for k, v in params.items()}
            if isinstance(params, list | tuple):
                return item[0], [_param(v) for v in params]
        raise StatementFormError('expected ["SQL", [params]] or ["SQL", {named params}]')
    if isinstance(item, dict):
        query = item.get("query")
        if not isinstance(query, str):
            raise StatementFormError('a statement object needs a "query" string')
        unknown = set(item) - {"query", "params", "named_params"}
        if unknown:
            raise StatementFormError(f"unknown statement field(s): {', '.join(sorted(unknown))}")
        params = item.get("params")
        named = item.get("named_params")
        if params and named:
            raise StatementFormError("use params or named_params, not both")
        if named:
            if not isinstance(named, dict):
                raise StatementFormError("named_params must be an object")
            return query, {str(k).lstrip(":@$"): _param(v) for k, v in named.items()}
        if params is None:
            return query, ()
        if not isinstance(params, list):
            raise StatementFormError("params must be an array")
        return query, [_param(v) for v in params]
    raise StatementFormError(f"a statement cannot be {json_type(item)}")


def parse_statements(items: Any) -> list[Statement]:
    if isinstance(items, str | dict):
        items = [items]
    if not isinstance(items, list | tuple) or not items:
        raise StatementFormError("expected a non-empty array of statements")
    return [parse_statement(i) for i in items]
