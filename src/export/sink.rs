//! Where exported pages go. Each page is written and checkpointed together:
//! in one SQLite transaction for SQLite output; for CSV and JSONL, appended
//! to a spool beside the output, then the checkpoint records the spool's new
//! length. A resumed export truncates the spool to that length and goes on
//! from the next page: no duplicate, no gap. Duplicates from shifting pages
//! are dropped by id.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

use super::resource::Resource;
use crate::output::AtomicFile;
use crate::sandbox::world::iso8601;

pub const EXPORT_SCHEMA_VERSION: i64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Jsonl,
    Sqlite,
}

/// One resource of one project being exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub beta_id: i64,
    pub resource: Resource,
    pub filters: String,
}

pub trait Sink: Send {
    /// Starts (or resumes) a part; returns its run id, the next page and
    /// the records written so far.
    fn start(&mut self, part: &Part, fresh: bool) -> anyhow::Result<(i64, u64, u64)>;
    /// Writes one page and records `next_page`; returns how many records
    /// were new to this run.
    fn page(
        &mut self,
        run: i64,
        part: &Part,
        items: &[Value],
        next_page: u64,
    ) -> anyhow::Result<u64>;
    /// Closes a part. `complete` when every page was read.
    fn finish(
        &mut self,
        run: i64,
        part: &Part,
        complete: bool,
        consistent: bool,
    ) -> anyhow::Result<u64>;
    /// Makes the output final (renames files into place).
    fn close(&mut self) -> anyhow::Result<()>;
}

fn now_iso() -> String {
    iso8601(std::time::SystemTime::now())
}

fn open_db(path: &Path) -> anyhow::Result<Connection> {
    let conn =
        Connection::open(path).with_context(|| format!("failed to open {}", path.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

fn check_version(conn: &Connection, path: &Path) -> anyhow::Result<i64> {
    let v: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if v > EXPORT_SCHEMA_VERSION {
        bail!(
            "{} has schema version {v}, newer than this prefsync understands ({EXPORT_SCHEMA_VERSION}); upgrade prefsync",
            path.display()
        );
    }
    Ok(v)
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
        if check_version(&conn, path)? < 1 {
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
            conn.execute_batch(&ddl)?;
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?1), ('written_by', ?2)",
                params![EXPORT_SCHEMA_VERSION.to_string(), concat!("prefsync ", env!("CARGO_PKG_VERSION"))],
            )?;
            conn.pragma_update(None, "user_version", EXPORT_SCHEMA_VERSION)?;
        }
        Ok(SqliteSink { conn })
    }
}

