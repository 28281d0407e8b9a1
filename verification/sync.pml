/*
 * A Promela model of corrosion's replication: versions, chunks, broadcast, anti-entropy sync,
 * crash and restart. Checked by spin (tests/simulations/test_spin_model.py; docs/simulations.md
 * has the commands and the mapping from this model to corrosion/core).
 *
 * Nodes 0..N-1; nodes 0..A-1 are also writers (actors), each committing V versions of C chunks.
 * Durable state (the SQLite file; store.py writes data and bookkeeping in one transaction):
 *   rows[a,n,v]  seqs of version v of actor a whose changes are merged into node n's tables
 *   held[a,n,v]  __corro_bookkeeping: node n holds version v of actor a (Booked.held)
 *   buf[a,n,v]   __corro_seq_bookkeeping + __corro_buffered_changes: seqs of a partial version
 *                buffered, not merged (Booked.partials)
 * Volatile state (lost on a crash):
 *   inflight[n]  chunks on their way to node n (broadcast frames, sync answers, the apply queue);
 *                a set: bit ((a*V+v)*C+s) is chunk s of version v of actor a
 *   pend[a]      versions actor a committed but has not broadcast yet (B1)
 * Heads and gaps are derived from held and buf, as Booked.max() and Booked.gaps() do.
 *
 * Faults during the first phase, at any step: a chunk in flight is lost or delivered twice,
 * chunks are delivered in any order, a node crashes (losing its volatile state) and restarts.
 * Once every write is committed the model may end the faults; then all nodes are up and
 * ROUNDS rounds of fault-free sync run (each node asks every peer, the answers are applied),
 * after which every node must hold every version, with no gap and no partial version.
 *
 * Mutants (spin -DMUTANT=k; -DMUTANT is 1), each must make the check fail:
 *   1  sync does not serve a version the asker holds partially (missing_for treats the
 *      asker's partial versions as held): a partial version left by a lost chunk is never
 *      completed.
 *   2  the asker's sync state leaves out its gaps (a gap not recorded): a version skipped over
 *      is never served.
 *   3  a chunk's changes are merged as it arrives, before its version is complete.
 */

#ifndef N
#define N 3            /* nodes */
#endif
#ifndef A
#define A 1            /* writers: nodes 0..A-1 */
#endif
#ifndef V
#define V 2            /* versions per writer */
#endif
#ifndef C
#define C 2            /* chunks per version (seqs 0..C-1) */
#endif
#ifndef BUDGET
#define BUDGET 1       /* versions served per sync answer (sync_budget_versions) */
#endif
#ifndef MAXCRASH
#define MAXCRASH 1     /* crashes during the fault phase */
#endif
#define ROUNDS (A*V)   /* fault-free sync rounds: each serves at least one missing version */

#define FULL ((1 << C) - 1)
#define K(a, n, v) ((((a) * N) + (n)) * V + (v))
#define H(a, n) ((a) * N + (n))
#define CHUNK(a, v, s) ((((a) * V) + (v)) * C + (s))

byte rows[A * N * V];
byte buf[A * N * V];
bit held[A * N * V];
byte written[A];       /* versions committed and acknowledged to the client by actor a */
byte pend[A];
int inflight[N];
bit up[N];
byte prevhead[A * N];  /* each node's head of each actor when last checked: heads only grow */
byte crashes;
byte committed;     /* versions committed by all writers */
bool healing;

/* scratch (reset to 0 after use, so they add no states) */
byte i, j, k, s2, hd, served;
int gapmask, partmask;

/* head(a, n): the highest version held or partial, as Booked.max() (versions are 1-based in
 * the code, 0-based here: head is v+1) */
#define HEAD(a, n) \
  hd = 0; \
  for (k : 0 .. V - 1) { \
    if \
    :: held[K(a, n, k)] || buf[K(a, n, k)] != 0 -> hd = k + 1 \
    :: else -> skip \
    fi \
  }

/* The invariants, checked after every step. */
#define CHECK \
  for (i : 0 .. A - 1) { \
    for (j : 0 .. N - 1) { \
      for (s2 : 0 .. V - 1) { \
        /* a partial version is never applied: its changes are merged all at once */ \
        assert(rows[K(i, j, s2)] == 0 || rows[K(i, j, s2)] == FULL); \
        /* bookkeeping agrees with the data */ \
        assert((rows[K(i, j, s2)] == FULL) == held[K(i, j, s2)]); \
        assert(!(held[K(i, j, s2)] && buf[K(i, j, s2)] != 0)); \
      } \
      /* heads only grow */ \
      HEAD(i, j); \
      assert(hd >= prevhead[H(i, j)]); \
      prevhead[H(i, j)] = hd; \
    } \
    /* no acknowledged version is lost */ \
    for (s2 : 0 .. V - 1) { \
      assert(s2 >= written[i] || held[K(i, i, s2)]); \
    } \
  } \
  i = 0; j = 0; k = 0; s2 = 0; hd = 0

