// A line-oriented JSON server around the real cr-sqlite (WASM build of @vlcn.io/wa-sqlite),
// used by the Python differential tests as an oracle. One request per stdin line:
//   {"op": "open", "db": "n1"}                     -> {"ok": true}
//   {"op": "exec", "db": "n1", "sql": "...", "params": [...]}   -> {"rows": [[...], ...]}
//   {"op": "close", "db": "n1"}
// Every statement in "sql" runs in order; "rows" are the rows of the last statement that
// returned any. Values travel tagged so types survive JSON: integers {"i": "123"}, reals
// {"f": 1.5} (or {"f": "inf"}), blobs {"b": "hex"}, text as strings, NULL as null.
import fs from 'node:fs';
import readline from 'node:readline';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const base = path.join(here, 'node_modules', '@vlcn.io', 'wa-sqlite');
const factory = (await import(path.join(base, 'dist', 'crsqlite-sync.mjs'))).default;
const mod = await factory({ wasmBinary: fs.readFileSync(path.join(base, 'dist', 'crsqlite-sync.wasm')) });
const api = await import(path.join(base, 'src', 'sqlite-api.js'));
const sqlite3 = api.Factory(mod);
const SQLITE_ROW = 100;
const T_INT = 1, T_FLOAT = 2, T_TEXT = 3, T_BLOB = 4, T_NULL = 5;

const dbs = new Map();

function decode(v) {
  if (v === null || typeof v === 'string') return v;
  if (typeof v === 'object') {
    if ('i' in v) return BigInt(v.i);
    if ('f' in v) return typeof v.f === 'string' ? Number(v.f) : v.f;
    if ('b' in v) return Uint8Array.from(Buffer.from(v.b, 'hex'));
  }
  throw new Error('cannot decode ' + JSON.stringify(v));
}

function bind(stmt, i, v) {
  if (v === null) return sqlite3.bind_null(stmt, i);
  if (typeof v === 'bigint') return sqlite3.bind_int64(stmt, i, v);
  if (typeof v === 'number') return sqlite3.bind_double(stmt, i, v);
  if (typeof v === 'string') return sqlite3.bind_text(stmt, i, v);
  if (v.length === 0) {
    // wa-sqlite's bind_blob passes malloc(0) == NULL for an empty blob, which binds NULL;
    // bind a real (1-byte) buffer with length 0 so x'' stays an empty blob.
    return mod._sqlite3_bind_blob(stmt, i, mod._sqlite3_malloc(1), 0, mod._getSqliteFree());
  }
  return sqlite3.bind_blob(stmt, i, v);
}

function column(stmt, i) {
  switch (sqlite3.column_type(stmt, i)) {
    case T_INT: return { i: sqlite3.column_int64(stmt, i).toString() };
    case T_FLOAT: {
      const f = sqlite3.column_double(stmt, i);
      return { f: Number.isFinite(f) ? f : String(f) };
    }
    case T_TEXT: return sqlite3.column_text(stmt, i);
    case T_BLOB: return { b: Buffer.from(sqlite3.column_blob(stmt, i)).toString('hex') };
    default: return null;
  }
}

async function exec(db, sql, params) {
  const values = (params || []).map(decode);
  let rows = [];
  let used = 0;
  for await (const stmt of sqlite3.statements(db, sql)) {
    const n = sqlite3.bind_parameter_count(stmt);
    for (let i = 1; i <= n; i++) bind(stmt, i, values[used + i - 1]);
    used += n;
    const out = [];
    while ((await sqlite3.step(stmt)) === SQLITE_ROW) {
      const row = [];
      const cols = sqlite3.data_count(stmt);
      for (let c = 0; c < cols; c++) row.push(column(stmt, c));
      out.push(row);
    }
    if (out.length) rows = out;
  }
  return rows;
}

async function handle(req) {
  switch (req.op) {
    case 'open':
      dbs.set(req.db, await sqlite3.open_v2(req.db));
      return { ok: true };
    case 'exec':
      return { rows: await exec(dbs.get(req.db), req.sql, req.params) };
    case 'close':
      await sqlite3.exec(dbs.get(req.db), 'SELECT crsql_finalize()');
      await sqlite3.close(dbs.get(req.db));
      dbs.delete(req.db);
      return { ok: true };
    default:
      throw new Error('unknown op ' + req.op);
  }
}

const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of rl) {
  if (!line.trim()) continue;
  let reply;
  try {
    reply = await handle(JSON.parse(line));
  } catch (e) {
    reply = { error: String(e && e.message ? e.message : e) };
  }
  process.stdout.write(JSON.stringify(reply) + '\n');
}
