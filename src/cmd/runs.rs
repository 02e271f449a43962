//! `prefsync runs`: the runs a checkpoint holds. The file is opened
//! read-only (nothing is created, migrated or set, so a file that is not a
//! checkpoint is never changed) and told by its schema: a checkpoint, a
//! SQLite export or mirror (its export runs are listed instead), an
//! export's checkpoint, another SQLite database, or not SQLite at all.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags};
use serde_json::{Value, json};

use crate::checkpoint::Checkpoint;
use crate::cli::{OutputFormat, RunsArgs};
use crate::exit::{Exit, usage};

/// What a file given to `runs` turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A checkpoint of imports and bulk runs (tables `runs` and `rows`).
    Checkpoint,
    /// A SQLite export, which sync also takes as its mirror (`export_runs`).
    Export,
    /// The checkpoint of a CSV or JSONL export (`export_files`).
    ExportCheckpoint,
}

const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

const HINT: &str = "hint: --checkpoint takes the file an import, sync or bulk run keeps its \
                    runs in (by default prefsync-checkpoint.sqlite)";

pub fn run(a: &RunsArgs) -> anyhow::Result<Exit> {
    let path = a.checkpoint.as_path();
    let conn = open_read_only(path)?;
    let kind = kind_of(&conn, path)?;
    let doc = match kind {
        FileKind::Checkpoint => {
            let ck = Checkpoint::open_read_only(conn, path).map_err(|e| usage(format!("{e:#}")))?;
            checkpoint_runs(&ck)?
        }
        FileKind::Export => export_runs(&conn)?,
        FileKind::ExportCheckpoint => export_files(&conn)?,
    };
    let doc = json!({
        "file": path.display().to_string(),
        "kind": match kind {
            FileKind::Checkpoint => "checkpoint",
            FileKind::Export => "export",
            FileKind::ExportCheckpoint => "export-checkpoint",
        },
        "runs": doc,
    });
    let mut out = std::io::stdout().lock();
    match a.output {
        OutputFormat::Json => writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?,
        OutputFormat::Text => write_text(&mut out, kind, path, &doc)?,
    }
    out.flush()?;
    Ok(Exit::Done)
}

/// Opens `path` read-only after checking that it is a SQLite database at
/// all: SQLite would otherwise say only "file is not a database".
pub fn open_read_only(path: &Path) -> anyhow::Result<Connection> {
    let meta = std::fs::metadata(path)
        .map_err(|e| usage(format!("no checkpoint at {}: {e}. {HINT}", path.display())))?;
    if meta.is_dir() {
        return Err(usage(format!(
            "{} is a folder, not a checkpoint. {HINT}",
            path.display()
        )));
    }
    let mut head = Vec::with_capacity(16);
    std::fs::File::open(path)
        .and_then(|f| f.take(16).read_to_end(&mut head))
        .map_err(|e| usage(format!("failed to read {}: {e}", path.display())))?;
    if head.is_empty() {
        return Err(usage(format!(
            "{} is empty: not a checkpoint. {HINT}",
            path.display()
        )));
    }
    if head.as_slice() != SQLITE_MAGIC {
        return Err(usage(format!(
            "{} is not a SQLite database, so not a checkpoint (a CSV or JSONL file, perhaps). {HINT}",
            path.display()
        )));
    }
    let conn = open_sqlite_read_only(path)
        .map_err(|e| usage(format!("failed to open {} read-only: {e}", path.display())))?;
    // A run in progress holds the write lock now and then: wait for it.
    conn.busy_timeout(Duration::from_secs(30))?;
    Ok(conn)
}

/// Opens a SQLite file without changing it or anything beside it. A
/// read-only connection to a WAL database still creates its `-wal` and
/// `-shm` files when they are missing; with no `-wal` beside it, no
/// connection has the file open in WAL mode and all its content is in the
/// file, so it is opened `immutable` (nothing created, nothing locked).
/// With a `-wal` (a run in progress, or one that was killed), it is
/// opened read-only the ordinary way, to see the latest commits.
fn open_sqlite_read_only(path: &Path) -> anyhow::Result<Connection> {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if Path::new(&wal).exists() {
        return Ok(Connection::open_with_flags(path, flags)?);
    }
    let abs = std::path::absolute(path)?;
    let mut uri = url::Url::from_file_path(&abs)
        .map_err(|()| anyhow::anyhow!("cannot name {} as a URI", abs.display()))?;
    uri.set_query(Some("immutable=1"));
    Ok(Connection::open_with_flags(
        uri.as_str(),
        flags | OpenFlags::SQLITE_OPEN_URI,
    )?)
}

/// Tells the file by its tables.
pub fn kind_of(conn: &Connection, path: &Path) -> anyhow::Result<FileKind> {
    let mut st =
        conn.prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")?;
    let tables: Vec<String> = st
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()
        .map_err(|e| usage(format!("failed to read {}: {e}", path.display())))?;
    let has = |t: &str| tables.iter().any(|n| n == t);
    if has("runs") && has("rows") {
        Ok(FileKind::Checkpoint)
    } else if has("export_runs") {
        Ok(FileKind::Export)
    } else if has("export_files") {
        Ok(FileKind::ExportCheckpoint)
    } else if tables.is_empty() {
        Err(usage(format!(
            "{} is an empty SQLite database, not a checkpoint. {HINT}",
            path.display()
        )))
    } else {
        Err(usage(format!(
            "{} is a SQLite database but not a prefsync checkpoint (its tables: {}). {HINT}",
            path.display(),
            tables.join(", ")
        )))
    }
}

fn iso(secs: i64) -> String {
    crate::time::iso8601(UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64))
}