/* Node n applies chunk s of version v of actor a (Store._apply, one transaction). */
#define APPLY(n, a, v, s) \
  if \
  :: (a) == (n) -> skip                          /* our own version came back: dropped */ \
  :: (a) != (n) && held[K(a, n, v)] -> skip      /* already held: a duplicate */ \
  :: (a) != (n) && !held[K(a, n, v)] && (buf[K(a, n, v)] & (1 << (s))) -> skip  /* covered */ \
  :: else -> \
    buf[K(a, n, v)] = buf[K(a, n, v)] | (1 << (s)); \
    MERGE_EARLY(n, a, v, s); \
    if \
    :: buf[K(a, n, v)] == FULL -> \
      rows[K(a, n, v)] = FULL;                   /* merge_changesets of the whole version */ \
      held[K(a, n, v)] = 1;                      /* INSERT INTO __corro_bookkeeping */ \
      buf[K(a, n, v)] = 0                        /* _take_buffered, del b.partials[v] */ \
    :: else -> skip \
    fi \
  fi

#if MUTANT == 3
#define MERGE_EARLY(n, a, v, s) rows[K(a, n, v)] = rows[K(a, n, v)] | (1 << (s))
#else
#define MERGE_EARLY(n, a, v, s) skip
#endif

/* Node q asks node p to sync (S1) and p answers (S2): q's sync state is its heads, gaps and
 * partial versions per actor (Bookie.sync_state); p serves, chunk by chunk, every version it
 * holds that q lacks (Bookie.missing_for: not below q's head, or in q's gaps or partials), up to
 * BUDGET versions (sync_answer). The answers travel like any chunk (inflight[q]). */
#define SYNC(q, p) \
  served = 0; \
  for (i : 0 .. A - 1) { \
    /* q's sync state for actor i */ \
    HEAD(i, q); \
    gapmask = 0; partmask = 0; \
    for (j : 0 .. V - 1) { \
      if \
      :: j < hd && !held[K(i, q, j)] && buf[K(i, q, j)] == 0 -> gapmask = gapmask | (1 << j) \
      :: else -> skip \
      fi; \
      if \
      :: buf[K(i, q, j)] != 0 -> partmask = partmask | (1 << j) \
      :: else -> skip \
      fi \
    } \
    SYNC_STATE_MUTANTS; \
    /* missing_for: p's held versions q lacks */ \
    for (j : 0 .. V - 1) { \
      if \
      :: served < BUDGET && held[K(i, p, j)] && \
         (j >= hd || (gapmask & (1 << j)) || (partmask & (1 << j))) -> \
        for (s2 : 0 .. C - 1) { \
          inflight[q] = inflight[q] | (1 << CHUNK(i, j, s2)) \
        } \
        served++ \
      :: else -> skip \
      fi \
    } \
  } \
  served = 0; gapmask = 0; partmask = 0; hd = 0; i = 0; j = 0; s2 = 0

#if MUTANT == 1
#define SYNC_STATE_MUTANTS partmask = 0
#elif MUTANT == 2
#define SYNC_STATE_MUTANTS gapmask = 0
#else
#define SYNC_STATE_MUTANTS skip
#endif

/* Node n applies every chunk in flight to it (the fault-free phase: lossless, in order). */
#define DELIVER_ALL(n) \
  for (i : 0 .. A - 1) { \
    for (j : 0 .. V - 1) { \
      for (s2 : 0 .. C - 1) { \
        if \
        :: inflight[n] & (1 << CHUNK(i, j, s2)) -> \
          inflight[n] = inflight[n] & ~(1 << CHUNK(i, j, s2)); \
          APPLY(n, i, j, s2) \
        :: else -> skip \
        fi \
      } \
    } \
  } \
  i = 0; j = 0; s2 = 0

byte n, q, a, v, s;

