"""The corrosion agent: replication over SWIM, HTTP API, CLI, embedded mode (lands with its issue)."""
