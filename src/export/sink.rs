//! Where exported pages go. Each page is written and checkpointed together:
//! in one SQLite transaction for SQLite output; for CSV and JSONL, appended
//! to a spool beside the output, then the checkpoint records the spool's new
//! length. A resumed export truncates the spool to that length and goes on
//! from the next page: no duplicate, no gap. Duplicates from shifting pages
//! are dropped by id.
//!
//! The checkpoint also holds the list's sizes (`X-Pagination` pages and
//! total) seen by the current pass and whether the list is being read once
//! more, so a resumed export sees that the list changed while it was stopped
//! exactly as an uninterrupted one would.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

use super::resource::Resource;
use crate::output::AtomicFile;
use crate::time::iso8601;

/// The version of both the SQLite export and the CSV/JSONL checkpoint.
/// 2: `list_sizes` and `reread` on `export_runs` and `export_files`.
/// 3: the mirror of sync (`email_key`, `projects`).
/// 4: the webhook journal (`webhook_events`) and the reconciliation figures
/// on `export_runs`.
pub const EXPORT_SCHEMA_VERSION: i64 = 4;

/// A list's size as `X-Pagination` tells it: pages, and records if known.
pub type ListSize = (u64, Option<u64>);

/// Where a part starts: a new run, or the one a stopped export left open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub run: i64,
    pub next_page: u64,
    /// Records written by this run so far.
    pub rows: u64,
    /// The distinct sizes, in order, the current pass saw before the stop:
    /// more than one means the list changed while it was read.
    pub sizes: Vec<ListSize>,
    /// The list is already being read once more from the start.
    pub reread: bool,
}

impl Started {
    fn new(run: i64) -> Started {
        Started {
            run,
            next_page: 1,
            rows: 0,
            sizes: vec![],
            reread: false,
        }
    }
}

/// `list_sizes` as stored: absent (a run from schema version 1) is unknown.
fn parse_sizes(text: Option<String>) -> anyhow::Result<Vec<ListSize>> {
    text.map(|t| serde_json::from_str(&t).context("failed to read list_sizes"))
        .transpose()
        .map(Option::unwrap_or_default)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Jsonl,
    Sqlite,
}

impl Format {
    /// As the user names it (`--format csv`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Jsonl => "jsonl",
            Format::Sqlite => "sqlite",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Format, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "csv" => Ok(Format::Csv),
            "jsonl" => Ok(Format::Jsonl),
            "sqlite" => Ok(Format::Sqlite),
            _ => Err(format!(
                "unknown format {s:?}; expected csv, jsonl or sqlite"
            )),
        }
    }
}

/// One resource of one project being exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub beta_id: i64,
    pub resource: Resource,
    pub filters: String,
}

pub trait Sink: Send {
    /// Starts (or resumes) a part.
    fn start(&mut self, part: &Part, fresh: bool) -> anyhow::Result<Started>;
    /// Writes one page and records `next_page` and the sizes the current
    /// pass has seen; returns how many records were new to this run.
    fn page(
        &mut self,
        run: i64,
        part: &Part,
        items: &[Value],
        next_page: u64,
        sizes: &[ListSize],
    ) -> anyhow::Result<u64>;
    /// The list changed while it was read: it is read once more from page
    /// 1, and the new pass has seen `sizes` so far.
    fn reread(&mut self, run: i64, part: &Part, sizes: &[ListSize]) -> anyhow::Result<()>;
    /// Closes a part. `complete` when every page was read; `last_pass_stable`
    /// when the list kept its size through the last pass, so a record that
    /// pass did not see is gone.
    fn finish(
        &mut self,
        run: i64,
        part: &Part,
        complete: bool,
        consistent: bool,
        last_pass_stable: bool,
    ) -> anyhow::Result<u64>;
    /// Makes the output final (renames files into place).
    fn close(&mut self) -> anyhow::Result<()>;
    /// For a listing of users into a mirror: the records new to it and the
    /// records changed, as counted by the run's pages.
    fn reconciliation(&mut self, _run: i64) -> anyhow::Result<Option<(u64, u64)>> {
        Ok(None)
    }
    /// Keeps a project's UID beside its numeric id, where the output has a
    /// place for it (the SQLite mirror).
    fn note_project(
        &mut self,
        _beta_id: i64,
        _uid: Option<&str>,
        _name: Option<&str>,
    ) -> anyhow::Result<()> {
        Ok(())
    }
}

fn now_iso() -> String {
    iso8601(std::time::SystemTime::now())
}

