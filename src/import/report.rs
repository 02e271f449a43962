//! The rejected-rows report and the per-line results, written from the
//! checkpoint in line order, to a temporary file renamed into place.

use std::path::Path;

use anyhow::Context;
use rusqlite::params;

use crate::checkpoint::Checkpoint;
use crate::output::AtomicFile;

/// Columns the errors report adds after the original ones. Fed back in as
/// input, they are recognised and ignored.
pub const ERROR_COLUMNS: [&str; 4] = [
    "prefsync_line",
    "prefsync_error_class",
    "prefsync_http_status",
    "prefsync_message",
];

pub fn write_errors(
    ck: &Checkpoint,
    run: i64,
    headers: &[String],
    path: &Path,
    excel_safe: bool,
) -> anyhow::Result<()> {
    let out = AtomicFile::create(path)?;
    let mut w = csv::Writer::from_writer(out.writer());
    let mut head: Vec<&str> = headers
        .iter()
        .map(String::as_str)
        .filter(|h| !crate::import::mapping::is_report_column(h))
        .collect();
    let keep: Vec<usize> = headers
        .iter()
        .enumerate()
        .filter(|(_, h)| !crate::import::mapping::is_report_column(h))
        .map(|(i, _)| i)
        .collect();
    head.extend(ERROR_COLUMNS);
    w.write_record(&head)?;
    let mut st = ck.conn().prepare(
        "SELECT line, error_class, http_status, message, raw FROM rows WHERE run_id = ?1 AND state = 'rejected' ORDER BY line",
    )?;
    let rows = st.query_map(params![run], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, Option<String>>(1)?,
            r.get::<_, Option<i64>>(2)?,
            r.get::<_, Option<String>>(3)?,
            r.get::<_, Option<String>>(4)?,
        ))
    })?;
    for row in rows {
        let (line, class, status, message, raw) = row?;
        let fields: Vec<String> = raw
            .and_then(|r| serde_json::from_str(&r).ok())
            .unwrap_or_default();
        let mut rec: Vec<String> = keep
            .iter()
            .map(|i| fields.get(*i).cloned().unwrap_or_default())
            .map(|c| {
                if excel_safe {
                    crate::export::sink::excel_safe(c)
                } else {
                    c
                }
            })
            .collect();
        rec.push(line.to_string());
        rec.push(class.unwrap_or_default());
        rec.push(status.map(|s| s.to_string()).unwrap_or_default());
        rec.push(message.unwrap_or_default());
        w.write_record(&rec)?;
    }
    let inner = w
        .into_inner()
        .map_err(|e| anyhow::anyhow!("failed to write {}: {e}", path.display()))?;
    drop(inner);
    out.commit()
        .with_context(|| format!("failed to write {}", path.display()))
}

pub fn write_results(ck: &Checkpoint, run: i64, path: &Path) -> anyhow::Result<()> {
    let out = AtomicFile::create(path)?;
    let mut w = csv::Writer::from_writer(out.writer());
    w.write_record([
        "line",
        "email",
        "action",
        "prefinery_id",
        "error_class",
        "message",
    ])?;
    let mut st = ck.conn().prepare(
        "SELECT rows.line, email, COALESCE(o.action, rows.action, state), COALESCE(o.tester_id, rows.tester_id), error_class, message \
         FROM rows LEFT JOIN outcomes o ON o.run_id = rows.run_id AND o.line = rows.line \
         WHERE rows.run_id = ?1 ORDER BY rows.line",
    )?;
    let rows = st.query_map(params![run], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, Option<String>>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, Option<i64>>(3)?,
            r.get::<_, Option<String>>(4)?,
            r.get::<_, Option<String>>(5)?,
        ))
    })?;
    for row in rows {
        let (line, email, action, id, class, message) = row?;
        w.write_record([
            line.to_string(),
            email.unwrap_or_default(),
            action,
            id.filter(|i| *i > 0)
                .map(|i| i.to_string())
                .unwrap_or_default(),
            class.unwrap_or_default(),
            message.unwrap_or_default(),
        ])?;
    }
    drop(
        w.into_inner()
            .map_err(|e| anyhow::anyhow!("failed to write {}: {e}", path.display()))?,
    );
    out.commit()
        .with_context(|| format!("failed to write {}", path.display()))
}
