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
pub mod presets;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::api::Client;
pub use crate::engine::default_errors_path;
use crate::engine::events::Subscriber;
use crate::engine::{RunOptions, RunSummary, Subscribers};
pub use crate::input;
use crate::mirror::Mirror;
use crate::ops::testers_import::{MirrorUse, TestersImport, check_default_status};
pub use crate::ops::testers_import::{Mode, Resolve};
use crate::stop::Stop;
use input::{Encoding, Source};
use mapping::EmptyCells;
use presets::MailchimpList;

#[derive(Debug, Clone, Serialize)]
pub struct ImportOptions {
    pub beta: String,
    #[serde(skip)]
    pub source: Source,
    pub mode: Mode,
    pub map: Option<PathBuf>,
    /// A preset's name, or `auto`; `map` overrides its entries.
    pub preset: Option<String>,
    /// Which Mailchimp list the input is (else told from its file name).
    pub mailchimp_list: Option<MailchimpList>,
    /// Import rows that `skip_if` rules would skip.
    pub include_flagged: bool,
    /// Status for new users; `None`: the map's `default_status`, else
    /// `imported`.
    pub default_status: Option<String>,
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
    /// The local mirror: what the API returns for each create and update
    /// is written back to it.
    #[serde(skip)]
    pub mirror: Option<PathBuf>,
    /// Tell new users from existing ones by the mirror alone (sync; the
    /// caller has made it fresh).
    pub by_mirror: bool,
    /// The order rows are sent in; `None`: the map's (or preset's).
    pub order: Option<crate::engine::Order>,
    /// Send each create's referrer, found among this run's rows, as
    /// `referrer_id`.
    pub link_referrers: bool,
    /// Send the rows of people who left as suppressions.
    pub suppress: bool,
}

impl ImportOptions {
    pub fn new(beta: &str, source: Source, checkpoint: PathBuf) -> ImportOptions {
        ImportOptions {
            beta: beta.to_string(),
            source,
            mode: Mode::Upsert,
            map: None,
            preset: None,
            mailchimp_list: None,
            include_flagged: false,
            default_status: None,
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
            order: None,
            link_referrers: false,
            suppress: false,
            allow_emails: false,
            resolve: None,
            excel_safe: false,
            mirror: None,
            by_mirror: false,
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
    /// `--suppress`: suppressions added, and of those the ones that
    /// unsubscribed a user of the project.
    pub suppressed: u64,
    pub unsubscribed: u64,
    pub rejected: u64,
    /// Rows a `skip_if` rule kept out (spam, fraud).
    pub skipped_flagged: u64,
    /// Rows of people who left (opted out, unsubscribed, cleaned): kept out
    /// until suppressions can be sent.
    pub would_suppress: u64,
    /// Each reason rows were skipped for, with its count.
    pub skip_reasons: Vec<(String, u64)>,
    /// The preset used, if any.
    pub preset: Option<String>,
    pub pending: u64,
    pub api_calls: u64,
    pub throttled: u64,
    pub retries: u64,
    pub elapsed_secs: f64,
    pub stopped: bool,
    pub resolve: String,
    /// The order creates were sent in: file, sorted or strict.
    pub order: String,
    /// `--link-referrers`: creates sent with their referrer's id, and
    /// creates whose referrer could not be linked.
    pub referrers_linked: Option<u64>,
    pub referrers_not_linked: Option<u64>,
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
            suppressed: s.count("suppressed"),
            unsubscribed: s.count("unsubscribed"),
            rejected: s.rejected,
            skipped_flagged: s
                .skipped
                .get("flagged")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            would_suppress: s
                .skipped
                .get("would_suppress")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            skip_reasons: s.skip_reasons.clone(),
            preset: note("preset").as_str().map(str::to_string),
            pending: s.pending,
            api_calls: s.api_calls,
            throttled: s.throttled,
            retries: s.retries,
            elapsed_secs: s.elapsed_secs,
            stopped: s.stopped,
            resolve: note("resolve").as_str().unwrap_or_default().to_string(),
            order: note("order").as_str().unwrap_or("file").to_string(),
            referrers_linked: note("referrers_linked").as_u64(),
            referrers_not_linked: note("referrers_not_linked").as_u64(),
            unmapped_columns: serde_json::from_value(note("unmapped_columns")).unwrap_or_default(),
            errors_file: s.errors_file.clone(),
            results_file: s.results_file.clone(),
            checkpoint: s.checkpoint.clone(),
            run: s,
        }
    }
}

/// Runs an import to its end, or until `stop`. `progress` (and the
/// reports, and the summary JSON when asked) subscribe to its events.
pub async fn import(
    client: &Client,
    opts: &ImportOptions,
    stop: Stop,
    progress: Arc<dyn Subscriber>,
) -> anyhow::Result<ImportSummary> {
    if let Some(s) = &opts.default_status {
        check_default_status(s, "--status", opts.allow_emails)?;
    }
    let delimiter = opts.delimiter.map(|c| c as u8);
    let mut op = TestersImport::new(client.clone(), opts.beta.clone());
    op.mode = opts.mode;
    op.resolve = opts.resolve;
    op.status = opts.default_status.clone();
    op.allow_emails = opts.allow_emails;
    op.map = opts.map.clone();
    op.preset = opts.preset.clone();
    op.mailchimp_list = opts.mailchimp_list;
    op.include_flagged = opts.include_flagged;
    if let Some(path) = &opts.mirror {
        let mirror = Arc::new(Mirror::open(path)?);
        let beta_id = match mirror.project_id(&opts.beta)? {
            Some(id) => id,
            None => client.beta(&opts.beta).await?.id as i64,
        };
        op.mirror = Some(MirrorUse { mirror, beta_id });
        if opts.by_mirror {
            op.resolve = Some(Resolve::Mirror);
        }
    }
    op.empty = opts.empty;
    op.strict = opts.strict;
    op.order = opts.order;
    op.link_referrers = opts.link_referrers;
    op.suppress = opts.suppress;
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
        options: serde_json::to_value(opts)?,
    };
    let subscribers =
        Subscribers::standard(progress, opts.excel_safe, opts.summary_json.as_deref());
    let (summary, _op) = crate::engine::run(client, op, &run_opts, stop, subscribers).await?;
    Ok(ImportSummary::from_run(summary))
}