fn open_db(path: &Path) -> anyhow::Result<Connection> {
    crate::fsutil::private_sqlite(path)?;
    let conn =
        Connection::open(path).with_context(|| format!("failed to open {}", path.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

/// Brings a file to [`EXPORT_SCHEMA_VERSION`], one step at a time, each in
/// its own transaction.
fn migrate(conn: &Connection, path: &Path, steps: &[(i64, String)]) -> anyhow::Result<()> {
    let v: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if v > EXPORT_SCHEMA_VERSION {
        bail!(
            "{} has schema version {v}, newer than this prefsync understands ({EXPORT_SCHEMA_VERSION}); upgrade prefsync",
            path.display()
        );
    }
    for (to, sql) in steps {
        if v < *to {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(sql)
                .with_context(|| format!("failed to migrate {} to version {to}", path.display()))?;
            tx.pragma_update(None, "user_version", to)?;
            tx.commit()?;
        }
    }
    Ok(())
}

// ---- SQLite output ---------------------------------------------------------

/// A SQLite export: typed tables, the whole record as JSON, first and last
/// seen, and `deleted_at` for records gone from a later complete run.
pub struct SqliteSink {
    conn: Connection,
}

impl SqliteSink {
    pub fn open(path: &Path) -> anyhow::Result<SqliteSink> {
        let conn = open_db(path)?;
        migrate(
            &conn,
            path,
            &[
                (1, Self::schema_v1()),
                (2, Self::migrate_v2().into()),
                (3, Self::migrate_v3().into()),
                (4, Self::migrate_v4().into()),
            ],
        )?;
        Ok(SqliteSink { conn })
    }

    fn schema_v1() -> String {
        let mut ddl = String::from(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS export_runs (
                id INTEGER PRIMARY KEY,
                beta_id INTEGER NOT NULL,
                resource TEXT NOT NULL,
                filters TEXT NOT NULL,
                started_at TEXT NOT NULL,
                finished_at TEXT,
                complete INTEGER NOT NULL DEFAULT 0,
                consistent INTEGER,
                rows INTEGER NOT NULL DEFAULT 0,
                next_page INTEGER NOT NULL DEFAULT 1,
                deleted INTEGER NOT NULL DEFAULT 0
             );",
        );
        for r in [
            Resource::Testers,
            Resource::Rewards,
            Resource::Suppressions,
            Resource::Points,
            Resource::Betas,
        ] {
            let typed: Vec<String> = r
                .sql_columns()
                .iter()
                .map(|(c, t)| format!("{c} {t}"))
                .collect();
            ddl.push_str(&format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    beta_id INTEGER NOT NULL,
                    id INTEGER NOT NULL,
                    {typed},
                    record TEXT NOT NULL,
                    first_seen_at TEXT NOT NULL,
                    last_seen_at TEXT NOT NULL,
                    last_seen_run INTEGER NOT NULL,
                    deleted_at TEXT,
                    PRIMARY KEY (beta_id, id)
                );",
                t = r.name(),
                typed = typed.join(", ")
            ));
            if let Some(c) = r.indexed() {
                ddl.push_str(&format!(
                    "CREATE INDEX IF NOT EXISTS {t}_{c} ON {t}({c});",
                    t = r.name()
                ));
            }
        }
        ddl.push_str(concat!(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', '1'), ('written_by', 'prefsync ",
            env!("CARGO_PKG_VERSION"),
            "');"
        ));
        ddl
    }

    /// A resumed run must know the list's size seen before the stop, and
    /// whether it was already re-reading the list. Older runs have neither
    /// (NULL, 0): they resume as before.
    fn migrate_v2() -> &'static str {
        "ALTER TABLE export_runs ADD COLUMN list_sizes TEXT;
         ALTER TABLE export_runs ADD COLUMN reread INTEGER NOT NULL DEFAULT 0;
         INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', '2');"
    }
}

impl SqliteSink {
    /// Version 3: the file is the local mirror of a project that sync
    /// reads. A user's email as compared (lower-cased, as SQLite's
    /// `lower` does: ASCII) is a generated column, unique per project
    /// among users not deleted, and indexed; a project's UID is kept
    /// beside its numeric id. Generated, so no write pays for it and old
    /// rows have it at once.
    fn migrate_v3() -> &'static str {
        "ALTER TABLE testers ADD COLUMN email_key TEXT GENERATED ALWAYS AS (lower(email)) VIRTUAL;
         CREATE UNIQUE INDEX IF NOT EXISTS testers_email_key ON testers(beta_id, email_key)
           WHERE deleted_at IS NULL AND email_key IS NOT NULL;
         CREATE TABLE IF NOT EXISTS projects (beta_id INTEGER PRIMARY KEY, uid TEXT, name TEXT);
         INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', '3');"
    }

    /// Version 4: the mirror is kept current by `prefsync listen`.
    /// `webhook_events` is its journal: every delivery it accepted, durable
    /// before it answered 200 (raw body, when it came, the signature's
    /// time, the body's SHA-256 for duplicates), and what the applier made
    /// of it (`state`: pending, applied or unknown; unknown ones are kept).
    /// `export_runs` counts, for a listing of users, the records that
    /// differed from what the mirror held: new to it, or changed (see
    /// [`differs`]); the records a complete listing found gone are its
    /// `deleted`.
    fn migrate_v4() -> &'static str {
        "CREATE TABLE IF NOT EXISTS webhook_events (
            id INTEGER PRIMARY KEY,
            received_at TEXT NOT NULL,
            signed_at INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            body BLOB NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending',
            event TEXT,
            user_id INTEGER,
            email TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            applied_at TEXT,
            note TEXT
         );
         CREATE UNIQUE INDEX IF NOT EXISTS webhook_events_sha256 ON webhook_events(sha256);
         CREATE INDEX IF NOT EXISTS webhook_events_state ON webhook_events(state, id);
         ALTER TABLE export_runs ADD COLUMN differed_new INTEGER NOT NULL DEFAULT 0;
         ALTER TABLE export_runs ADD COLUMN differed_changed INTEGER NOT NULL DEFAULT 0;
         INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', '4');"
    }
}

