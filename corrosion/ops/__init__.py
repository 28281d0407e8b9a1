"""The operator's tools: the ``corrosion`` command (``cli``), ``devcluster``, ``backup`` and
restore, and the one-line start-up errors (``startup``).

May import everything in corrosion; nothing in corrosion imports them.
"""
