"""The agent's runtime: the core on real sockets and threads, in one anyio task group.

``agent`` (lifecycle and the public API: execute, query), ``peers`` (broadcast and sync streams),
``membership`` (the SWIM bridge and the join loop), ``reads`` (read connections and queries),
``updates`` (update watches), ``timers``, ``transport`` (framed, keyed peer streams),
``subscriptions``, ``extensions`` (the interface higher layers plug into), ``activity`` (the logs
that stay readable under load). The event loop owns the state; worker threads compute and return.

May import: the core, crdt, swim, and the package's shared modules (config, errors, logs,
addresses). Never the surfaces or ops above it.
"""