/// The fields of a user that change with no webhook: Prefinery sends none
/// when a waitlist position moves (API reference, section 8), so a mirror
/// kept by webhooks holds the positions of each user's last event. They are
/// left out when a listing is compared with the mirror.
pub const UNANNOUNCED_FIELDS: [&str; 4] = [
    "waitlist_position",
    "waitlist_ahead",
    "waitlist_behind",
    "waitlist_length",
];

/// Whether two records of a user differ, but for [`UNANNOUNCED_FIELDS`].
pub fn differs(a: &Value, b: &Value) -> bool {
    match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => {
            let keys = a.keys().chain(b.keys());
            keys.filter(|k| !UNANNOUNCED_FIELDS.contains(&k.as_str()))
                .any(|k| a.get(k) != b.get(k))
        }
        _ => a != b,
    }
}

impl Sink for SqliteSink {
    fn start(&mut self, part: &Part, fresh: bool) -> anyhow::Result<Started> {
        let open: Option<(i64, i64, i64, Option<String>, bool)> = self
            .conn
            .query_row(
                "SELECT id, next_page, rows, list_sizes, reread FROM export_runs WHERE beta_id = ?1 AND resource = ?2 AND filters = ?3 AND complete = 0 ORDER BY id DESC LIMIT 1",
                params![part.beta_id, part.resource.name(), part.filters],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()?;
        if let Some((id, next, rows, sizes, reread)) = open {
            if !fresh {
                return Ok(Started {
                    run: id,
                    next_page: next as u64,
                    rows: rows as u64,
                    sizes: parse_sizes(sizes)?,
                    reread,
                });
            }
            self.conn.execute(
                "UPDATE export_runs SET finished_at = ?2 WHERE id = ?1",
                params![id, now_iso()],
            )?;
            self.conn.execute(
                "UPDATE export_runs SET complete = -1 WHERE id = ?1",
                params![id],
            )?;
        }
        self.conn.execute(
            "INSERT INTO export_runs (beta_id, resource, filters, started_at) VALUES (?1, ?2, ?3, ?4)",
            params![part.beta_id, part.resource.name(), part.filters, now_iso()],
        )?;
        Ok(Started::new(self.conn.last_insert_rowid()))
    }

    fn page(
        &mut self,
        run: i64,
        part: &Part,
        items: &[Value],
        next_page: u64,
        sizes: &[ListSize],
    ) -> anyhow::Result<u64> {
        let r = part.resource;
        let t = r.name();
        let cols: Vec<&str> = r.sql_columns().iter().map(|(c, _)| *c).collect();
        let placeholders: Vec<String> = (0..cols.len()).map(|i| format!("?{}", i + 7)).collect();
        // A record's `updated_at` guards every write: a listing never
        // replaces a newer record (written back by an import or an apply
        // after the listing read its page) with an older one. It is seen
        // all the same.
        let newer = if cols.contains(&"updated_at") {
            format!(
                "(excluded.updated_at IS NULL OR {t}.updated_at IS NULL OR excluded.updated_at >= {t}.updated_at)"
            )
        } else {
            "1".to_string()
        };
        let updates: Vec<String> = std::iter::once("record".to_string())
            .chain(cols.iter().map(|c| c.to_string()))
            .map(|c| format!("{c} = CASE WHEN {newer} THEN excluded.{c} ELSE {t}.{c} END"))
            .collect();
        let sql = format!(
            "INSERT INTO {t} (beta_id, id, record, first_seen_at, last_seen_at, last_seen_run, {cols}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, {ph})
             ON CONFLICT (beta_id, id) DO UPDATE SET last_seen_at = excluded.last_seen_at,
               last_seen_run = excluded.last_seen_run, deleted_at = NULL, {upd}",
            cols = cols.join(", "),
            ph = placeholders.join(", "),
            upd = updates.join(", ")
        );
        let now = now_iso();
        let tx = self.conn.transaction()?;
        let mut new = 0;
        // The reconciliation figures (users only): records this listing
        // sees for the first time in the run that the mirror lacked, or
        // held otherwise while not newer than the listing's.
        let (mut differed_new, mut differed_changed) = (0i64, 0i64);
        let reconcile = r == Resource::Testers;
        {
            let mut seen = tx.prepare_cached(&format!(
                "SELECT last_seen_run, CASE WHEN ?3 THEN record END, deleted_at, {upd} FROM {t} WHERE beta_id = ?1 AND id = ?2",
                upd = if cols.contains(&"updated_at") { "updated_at" } else { "NULL" }
            ))?;
            let mut ins = tx.prepare_cached(&sql)?;
            // An email belongs to one user of a project: another user with
            // it here (deleted, and the email signed up again) is gone.
            let mut gone = (r == Resource::Testers).then(|| {
                tx.prepare_cached(
                    "UPDATE testers SET deleted_at = ?4 WHERE beta_id = ?1 AND email_key = lower(?2) AND id != ?3 AND deleted_at IS NULL",
                )
            }).transpose()?;
            for item in items {
                let Some(id) = item.get("id").and_then(Value::as_i64) else {
                    continue;
                };
                if let (Some(gone), Some(email)) =
                    (gone.as_mut(), item.get("email").and_then(Value::as_str))
                {
                    gone.execute(params![part.beta_id, email, id, now])?;
                }
                type Held = (i64, Option<String>, Option<String>, Option<String>);
                let held: Option<Held> = seen
                    .query_row(params![part.beta_id, id, reconcile], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })
                    .optional()?;
                let last = held.as_ref().map(|h| h.0);
                if last == Some(run) {
                    continue;
                }
                // Seen by this run's first pass and again by its re-read:
                // written again (it is still there), but not new.
                if last != Some(-run) {
                    new += 1;
                    if reconcile {
                        match &held {
                            None | Some((_, _, Some(_), _)) => differed_new += 1,
                            Some((_, record, None, updated)) => {
                                let theirs = item.get("updated_at").and_then(Value::as_str);
                                // A mirror record newer than the page was
                                // written after the page was read: not a
                                // difference the webhooks left.
                                let mirror_newer = matches!((updated.as_deref(), theirs), (Some(m), Some(l)) if m > l);
                                let held: Value = record
                                    .as_deref()
                                    .and_then(|r| serde_json::from_str(r).ok())
                                    .unwrap_or(Value::Null);
                                if !mirror_newer && differs(&held, item) {
                                    differed_changed += 1;
                                }
                            }
                        }
                    }
                }
                let mut values: Vec<rusqlite::types::Value> = vec![
                    part.beta_id.into(),
                    id.into(),
                    item.to_string().into(),
                    now.clone().into(),
                    now.clone().into(),
                    run.into(),
                ];
                for c in &cols {
                    values.push(sql_value(item.get(*c)));
                }
                ins.execute(rusqlite::params_from_iter(values))?;
            }
        }
        tx.execute(
            "UPDATE export_runs SET next_page = ?2, rows = rows + ?3, list_sizes = ?4,
               differed_new = differed_new + ?5, differed_changed = differed_changed + ?6 WHERE id = ?1",
            params![
                run,
                next_page as i64,
                new as i64,
                serde_json::to_string(sizes)?,
                differed_new,
                differed_changed
            ],
        )?;
        tx.commit()?;
        Ok(new)
    }

