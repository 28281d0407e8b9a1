"""The replication core: what every node runs, with no I/O of its own.

``replication`` is the sans-IO Replicator (broadcast, apply and sync decisions, and the
membership-event to peer translation), ``plumtree`` its epidemic-broadcast-tree mode; ``store``
is the SQLite side it drives synchronously (the host chooses the thread); ``bookie``,
``ranges``, ``changeset``, ``hlc``, ``statements``, ``sqlguard`` and ``pending_schema`` are
their parts. The simulator (simulations/) hosts exactly
these modules, so what it checks is what the agent runs.

May import: crdt, swim, ``corrosion.errors``. Never the runtime, surfaces or ops.
"""
