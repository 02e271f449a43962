//! The local SQLite checkpoint: one database (WAL) that journals every run
//! and the state of every input row, so an interrupted run resumes where it
//! stopped.
//!
//! Guarantees: a row is `sending` on disk before its create is sent, so a
//! crash at any moment leaves at most the rows in flight in doubt, and those
//! are looked up before anything is retried. A call that succeeded appends
//! the row's outcome to `outcomes` (schema version 3); the row itself is
//! not rewritten, and a row with an outcome is done. The schema carries a
//! version (`meta.schema_version`) and is migrated forward on open.
//!
//! The duplicate check (one row per email in a run) is an index in memory:
//! 64-bit hashes of the emails with their first lines, rebuilt from the
//! rows when a run is resumed. An index on the email in the database puts
//! every row's insert on a random page, and each commit writes a whole page
//! per row: 18-44 µs a row with real (unordered) emails, against ~6 µs
//! without it. Memory stays bounded all the same: past
//! [`EMAILS_IN_MEMORY`] emails in a run (~36 MB), the index is built in the
//! database and the rest of the run uses it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use rusqlite::{Connection, OptionalExtension, params};

pub const SCHEMA_VERSION: i64 = 5;

const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    input_path TEXT NOT NULL,
    input_size INTEGER,
    input_hash TEXT,
    beta TEXT NOT NULL,
    options TEXT NOT NULL,
    state TEXT NOT NULL,          -- planning, running, stopped, done
    planned INTEGER NOT NULL DEFAULT 0,
    total_rows INTEGER,
    started_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    finished_at INTEGER
);
CREATE TABLE IF NOT EXISTS rows (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    line INTEGER NOT NULL,
    email TEXT,                  -- lower-cased; NULL when the row has none
    state TEXT NOT NULL,         -- pending, sending, done, rejected
    intent TEXT,                 -- create or update, while sending
    action TEXT,                 -- created, updated, unchanged, rejected
    tester_id INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    error_class TEXT,            -- validation, rejected_by_api, retries_exhausted, outcome_unknown
    http_status INTEGER,
    message TEXT,
    raw TEXT,                    -- the original cells (JSON array), kept for rejected rows
    PRIMARY KEY (run_id, line)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS rows_email ON rows(run_id, email) WHERE email IS NOT NULL AND error_class IS NOT 'validation';
CREATE TABLE IF NOT EXISTS known_testers (
    run_id INTEGER NOT NULL,
    email TEXT NOT NULL,         -- lower-cased
    tester_id INTEGER NOT NULL,
    record TEXT NOT NULL,        -- the tester as listed (JSON)
    PRIMARY KEY (run_id, email)
) WITHOUT ROWID;
";

/// Version 2: the duplicate check moved to memory (see the module's
/// documentation); its unique index goes. A prefsync that knows only
/// version 1 relies on that index, and refuses a version 2 checkpoint.
const MIGRATE_V2: &str = "DROP INDEX IF EXISTS rows_email;";

/// Version 3: a row's call that succeeded is appended to `outcomes`, a
/// narrow table, instead of rewriting the row: the row keeps the state it
/// had when it was sent (`sending`), and an outcome overrides it. Rows done
/// under version 2 keep `state = 'done'` and their action in `rows`; every
/// reader takes both.
const MIGRATE_V3: &str = "
CREATE TABLE IF NOT EXISTS outcomes (
    run_id INTEGER NOT NULL,
    line INTEGER NOT NULL,
    action TEXT NOT NULL,        -- created, updated, unchanged
    tester_id INTEGER NOT NULL,
    PRIMARY KEY (run_id, line)
) WITHOUT ROWID;
";

/// Version 4: one checkpoint for every operation of the engine, not only
/// the import of testers. A row may also be `skipped` (state and action),
/// kept out of the run by a rule, with its class in `error_class`
/// (`flagged`, `would_suppress`) and the reason in `message`. `runs.kind` names the operation; a row's `email`
/// becomes its generic `key` (an email, an id), `tester_id` becomes
/// `target_id` (the record the row acted on), and a row may carry the small
/// `detail` its operation needs to prove a call's effect. The columns are
/// renamed in place (no table is rewritten), so an unfinished version 3
/// run resumes. A prefsync that knows only version 3 refuses this file.
const MIGRATE_V4: &str = "
DROP INDEX IF EXISTS rows_by_email;
ALTER TABLE rows RENAME COLUMN email TO key;
ALTER TABLE rows RENAME COLUMN tester_id TO target_id;
ALTER TABLE rows ADD COLUMN detail TEXT;
ALTER TABLE outcomes RENAME COLUMN tester_id TO target_id;
ALTER TABLE known_testers RENAME TO known;
ALTER TABLE known RENAME COLUMN email TO key;
ALTER TABLE known RENAME COLUMN tester_id TO target_id;
UPDATE runs SET kind = 'testers.import' WHERE kind = 'import';
";

/// The tables version 5 adds, for the migration and the new-file schema
/// alike (a macro: `concat!` takes it in at compile time).
macro_rules! v5_tables {
    () => {
        "
CREATE TABLE IF NOT EXISTS row_order (
    run_id INTEGER NOT NULL,
    ord INTEGER NOT NULL,        -- where the row is sent (its signup time, say); no value sorts last
    line INTEGER NOT NULL,
    byte_offset INTEGER NOT NULL, -- where its record starts in the input, to read it again
    PRIMARY KEY (run_id, ord, line)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS refs (
    run_id INTEGER NOT NULL,
    ref TEXT NOT NULL,           -- how other rows name this one (a referral code, a source id, an email)
    line INTEGER NOT NULL,
    PRIMARY KEY (run_id, ref)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS wanted_refs (
    run_id INTEGER NOT NULL,
    ref TEXT NOT NULL,           -- a value some row names as its referrer
    PRIMARY KEY (run_id, ref)
) WITHOUT ROWID;
"
    };
}

/// Version 5 adds what a run sent in another order than the file's needs
/// (each row's place in that order and where its record starts, so the
/// rows are read back one by one, in bounded memory), and what linking
/// referrers needs (how rows name each other). Only new tables: a version 4
/// run resumes as it was.
const MIGRATE_V5: &str = v5_tables!();

/// A new checkpoint is created at the current version in one step; the
/// steps above bring older files to it. Stepping a new file through every
/// migration re-parses the whole schema at each `RENAME COLUMN`. The test
/// `a_new_checkpoint_has_the_schema_the_migrations_reach` holds the two
/// paths to the same tables.
const SCHEMA_CURRENT: &str = concat!(
    "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,           -- the operation: testers.import, points.add, ...
    input_path TEXT NOT NULL,
    input_size INTEGER,
    input_hash TEXT,
    beta TEXT NOT NULL,
    options TEXT NOT NULL,
    state TEXT NOT NULL,          -- planning, running, stopped, done
    planned INTEGER NOT NULL DEFAULT 0,
    total_rows INTEGER,
    started_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    finished_at INTEGER
);
CREATE TABLE IF NOT EXISTS rows (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    line INTEGER NOT NULL,
    key TEXT,                    -- the row's key (a lower-cased email, an id); NULL when it has none
    state TEXT NOT NULL,         -- pending, sending, done, rejected, skipped
    intent TEXT,                 -- what is being sent (create, update, ...), while sending
    action TEXT,                 -- the operation's action, rejected or skipped
    target_id INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    error_class TEXT,            -- validation, rejected_by_api, retries_exhausted, outcome_unknown; a skip's class
    http_status INTEGER,
    message TEXT,
    raw TEXT,                    -- the original cells (JSON array), kept for rejected rows
    detail TEXT,                 -- what the operation needs to prove a call's effect
    PRIMARY KEY (run_id, line)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS known (
    run_id INTEGER NOT NULL,
    key TEXT NOT NULL,
    target_id INTEGER NOT NULL,
    record TEXT NOT NULL,        -- the record as listed (JSON)
    PRIMARY KEY (run_id, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outcomes (
    run_id INTEGER NOT NULL,
    line INTEGER NOT NULL,
    action TEXT NOT NULL,
    target_id INTEGER NOT NULL,
    PRIMARY KEY (run_id, line)
) WITHOUT ROWID;
",
    v5_tables!()
);

/// A row of `rows` with no outcome (the table's alias must be `rows`). A
/// macro, so statements take it in with `concat!`, once, at compile time.
macro_rules! no_outcome {
    () => {
        "NOT EXISTS (SELECT 1 FROM outcomes o WHERE o.run_id = rows.run_id AND o.line = rows.line)"
    };
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// One run as the checkpoint holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub id: i64,
    pub kind: String,
    pub input_path: String,
    pub input_size: Option<i64>,
    pub input_hash: Option<String>,
    pub beta: String,
    pub options: String,
    pub state: String,
    pub planned: bool,
    pub total_rows: Option<i64>,
    pub started_at: i64,
    pub updated_at: i64,
}

/// A run's rows by what became of them. Done rows are counted per action,
/// in the words of their operation (`created`, `updated`, `unchanged` for an
/// import; `added` for points; ...).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Done rows per action, in the order first seen.
    pub done: Vec<(String, u64)>,
    pub rejected: u64,
    /// Rows a rule kept out, per class.
    pub skipped: Vec<(String, u64)>,
    /// Open rows (pending or sending).
    pub pending: u64,
    /// Of those, rows that were in flight when a run stopped.
    pub sending: u64,
}

impl Counts {
    /// Done rows with this action.
    pub fn action(&self, action: &str) -> u64 {
        self.done
            .iter()
            .find(|(a, _)| a == action)
            .map_or(0, |(_, n)| *n)
    }

    fn add(list: &mut Vec<(String, u64)>, name: &str) {
        match list.iter_mut().find(|(a, _)| a == name) {
            Some((_, n)) => *n += 1,
            None => list.push((name.to_string(), 1)),
        }
    }

    pub fn finished(&self) -> u64 {
        self.done.iter().map(|(_, n)| n).sum::<u64>()
            + self.skipped.iter().map(|(_, n)| n).sum::<u64>()
            + self.rejected
    }

    /// Every row recorded.
    pub fn total(&self) -> u64 {
        self.finished() + self.pending
    }
}

/// A row still to do, as a resumed run reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRow {
    pub line: u64,
    /// It was `sending` when the run stopped.
    pub sending: bool,
    /// What it was about to send, if that was decided.
    pub intent: Option<String>,
    /// What its operation wrote with the intent.
    pub detail: Option<String>,
}

/// A rejected row, as the errors report shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectedRow {
    pub line: u64,
    pub class: Option<String>,
    pub http_status: Option<i64>,
    pub message: Option<String>,
    /// The row's original cells.
    pub cells: Vec<String>,
}

/// What became of one row, as the results report shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct RowResult {
    pub line: u64,
    /// The row's key (its email for an import), when it got that far.
    pub key: Option<String>,
    /// The operation's action, `rejected`, or the open state.
    pub action: String,
    pub target_id: Option<i64>,
    pub class: Option<String>,
    pub message: Option<String>,
    /// A rejected row's original cells (a JSON array of strings), for the
    /// key of a row refused before it had one.
    pub raw: Option<String>,
}

/// A row's final or in-flight state, as the engine reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum RowUpdate {
    /// The open rows from line `from` to `to` (inclusive) handed to
    /// workers, with what they are planned to send (`create` or `update`)
    /// when the plan is known before the call. A row already `sending` (a
    /// resumed run) keeps the intent it had.
    Dispatched {
        from: u64,
        to: u64,
        intent: Option<&'static str>,
    },
    /// About to send a `create` or an `update`, with what the operation
    /// needs to prove the call's effect after a kill (the records it saw
    /// before a create with no natural key), made durable with the intent.
    Sending {
        line: u64,
        intent: &'static str,
        detail: Option<String>,
    },
    /// Back to pending (stopped before it was sent).
    Pending { line: u64 },
    Done {
        line: u64,
        action: &'static str,
        target_id: u64,
    },
    Rejected {
        line: u64,
        class: &'static str,
        http_status: Option<u16>,
        message: String,
        raw: Option<String>,
    },
    /// Why a done row is as it is, for the results file.
    Note { line: u64, message: String },
    /// Kept out of the run by a rule: not sent, not an error. The key is
    /// kept for the results, outside the duplicate check (a skipped row is
    /// as if it were not in the file).
    Skipped {
        line: u64,
        class: &'static str,
        key: Option<String>,
        message: String,
    },
}

