//! `import testers`: CSV rows into tester create and update calls, run by
//! the [`engine`](crate::engine) as the operation
//! [`TestersImport`](crate::ops::testers_import::TestersImport).
//!
//! A new run whose rows cannot set a status that emails people reads its
//! input in a single pass; otherwise every row is checked (and the run
//! refused if any would email people without `--allow-emails`) before the
//! first call. See the engine for the rest: checkpoint, resume, exactly
//! once.

pub mod mapping;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::api::Client;
pub use crate::engine::default_errors_path;
use crate::engine::events::{Subscriber, SummaryJson};
use crate::engine::report::Reports;
use crate::engine::{RunOptions, RunSummary, Subscribers};
use crate::exit::usage;
pub use crate::input;
use crate::ops::testers_import::TestersImport;
pub use crate::ops::testers_import::{Mode, Resolve};
use crate::stop::Stop;
use input::{Encoding, Source};
use mapping::{EMAILING_STATUSES, EmptyCells};

#[derive(Debug, Clone, Serialize)]
pub struct ImportOptions {
    pub beta: String,
    #[serde(skip)]
    pub source: Source,
    pub mode: Mode,
    pub map: Option<PathBuf>,
    /// Status for new users.
    pub default_status: String,
    pub concurrency: usize,
    pub dry_run: bool,
    pub checkpoint: PathBuf,
    pub errors: Option<PathBuf>,
    pub results: Option<PathBuf>,
    /// Written by the caller; here only to be checked against the others.
    #[serde(skip)]
    pub summary_json: Option<PathBuf>,
    pub fresh: bool,
    pub max_duration: Option<Duration>,
    #[serde(skip)]
    pub encoding: Option<Encoding>,
    pub delimiter: Option<char>,
    pub strict: bool,
    pub empty: EmptyCells,
    pub allow_emails: bool,
    pub resolve: Option<Resolve>,
    /// Neutralise formula cells in the rejected-rows report.
    pub excel_safe: bool,
}