fn checkpoint_runs(ck: &Checkpoint) -> anyhow::Result<Value> {
    let mut runs = Vec::new();
    for r in ck.runs()? {
        let c = ck.counts(r.id)?;
        // A run stopped during its single pass has not read its input to
        // the end: its total is not known, but the rows it recorded are.
        let (rows, input_read) = match (r.planned, r.total_rows) {
            (true, Some(n)) => (n.max(0) as u64, true),
            _ => (c.total(), false),
        };
        let done: serde_json::Map<String, Value> = c
            .done
            .iter()
            .map(|(a, n)| (a.clone(), Value::from(*n)))
            .collect();
        let skipped: serde_json::Map<String, Value> = c
            .skipped
            .iter()
            .map(|(a, n)| (a.clone(), Value::from(*n)))
            .collect();
        runs.push(json!({
            "id": r.id,
            "kind": r.kind,
            "state": r.state,
            "project": r.beta,
            "input": r.input_path,
            "rows": rows,
            "input_read": input_read,
            "done": done,
            "rejected": c.rejected,
            "skipped": skipped,
            "open": c.pending,
            "in_flight": c.sending,
            "started_at": iso(r.started_at),
            "updated_at": iso(r.updated_at),
        }));
    }
    Ok(Value::Array(runs))
}

/// An export's `complete`: 1 complete, 0 not finished, -1 abandoned by
/// `--fresh`.
fn export_state(complete: i64) -> &'static str {
    match complete {
        1 => "done",
        0 => "unfinished",
        _ => "abandoned",
    }
}

fn export_runs(conn: &Connection) -> anyhow::Result<Value> {
    let mut st = conn.prepare(
        "SELECT id, beta_id, resource, filters, started_at, finished_at, complete, rows FROM export_runs ORDER BY id",
    )?;
    let runs = st
        .query_map([], |r| {
            let complete: i64 = r.get(6)?;
            Ok(json!({
                "id": r.get::<_, i64>(0)?,
                "project": r.get::<_, i64>(1)?.to_string(),
                "resource": r.get::<_, String>(2)?,
                "filters": r.get::<_, String>(3)?,
                "started_at": r.get::<_, String>(4)?,
                "finished_at": r.get::<_, Option<String>>(5)?,
                "state": export_state(complete),
                "rows": r.get::<_, i64>(7)?,
            }))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Value::Array(runs))
}

fn export_files(conn: &Connection) -> anyhow::Result<Value> {
    let mut st = conn.prepare(
        "SELECT id, beta_id, resource, filters, started_at, complete, rows, format, out_path FROM export_files ORDER BY id",
    )?;
    let runs = st
        .query_map([], |r| {
            let complete: i64 = r.get(5)?;
            Ok(json!({
                "id": r.get::<_, i64>(0)?,
                "project": r.get::<_, i64>(1)?.to_string(),
                "resource": r.get::<_, String>(2)?,
                "filters": r.get::<_, String>(3)?,
                "started_at": r.get::<_, String>(4)?,
                "state": export_state(complete),
                "rows": r.get::<_, i64>(6)?,
                "format": r.get::<_, String>(7)?,
                "output": r.get::<_, String>(8)?,
            }))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Value::Array(runs))
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn write_text(
    out: &mut impl Write,
    kind: FileKind,
    path: &Path,
    doc: &Value,
) -> anyhow::Result<()> {
    let runs = doc["runs"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    match kind {
        FileKind::Checkpoint => {
            writeln!(
                out,
                "{:>4}  {:<16}  {:<8}  {:>8}  {:>8}  {:>8}  {:<10}  {:<40}  input",
                "run", "kind", "state", "rows", "rejected", "open", "project", "done"
            )?;
            for r in runs {
                let rows = if r["input_read"] == Value::Bool(true) {
                    s(&r["rows"])
                } else {
                    format!("{}+", s(&r["rows"]))
                };
                let done: Vec<String> = r["done"]
                    .as_object()
                    .map(|m| m.iter().map(|(a, n)| format!("{a} {n}")).collect())
                    .unwrap_or_default();
                writeln!(
                    out,
                    "{:>4}  {:<16}  {:<8}  {:>8}  {:>8}  {:>8}  {:<10}  {:<40}  {}",
                    s(&r["id"]),
                    s(&r["kind"]),
                    s(&r["state"]),
                    rows,
                    s(&r["rejected"]),
                    s(&r["open"]),
                    s(&r["project"]),
                    if done.is_empty() {
                        "-".to_string()
                    } else {
                        done.join(", ")
                    },
                    s(&r["input"])
                )?;
            }
        }
        FileKind::Export | FileKind::ExportCheckpoint => {
            let what = if kind == FileKind::Export {
                "a SQLite export (the mirror sync takes)"
            } else {
                "the checkpoint of a CSV or JSONL export"
            };
            writeln!(
                out,
                "{} is not a run checkpoint: it is {what}. Its export runs:",
                path.display()
            )?;
            writeln!(
                out,
                "{:>4}  {:<12}  {:<10}  {:>8}  {:<10}  {:<20}  filters",
                "run", "resource", "state", "rows", "project", "started"
            )?;
            for r in runs {
                writeln!(
                    out,
                    "{:>4}  {:<12}  {:<10}  {:>8}  {:<10}  {:<20}  {}",
                    s(&r["id"]),
                    s(&r["resource"]),
                    s(&r["state"]),
                    s(&r["rows"]),
                    s(&r["project"]),
                    s(&r["started_at"]),
                    if r["filters"] == "" {
                        "-".to_string()
                    } else {
                        s(&r["filters"])
                    }
                )?;
            }
        }
    }
    Ok(())
}