    /// What the first pass saw is set aside as `last_seen_run = -run`; the
    /// re-read gives each record it sees `run` back, so at the end the
    /// records still at `-run` are those that left while the list was read.
    fn reread(&mut self, run: i64, part: &Part, sizes: &[ListSize]) -> anyhow::Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute(
            &format!(
                "UPDATE {} SET last_seen_run = -?2 WHERE beta_id = ?1 AND last_seen_run = ?2",
                part.resource.name()
            ),
            params![part.beta_id, run],
        )?;
        tx.execute(
            "UPDATE export_runs SET next_page = 1, reread = 1, consistent = 0, list_sizes = ?2 WHERE id = ?1",
            params![run, serde_json::to_string(sizes)?],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn finish(
        &mut self,
        run: i64,
        part: &Part,
        complete: bool,
        consistent: bool,
        last_pass_stable: bool,
    ) -> anyhow::Result<u64> {
        let t = part.resource.name();
        let tx = self.conn.transaction()?;
        // A re-read that itself saw the list change may have missed records
        // that shifted: what the first pass saw of them stands.
        if !(complete && last_pass_stable) {
            tx.execute(
                &format!(
                    "UPDATE {t} SET last_seen_run = ?2 WHERE beta_id = ?1 AND last_seen_run = -?2"
                ),
                params![part.beta_id, run],
            )?;
        }
        let mut deleted = 0;
        // Only a complete, unfiltered run sees everything, so only it can
        // tell that a record is gone.
        if complete && part.filters.is_empty() {
            deleted = tx.execute(
                &format!(
                    "UPDATE {t} SET deleted_at = ?3 WHERE beta_id = ?1 AND last_seen_run != ?2 AND deleted_at IS NULL \
                     AND NOT (last_seen_run = 0 AND last_seen_at >= (SELECT started_at FROM export_runs WHERE id = ?2))"
                ),
                params![part.beta_id, run, now_iso()],
            )? as u64;
        }
        // The first pass did see the ones that left: `run` is when they
        // were last seen.
        tx.execute(
            &format!(
                "UPDATE {t} SET last_seen_run = ?2 WHERE beta_id = ?1 AND last_seen_run = -?2"
            ),
            params![part.beta_id, run],
        )?;
        tx.execute(
            "UPDATE export_runs SET complete = ?2, consistent = ?3, finished_at = ?4, deleted = ?5 WHERE id = ?1",
            params![run, i64::from(complete), consistent, now_iso(), deleted as i64],
        )?;
        tx.commit()?;
        Ok(deleted)
    }

    fn close(&mut self) -> anyhow::Result<()> {
        self.conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
        Ok(())
    }

    fn reconciliation(&mut self, run: i64) -> anyhow::Result<Option<(u64, u64)>> {
        let (resource, new, changed): (String, i64, i64) = self.conn.query_row(
            "SELECT resource, differed_new, differed_changed FROM export_runs WHERE id = ?1",
            [run],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        Ok((resource == Resource::Testers.name()).then_some((new as u64, changed as u64)))
    }

    /// Notes a project's UID beside its numeric id.
    fn note_project(
        &mut self,
        beta_id: i64,
        uid: Option<&str>,
        name: Option<&str>,
    ) -> anyhow::Result<()> {
        self.conn.execute(
            "INSERT INTO projects (beta_id, uid, name) VALUES (?1, ?2, ?3)
             ON CONFLICT (beta_id) DO UPDATE SET uid = COALESCE(excluded.uid, uid), name = COALESCE(excluded.name, name)",
            params![beta_id, uid, name],
        )?;
        Ok(())
    }
}

// ---- CSV and JSONL output ----------------------------------------------------

#[derive(Debug, Clone, Copy)]
pub struct CsvOptions {
    pub excel_safe: bool,
    pub bom: bool,
}

/// CSV or JSONL: records spool as JSONL beside the output; `close` turns
/// the spool into the output and renames it into place.
pub struct FileSink {
    out: PathBuf,
    /// The checkpoint's path: removed once no export in it is left to
    /// resume.
    ck_path: PathBuf,
    spool_path: PathBuf,
    spool: Option<BufWriter<File>>,
    spool_len: u64,
    ck: Connection,
    format: Format,
    csv: CsvOptions,
    resource: Option<Resource>,
}

impl FileSink {
    pub fn open(
        out: &Path,
        checkpoint: &Path,
        format: Format,
        csv: CsvOptions,
    ) -> anyhow::Result<FileSink> {
        let ck = open_db(checkpoint)?;
        migrate(
            &ck,
            checkpoint,
            &[
                (
                    1,
                    "CREATE TABLE IF NOT EXISTS export_files (
                    id INTEGER PRIMARY KEY,
                    out_path TEXT NOT NULL,
                    beta_id INTEGER NOT NULL,
                    resource TEXT NOT NULL,
                    filters TEXT NOT NULL,
                    format TEXT NOT NULL,
                    started_at TEXT NOT NULL,
                    next_page INTEGER NOT NULL DEFAULT 1,
                    spool_bytes INTEGER NOT NULL DEFAULT 0,
                    rows INTEGER NOT NULL DEFAULT 0,
                    complete INTEGER NOT NULL DEFAULT 0
                 );
                 CREATE TABLE IF NOT EXISTS export_seen (run_id INTEGER NOT NULL, id INTEGER NOT NULL, PRIMARY KEY (run_id, id)) WITHOUT ROWID;"
                        .into(),
                ),
                // As for the SQLite export: the list's sizes seen before a
                // stop, and whether the list was being read once more.
                (
                    2,
                    "ALTER TABLE export_files ADD COLUMN list_sizes TEXT;
                     ALTER TABLE export_files ADD COLUMN reread INTEGER NOT NULL DEFAULT 0;"
                        .into(),
                ),
            ],
        )?;
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let spool_path = out.with_file_name(format!(".{name}.partial.jsonl"));
        Ok(FileSink {
            out: out.to_path_buf(),
            ck_path: checkpoint.to_path_buf(),
            spool_path,
            spool: None,
            spool_len: 0,
            ck,
            format,
            csv,
            resource: None,
        })
    }

    fn format_name(&self) -> &'static str {
        self.format.name()
    }

