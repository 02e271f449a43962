//! The rejected-rows report and the per-line results: a subscriber that
//! writes them from the checkpoint, in line order, when a run ends, each to
//! a temporary file renamed into place.

use std::path::Path;

use anyhow::Context;

use super::events::{Event, Subscriber};
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

/// Whether a header is one of the report's own columns.
pub fn is_report_column(h: &str) -> bool {
    ERROR_COLUMNS.contains(&h.trim())
}

/// A finished run's records, as the reports read them.
pub struct RunRecords<'a> {
    pub checkpoint: &'a Checkpoint,
    pub run: i64,
    /// The input's header row.
    pub headers: &'a [String],
    /// The results file's name for a row's key (`email`).
    pub key_name: &'a str,
    /// The input column the key is read from, when the operation knows it
    /// (else the column named `key_name`): a row rejected before it had a
    /// key is still named in the results by that cell.
    pub key_column: Option<usize>,
    /// Where the errors report goes, when there is one to write.
    pub errors: Option<&'a Path>,
    pub results: Option<&'a Path>,
}

/// Writes the errors report and the results file when a run ends.
pub struct Reports {
    /// Put a `'` before cells a spreadsheet would run as formulas.
    pub excel_safe: bool,
}

impl Subscriber for Reports {
    fn event(&self, e: &Event<'_>) -> anyhow::Result<()> {
        if let Event::Finished { records, .. } = e {
            if let Some(p) = records.errors {
                write_errors(records, p, self.excel_safe)?;
            }
            if let Some(p) = records.results {
                write_results(records, p)?;
            }
        }
        Ok(())
    }
}

fn write_errors(r: &RunRecords<'_>, path: &Path, excel_safe: bool) -> anyhow::Result<()> {
    let out = AtomicFile::create(path)?;
    let mut w = csv::Writer::from_writer(out.writer());
    let keep: Vec<usize> = r
        .headers
        .iter()
        .enumerate()
        .filter(|(_, h)| !is_report_column(h))
        .map(|(i, _)| i)
        .collect();
    let mut head: Vec<&str> = keep.iter().map(|i| r.headers[*i].as_str()).collect();
    head.extend(ERROR_COLUMNS);
    w.write_record(&head)?;
    r.checkpoint.each_rejected(r.run, |row| {
        let mut rec: Vec<String> = keep
            .iter()
            .map(|i| row.cells.get(*i).cloned().unwrap_or_default())
            .map(|c| {
                if excel_safe {
                    crate::output::excel_safe(c)
                } else {
                    c
                }
            })
            .collect();
        rec.push(row.line.to_string());
        rec.push(row.class.unwrap_or_default());
        rec.push(row.http_status.map(|s| s.to_string()).unwrap_or_default());
        rec.push(row.message.unwrap_or_default());
        w.write_record(&rec)?;
        Ok(())
    })?;
    drop(
        w.into_inner()
            .map_err(|e| anyhow::anyhow!("failed to write {}: {e}", path.display()))?,
    );
    out.commit()
        .with_context(|| format!("failed to write {}", path.display()))
}

fn write_results(r: &RunRecords<'_>, path: &Path) -> anyhow::Result<()> {
    let out = AtomicFile::create(path)?;
    let mut w = csv::Writer::from_writer(out.writer());
    w.write_record([
        "line",
        r.key_name,
        "action",
        "prefinery_id",
        "error_class",
        "message",
    ])?;
    let key_column = r.key_column.or_else(|| {
        r.headers
            .iter()
            .position(|h| h.trim().eq_ignore_ascii_case(r.key_name))
    });
    r.checkpoint.each_result(r.run, |row| {
        // A row refused before it had a key (a malformed email, a ragged
        // row) is named by its key column's cell as the file has it.
        let key = row.key.or_else(|| {
            let cells: Vec<String> = serde_json::from_str(row.raw.as_deref()?).ok()?;
            Some(cells.get(key_column?)?.trim().to_string())
        });
        w.write_record([
            row.line.to_string(),
            key.unwrap_or_default(),
            row.action,
            row.target_id.map(|i| i.to_string()).unwrap_or_default(),
            row.class.unwrap_or_default(),
            row.message.unwrap_or_default(),
        ])?;
        Ok(())
    })?;
    drop(
        w.into_inner()
            .map_err(|e| anyhow::anyhow!("failed to write {}: {e}", path.display()))?,
    );
    out.commit()
        .with_context(|| format!("failed to write {}", path.display()))
}