active proctype world() {
  d_step {
    for (n : 0 .. N - 1) { up[n] = 1 }
    n = 0
  }
  do
  /* B1: a writer commits its next version (data and bookkeeping in one transaction) and
   * acknowledges it to its client; its chunks are broadcast in a later step. */
  :: atomic {
      select(a : 0 .. A - 1);
      if
      :: up[a] && written[a] < V ->
        d_step {
          v = written[a];
          rows[K(a, a, v)] = FULL;
          held[K(a, a, v)] = 1;
          written[a]++;
          committed++;
          pend[a] = pend[a] | (1 << v);
          v = 0;
          CHECK
        }
      :: else -> skip
      fi;
      a = 0
    }
  /* B1: a writer sends the chunks of its new versions to every peer that is up. */
  :: atomic {
      select(a : 0 .. A - 1);
      if
      :: up[a] && pend[a] != 0 ->
        d_step {
          for (v : 0 .. V - 1) {
            if
            :: pend[a] & (1 << v) ->
              for (n : 0 .. N - 1) {
                if
                :: n != a && up[n] ->
                  for (s : 0 .. C - 1) { inflight[n] = inflight[n] | (1 << CHUNK(a, v, s)) }
                :: else -> skip
                fi
              }
            :: else -> skip
            fi
          }
          pend[a] = 0; v = 0; n = 0; s = 0
        }
      :: else -> skip
      fi;
      a = 0
    }
  /* B2/B3: a chunk in flight reaches a node that is up and is applied, in any order; it may
   * also stay in flight (it will be delivered again: a duplicate). */
  :: atomic {
      select(n : 0 .. N - 1);
      select(a : 0 .. A - 1);
      select(v : 0 .. V - 1);
      select(s : 0 .. C - 1);
      if
      :: up[n] && (inflight[n] & (1 << CHUNK(a, v, s))) ->
        if
        :: inflight[n] = inflight[n] & ~(1 << CHUNK(a, v, s))
        :: skip
        fi;
        d_step { APPLY(n, a, v, s); CHECK }
      :: else -> skip
      fi;
      n = 0; a = 0; v = 0; s = 0
    }
  /* fault: a chunk in flight is lost */
  :: atomic {
      select(n : 0 .. N - 1);
      select(a : 0 .. A - 1);
      select(v : 0 .. V - 1);
      select(s : 0 .. C - 1);
      inflight[n] = inflight[n] & ~(1 << CHUNK(a, v, s));
      n = 0; a = 0; v = 0; s = 0
    }
  /* S1/S2: node q syncs with node p, both up. */
  :: atomic {
      select(q : 0 .. N - 1);
      select(n : 0 .. N - 1);
      if
      :: q != n && up[q] && up[n] -> d_step { SYNC(q, n) }
      :: else -> skip
      fi;
      q = 0; n = 0
    }
  /* fault: a node crashes, losing what is in memory (its queue, frames on the way to it, its
   * pending broadcasts); what it committed stays. */
  :: atomic {
      crashes < MAXCRASH;
      select(n : 0 .. N - 1);
      if
      :: up[n] ->
        d_step {
          up[n] = 0;
          inflight[n] = 0;
          if
          :: n < A -> pend[n] = 0
          :: else -> skip
          fi;
          crashes++
        }
      :: else -> skip
      fi;
      n = 0
    }
  /* a crashed node restarts from its database (Store._load_bookie) */
  :: atomic {
      select(n : 0 .. N - 1);
      if
      :: !up[n] -> d_step { up[n] = 1; CHECK }
      :: else -> skip
      fi;
      n = 0
    }
  /* the faults stop once every write is committed */
  :: committed == A * V -> break
  od;
  healing = 1;
  /* Fault-free phase: every node up; ROUNDS rounds in which each node syncs with every peer and
   * applies the answers (and whatever was still in flight). Then the cluster has converged. */
  d_step {
    for (n : 0 .. N - 1) { up[n] = 1 }
    for (v : 1 .. ROUNDS) {
      for (q : 0 .. N - 1) {
        for (n : 0 .. N - 1) {
          if
          :: q != n -> SYNC(q, n); DELIVER_ALL(q); CHECK
          :: else -> skip
          fi
        }
      }
    }
    for (a : 0 .. A - 1) {
      for (n : 0 .. N - 1) {
        for (v : 0 .. V - 1) {
          assert(held[K(a, n, v)] && buf[K(a, n, v)] == 0);  /* no gap, no partial */
        }
      }
    }
    n = 0; q = 0; v = 0; a = 0; k = 0
  }
}