    /// Whether the checkpoint is needed no more: it holds only an export's
    /// checkpoint tables, and no export in it is left to resume.
    fn spent(&self) -> anyhow::Result<bool> {
        let foreign: i64 = self.ck.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name NOT IN ('export_files', 'export_seen')",
            [],
            |r| r.get(0),
        )?;
        let open: i64 = self.ck.query_row(
            "SELECT count(*) FROM export_files WHERE complete = 0",
            [],
            |r| r.get(0),
        )?;
        Ok(foreign == 0 && open == 0)
    }
}

impl Sink for FileSink {
    fn start(&mut self, part: &Part, fresh: bool) -> anyhow::Result<Started> {
        self.resource = Some(part.resource);
        let out = self.out.display().to_string();
        let open: Option<(i64, i64, i64, i64, Option<String>, bool)> = self
            .ck
            .query_row(
                "SELECT id, next_page, spool_bytes, rows, list_sizes, reread FROM export_files WHERE out_path = ?1 AND beta_id = ?2 AND resource = ?3 AND filters = ?4 AND format = ?5 AND complete = 0 ORDER BY id DESC LIMIT 1",
                params![out, part.beta_id, part.resource.name(), part.filters, self.format_name()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
            )
            .optional()?;
        let open_run = open.as_ref().map(|o| o.0);
        let resumable = match open {
            Some((id, next, bytes, rows, sizes, reread)) if !fresh => {
                let len = std::fs::metadata(&self.spool_path)
                    .map(|m| m.len())
                    .unwrap_or(0);
                if len >= bytes as u64 {
                    let started = Started {
                        run: id,
                        next_page: next as u64,
                        rows: rows as u64,
                        sizes: parse_sizes(sizes)?,
                        reread,
                    };
                    Some((started, bytes as u64))
                } else {
                    tracing::warn!(
                        "the partial file {} is shorter than its checkpoint says; starting over",
                        self.spool_path.display()
                    );
                    None
                }
            }
            _ => None,
        };
        if let Some((started, bytes)) = resumable {
            let f = OpenOptions::new().write(true).open(&self.spool_path)?;
            // Drop what was written after the last checkpointed page.
            f.set_len(bytes)?;
            let mut f = f;
            f.seek(SeekFrom::End(0))?;
            self.spool = Some(BufWriter::with_capacity(256 * 1024, f));
            self.spool_len = bytes;
            return Ok(started);
        }
        if let Some(id) = open_run {
            self.ck
                .execute("UPDATE export_files SET complete = -1 WHERE id = ?1", [id])?;
            self.ck
                .execute("DELETE FROM export_seen WHERE run_id = ?1", [id])?;
        }
        // JSONL output is this file renamed: private from the start.
        let f = crate::fsutil::create_private(&self.spool_path)?;
        self.spool = Some(BufWriter::with_capacity(256 * 1024, f));
        self.spool_len = 0;
        self.ck.execute(
            "INSERT INTO export_files (out_path, beta_id, resource, filters, format, started_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![out, part.beta_id, part.resource.name(), part.filters, self.format_name(), now_iso()],
        )?;
        Ok(Started::new(self.ck.last_insert_rowid()))
    }

    fn page(
        &mut self,
        run: i64,
        _part: &Part,
        items: &[Value],
        next_page: u64,
        sizes: &[ListSize],
    ) -> anyhow::Result<u64> {
        let spool = self.spool.as_mut().expect("started");
        let tx = self.ck.transaction()?;
        let mut new = 0u64;
        {
            let mut seen = tx
                .prepare_cached("INSERT OR IGNORE INTO export_seen (run_id, id) VALUES (?1, ?2)")?;
            for item in items {
                if let Some(id) = item.get("id").and_then(Value::as_i64)
                    && seen.execute(params![run, id])? == 0
                {
                    continue;
                }
                let line = serde_json::to_string(item)?;
                spool.write_all(line.as_bytes())?;
                spool.write_all(b"\n")?;
                self.spool_len += line.len() as u64 + 1;
                new += 1;
            }
        }
        // The spool's bytes reach the OS before the checkpoint says so.
        spool.flush()?;
        tx.execute(
            "UPDATE export_files SET next_page = ?2, spool_bytes = ?3, rows = rows + ?4, list_sizes = ?5 WHERE id = ?1",
            params![run, next_page as i64, self.spool_len as i64, new as i64, serde_json::to_string(sizes)?],
        )?;
        tx.commit()?;
        Ok(new)
    }

    /// The spool and the ids seen stay: the re-read appends only what the
    /// first pass missed.
    fn reread(&mut self, run: i64, _part: &Part, sizes: &[ListSize]) -> anyhow::Result<()> {
        self.ck.execute(
            "UPDATE export_files SET next_page = 1, reread = 1, list_sizes = ?2 WHERE id = ?1",
            params![run, serde_json::to_string(sizes)?],
        )?;
        Ok(())
    }

    fn finish(
        &mut self,
        run: i64,
        _part: &Part,
        complete: bool,
        _consistent: bool,
        _last_pass_stable: bool,
    ) -> anyhow::Result<u64> {
        let mut spool = self.spool.take().expect("started");
        spool.flush()?;
        spool.get_ref().sync_all()?;
        drop(spool);
        if !complete {
            return Ok(0);
        }
        let resource = self.resource.expect("started");
        match self.format {
            Format::Jsonl => {
                std::fs::rename(&self.spool_path, &self.out)
                    .with_context(|| format!("failed to rename into {}", self.out.display()))?;
            }
            _ => {
                write_csv(&self.spool_path, &self.out, resource, self.csv)?;
                std::fs::remove_file(&self.spool_path).ok();
            }
        }
        self.ck
            .execute("UPDATE export_files SET complete = 1 WHERE id = ?1", [run])?;
        self.ck
            .execute("DELETE FROM export_seen WHERE run_id = ?1", [run])?;
        Ok(0)
    }

    /// A finished export's checkpoint is only a resume's: once no export
    /// in it is left unfinished, it is removed (with its `-wal` and
    /// `-shm`), so a finished nightly CSV leaves only the CSV.
    fn close(&mut self) -> anyhow::Result<()> {
        if !self.spent()? {
            return Ok(());
        }
        let ck = std::mem::replace(&mut self.ck, Connection::open_in_memory()?);
        ck.close().map_err(|(_, e)| e)?;
        let mut name = self.ck_path.as_os_str().to_owned();
        for suffix in ["", "-wal", "-shm", "-journal"] {
            name.push(suffix);
            let p = PathBuf::from(&name);
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!(
                        "failed to remove the finished checkpoint {}: {e}",
                        p.display()
                    );
                }
                _ => {}
            }
            name = self.ck_path.as_os_str().to_owned();
        }
        Ok(())
    }
}

