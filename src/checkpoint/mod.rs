//! The local SQLite checkpoint: one database (WAL) that journals every run
//! and the state of every input row, so an interrupted run resumes where it
//! stopped.
//!
//! Guarantees: a row is `sending` on disk before its create is sent, so a
//! crash at any moment leaves at most the rows in flight in doubt, and those
//! are looked up before anything is retried. The schema carries a version
//! (`meta.schema_version`) and is migrated forward on open.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use rusqlite::{Connection, OptionalExtension, params};

pub const SCHEMA_VERSION: i64 = 1;

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

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub rejected: u64,
    /// Open rows (pending or sending).
    pub pending: u64,
    /// Of those, rows that were in flight when a run stopped.
    pub sending: u64,
}

impl Counts {
    pub fn finished(&self) -> u64 {
        self.created + self.updated + self.unchanged + self.rejected
    }

    /// Every row recorded.
    pub fn total(&self) -> u64 {
        self.finished() + self.pending
    }
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
    /// About to send a `create` or an `update`.
    Sending { line: u64, intent: &'static str },
    /// Back to pending (stopped before it was sent).
    Pending { line: u64 },
    Done {
        line: u64,
        action: &'static str,
        tester_id: u64,
    },
    Rejected {
        line: u64,
        class: &'static str,
        http_status: Option<u16>,
        message: String,
        raw: Option<String>,
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
}

impl Checkpoint {
    pub fn open(path: &Path) -> anyhow::Result<Checkpoint> {
        let conn = Connection::open(path)
            .with_context(|| format!("failed to open the checkpoint {}", path.display()))?;
        Self::setup(conn, path)
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
        if version < 1 {
            conn.execute_batch(SCHEMA_V1)?;
            conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?1)",
                [SCHEMA_VERSION.to_string()],
            )?;
        }
        // Later versions migrate here, one step at a time.
        Ok(Checkpoint {
            conn,
            path: path.to_path_buf(),
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
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(())
    }

    pub fn commit(&self) -> anyhow::Result<()> {
        self.conn.execute_batch("COMMIT")?;
        Ok(())
    }

    /// Plans one row. Returns the first line with the same email when the
    /// email was seen before in this run.
    pub fn plan_row(&self, run: i64, line: u64, email: &str) -> anyhow::Result<Option<u64>> {
        let mut insert = self.conn.prepare_cached(
            "INSERT INTO rows (run_id, line, email, state) VALUES (?1, ?2, ?3, 'pending') ON CONFLICT DO NOTHING",
        )?;
        if insert.execute(params![run, line as i64, email])? == 1 {
            return Ok(None);
        }
        let mut first = self
            .conn
            .prepare_cached("SELECT line FROM rows WHERE run_id = ?1 AND email = ?2 AND error_class IS NOT 'validation'")?;
        let l: Option<i64> = first
            .query_row(params![run, email], |r| r.get(0))
            .optional()?;
        match l {
            Some(l) if l as u64 != line => Ok(Some(l as u64)),
            // Planned already (a resumed planning pass).
            _ => Ok(None),
        }
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
        let mut insert = self.conn.prepare_cached(
            "INSERT INTO rows (run_id, line, email, state, intent, attempts) VALUES (?1, ?2, ?3, 'sending', ?4, 1) ON CONFLICT DO NOTHING",
        )?;
        if insert.execute(params![run, line as i64, email, intent])? == 1 {
            return Ok(None);
        }
        match self.plan_row(run, line, email)? {
            Some(first) => Ok(Some(first)),
            None => bail!(
                "line {line} of run {run} is in the checkpoint already; it cannot be planned again"
            ),
        }
    }

    pub fn apply(&self, run: i64, u: &RowUpdate) -> anyhow::Result<()> {
        match u {
            RowUpdate::Dispatched { from, to, intent } => {
                let mut st = self.conn.prepare_cached(
                    "UPDATE rows SET state = 'sending', attempts = attempts + 1, intent = COALESCE(intent, ?4) \
                     WHERE run_id = ?1 AND line BETWEEN ?2 AND ?3 AND state IN ('pending', 'sending')",
                )?;
                st.execute(params![run, *from as i64, *to as i64, intent])?;
            }
            RowUpdate::Pending { line } => {
                let mut st = self.conn.prepare_cached(
                    "UPDATE rows SET state = 'pending', intent = NULL WHERE run_id = ?1 AND line = ?2 AND state = 'sending'",
                )?;
                st.execute(params![run, *line as i64])?;
            }
            RowUpdate::Sending { line, intent } => {
                let mut st = self.conn.prepare_cached(
                    "UPDATE rows SET state = 'sending', intent = ?3 WHERE run_id = ?1 AND line = ?2",
                )?;
                st.execute(params![run, *line as i64, intent])?;
            }
            RowUpdate::Done {
                line,
                action,
                tester_id,
            } => {
                let mut st = self.conn.prepare_cached(
                    "UPDATE rows SET state = 'done', action = ?3, tester_id = ?4, intent = NULL WHERE run_id = ?1 AND line = ?2",
                )?;
                st.execute(params![run, *line as i64, action, *tester_id as i64])?;
            }
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
                       message = excluded.message, raw = COALESCE(excluded.raw, rows.raw), intent = NULL",
                )?;
                st.execute(params![run, *line as i64, class, http_status, message, raw])?;
            }
        }
        Ok(())
    }

    /// Rows still to do, from `after_line` on, in line order: (line, was it
    /// `sending`, intent).
    pub fn open_rows(
        &self,
        run: i64,
        after_line: u64,
        limit: usize,
    ) -> anyhow::Result<Vec<(u64, bool, Option<String>)>> {
        let mut st = self.conn.prepare_cached(
            "SELECT line, state = 'sending', intent FROM rows WHERE run_id = ?1 AND line > ?2 AND state IN ('pending', 'sending') ORDER BY line LIMIT ?3",
        )?;
        let v = st
            .query_map(params![run, after_line as i64, limit as i64], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(v)
    }

    pub fn counts(&self, run: i64) -> anyhow::Result<Counts> {
        let mut c = Counts::default();
        let mut st = self.conn.prepare(
            "SELECT COALESCE(action, state), count(*) FROM rows WHERE run_id = ?1 GROUP BY 1",
        )?;
        let rows = st.query_map([run], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })?;
        for r in rows {
            let (k, n) = r?;
            match k.as_str() {
                "created" => c.created = n,
                "updated" => c.updated = n,
                "unchanged" => c.unchanged = n,
                "rejected" => c.rejected = n,
                "sending" => {
                    c.sending = n;
                    c.pending += n;
                }
                _ => c.pending += n,
            }
        }
        Ok(c)
    }

    pub fn store_known(&self, run: i64, email: &str, id: u64, record: &str) -> anyhow::Result<()> {
        let mut st = self.conn.prepare_cached(
            "INSERT OR REPLACE INTO known_testers (run_id, email, tester_id, record) VALUES (?1, ?2, ?3, ?4)",
        )?;
        st.execute(params![run, email, id as i64, record])?;
        Ok(())
    }

    pub fn known(&self, run: i64, email: &str) -> anyhow::Result<Option<String>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT record FROM known_testers WHERE run_id = ?1 AND email = ?2")?;
        Ok(st.query_row(params![run, email], |r| r.get(0)).optional()?)
    }
}