impl Sink for SqliteSink {
    fn start(&mut self, part: &Part, fresh: bool) -> anyhow::Result<(i64, u64, u64)> {
        let open: Option<(i64, i64, i64)> = self
            .conn
            .query_row(
                "SELECT id, next_page, rows FROM export_runs WHERE beta_id = ?1 AND resource = ?2 AND filters = ?3 AND complete = 0 ORDER BY id DESC LIMIT 1",
                params![part.beta_id, part.resource.name(), part.filters],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        if let Some((id, next, rows)) = open {
            if !fresh {
                return Ok((id, next as u64, rows as u64));
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
        Ok((self.conn.last_insert_rowid(), 1, 0))
    }

    fn page(
        &mut self,
        run: i64,
        part: &Part,
        items: &[Value],
        next_page: u64,
    ) -> anyhow::Result<u64> {
        let r = part.resource;
        let t = r.name();
        let cols: Vec<&str> = r.sql_columns().iter().map(|(c, _)| *c).collect();
        let placeholders: Vec<String> = (0..cols.len()).map(|i| format!("?{}", i + 7)).collect();
        let updates: Vec<String> = cols.iter().map(|c| format!("{c} = excluded.{c}")).collect();
        let sql = format!(
            "INSERT INTO {t} (beta_id, id, record, first_seen_at, last_seen_at, last_seen_run, {cols}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, {ph})
             ON CONFLICT (beta_id, id) DO UPDATE SET record = excluded.record, last_seen_at = excluded.last_seen_at,
               last_seen_run = excluded.last_seen_run, deleted_at = NULL, {upd}",
            cols = cols.join(", "),
            ph = placeholders.join(", "),
            upd = updates.join(", ")
        );
        let now = now_iso();
        let tx = self.conn.transaction()?;
        let mut new = 0;
        {
            let mut seen = tx.prepare_cached(&format!(
                "SELECT last_seen_run FROM {t} WHERE beta_id = ?1 AND id = ?2"
            ))?;
            let mut ins = tx.prepare_cached(&sql)?;
            for item in items {
                let Some(id) = item.get("id").and_then(Value::as_i64) else {
                    continue;
                };
                let last: Option<i64> = seen
                    .query_row(params![part.beta_id, id], |r| r.get(0))
                    .optional()?;
                if last == Some(run) {
                    continue;
                }
                new += 1;
                let mut values: Vec<rusqlite::types::Value> = vec![
                    part.beta_id.into(),
                    id.into(),
                    item.to_string().into(),
                    now.clone().into(),
                    now.clone().into(),
                    run.into(),
                ];
                for c in &cols {
                    values.push(match item.get(*c) {
                        Some(Value::String(s)) => s.clone().into(),
                        Some(Value::Number(n)) => n
                            .as_i64()
                            .map(Into::into)
                            .unwrap_or_else(|| n.to_string().into()),
                        Some(Value::Bool(b)) => i64::from(*b).into(),
                        None | Some(Value::Null) => rusqlite::types::Value::Null,
                        Some(other) => other.to_string().into(),
                    });
                }
                ins.execute(rusqlite::params_from_iter(values))?;
            }
        }
        tx.execute(
            "UPDATE export_runs SET next_page = ?2, rows = rows + ?3 WHERE id = ?1",
            params![run, next_page as i64, new as i64],
        )?;
        tx.commit()?;
        Ok(new)
    }

    fn finish(
        &mut self,
        run: i64,
        part: &Part,
        complete: bool,
        consistent: bool,
    ) -> anyhow::Result<u64> {
        let mut deleted = 0;
        // Only a complete, unfiltered run sees everything, so only it can
        // tell that a record is gone.
        if complete && part.filters.is_empty() {
            deleted = self.conn.execute(
                &format!(
                    "UPDATE {} SET deleted_at = ?3 WHERE beta_id = ?1 AND last_seen_run != ?2 AND deleted_at IS NULL",
                    part.resource.name()
                ),
                params![part.beta_id, run, now_iso()],
            )? as u64;
        }
        self.conn.execute(
            "UPDATE export_runs SET complete = ?2, consistent = ?3, finished_at = ?4, deleted = ?5 WHERE id = ?1",
            params![run, i64::from(complete), consistent, now_iso(), deleted as i64],
        )?;
        Ok(deleted)
    }

    fn close(&mut self) -> anyhow::Result<()> {
        self.conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
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
        if check_version(&ck, checkpoint)? < 1 {
            ck.execute_batch(
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
                 CREATE TABLE IF NOT EXISTS export_seen (run_id INTEGER NOT NULL, id INTEGER NOT NULL, PRIMARY KEY (run_id, id)) WITHOUT ROWID;",
            )?;
            ck.pragma_update(None, "user_version", EXPORT_SCHEMA_VERSION)?;
        }
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let spool_path = out.with_file_name(format!(".{name}.partial.jsonl"));
        Ok(FileSink {
            out: out.to_path_buf(),
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
        match self.format {
            Format::Csv => "csv",
            Format::Jsonl => "jsonl",
            Format::Sqlite => "sqlite",
        }
    }
}

impl Sink for FileSink {
    fn start(&mut self, part: &Part, fresh: bool) -> anyhow::Result<(i64, u64, u64)> {
        self.resource = Some(part.resource);
        let out = self.out.display().to_string();
        let open: Option<(i64, i64, i64, i64)> = self
            .ck
            .query_row(
                "SELECT id, next_page, spool_bytes, rows FROM export_files WHERE out_path = ?1 AND beta_id = ?2 AND resource = ?3 AND filters = ?4 AND format = ?5 AND complete = 0 ORDER BY id DESC LIMIT 1",
                params![out, part.beta_id, part.resource.name(), part.filters, self.format_name()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let resumable = match open {
            Some((id, next, bytes, rows)) if !fresh => {
                let len = std::fs::metadata(&self.spool_path)
                    .map(|m| m.len())
                    .unwrap_or(0);
                if len >= bytes as u64 {
                    Some((id, next as u64, bytes as u64, rows as u64))
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
        if let Some((id, next, bytes, rows)) = resumable {
            let f = OpenOptions::new().write(true).open(&self.spool_path)?;
            // Drop what was written after the last checkpointed page.
            f.set_len(bytes)?;
            let mut f = f;
            f.seek(SeekFrom::End(0))?;
            self.spool = Some(BufWriter::with_capacity(256 * 1024, f));
            self.spool_len = bytes;
            return Ok((id, next, rows));
        }
        if let Some((id, ..)) = open {
            self.ck
                .execute("UPDATE export_files SET complete = -1 WHERE id = ?1", [id])?;
            self.ck
                .execute("DELETE FROM export_seen WHERE run_id = ?1", [id])?;
        }
        let f = File::create(&self.spool_path)
            .with_context(|| format!("failed to create {}", self.spool_path.display()))?;
        self.spool = Some(BufWriter::with_capacity(256 * 1024, f));
        self.spool_len = 0;
        self.ck.execute(
            "INSERT INTO export_files (out_path, beta_id, resource, filters, format, started_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![out, part.beta_id, part.resource.name(), part.filters, self.format_name(), now_iso()],
        )?;
        Ok((self.ck.last_insert_rowid(), 1, 0))
    }

    fn page(
        &mut self,
        run: i64,
        _part: &Part,
        items: &[Value],
        next_page: u64,
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
            "UPDATE export_files SET next_page = ?2, spool_bytes = ?3, rows = rows + ?4 WHERE id = ?1",
            params![run, next_page as i64, self.spool_len as i64, new as i64],
        )?;
        tx.commit()?;
        Ok(new)
    }

    fn finish(
        &mut self,
        run: i64,
        _part: &Part,
        complete: bool,
        _consistent: bool,
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

    fn close(&mut self) -> anyhow::Result<()> {
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

/// Neutralises a cell that a spreadsheet would run as a formula: a leading
/// `=`, `+`, `-`, `@`, tab or CR gets a `'` in front, which Excel shows as
/// text and does not display.
pub fn excel_safe(s: String) -> String {
    match s.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r') => format!("'{s}"),
        _ => s,
    }
}

/// Two passes over the spool: the columns (documented order, then
/// `profile.*` sorted, then any other field in the order first seen), then
/// the rows.
fn write_csv(spool: &Path, out: &Path, resource: Resource, opts: CsvOptions) -> anyhow::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_cells_are_neutralised() {
        assert_eq!(excel_safe("=HYPERLINK(\"x\")".into()), "'=HYPERLINK(\"x\")");
        assert_eq!(excel_safe("+1".into()), "'+1");
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

    #[test]
    fn now_secs_is_sane() {
        assert!(crate::checkpoint::now_secs() > 1_700_000_000);
    }
}