/// A cell's text: strings as they are, null as empty, nested values as
/// JSON text.
fn cell(v: Option<&Value>) -> (String, bool) {
    match v {
        None | Some(Value::Null) => (String::new(), false),
        Some(Value::String(s)) => (s.clone(), true),
        Some(Value::Number(n)) => (n.to_string(), false),
        Some(Value::Bool(b)) => (b.to_string(), false),
        Some(other) => (other.to_string(), false),
    }
}

/// The one rule for cells a spreadsheet would run as formulas, shared
/// with the rejected-rows report.
pub use crate::output::excel_safe;

/// Two passes over the spool: the columns (documented order, then
/// `profile.*` sorted, then any other field in the order first seen), then
/// the rows.
pub(crate) fn write_csv(
    spool: &Path,
    out: &Path,
    resource: Resource,
    opts: CsvOptions,
) -> anyhow::Result<()> {
    let known = resource.columns();
    let mut profile_keys = BTreeSet::new();
    let mut others: Vec<String> = Vec::new();
    for line in BufReader::new(File::open(spool)?).lines() {
        let v: Value = serde_json::from_str(&line?)?;
        let Value::Object(m) = v else { continue };
        for (k, val) in &m {
            if known.contains(&k.as_str()) {
                continue;
            }
            if k == "profile" && resource == Resource::Testers {
                if let Value::Object(p) = val {
                    profile_keys.extend(p.keys().cloned());
                }
                continue;
            }
            if !others.contains(k) {
                others.push(k.clone());
            }
        }
    }
    let mut header: Vec<String> = known.iter().map(|s| s.to_string()).collect();
    header.extend(profile_keys.iter().map(|k| format!("profile.{k}")));
    header.extend(others.iter().cloned());

    let f = AtomicFile::create(out)?;
    {
        let mut w = f.writer();
        if opts.bom {
            w.write_all("\u{feff}".as_bytes())?;
        }
        let mut cw = csv::WriterBuilder::new().from_writer(w);
        cw.write_record(&header)?;
        for line in BufReader::new(File::open(spool)?).lines() {
            let v: Value = serde_json::from_str(&line?)?;
            let mut rec = Vec::with_capacity(header.len());
            for k in known {
                rec.push(cell(v.get(*k)));
            }
            for k in &profile_keys {
                rec.push(cell(v.get("profile").and_then(|p| p.get(k))));
            }
            for k in &others {
                rec.push(cell(v.get(k)));
            }
            let rec: Vec<String> = rec
                .into_iter()
                .map(|(s, typed)| {
                    if opts.excel_safe && typed {
                        excel_safe(s)
                    } else {
                        s
                    }
                })
                .collect();
            cw.write_record(&rec)?;
        }
        let mut w = cw
            .into_inner()
            .map_err(|e| anyhow::anyhow!("failed to write {}: {e}", out.display()))?;
        w.flush()?;
    }
    f.commit()
}

