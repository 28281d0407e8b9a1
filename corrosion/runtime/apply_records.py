"""The apply record: a ``corrosion.apply`` span of the usual shape as one tuple, queued per
version applied (``tracing.apply_recorder``) and encoded straight to OTLP by the exporter
(``otlp_export``), where a ``ReadableSpan`` would be five objects made on the event loop.

The record: the wire context (``tracing.context_bytes``) of the changeset applied, which is the
span's parent (remote); when the span started and ended (ns since the epoch); the values of
``APPLY_KEYS``, its attributes, in that order. Its status is unset. The exporter makes its span
id (random, as the SDK's generator) and leaves out a record whose context is not a valid,
sampled one, as ``tracing.record_span`` makes no span for it.

Kept apart from both (no SDK import) so that neither imports the other for it.
"""

from __future__ import annotations

import struct

from opentelemetry.trace import SpanKind

ApplyRecord = tuple[bytes, int, int, str, int, str, int, str, str]
APPLY_SPAN = "corrosion.apply"
APPLY_KIND = SpanKind.CONSUMER
APPLY_KEYS = (
    "corrosion.actor_id",
    "corrosion.version",
    "corrosion.seqs",
    "corrosion.changes",
    "corrosion.peer",
    "corrosion.via",
)

CONTEXT_BYTES = 26  # a wire context: version, trace id (16), span id (8), flags
WIRE_CONTEXT = struct.Struct(">BQQQB")  # version, trace id (high, low halves), span id, flags
