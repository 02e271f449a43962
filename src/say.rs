//! How a command's closing summary reaches the user: as text on stderr; as
//! one JSON log event, the last line, with `--log-format json` (a log
//! reader gets every line as JSON, the summary's counts as fields); or not
//! at all with `-q` (cron mails whatever a job prints, so a quiet run that
//! went well prints nothing; the summary JSON file, when asked, is written
//! all the same). Set once from the global flags by [`crate::run`].

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};

use serde::Serialize;

const TEXT: u8 = 0;
const JSON: u8 = 1;
const QUIET: u8 = 2;

static MODE: AtomicU8 = AtomicU8::new(TEXT);

/// How summaries are said from now on: `-q` wins over the log format.
pub fn configure(quiet: bool, json: bool) {
    let mode = match (quiet, json) {
        (true, _) => QUIET,
        (false, true) => JSON,
        (false, false) => TEXT,
    };
    MODE.store(mode, Ordering::Relaxed);
}

/// Whether `-q` asked for errors only.
pub fn quiet() -> bool {
    MODE.load(Ordering::Relaxed) == QUIET
}

/// Says a command's closing summary (`what`: `import`, `export`, ...).
pub fn summary<S: std::fmt::Display + Serialize>(what: &str, s: &S) {
    let mut err = std::io::stderr().lock();
    // A closed stderr is no reason to fail a run that did its work.
    let _ = match MODE.load(Ordering::Relaxed) {
        QUIET => Ok(()),
        JSON => writeln!(err, "{}", json_event(what, s)),
        _ => write!(err, "{s}"),
    };
}

/// Under `-q`, a run that did not do all its work is the one thing worth a
/// line each (cron mails it): stopped before the end (exit 5), rows
/// rejected (exit 4), and where the report is. Otherwise the summary says
/// it.
pub fn unfinished(stopped: bool, rejected: u64, report: Option<&str>) {
    if !quiet() {
        return;
    }
    if stopped {
        tracing::error!("stopped before the end: run the same command again to resume");
    }
    if rejected > 0 {
        match report {
            Some(r) => {
                tracing::error!(rejected, report = r, "{rejected} rows rejected; see {r}")
            }
            None => tracing::error!(rejected, "{rejected} rows rejected"),
        }
    }
}

/// The summary as tracing's JSON formatter writes an event: `timestamp`,
/// `level`, and `fields` with the `message` and the summary itself as an
/// object (not its text).
fn json_event<S: Serialize>(what: &str, s: &S) -> serde_json::Value {
    serde_json::json!({
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "level": "INFO",
        "fields": {
            "message": format!("{what} finished"),
            "summary": s,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_event_carries_the_summary_as_an_object() {
        #[derive(Serialize)]
        struct S {
            rows: u64,
        }
        let v = json_event("import", &S { rows: 3 });
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["fields"]["message"], "import finished");
        assert_eq!(v["fields"]["summary"]["rows"], 3);
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
    }
}