/// A record's field as its SQLite column holds it: text as text, whole
/// numbers as integers, booleans as 0/1, anything else as its JSON.
pub fn sql_value(v: Option<&Value>) -> rusqlite::types::Value {
    match v {
        Some(Value::String(s)) => s.clone().into(),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Into::into)
            .unwrap_or_else(|| n.to_string().into()),
        Some(Value::Bool(b)) => i64::from(*b).into(),
        None | Some(Value::Null) => rusqlite::types::Value::Null,
        Some(other) => other.to_string().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_cells_are_neutralised() {
        assert_eq!(excel_safe("=HYPERLINK(\"x\")".into()), "'=HYPERLINK(\"x\")");
        assert_eq!(excel_safe("+SUM(A1:A9)".into()), "'+SUM(A1:A9)");
        assert_eq!(
            excel_safe("-2+3+cmd|' /C calc'!A0".into()),
            "'-2+3+cmd|' /C calc'!A0"
        );
        assert_eq!(excel_safe("@SUM(A1)".into()), "'@SUM(A1)");
        assert_eq!(excel_safe("\tx".into()), "'\tx");
        assert_eq!(excel_safe("Ada".into()), "Ada");
    }

    #[test]
    fn cells() {
        assert_eq!(cell(Some(&serde_json::json!([{"a": 1}]))).0, r#"[{"a":1}]"#);
        assert_eq!(cell(Some(&Value::Null)).0, "");
        assert_eq!(
            cell(Some(&serde_json::json!(-5))),
            ("-5".to_string(), false)
        );
    }

    /// A version 1 export file with a run left open opens, is migrated to
    /// version 2, and resumes the run (its list's size unknown, as before).
    #[test]
    fn a_version_1_export_is_migrated_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sqlite");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&SqliteSink::schema_v1()).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO export_runs (beta_id, resource, filters, started_at, rows, next_page) VALUES (1, 'testers', '', 'then', 50, 3)",
                [],
            )
            .unwrap();
        }
        let mut sink = SqliteSink::open(&path).unwrap();
        let part = Part {
            beta_id: 1,
            resource: Resource::Testers,
            filters: String::new(),
        };
        let started = sink.start(&part, false).unwrap();
        assert_eq!(
            started,
            Started {
                run: 1,
                next_page: 3,
                rows: 50,
                sizes: vec![],
                reread: false
            }
        );
        sink.page(
            1,
            &part,
            &[serde_json::json!({"id": 7})],
            4,
            &[(9, Some(220))],
        )
        .unwrap();
        assert_eq!(sink.start(&part, false).unwrap().sizes, [(9, Some(220))]);
        let (v, meta): (i64, String) = sink
            .conn
            .query_row(
                "SELECT (SELECT value FROM meta WHERE key = 'schema_version'), user_version FROM pragma_user_version",
                [],
                |r| Ok((r.get(1)?, r.get(0)?)),
            )
            .unwrap();
        assert_eq!((v, meta.as_str()), (EXPORT_SCHEMA_VERSION, "4"));
    }

    /// A version 3 mirror (what prefsync wrote before `listen`) opens: it
    /// is migrated to version 4, keeps its users and runs, gains the
    /// webhook journal, and a listing into it counts what differed.
    #[test]
    fn a_version_3_mirror_opens_and_gains_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v3.sqlite");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&SqliteSink::schema_v1()).unwrap();
            conn.execute_batch(SqliteSink::migrate_v2()).unwrap();
            conn.execute_batch(SqliteSink::migrate_v3()).unwrap();
            conn.pragma_update(None, "user_version", 3).unwrap();
            conn.execute(
                "INSERT INTO testers (beta_id, id, email, status, updated_at, record, first_seen_at, last_seen_at, last_seen_run)
                 VALUES (1, 7, 'a@x.io', 'applied', '2026-01-01T00:00:00Z',
                   '{\"id\":7,\"email\":\"a@x.io\",\"status\":\"applied\",\"updated_at\":\"2026-01-01T00:00:00Z\",\"waitlist_position\":3}', 'then', 'then', 1)",
                [],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO export_runs (beta_id, resource, filters, started_at, complete) VALUES (1, 'testers', '', 'then', 1)",
                [],
            )
            .unwrap();
        }
        let mut sink = SqliteSink::open(&path).unwrap();
        let (v, events, runs): (i64, i64, i64) = sink
            .conn
            .query_row(
                "SELECT user_version, (SELECT count(*) FROM webhook_events), (SELECT count(*) FROM export_runs) FROM pragma_user_version",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!((v, events, runs), (4, 0, 1));
        let part = Part {
            beta_id: 1,
            resource: Resource::Testers,
            filters: String::new(),
        };
        let run = sink.start(&part, false).unwrap().run;
        // User 7 moved in the waitlist only (not a difference), user 8 is
        // new, and user 7 again in a later page is not counted twice.
        let page = [
            serde_json::json!({"id": 7, "email": "a@x.io", "status": "applied", "updated_at": "2026-01-01T00:00:00Z", "waitlist_position": 1}),
            serde_json::json!({"id": 8, "email": "b@x.io", "status": "applied", "updated_at": "2026-01-01T00:00:00Z"}),
        ];
        sink.page(run, &part, &page, 2, &[]).unwrap();
        let changed = serde_json::json!({"id": 7, "email": "a@x.io", "status": "invited", "updated_at": "2026-01-02T00:00:00Z"});
        sink.page(run, &part, &[changed], 3, &[]).unwrap();
        sink.finish(run, &part, true, true, true).unwrap();
        assert_eq!(sink.reconciliation(run).unwrap(), Some((1, 0)));
        // A second listing: user 7 changed since the last one (the
        // webhooks missed it), user 8 unchanged.
        let run = sink.start(&part, false).unwrap().run;
        sink.page(
            run,
            &part,
            &[
                serde_json::json!({"id": 7, "email": "a@x.io", "status": "active", "updated_at": "2026-01-03T00:00:00Z"}),
                page[1].clone(),
            ],
            2,
            &[],
        )
        .unwrap();
        sink.finish(run, &part, true, true, true).unwrap();
        assert_eq!(sink.reconciliation(run).unwrap(), Some((0, 1)));
    }

    #[test]
    fn now_secs_is_sane() {
        assert!(crate::checkpoint::now_secs() > 1_700_000_000);
    }
}