impl ImportOptions {
    pub fn new(beta: &str, source: Source, checkpoint: PathBuf) -> ImportOptions {
        ImportOptions {
            beta: beta.to_string(),
            source,
            mode: Mode::Upsert,
            map: None,
            default_status: "imported".into(),
            concurrency: 8,
            dry_run: false,
            checkpoint,
            errors: None,
            results: None,
            summary_json: None,
            fresh: false,
            max_duration: None,
            encoding: None,
            delimiter: None,
            strict: false,
            empty: EmptyCells::Keep,
            allow_emails: false,
            resolve: None,
            excel_safe: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ImportSummary {
    pub run_id: i64,
    pub input: String,
    pub beta: String,
    pub dry_run: bool,
    pub resumed: bool,
    pub total_rows: u64,
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub rejected: u64,
    pub pending: u64,
    pub api_calls: u64,
    pub throttled: u64,
    pub retries: u64,
    pub elapsed_secs: f64,
    pub stopped: bool,
    pub resolve: String,
    pub unmapped_columns: Vec<String>,
    pub errors_file: Option<String>,
    pub results_file: Option<String>,
    pub checkpoint: String,
    /// The engine's summary, as printed.
    #[serde(skip)]
    pub run: RunSummary,
}

impl std::fmt::Display for ImportSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.run.fmt(f)
    }
}

impl ImportSummary {
    fn from_run(s: RunSummary) -> ImportSummary {
        let note = |k: &str| s.notes.get(k).cloned().unwrap_or(Value::Null);
        ImportSummary {
            run_id: s.run_id,
            input: s.input.clone(),
            beta: s.beta.clone(),
            dry_run: s.dry_run,
            resumed: s.resumed,
            total_rows: s.total_rows,
            created: s.count("created"),
            updated: s.count("updated"),
            unchanged: s.count("unchanged"),
            rejected: s.rejected,
            pending: s.pending,
            api_calls: s.api_calls,
            throttled: s.throttled,
            retries: s.retries,
            elapsed_secs: s.elapsed_secs,
            stopped: s.stopped,
            resolve: note("resolve").as_str().unwrap_or_default().to_string(),
            unmapped_columns: serde_json::from_value(note("unmapped_columns")).unwrap_or_default(),
            errors_file: s.errors_file.clone(),
            results_file: s.results_file.clone(),
            checkpoint: s.checkpoint.clone(),
            run: s,
        }
    }
}

/// What decides how rows are shaped and sent, stored with the run: a
/// resume with other settings is refused, or one project would get part of
/// a file under one mapping or status and the rest under another. The map
/// is compared by content, not only by name.
fn run_settings(opts: &ImportOptions) -> anyhow::Result<serde_json::Map<String, Value>> {
    let map = match &opts.map {
        Some(p) => {
            let bytes = std::fs::read(p)
                .map_err(|e| usage(format!("failed to read the map {}: {e}", p.display())))?;
            Value::String(format!(
                "{} (sha1 {})",
                p.display(),
                &sha1_smol::Sha1::from(&bytes).digest().to_string()[..12]
            ))
        }
        None => Value::String("none".into()),
    };
    let mut m = serde_json::Map::new();
    m.insert("--map".into(), map);
    m.insert("--mode".into(), serde_json::to_value(opts.mode)?);
    m.insert(
        "--status".into(),
        Value::String(opts.default_status.clone()),
    );
    m.insert("--allow-emails".into(), Value::Bool(opts.allow_emails));
    m.insert("--empty".into(), serde_json::to_value(opts.empty)?);
    m.insert(
        "--encoding".into(),
        Value::String(match opts.encoding {
            None => "detected".into(),
            Some(e) => format!("{e:?}").to_lowercase(),
        }),
    );
    m.insert(
        "--delimiter".into(),
        Value::String(
            opts.delimiter
                .map_or("detected".into(), |d| format!("{d:?}")),
        ),
    );
    Ok(m)
}

/// Runs an import to its end, or until `stop`. `progress` (and the
/// reports, and the summary JSON when asked) subscribe to its events.
pub async fn import(
    client: &Client,
    opts: &ImportOptions,
    stop: Stop,
    progress: Arc<dyn Subscriber>,
) -> anyhow::Result<ImportSummary> {
    if !mapping::STATUSES.contains(&opts.default_status.as_str()) {
        return Err(usage(format!(
            "unknown --status {:?}; expected one of {}",
            opts.default_status,
            mapping::STATUSES.join(", ")
        )));
    }
    if EMAILING_STATUSES.contains(&opts.default_status.as_str()) && !opts.allow_emails {
        return Err(usage(format!(
            "--status {} makes Prefinery email every new user; add --allow-emails if that is what you want",
            opts.default_status
        )));
    }
    let delimiter = opts.delimiter.map(|c| c as u8);
    let mut op = TestersImport::new(client.clone(), opts.beta.clone());
    op.mode = opts.mode;
    op.resolve = opts.resolve;
    op.default_status = opts.default_status.clone();
    op.allow_emails = opts.allow_emails;
    op.map = opts.map.clone();
    op.empty = opts.empty;
    op.strict = opts.strict;
    let run_opts = RunOptions {
        beta: opts.beta.clone(),
        source: opts.source.clone(),
        concurrency: opts.concurrency,
        dry_run: opts.dry_run,
        checkpoint: opts.checkpoint.clone(),
        errors: opts.errors.clone(),
        results: opts.results.clone(),
        summary_json: opts.summary_json.clone(),
        fresh: opts.fresh,
        max_duration: opts.max_duration,
        encoding: opts.encoding,
        delimiter,
        settings: run_settings(opts)?,
        options: serde_json::to_value(opts)?,
    };
    let mut subscribers = Subscribers::default()
        .with(progress)
        .with(Arc::new(Reports {
            excel_safe: opts.excel_safe,
        }));
    if let Some(p) = &opts.summary_json {
        subscribers = subscribers.with(Arc::new(SummaryJson(p.clone())));
    }
    let (summary, _op) = crate::engine::run(client, op, &run_opts, stop, subscribers).await?;
    Ok(ImportSummary::from_run(summary))
}
