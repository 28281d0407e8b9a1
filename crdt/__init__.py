"""CRR engine: cr-sqlite 0.16.3 semantics on SQLite, in Python."""