/// The background checkpoint thread; stops when dropped.
pub struct BackgroundCheckpoints {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for BackgroundCheckpoints {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub struct Checkpoint {
    conn: Connection,
    path: PathBuf,
    seen: RefCell<SeenEmails>,
}

/// The most emails of one run the duplicate check holds in memory: as many
/// as a table of 2^21 slots holds (17 bytes a slot, 36 MB).
pub const EMAILS_IN_MEMORY: usize = (1 << 21) / 8 * 7;

/// The database's index on emails, once a run outgrew the memory's.
const EMAIL_INDEX: &str =
    "CREATE INDEX IF NOT EXISTS rows_by_key ON rows(run_id, key) WHERE key IS NOT NULL";

/// The row counts a batch statement is prepared for: a batch goes in parts
/// of these sizes, so a handful of statements serve every batch.
pub const BATCH_SIZES: [usize; 4] = [64, 16, 4, 1];

/// `n` split into [`BATCH_SIZES`] parts, largest first: (index in
/// `BATCH_SIZES`, size) for each.
fn sizes(mut n: usize) -> Vec<(usize, usize)> {
    let mut parts = Vec::new();
    for (i, size) in BATCH_SIZES.into_iter().enumerate() {
        while n >= size {
            parts.push((i, size));
            n -= size;
        }
    }
    parts
}

/// `head` then `n` tuples `(?1, ?a, ?b, ?c, fixed)` with `per` numbered
/// parameters each after the run's `?1`, then `tail`. An empty `fixed`
/// adds no value.
fn values_statement(head: &str, fixed: &str, per: usize, n: usize, tail: &str) -> String {
    use std::fmt::Write;
    let mut sql = String::from(head);
    for i in 0..n {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("(?1");
        for k in 0..per {
            let _ = write!(sql, ", ?{}", 2 + per * i + k);
        }
        if !fixed.is_empty() {
            let _ = write!(sql, ", {fixed}");
        }
        sql.push(')');
    }
    sql.push_str(tail);
    sql
}

/// The batch statements, one per size in [`BATCH_SIZES`].
struct BatchSql {
    plan_sending: Vec<String>,
    done: Vec<String>,
}

fn batch_sql() -> &'static BatchSql {
    static SQL: std::sync::OnceLock<BatchSql> = std::sync::OnceLock::new();
    SQL.get_or_init(|| BatchSql {
        plan_sending: BATCH_SIZES
            .iter()
            .map(|&n| {
                values_statement(
                    "INSERT INTO rows (run_id, line, key, intent, state, attempts) VALUES ",
                    "'sending', 1",
                    3,
                    n,
                    " ON CONFLICT DO NOTHING",
                )
            })
            .collect(),
        // Appended, mostly in line order, to a narrow table: less than half
        // the work of rewriting the row in place (see `MIGRATE_V3`). Every
        // row reported done was recorded `sending` before it was sent.
        done: BATCH_SIZES
            .iter()
            .map(|&n| {
                values_statement(
                    "INSERT OR REPLACE INTO outcomes (run_id, line, action, target_id) VALUES ",
                    "",
                    3,
                    n,
                    "",
                )
            })
            .collect(),
    })
}

/// The duplicate check's index for one run: the hash of each email the run
/// recorded (lower-cased, as planned) and the first line that had it.
struct SeenEmails {
    /// The run loaded, if any.
    run: Option<i64>,
    /// Empty when the database has the index on emails.
    first: HashMap<u64, u64, BuildHasherDefault<Prehashed>>,
    in_database: bool,
    /// How many emails to make room for at the next load.
    expect: usize,
    /// [`EMAILS_IN_MEMORY`], smaller in tests.
    cap: usize,
}

impl Default for SeenEmails {
    fn default() -> Self {
        SeenEmails {
            run: None,
            first: HashMap::default(),
            in_database: false,
            expect: 0,
            cap: EMAILS_IN_MEMORY,
        }
    }
}

/// The keys of [`SeenEmails::first`] are hashes already.
#[derive(Default)]
struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, _: &[u8]) {
        unreachable!("only u64 keys are hashed")
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

fn email_hash(email: &str) -> u64 {
    // Nothing stored depends on it: the map is rebuilt at every load.
    BuildHasherDefault::<DefaultHasher>::default().hash_one(email)
}

impl Checkpoint {
    pub fn open(path: &Path) -> anyhow::Result<Checkpoint> {
        crate::fsutil::private_sqlite(path)?;
        let conn = Connection::open(path)
            .with_context(|| format!("failed to open the checkpoint {}", path.display()))?;
        Self::setup(conn, path)
    }

    /// A checkpoint opened read-only, for `prefsync runs`: nothing is
    /// created, migrated or set (not even the journal mode), so the file is
    /// never changed. Only a checkpoint of the current schema is read; an
    /// older one is upgraded by the next run that writes it.
    pub fn open_read_only(conn: Connection, path: &Path) -> anyhow::Result<Checkpoint> {
        debug_assert!(conn.is_readonly(rusqlite::MAIN_DB).unwrap_or(false));
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            bail!(
                "the checkpoint {} has schema version {version}, newer than this prefsync understands ({SCHEMA_VERSION}); upgrade prefsync",
                path.display()
            );
        }
        if version < SCHEMA_VERSION {
            bail!(
                "the checkpoint {} was written by an older prefsync (schema version {version}, this one reads {SCHEMA_VERSION}); \
                 run the command that wrote it again to upgrade it (the run resumes), then list its runs",
                path.display()
            );
        }
        Ok(Checkpoint {
            conn,
            path: path.to_path_buf(),
            seen: RefCell::default(),
        })
    }

    /// A checkpoint that lives in memory (dry runs write nothing).
    pub fn in_memory() -> anyhow::Result<Checkpoint> {
        Self::setup(Connection::open_in_memory()?, Path::new(":memory:"))
    }

    fn setup(conn: Connection, path: &Path) -> anyhow::Result<Checkpoint> {
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        // WAL: readers never block the writer. NORMAL: a commit survives the
        // process being killed (it is in the OS's hands); only a power cut
        // can lose the last commits.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            bail!(
                "the checkpoint {} has schema version {version}, newer than this prefsync understands ({SCHEMA_VERSION}); upgrade prefsync or use another --checkpoint",
                path.display()
            );
        }
        if version == 0 {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(SCHEMA_CURRENT)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?1)",
                [SCHEMA_VERSION.to_string()],
            )?;
            tx.commit()?;
        }
        // Older files: one step at a time, each in its own transaction.
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let steps: [(i64, &str); 5] = [
            (1, SCHEMA_V1),
            (2, MIGRATE_V2),
            (3, MIGRATE_V3),
            (4, MIGRATE_V4),
            (5, MIGRATE_V5),
        ];
        for (to, sql) in steps {
            if version < to {
                let tx = conn.unchecked_transaction()?;
                tx.execute_batch(sql)?;
                tx.pragma_update(None, "user_version", to)?;
                tx.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?1)",
                    [to.to_string()],
                )?;
                tx.commit()?;
            }
        }
        // The batch statements come in a few sizes each (see `sizes`).
        conn.set_prepared_statement_cache_capacity(64);
        Ok(Checkpoint {
            conn,
            path: path.to_path_buf(),
            seen: RefCell::default(),
        })
    }

    /// Moves WAL checkpoints (copying committed pages into the database,
    /// with an fsync) from this connection to a thread of its own, so a
    /// commit never waits for one. Until the guard is dropped.
    pub fn checkpoint_in_background(&self) -> anyhow::Result<BackgroundCheckpoints> {
        let conn = Connection::open(&self.path)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        self.conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("checkpointer".into())
            .spawn(move || {
                // PASSIVE: never waits for the writer or blocks it.
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(std::time::Duration::from_millis(100))
                {
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::debug!("background WAL checkpoint: {e}");
                    }
                }
            })?;
        Ok(BackgroundCheckpoints {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Back to checkpoints on commit (SQLite's default: every 1000 pages).
    pub fn checkpoint_on_commit(&self) -> anyhow::Result<()> {
        self.conn.pragma_update(None, "wal_autocheckpoint", 1000)?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    fn run_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Run> {
        Ok(Run {
            id: r.get(0)?,
            kind: r.get(1)?,
            input_path: r.get(2)?,
            input_size: r.get(3)?,
            input_hash: r.get(4)?,
            beta: r.get(5)?,
            options: r.get(6)?,
            state: r.get(7)?,
            planned: r.get(8)?,
            total_rows: r.get(9)?,
            started_at: r.get(10)?,
            updated_at: r.get(11)?,
        })
    }

    const RUN_COLS: &'static str = "id, kind, input_path, input_size, input_hash, beta, options, state, planned, total_rows, started_at, updated_at";

    /// The latest unfinished run of this kind for this input and project.
    pub fn unfinished_run(
        &self,
        kind: &str,
        input: &str,
        beta: &str,
    ) -> anyhow::Result<Option<Run>> {
        Ok(self
            .conn
            .query_row(
                &format!(
                    "SELECT {} FROM runs WHERE kind = ?1 AND input_path = ?2 AND beta = ?3 AND state != 'done' ORDER BY id DESC LIMIT 1",
                    Self::RUN_COLS
                ),
                params![kind, input, beta],
                Self::run_from_row,
            )
            .optional()?)
    }

    /// Reopens the rows a finished run gave up on as unclear, which their
    /// message tells to run again (`retries_exhausted`, `outcome_unknown`),
    /// and marks the run stopped, so the same command resumes it and does
    /// exactly those rows. Their calls may have taken effect (a write whose
    /// answer was lost, then a check that could not get through): they go
    /// back as `sending`, with the intent they had, so their effect is
    /// asked about before anything is sent again. Returns how many rows
    /// were reopened.
    pub fn reopen_given_up(&self, run: i64) -> anyhow::Result<u64> {
        let n = self.conn.execute(
            concat!(
                "UPDATE rows SET state = 'sending', \
                 action = NULL, error_class = NULL, http_status = NULL, message = NULL \
                 WHERE run_id = ?1 AND state = 'rejected' AND error_class IN ('retries_exhausted', 'outcome_unknown') AND ",
                no_outcome!()
            ),
            params![run],
        )?;
        if n > 0 {
            self.conn.execute(
                "UPDATE runs SET state = 'stopped', updated_at = ?2 WHERE id = ?1",
                params![run, now_secs()],
            )?;
        }
        Ok(n as u64)
    }

    /// The latest run of this kind that finished this input (by content)
    /// for this project; runs abandoned by `--fresh` do not count.
    pub fn finished_run(
        &self,
        kind: &str,
        input: &str,
        beta: &str,
        hash: &str,
    ) -> anyhow::Result<Option<Run>> {
        Ok(self
            .conn
            .query_row(
                &format!(
                    "SELECT {} FROM runs WHERE kind = ?1 AND input_path = ?2 AND beta = ?3 AND input_hash = ?4 \
                     AND state = 'done' AND options NOT LIKE '%(abandoned by --fresh)' ORDER BY id DESC LIMIT 1",
                    Self::RUN_COLS
                ),
                params![kind, input, beta, hash],
                Self::run_from_row,
            )
            .optional()?)
    }

    pub fn run(&self, id: i64) -> anyhow::Result<Option<Run>> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {} FROM runs WHERE id = ?1", Self::RUN_COLS),
                [id],
                Self::run_from_row,
            )
            .optional()?)
    }

    pub fn runs(&self) -> anyhow::Result<Vec<Run>> {
        let mut st = self
            .conn
            .prepare(&format!("SELECT {} FROM runs ORDER BY id", Self::RUN_COLS))?;
        let runs = st
            .query_map([], Self::run_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(runs)
    }

    pub fn new_run(
        &self,
        kind: &str,
        input: &str,
        size: Option<i64>,
        hash: Option<&str>,
        beta: &str,
        options: &str,
    ) -> anyhow::Result<i64> {
        let now = now_secs();
        self.conn.execute(
            "INSERT INTO runs (kind, input_path, input_size, input_hash, beta, options, state, started_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'planning', ?7, ?7)",
            params![kind, input, size, hash, beta, options, now],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Marks a run abandoned (by `--fresh`): it is kept for the record.
    pub fn abandon(&self, run: i64) -> anyhow::Result<()> {
        self.conn.execute(
            "UPDATE runs SET state = 'done', finished_at = ?2, updated_at = ?2, options = options || ' (abandoned by --fresh)' WHERE id = ?1",
            params![run, now_secs()],
        )?;
        Ok(())
    }

    pub fn set_state(&self, run: i64, state: &str) -> anyhow::Result<()> {
        let now = now_secs();
        self.conn.execute(
            "UPDATE runs SET state = ?2, updated_at = ?3, finished_at = CASE WHEN ?2 = 'done' THEN ?3 ELSE finished_at END WHERE id = ?1",
            params![run, state, now],
        )?;
        Ok(())
    }

    pub fn set_planned(&self, run: i64, total: u64) -> anyhow::Result<()> {
        self.conn.execute(
            "UPDATE runs SET planned = 1, total_rows = ?2, state = 'running', updated_at = ?3 WHERE id = ?1",
            params![run, total as i64, now_secs()],
        )?;
        Ok(())
    }

    pub fn begin(&self) -> anyhow::Result<()> {
        self.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        Ok(())
    }

    pub fn commit(&self) -> anyhow::Result<()> {
        if let Err(e) = self.conn.prepare_cached("COMMIT")?.execute([]) {
            // The index in memory may hold rows the database does not.
            self.seen.borrow_mut().run = None;
            return Err(e.into());
        }
        Ok(())
    }

    /// Makes room in the duplicate check for `emails` (the run's row count,
    /// when known before its rows are), so its index is not regrown.
    pub fn expect_emails(&self, emails: u64) {
        self.seen.borrow_mut().expect = emails.try_into().unwrap_or(usize::MAX);
    }

    /// Loads the duplicate check's index for `run`, if another is loaded.
    fn load_seen(&self, run: i64) -> anyhow::Result<()> {
        let mut seen = self.seen.borrow_mut();
        if seen.run == Some(run) {
            return Ok(());
        }
        seen.first = HashMap::default();
        seen.in_database = self.conn.query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'index' AND name = 'rows_by_key'",
            [],
            |r| r.get(0),
        )?;
        if !seen.in_database && seen.expect > seen.cap {
            self.conn.execute_batch(EMAIL_INDEX)?;
            seen.in_database = true;
        }
        if !seen.in_database {
            let room = seen.expect;
            seen.first.reserve(room);
            let mut st = self.conn.prepare(
                "SELECT line, key FROM rows WHERE run_id = ?1 AND key IS NOT NULL AND error_class IS NOT 'validation' AND state IS NOT 'skipped' ORDER BY line",
            )?;
            let mut rows = st.query([run])?;
            while let Some(r) = rows.next()? {
                let email: String = r.get(1)?;
                let line = r.get::<_, i64>(0)? as u64;
                seen.first.entry(email_hash(&email)).or_insert(line);
                if seen.first.len() > seen.cap {
                    // A resumed run past the cap: the database takes over.
                    seen.in_database = true;
                    seen.first = HashMap::default();
                    break;
                }
            }
            drop(rows);
            if seen.in_database {
                self.conn.execute_batch(EMAIL_INDEX)?;
            }
        }
        seen.run = Some(run);
        Ok(())
    }

    /// The first line of this run recorded with `email` (whose
    /// [`email_hash`] is `hash`), if any.
    fn first_line(&self, run: i64, email: &str, hash: u64) -> anyhow::Result<Option<u64>> {
        self.load_seen(run)?;
        let seen = self.seen.borrow();
        if seen.in_database {
            return self.first_line_in_rows(run, email, true);
        }
        let Some(&line) = seen.first.get(&hash) else {
            return Ok(None);
        };
        let mut at = self.conn.prepare_cached(
            "SELECT key FROM rows WHERE run_id = ?1 AND line = ?2 AND error_class IS NOT 'validation' AND state IS NOT 'skipped'",
        )?;
        let there: Option<Option<String>> = at
            .query_row(params![run, line as i64], |r| r.get(0))
            .optional()?;
        if there.flatten().as_deref() == Some(email) {
            return Ok(Some(line));
        }
        // Two emails with one hash (about one chance in 10^7 for a file of
        // 10^6 rows): ask the rows themselves.
        self.first_line_in_rows(run, email, false)
    }

    /// The first line with `email`, from the rows: through the index on
    /// emails when the database has it, else by reading the run's rows.
    fn first_line_in_rows(
        &self,
        run: i64,
        email: &str,
        indexed: bool,
    ) -> anyhow::Result<Option<u64>> {
        // Without statistics, SQLite's planner prefers the primary key for
        // min(line): the index must be named.
        let mut st = self.conn.prepare_cached(if indexed {
            "SELECT min(line) FROM rows INDEXED BY rows_by_key WHERE run_id = ?1 AND key = ?2 AND key IS NOT NULL AND error_class IS NOT 'validation' AND state IS NOT 'skipped'"
        } else {
            "SELECT min(line) FROM rows WHERE run_id = ?1 AND key = ?2 AND error_class IS NOT 'validation' AND state IS NOT 'skipped'"
        })?;
        let l: Option<i64> = st.query_row(params![run, email], |r| r.get(0))?;
        Ok(l.map(|l| l as u64))
    }

    /// Records `line` as the first with the email hashed `hash` (after its
    /// insert). Past the memory's cap, the database takes over the index.
    fn note_first(&self, hash: u64, line: u64) -> anyhow::Result<()> {
        let mut seen = self.seen.borrow_mut();
        if seen.in_database {
            return Ok(());
        }
        if seen.first.len() >= seen.cap {
            tracing::info!(
                "more than {} emails in this run: the duplicate check moves to an index in the checkpoint (slower, bounded memory)",
                seen.cap
            );
            self.conn.execute_batch(EMAIL_INDEX)?;
            seen.in_database = true;
            seen.first = HashMap::default();
            return Ok(());
        }
        seen.first.entry(hash).or_insert(line);
        Ok(())
    }

    /// Plans one row. Returns the first line with the same email when the
    /// email was seen before in this run.
    pub fn plan_row(&self, run: i64, line: u64, email: &str) -> anyhow::Result<Option<u64>> {
        let hash = email_hash(email);
        if let Some(first) = self.first_line(run, email, hash)? {
            // The same line: planned already (a resumed planning pass).
            return Ok((first != line).then_some(first));
        }
        let mut insert = self.conn.prepare_cached(
            "INSERT INTO rows (run_id, line, key, state) VALUES (?1, ?2, ?3, 'pending') ON CONFLICT DO NOTHING",
        )?;
        insert.execute(params![run, line as i64, email])?;
        self.note_first(hash, line)?;
        Ok(None)
    }

    /// Plans one row and marks it `sending` with its intent in one step (a
    /// run's single pass, when nothing needs the whole file checked first).
    /// Returns the first line with the same email when the email was seen
    /// before in this run: the row is then not recorded, and not sent.
    pub fn plan_sending(
        &self,
        run: i64,
        line: u64,
        email: &str,
        intent: Option<&'static str>,
    ) -> anyhow::Result<Option<u64>> {
        Ok(self.plan_sending_all(run, &[(line, email, intent)])?[0])
    }

    /// Plans rows and marks them `sending`, like [`Checkpoint::plan_sending`]
    /// for each, with one statement per [`BATCH_SIZES`] part. Returns, in the
    /// same order, the first line with the same email for each duplicate
    /// (an earlier row of the run or of `rows`): those are not recorded.
    pub fn plan_sending_all(
        &self,
        run: i64,
        rows: &[(u64, &str, Option<&'static str>)],
    ) -> anyhow::Result<Vec<Option<u64>>> {
        let mut firsts = Vec::with_capacity(rows.len());
        let mut fresh: Vec<(u64, &str, Option<&'static str>)> = Vec::with_capacity(rows.len());
        // Each email is hashed once, for the check within the batch, the
        // check against the run, and noting it. The batch's own emails are
        // found by their hashes (a few dozen compares), then compared whole.
        let mut hashes: Vec<u64> = Vec::with_capacity(rows.len());
        for &(line, email, intent) in rows {
            let hash = email_hash(email);
            let in_batch = hashes
                .iter()
                .zip(&fresh)
                .find(|(h, f)| **h == hash && f.1 == email)
                .map(|(_, f)| f.0);
            let first = match in_batch {
                Some(first) => Some(first),
                None => self.first_line(run, email, hash)?,
            };
            match first {
                Some(first) if first == line => bail!(
                    "line {line} of run {run} is in the checkpoint already; it cannot be planned again"
                ),
                Some(first) => firsts.push(Some(first)),
                None => {
                    fresh.push((line, email, intent));
                    hashes.push(hash);
                    firsts.push(None);
                }
            }
        }
        let mut rest = &fresh[..];
        for (size, n) in sizes(fresh.len()) {
            let (part, more) = rest.split_at(n);
            rest = more;
            let mut st = self.conn.prepare_cached(&batch_sql().plan_sending[size])?;
            st.raw_bind_parameter(1, run)?;
            for (i, (line, email, intent)) in part.iter().enumerate() {
                st.raw_bind_parameter(2 + 3 * i, *line as i64)?;
                st.raw_bind_parameter(3 + 3 * i, *email)?;
                st.raw_bind_parameter(4 + 3 * i, *intent)?;
            }
            if st.raw_execute()? != n {
                bail!(
                    "rows of run {run} near line {} are in the checkpoint already; they cannot be planned again",
                    part[0].0
                );
            }
        }
        for ((line, _, _), hash) in fresh.into_iter().zip(hashes) {
            self.note_first(hash, line)?;
        }
        Ok(firsts)
    }

    /// Applies updates in order; runs of `Done` go in one statement per
    /// [`BATCH_SIZES`] part.
    pub fn apply_all(&self, run: i64, updates: &[RowUpdate]) -> anyhow::Result<()> {
        let mut rest = updates;
        while !rest.is_empty() {
            let done = rest
                .iter()
                .take_while(|u| matches!(u, RowUpdate::Done { .. }))
                .count();
            if done == 0 {
                self.apply(run, &rest[0])?;
                rest = &rest[1..];
                continue;
            }
            for (size, n) in sizes(done) {
                let (part, more) = rest.split_at(n);
                rest = more;
                let mut st = self.conn.prepare_cached(&batch_sql().done[size])?;
                st.raw_bind_parameter(1, run)?;
                for (i, u) in part.iter().enumerate() {
                    let RowUpdate::Done {
                        line,
                        action,
                        target_id,
                    } = u
                    else {
                        unreachable!("a run of Done updates")
                    };
                    st.raw_bind_parameter(2 + 3 * i, *line as i64)?;
                    st.raw_bind_parameter(3 + 3 * i, *action)?;
                    st.raw_bind_parameter(4 + 3 * i, *target_id as i64)?;
                }
                st.raw_execute()?;
            }
        }
        Ok(())
    }

    pub fn apply(&self, run: i64, u: &RowUpdate) -> anyhow::Result<()> {
        match u {
            RowUpdate::Dispatched { from, to, intent } => {
                let mut st = self.conn.prepare_cached(concat!(
                    "UPDATE rows SET state = 'sending', attempts = attempts + 1, intent = COALESCE(intent, ?4) \
                     WHERE run_id = ?1 AND line BETWEEN ?2 AND ?3 AND state IN ('pending', 'sending') AND ",
                    no_outcome!()
                ))?;
                st.execute(params![run, *from as i64, *to as i64, intent])?;
            }
            RowUpdate::Pending { line } => {
                let mut st = self.conn.prepare_cached(concat!(
                    "UPDATE rows SET state = 'pending', intent = NULL, detail = NULL WHERE run_id = ?1 AND line = ?2 AND state = 'sending' AND ",
                    no_outcome!()
                ))?;
                st.execute(params![run, *line as i64])?;
            }
            RowUpdate::Sending {
                line,
                intent,
                detail,
            } => {
                let mut st = self.conn.prepare_cached(
                    "UPDATE rows SET state = 'sending', intent = ?3, detail = COALESCE(?4, detail) WHERE run_id = ?1 AND line = ?2",
                )?;
                st.execute(params![run, *line as i64, intent, detail])?;
            }
            RowUpdate::Done { .. } => self.apply_all(run, std::slice::from_ref(u))?,
            RowUpdate::Rejected {
                line,
                class,
                http_status,
                message,
                raw,
            } => {
                let mut st = self.conn.prepare_cached(
                    "INSERT INTO rows (run_id, line, state, action, error_class, http_status, message, raw)
                     VALUES (?1, ?2, 'rejected', 'rejected', ?3, ?4, ?5, ?6)
                     ON CONFLICT (run_id, line) DO UPDATE SET state = 'rejected', action = 'rejected',
                       error_class = excluded.error_class, http_status = excluded.http_status,
                       message = excluded.message, raw = COALESCE(excluded.raw, rows.raw),
                       intent = CASE WHEN excluded.error_class IN ('outcome_unknown', 'retries_exhausted') THEN rows.intent END",
                )?;
                st.execute(params![run, *line as i64, class, http_status, message, raw])?;
                // A row has one final state (no path rejects a row it saw
                // done; this keeps the counts right if one ever did).
                let mut st = self
                    .conn
                    .prepare_cached("DELETE FROM outcomes WHERE run_id = ?1 AND line = ?2")?;
                st.execute(params![run, *line as i64])?;
            }
            RowUpdate::Note { line, message } => {
                let mut st = self.conn.prepare_cached(
                    "UPDATE rows SET message = ?3 WHERE run_id = ?1 AND line = ?2",
                )?;
                st.execute(params![run, *line as i64, message])?;
            }
            RowUpdate::Skipped {
                line,
                class,
                key,
                message,
            } => {
                let mut st = self.conn.prepare_cached(
                    "INSERT INTO rows (run_id, line, key, state, action, error_class, message)
                     VALUES (?1, ?2, ?3, 'skipped', 'skipped', ?4, ?5)
                     ON CONFLICT (run_id, line) DO UPDATE SET key = excluded.key, state = 'skipped',
                       action = 'skipped', error_class = excluded.error_class, message = excluded.message, intent = NULL",
                )?;
                st.execute(params![run, *line as i64, key, class, message])?;
            }
        }
        Ok(())
    }

    /// Why the run's rows were skipped, each reason with its count, most
    /// frequent first.
    pub fn skip_reasons(&self, run: i64) -> anyhow::Result<Vec<(String, u64)>> {
        let mut st = self.conn.prepare_cached(
            "SELECT message, count(*) FROM rows WHERE run_id = ?1 AND state = 'skipped' \
             GROUP BY message ORDER BY count(*) DESC, message",
        )?;
        let v = st
            .query_map([run], |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?.unwrap_or_default(),
                    r.get::<_, i64>(1)? as u64,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(v)
    }

    /// Rows still to do, from `after_line` on, in line order.
    pub fn open_rows(
        &self,
        run: i64,
        after_line: u64,
        limit: usize,
    ) -> anyhow::Result<Vec<OpenRow>> {
        let mut st = self.conn.prepare_cached(concat!(
            "SELECT line, state = 'sending', intent, detail FROM rows WHERE run_id = ?1 AND line > ?2 AND state IN ('pending', 'sending') AND ",
            no_outcome!(),
            " ORDER BY line LIMIT ?3"
        ))?;
        let v = st
            .query_map(params![run, after_line as i64, limit as i64], |r| {
                Ok(OpenRow {
                    line: r.get::<_, i64>(0)? as u64,
                    sending: r.get(1)?,
                    intent: r.get(2)?,
                    detail: r.get(3)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(v)
    }

    /// Records where a planned row goes in the run's sending order, and
    /// where its record starts in the input.
    pub fn plan_order(&self, run: i64, ord: i64, line: u64, offset: u64) -> anyhow::Result<()> {
        let mut st = self.conn.prepare_cached(
            "INSERT OR IGNORE INTO row_order (run_id, ord, line, byte_offset) VALUES (?1, ?2, ?3, ?4)",
        )?;
        st.execute(params![run, ord, line as i64, offset as i64])?;
        Ok(())
    }

    /// Rows still to do in the run's sending order, after `after` (the
    /// last `(ord, line)` read), with each record's byte offset.
    pub fn open_rows_ordered(
        &self,
        run: i64,
        after: Option<(i64, u64)>,
        limit: usize,
    ) -> anyhow::Result<Vec<(i64, u64, OpenRow)>> {
        let (ord, line) = after.unwrap_or((i64::MIN, 0));
        let mut st = self.conn.prepare_cached(concat!(
            "SELECT o.ord, o.byte_offset, rows.line, rows.state = 'sending', rows.intent, rows.detail \
             FROM row_order o JOIN rows ON rows.run_id = o.run_id AND rows.line = o.line \
             WHERE o.run_id = ?1 AND (o.ord, o.line) > (?2, ?3) AND rows.state IN ('pending', 'sending') AND ",
            no_outcome!(),
            " ORDER BY o.ord, o.line LIMIT ?4"
        ))?;
        let v = st
            .query_map(params![run, ord, line as i64, limit as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    OpenRow {
                        line: r.get::<_, i64>(2)? as u64,
                        sending: r.get(3)?,
                        intent: r.get(4)?,
                        detail: r.get(5)?,
                    },
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(v)
    }

    /// Notes that other rows may name the row on `line` by `r` (the first
    /// row with a value keeps it).
    pub fn note_ref(&self, run: i64, r: &str, line: u64) -> anyhow::Result<()> {
        let mut st = self
            .conn
            .prepare_cached("INSERT OR IGNORE INTO refs (run_id, ref, line) VALUES (?1, ?2, ?3)")?;
        st.execute(params![run, r, line as i64])?;
        Ok(())
    }

    /// Notes that a row names `r` as its referrer.
    pub fn note_wanted_ref(&self, run: i64, r: &str) -> anyhow::Result<()> {
        let mut st = self
            .conn
            .prepare_cached("INSERT OR IGNORE INTO wanted_refs (run_id, ref) VALUES (?1, ?2)")?;
        st.execute(params![run, r])?;
        Ok(())
    }

    /// The line of the row other rows name by `r`.
    pub fn ref_line(&self, run: i64, r: &str) -> anyhow::Result<Option<u64>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT line FROM refs WHERE run_id = ?1 AND ref = ?2")?;
        Ok(st
            .query_row(params![run, r], |r| r.get::<_, i64>(0))
            .optional()?
            .map(|l| l as u64))
    }

    /// The rows some other row names as its referrer, with the record each
    /// one's outcome names when it is done.
    pub fn named_rows(&self, run: i64) -> anyhow::Result<Vec<(u64, Option<u64>)>> {
        let mut st = self.conn.prepare_cached(
            "SELECT r.line, o.target_id FROM refs r \
             JOIN wanted_refs w ON w.run_id = r.run_id AND w.ref = r.ref \
             LEFT JOIN outcomes o ON o.run_id = r.run_id AND o.line = r.line \
             WHERE r.run_id = ?1",
        )?;
        let v = st
            .query_map(params![run], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, Option<i64>>(1)?.map(|t| t as u64),
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(v)
    }

    /// The detail a row's intent was made durable with, if any (the engine
    /// reads it with the open rows; this reads one row's, for a check).
    pub fn detail(&self, run: i64, line: u64) -> anyhow::Result<Option<String>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT detail FROM rows WHERE run_id = ?1 AND line = ?2")?;
        Ok(st
            .query_row(params![run, line as i64], |r| r.get(0))
            .optional()?
            .flatten())
    }

    /// The run's rows by state. Tallied here rather than by a `GROUP BY`,
    /// which sorts every row: this is a plain scan of each table.
    pub fn counts(&self, run: i64) -> anyhow::Result<Counts> {
        fn tally(c: &mut Counts, key: &str) {
            match key {
                "rejected" => c.rejected += 1,
                "sending" => {
                    c.sending += 1;
                    c.pending += 1;
                }
                "pending" | "done" => c.pending += 1,
                k => match k.strip_prefix("skipped:") {
                    Some(class) => Counts::add(&mut c.skipped, class),
                    None => Counts::add(&mut c.done, k),
                },
            }
        }
        let mut c = Counts::default();
        let mut st = self
            .conn
            .prepare_cached(
            "SELECT CASE state WHEN 'skipped' THEN 'skipped:' || error_class ELSE COALESCE(action, state) END FROM rows WHERE run_id = ?1",
        )?;
        let mut rows = st.query([run])?;
        while let Some(r) = rows.next()? {
            tally(&mut c, r.get_ref(0)?.as_str()?);
        }
        // A row with an outcome is still `sending` in `rows` (the outcome
        // is appended, and the row is left as it was when it was sent).
        let mut st = self
            .conn
            .prepare_cached("SELECT action FROM outcomes WHERE run_id = ?1")?;
        let mut rows = st.query([run])?;
        let mut outcomes = 0;
        while let Some(r) = rows.next()? {
            tally(&mut c, r.get_ref(0)?.as_str()?);
            outcomes += 1;
        }
        if outcomes > c.sending {
            bail!(
                "the checkpoint {} is inconsistent: run {run} has {outcomes} outcomes for {} rows in flight",
                self.path.display(),
                c.sending
            );
        }
        c.sending -= outcomes;
        c.pending -= outcomes;
        Ok(c)
    }

    /// The run's rejected rows, in line order, for the errors report.
    pub fn each_rejected(
        &self,
        run: i64,
        mut f: impl FnMut(RejectedRow) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut st = self.conn.prepare(
            "SELECT line, error_class, http_status, message, raw FROM rows WHERE run_id = ?1 AND state = 'rejected' ORDER BY line",
        )?;
        let mut rows = st.query(params![run])?;
        while let Some(r) = rows.next()? {
            f(RejectedRow {
                line: r.get::<_, i64>(0)? as u64,
                class: r.get(1)?,
                http_status: r.get(2)?,
                message: r.get(3)?,
                cells: r
                    .get::<_, Option<String>>(4)?
                    .and_then(|raw| serde_json::from_str(&raw).ok())
                    .unwrap_or_default(),
            })?;
        }
        Ok(())
    }

    /// What became of each of the run's rows, in line order, for the
    /// results report. A row done under version 2 has its action in `rows`;
    /// later, in `outcomes`.
    pub fn each_result(
        &self,
        run: i64,
        mut f: impl FnMut(RowResult) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut st = self.conn.prepare(
            "SELECT rows.line, key, COALESCE(o.action, rows.action, state), COALESCE(o.target_id, rows.target_id), error_class, message, raw \
             FROM rows LEFT JOIN outcomes o ON o.run_id = rows.run_id AND o.line = rows.line \
             WHERE rows.run_id = ?1 ORDER BY rows.line",
        )?;
        let mut rows = st.query(params![run])?;
        while let Some(r) = rows.next()? {
            f(RowResult {
                line: r.get::<_, i64>(0)? as u64,
                key: r.get(1)?,
                action: r.get(2)?,
                target_id: r.get::<_, Option<i64>>(3)?.filter(|i| *i > 0),
                class: r.get(4)?,
                message: r.get(5)?,
                raw: r.get(6)?,
            })?;
        }
        Ok(())
    }

    pub fn store_known(&self, run: i64, email: &str, id: u64, record: &str) -> anyhow::Result<()> {
        let mut st = self.conn.prepare_cached(
            "INSERT OR REPLACE INTO known (run_id, key, target_id, record) VALUES (?1, ?2, ?3, ?4)",
        )?;
        st.execute(params![run, email, id as i64, record])?;
        Ok(())
    }

    /// The keys of the run's rows still to do, in line order (an operation
    /// that resolves its rows before the first call reads them here).
    pub fn open_keys(&self, run: i64) -> anyhow::Result<Vec<String>> {
        let mut st = self.conn.prepare(concat!(
            "SELECT key FROM rows WHERE run_id = ?1 AND key IS NOT NULL AND state IN ('pending', 'sending') AND ",
            no_outcome!(),
            " ORDER BY line"
        ))?;
        let v = st
            .query_map([run], |r| r.get(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(v)
    }

    /// Every record the run stored with [`Checkpoint::store_known`], in key
    /// order: (key, target id, record).
    pub fn known_records(&self, run: i64) -> anyhow::Result<Vec<(String, u64, String)>> {
        let mut st = self
            .conn
            .prepare("SELECT key, target_id, record FROM known WHERE run_id = ?1 ORDER BY key")?;
        let v = st
            .query_map([run], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(v)
    }

    /// How far the run's listing of the project got (see
    /// [`ListingMark`]); `None` before it began.
    pub fn listing(&self, run: i64) -> anyhow::Result<Option<ListingMark>> {
        let v: Option<String> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                [format!("listing:{run}")],
                |r| r.get(0),
            )
            .optional()?;
        Ok(v.and_then(|v| serde_json::from_str(&v).ok()))
    }

    /// Records how far the listing got; in the transaction that stores
    /// the page's users, so the two never disagree.
    pub fn set_listing(&self, run: i64, mark: &ListingMark) -> anyhow::Result<()> {
        self.conn
            .prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?
            .execute(params![
                format!("listing:{run}"),
                serde_json::to_string(mark).expect("a mark serialises")
            ])?;
        Ok(())
    }

    pub fn known(&self, run: i64, email: &str) -> anyhow::Result<Option<String>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT record FROM known WHERE run_id = ?1 AND key = ?2")?;
        Ok(st.query_row(params![run, email], |r| r.get(0)).optional()?)
    }
}

/// How far a run's listing of the project got: a run resumed lists from
/// `next_page`, its users of the pages before already in `known`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ListingMark {
    /// The next page to list; `None` once the listing is complete.
    pub next_page: Option<u64>,
    pub pages_done: u64,
    /// Users stored so far.
    pub users: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A place for a checkpoint file that outlives one `Checkpoint`.
    fn file() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ck.sqlite");
        (dir, path)
    }

    fn run_in(ck: &Checkpoint) -> i64 {
        ck.new_run("import", "in.csv", None, None, "1", "{}")
            .unwrap()
    }

    #[test]
    fn duplicates_are_found_after_a_reopen() {
        let (_dir, path) = file();
        let run = {
            let ck = Checkpoint::open(&path).unwrap();
            let run = run_in(&ck);
            assert_eq!(ck.plan_row(run, 2, "a@x.io").unwrap(), None);
            assert_eq!(
                ck.plan_sending(run, 3, "b@x.io", Some("create")).unwrap(),
                None
            );
            assert_eq!(ck.plan_row(run, 4, "a@x.io").unwrap(), Some(2));
            run
        };
        let ck = Checkpoint::open(&path).unwrap();
        assert_eq!(ck.plan_sending(run, 5, "b@x.io", None).unwrap(), Some(3));
        // A line planned already is not its own duplicate (a resumed
        // planning pass), but it cannot be recorded twice as sending.
        assert_eq!(ck.plan_row(run, 2, "a@x.io").unwrap(), None);
        assert!(ck.plan_sending(run, 3, "b@x.io", None).is_err());
        // Another run has its own emails.
        let other = run_in(&ck);
        assert_eq!(ck.plan_row(other, 2, "b@x.io").unwrap(), None);
        assert_eq!(ck.plan_row(run, 6, "a@x.io").unwrap(), Some(2));
    }

    /// What an operation writes with an intent comes back with the row
    /// after a stop, and a row put back to pending forgets it.
    #[test]
    fn a_rows_detail_is_read_back_with_its_intent() {
        let (_dir, path) = file();
        let run = {
            let ck = Checkpoint::open(&path).unwrap();
            let run = run_in(&ck);
            ck.plan_row(run, 2, "a@x.io").unwrap();
            ck.plan_row(run, 3, "b@x.io").unwrap();
            for line in [2, 3] {
                ck.apply(
                    run,
                    &RowUpdate::Sending {
                        line,
                        intent: "checkin",
                        detail: Some(format!("{{\"n\":{line}}}")),
                    },
                )
                .unwrap();
            }
            ck.apply(run, &RowUpdate::Pending { line: 3 }).unwrap();
            run
        };
        let ck = Checkpoint::open(&path).unwrap();
        let open = ck.open_rows(run, 0, 10).unwrap();
        assert_eq!(
            open[0],
            OpenRow {
                line: 2,
                sending: true,
                intent: Some("checkin".into()),
                detail: Some("{\"n\":2}".into()),
            }
        );
        assert_eq!(
            (open[1].line, open[1].sending, &open[1].detail),
            (3, false, &None)
        );
        assert_eq!(ck.open_keys(run).unwrap(), ["a@x.io", "b@x.io"]);
    }

    #[test]
    fn batches_go_in_parts_and_keep_their_order() {
        let parts: Vec<usize> = sizes(90).into_iter().map(|(_, n)| n).collect();
        assert_eq!(parts, [64, 16, 4, 4, 1, 1]);
        assert!(sizes(0).is_empty());
        let ck = Checkpoint::in_memory().unwrap();
        let run = run_in(&ck);
        let emails: Vec<String> = (0..90).map(|i| format!("{i}@x.io")).collect();
        let mut plan: Vec<_> = (0..90)
            .map(|i| (i as u64 + 2, emails[i].as_str(), Some("create")))
            .collect();
        // Line 50 repeats line 10's email: a duplicate within the batch.
        plan[48].1 = "8@x.io";
        let firsts = ck.plan_sending_all(run, &plan).unwrap();
        assert_eq!(firsts[48], Some(10));
        assert_eq!(firsts.iter().filter(|f| f.is_some()).count(), 1);
        assert_eq!(ck.counts(run).unwrap().sending, 89);
        // Done in runs, with a rejection between two of them.
        let mut updates: Vec<RowUpdate> = plan
            .iter()
            .filter(|p| p.0 != 50)
            .map(|p| RowUpdate::Done {
                line: p.0,
                action: "created",
                target_id: p.0 * 10,
            })
            .collect();
        updates[30] = RowUpdate::Rejected {
            line: 32,
            class: "rejected_by_api",
            http_status: Some(422),
            message: "no".into(),
            raw: None,
        };
        ck.apply_all(run, &updates).unwrap();
        let c = ck.counts(run).unwrap();
        assert_eq!((c.action("created"), c.rejected, c.pending), (88, 1, 0));
        let (id, action): (i64, Option<String>) = ck
            .conn()
            .query_row(
                "SELECT target_id, action FROM outcomes WHERE run_id = ?1 AND line = 91",
                [run],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((id, action.as_deref()), (910, Some("created")));
    }

    #[test]
    fn two_emails_with_one_hash_are_told_apart() {
        let ck = Checkpoint::in_memory().unwrap();
        let run = run_in(&ck);
        assert_eq!(ck.plan_row(run, 2, "a@x.io").unwrap(), None);
        // Pretend "c@x.io" hashes like "a@x.io".
        ck.seen.borrow_mut().first.insert(email_hash("c@x.io"), 2);
        assert_eq!(ck.plan_row(run, 3, "c@x.io").unwrap(), None);
        assert_eq!(ck.plan_row(run, 4, "c@x.io").unwrap(), Some(3));
        assert_eq!(ck.plan_row(run, 5, "a@x.io").unwrap(), Some(2));
    }

    #[test]
    fn past_the_memory_cap_the_database_keeps_the_index() {
        let (_dir, path) = file();
        let ck = Checkpoint::open(&path).unwrap();
        ck.seen.borrow_mut().cap = 3;
        let run = run_in(&ck);
        for line in 2..10 {
            let email = format!("{line}@x.io");
            assert_eq!(ck.plan_row(run, line, &email).unwrap(), None);
        }
        assert!(ck.seen.borrow().in_database);
        assert!(ck.seen.borrow().first.is_empty());
        assert_eq!(ck.plan_row(run, 10, "2@x.io").unwrap(), Some(2));
        assert_eq!(ck.plan_row(run, 11, "9@x.io").unwrap(), Some(9));
        // Reopened, and for a new run too.
        drop(ck);
        let ck = Checkpoint::open(&path).unwrap();
        assert_eq!(ck.plan_row(run, 12, "8@x.io").unwrap(), Some(8));
        assert!(ck.seen.borrow().in_database);
        let other = run_in(&ck);
        assert_eq!(ck.plan_row(other, 2, "8@x.io").unwrap(), None);
        assert_eq!(ck.plan_row(other, 3, "8@x.io").unwrap(), Some(2));
    }

    #[test]
    fn a_run_resumed_past_the_cap_uses_the_database() {
        let (_dir, path) = file();
        let run = {
            let ck = Checkpoint::open(&path).unwrap();
            let run = run_in(&ck);
            for line in 2..10 {
                ck.plan_row(run, line, &format!("{line}@x.io")).unwrap();
            }
            run
        };
        let ck = Checkpoint::open(&path).unwrap();
        ck.seen.borrow_mut().cap = 5;
        assert_eq!(ck.plan_row(run, 10, "3@x.io").unwrap(), Some(3));
        assert!(ck.seen.borrow().in_database);
    }

    #[test]
    fn an_intent_keeps_its_detail_until_the_row_goes_back_to_pending() {
        let ck = Checkpoint::in_memory().unwrap();
        let run = run_in(&ck);
        ck.plan_row(run, 2, "a@x.io").unwrap();
        let sending = |detail: Option<&str>| RowUpdate::Sending {
            line: 2,
            intent: "issue",
            detail: detail.map(str::to_string),
        };
        ck.apply(run, &sending(Some("[1,2]"))).unwrap();
        assert_eq!(ck.detail(run, 2).unwrap().as_deref(), Some("[1,2]"));
        // An intent made durable again without a detail keeps the one it had.
        ck.apply(run, &sending(None)).unwrap();
        assert_eq!(ck.detail(run, 2).unwrap().as_deref(), Some("[1,2]"));
        ck.apply(run, &RowUpdate::Pending { line: 2 }).unwrap();
        assert_eq!(ck.detail(run, 2).unwrap(), None);
        assert_eq!(ck.detail(run, 99).unwrap(), None);
    }

    #[test]
    fn a_row_with_an_outcome_is_neither_open_nor_dispatched_again() {
        let ck = Checkpoint::in_memory().unwrap();
        let run = run_in(&ck);
        for line in 2..6 {
            ck.plan_row(run, line, &format!("{line}@x.io")).unwrap();
        }
        ck.apply(
            run,
            &RowUpdate::Dispatched {
                from: 2,
                to: 5,
                intent: Some("create"),
            },
        )
        .unwrap();
        ck.apply_all(
            run,
            &[
                RowUpdate::Done {
                    line: 3,
                    action: "created",
                    target_id: 30,
                },
                RowUpdate::Done {
                    line: 4,
                    action: "updated",
                    target_id: 40,
                },
            ],
        )
        .unwrap();
        // A stopped run's rows go back to pending; the done ones stay done.
        for line in 2..6 {
            ck.apply(run, &RowUpdate::Pending { line }).unwrap();
        }
        let open: Vec<u64> = ck
            .open_rows(run, 0, 10)
            .unwrap()
            .iter()
            .map(|r| r.line)
            .collect();
        assert_eq!(open, [2, 5]);
        let c = ck.counts(run).unwrap();
        assert_eq!(
            (
                c.action("created"),
                c.action("updated"),
                c.pending,
                c.sending,
                c.total()
            ),
            (1, 1, 2, 0, 4)
        );
        // Dispatched again over the whole range: only the open rows move.
        ck.apply(
            run,
            &RowUpdate::Dispatched {
                from: 2,
                to: 5,
                intent: None,
            },
        )
        .unwrap();
        let attempts: Vec<i64> = ck
            .conn()
            .prepare("SELECT attempts FROM rows WHERE run_id = ?1 ORDER BY line")
            .unwrap()
            .query_map([run], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(attempts, [2, 1, 1, 2]);
        let c = ck.counts(run).unwrap();
        assert_eq!((c.pending, c.sending), (2, 2));
        // A rejection is final, whatever came before it.
        ck.apply(
            run,
            &RowUpdate::Rejected {
                line: 4,
                class: "rejected_by_api",
                http_status: Some(422),
                message: "no".into(),
                raw: None,
            },
        )
        .unwrap();
        let c = ck.counts(run).unwrap();
        assert_eq!(
            (
                c.action("created"),
                c.action("updated"),
                c.rejected,
                c.total()
            ),
            (1, 0, 1, 4)
        );
    }

    #[test]
    fn a_version_2_checkpoint_keeps_its_done_rows() {
        let (_dir, path) = file();
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            conn.execute_batch(MIGRATE_V2).unwrap();
            conn.pragma_update(None, "user_version", 2).unwrap();
            conn.execute_batch(
                "INSERT INTO runs (id, kind, input_path, beta, options, state, started_at, updated_at)
                 VALUES (1, 'import', 'in.csv', '1', '{}', 'stopped', 0, 0);
                 INSERT INTO rows (run_id, line, email, state, action, tester_id)
                   VALUES (1, 2, 'a@x.io', 'done', 'created', 20);
                 INSERT INTO rows (run_id, line, email, state, intent) VALUES (1, 3, 'b@x.io', 'sending', 'create');",
            )
            .unwrap();
        }
        let ck = Checkpoint::open(&path).unwrap();
        let c = ck.counts(1).unwrap();
        assert_eq!((c.action("created"), c.pending, c.sending), (1, 1, 1));
        let open: Vec<u64> = ck
            .open_rows(1, 0, 10)
            .unwrap()
            .iter()
            .map(|r| r.line)
            .collect();
        assert_eq!(open, [3]);
        ck.apply_all(
            1,
            &[RowUpdate::Done {
                line: 3,
                action: "created",
                target_id: 30,
            }],
        )
        .unwrap();
        let c = ck.counts(1).unwrap();
        assert_eq!((c.action("created"), c.pending, c.sending), (2, 0, 0));
        assert!(ck.open_rows(1, 0, 10).unwrap().is_empty());
        // The results report reads both kinds of done row.
        let mut results = vec![];
        ck.each_result(1, |r| {
            results.push((r.line, r.key.unwrap(), r.action, r.target_id.unwrap()));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            results,
            [
                (2, "a@x.io".to_string(), "created".to_string(), 20),
                (3, "b@x.io".to_string(), "created".to_string(), 30)
            ]
        );
    }

    #[test]
    fn a_new_checkpoint_has_the_schema_the_migrations_reach() {
        fn tables(conn: &Connection) -> Vec<(String, String, String)> {
            let mut st = conn
                .prepare(
                    "SELECT m.name, p.name, p.type FROM sqlite_master m, pragma_table_info(m.name) p \
                     WHERE m.type = 'table' ORDER BY m.name, p.cid",
                )
                .unwrap();
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        }
        let (_dir, path) = file();
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
        }
        let migrated = Checkpoint::open(&path).unwrap();
        let new = Checkpoint::in_memory().unwrap();
        assert_eq!(tables(migrated.conn()), tables(new.conn()));
    }

    #[test]
    fn a_version_1_checkpoint_is_migrated_and_resumes() {
        let (_dir, path) = file();
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute_batch(
                "INSERT INTO runs (id, kind, input_path, beta, options, state, started_at, updated_at)
                 VALUES (1, 'import', 'in.csv', '1', '{}', 'running', 0, 0);
                 INSERT INTO rows (run_id, line, email, state) VALUES (1, 2, 'a@x.io', 'done');",
            )
            .unwrap();
        }
        let ck = Checkpoint::open(&path).unwrap();
        let version: i64 = ck
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let index: Option<String> = ck
            .conn()
            .query_row(
                "SELECT name FROM sqlite_master WHERE name = 'rows_email'",
                [],
                |r| r.get(0),
            )
            .optional()
            .unwrap();
        assert_eq!(index, None);
        assert_eq!(ck.plan_row(1, 3, "a@x.io").unwrap(), Some(2));
    }
}
