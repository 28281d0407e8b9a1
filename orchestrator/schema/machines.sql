-- The orchestrator's replicated table: one row per machine, written only by the worker that runs
-- it. Include this file in db.schema_paths on every node, orchestrator or not, so machine rows
-- apply everywhere (find its path with: python -m orchestrator schema-path).
-- A CRR: non-null primary key, no unique index, a default on every NOT NULL column.
CREATE TABLE machines (
    id TEXT NOT NULL PRIMARY KEY,
    app TEXT NOT NULL DEFAULT '',
    worker TEXT NOT NULL DEFAULT '',
    region TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT '',
    instance_id TEXT NOT NULL DEFAULT '',
    address TEXT NOT NULL DEFAULT '',
    cordoned INTEGER NOT NULL DEFAULT 0,
    checks TEXT NOT NULL DEFAULT '[]',
    services TEXT NOT NULL DEFAULT '[]',
    updated_at INTEGER NOT NULL DEFAULT 0,
    private_ip TEXT NOT NULL DEFAULT '',
    name TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '{}',
    -- the machine's own database (its step log): schema version and hash, and its state:
    -- 'current', 'pending' (older, migrating), 'migration_failed' (schema_error says why)
    schema_version INTEGER NOT NULL DEFAULT 0,
    schema_hash TEXT NOT NULL DEFAULT '',
    schema_state TEXT NOT NULL DEFAULT '',
    schema_error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX machines_app_state ON machines (app, state);
CREATE INDEX machines_worker ON machines (worker);

-- One row per worker, written only by that worker: at start, then every few seconds (heartbeat,
-- wall-clock milliseconds), and with draining = 1 when it shuts down. Gateways place machines
-- on live workers from their local replica of it.
CREATE TABLE workers (
    id TEXT NOT NULL PRIMARY KEY,
    region TEXT NOT NULL DEFAULT '',
    api_url TEXT NOT NULL DEFAULT '',
    capacity INTEGER NOT NULL DEFAULT 0,
    cordoned INTEGER NOT NULL DEFAULT 0,
    draining INTEGER NOT NULL DEFAULT 0,
    heartbeat INTEGER NOT NULL DEFAULT 0
);
