// The reference figures for bench/crdt_bench.py: the real cr-sqlite (WASM build from npm
// @vlcn.io/wa-sqlite, installed by scripts/setup-test-deps) driven by raw module calls, measured
// the same way as our engine. Usage: node crsqlite_ref.mjs ROWS WIDE_ROWS; prints one JSON line.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const base = path.join(here, '..', 'tests', 'oracle', 'node_modules', '@vlcn.io', 'wa-sqlite');
const factory = (await import(path.join(base, 'dist', 'crsqlite-sync.mjs'))).default;
const mod = await factory({ wasmBinary: fs.readFileSync(path.join(base, 'dist', 'crsqlite-sync.wasm')) });
const sqlite3 = (await import(path.join(base, 'src', 'sqlite-api.js'))).Factory(mod);
const ROW = 100;

const n = Number(process.argv[2] || 100000);
const wide = Number(process.argv[3] || 10000);
// CPU time of this process (user + system), like the Python side: robust to a loaded machine
const now = () => { const u = process.cpuUsage(); return (u.user + u.system) / 1e6; };

async function open() { return await sqlite3.open_v2(':memory:'); }
async function exec(db, sql) { await sqlite3.exec(db, sql); }
async function prepare(db, sql) {
  const str = sqlite3.str_new(db, sql);
  const p = await sqlite3.prepare_v2(db, sqlite3.str_value(str));
  return p.stmt;
}
function run(stmt) {
  let rc;
  while ((rc = mod._sqlite3_step(stmt)) === ROW) { /* drain */ }
  mod._sqlite3_reset(stmt);
  return rc;
}

async function insertUpdate(crr) {
  const db = await open();
  await exec(db, 'CREATE TABLE t (a INTEGER PRIMARY KEY NOT NULL, b TEXT, c INTEGER, d REAL)');
  if (crr) await exec(db, "SELECT crsql_as_crr('t')");
  const ins = await prepare(db, 'INSERT INTO t VALUES (?, ?, ?, ?)');
  await exec(db, 'BEGIN');
  let t = now();
  for (let i = 0; i < n; i++) {
    sqlite3.bind_int(ins, 1, i);
    sqlite3.bind_text(ins, 2, 'text-' + i);
    sqlite3.bind_int(ins, 3, i * 7);
    sqlite3.bind_double(ins, 4, i * 0.5);
    run(ins);
  }
  await exec(db, 'COMMIT');
  const ti = now() - t;
  t = now();
  await exec(db, 'BEGIN; UPDATE t SET c = c + 1; COMMIT');
  const tu = now() - t;
  await sqlite3.finalize(ins);
  if (crr) await exec(db, 'SELECT crsql_finalize()');

  return [ti, tu];
}

const COLS = Array.from({ length: 10 }, (_, i) => 'c' + i);
const WIDE_DDL = 'CREATE TABLE w (id INTEGER PRIMARY KEY NOT NULL, ' + COLS.map(c => c + ' INTEGER').join(', ') + ')';

async function wideSource(versions) {
  const db = await open();
  await exec(db, WIDE_DDL + "; SELECT crsql_as_crr('w')");
  const ins = await prepare(db, 'INSERT INTO w VALUES (' + Array(11).fill('?').join(', ') + ')');
  await exec(db, 'BEGIN');
  for (let i = 0; i < wide; i++) {
    sqlite3.bind_int(ins, 1, i);
    for (let c = 0; c < 10; c++) sqlite3.bind_int(ins, c + 2, i + c);
    run(ins);
  }
  await exec(db, 'COMMIT');
  for (let v = 1; v < versions; v++) {
    await exec(db, 'BEGIN; UPDATE w SET ' + COLS.map(c => `${c} = ${c} + ${v}`).join(', ') + '; COMMIT');
  }
  return db;
}

async function readChanges(db) {
  const stmt = await prepare(db, 'SELECT * FROM crsql_changes WHERE db_version > ?');
  sqlite3.bind_int(stmt, 1, 0);
  const rows = [];
  const t = now();
  while (mod._sqlite3_step(stmt) === ROW) rows.push(sqlite3.row(stmt));
  mod._sqlite3_reset(stmt);
  return [rows, now() - t];
}

async function mergeInto(db, rows) {
  const stmt = await prepare(db, 'INSERT INTO crsql_changes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)');
  await exec(db, 'BEGIN');
  const t = now();
  for (const r of rows) {
    sqlite3.bind_text(stmt, 1, r[0]);
    sqlite3.bind_blob(stmt, 2, r[1]);
    sqlite3.bind_text(stmt, 3, r[2]);
    if (r[3] === null) sqlite3.bind_null(stmt, 4); else sqlite3.bind_int(stmt, 4, r[3]);
    sqlite3.bind_int(stmt, 5, r[4]);
    sqlite3.bind_int(stmt, 6, r[5]);
    sqlite3.bind_blob(stmt, 7, r[6]);
    sqlite3.bind_int(stmt, 8, r[7]);
    sqlite3.bind_int(stmt, 9, r[8]);
    run(stmt);
  }
  await exec(db, 'COMMIT');
  return now() - t;
}

async function freshReplica() {
  const db = await open();
  await exec(db, WIDE_DDL + "; SELECT crsql_as_crr('w')");
  return db;
}

const best = (xs) => Math.min(...xs);
const plain = [await insertUpdate(false), await insertUpdate(false)];
const crr = [await insertUpdate(true), await insertUpdate(true)];
const newer = await wideSource(2);
const older = await wideSource(1);
const [newRows, readTime] = await readChanges(newer);
const [oldRows] = await readChanges(older);
const fresh = [], existing = [];
for (let i = 0; i < 2; i++) {
  fresh.push(await mergeInto(await freshReplica(), newRows));
  const db = await freshReplica();
  await mergeInto(db, oldRows);
  existing.push(await mergeInto(db, newRows));
}
console.log(JSON.stringify({
  insert_ratio: best(crr.map(x => x[0])) / best(plain.map(x => x[0])),
  update_ratio: best(crr.map(x => x[1])) / best(plain.map(x => x[1])),
  insert_us: best(crr.map(x => x[0])) / n * 1e6,
  update_us: best(crr.map(x => x[1])) / n * 1e6,
  merge_fresh: newRows.length / best(fresh),
  merge_existing: newRows.length / best(existing),
  changes_since: newRows.length / readTime,
}));
