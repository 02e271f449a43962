//! The engine: one runner for every row-by-row operation (the import of
//! testers today; sync apply and the bulk operations next).
//!
//! An [`Operation`] supplies only what is its own: parse and check a row,
//! its key for duplicates and reports, what a row costs, how to decide and
//! send, and how to find out whether a sent call took effect. The engine
//! owns the rest, once for all of them: spooling standard input, the
//! input's fingerprint, the lock, opening or resuming the run in the
//! checkpoint, the planning pass or the single pass, the coordinator (the
//! one task that owns the input and the checkpoint), the workers, the
//! exactly-once protocol, error classification, dry run, Ctrl-C and
//! `--max-duration`, and the reports. Progress, the summary and the
//! reports are [`events`] that subscribers turn into a bar, log lines,
//! JSON and CSV files.
//!
//! Exactly once: a row's intent (`create`, `update`, ...) is durable in the
//! checkpoint before the call that carries it out. A row found `sending` on
//! resume, and every call whose outcome is unknown, is first asked about:
//! [`Operation::find_effect`] tells whether the effect is already there,
//! and only if it is not is the call sent (again).

mod coordinator;
pub mod events;
pub mod report;
mod worker;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::api::{ApiError, Client, RateClass};
use crate::checkpoint::{Checkpoint, RowUpdate};
use crate::exit::{StoppedError, usage};
use crate::input::{CsvInput, Encoding, Source};
use crate::lock::RunLock;
use crate::stop::Stop;
pub use events::{Event, Subscriber, Subscribers};

/// What a row is about to send, as the checkpoint records it (`create`,
/// `update`, `delete`, ...). An operation names its own.
pub type Intent = &'static str;

/// Whether a call took effect, as the operation found out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// It did: the row is done with this action, on this record.
    Done { action: &'static str, target: u64 },
    /// It did not (or nothing was in flight): the row is still to do. What
    /// the operation read to find out may be kept in the row for `decide`.
    NotDone,
}

/// Why the engine asks whether a call took effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Doubt {
    /// The row was `sending` when a run stopped, about to carry out this
    /// intent (`None`: it had not been decided yet).
    InFlightAtStop(Option<Intent>),
    /// This run sent it and got no clear answer.
    OutcomeUnknown(Intent),
}

/// What an operation made of a record.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed<R> {
    Row(R),
    /// Kept out of the run by a rule (spam, an unsubscribed person): not
    /// sent and not an error, counted by `class` and reported with
    /// `reason`. A skipped row is as if it were not in the file: it takes
    /// no part in the duplicate check.
    Skip {
        class: &'static str,
        key: Option<String>,
        reason: String,
    },
}

/// The order a run sends its rows in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// The file's: each row is sent as it is read.
    #[default]
    File,
    /// By the operation's [`Operation::order_key`] (oldest signup first):
    /// every row is planned first, with its place and where its record
    /// starts, and read back one by one in that order (bounded memory).
    /// Concurrent workers take the rows in that order, so calls start in
    /// it, but two calls started together may land in either order.
    Sorted,
    /// Sorted, and each call of an intent the operation names
    /// ([`Operation::in_turn`]: an import's creates) is sent only once
    /// every row before it is answered: those calls land in exactly that
    /// order. Other calls (updates) stay concurrent.
    Strict,
}

impl Order {
    pub fn name(self) -> &'static str {
        match self {
            Order::File => "file",
            Order::Sorted => "sorted",
            Order::Strict => "strict",
        }
    }
}

/// What a row needs, decided by the operation (after a lookup if need be).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to send: the row is done (`unchanged`, ...).
    Done { action: &'static str, target: u64 },
    /// Refused, with a message that says why (the mode forbids it, ...).
    Reject { message: String },
    /// The record changed since the row was planned: not touched, reported
    /// as `drift` with what changed; the run stops if the operation says so
    /// ([`Operation::stop_on_drift`]).
    Drift { message: String },
    /// Send this.
    Send(Intent),
}

/// How a call went, when it got an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    Done {
        action: &'static str,
        target: u64,
    },
    /// Refused by the API in a way the operation understood.
    Rejected {
        status: Option<u16>,
        message: String,
    },
    /// The world was not as decided (a create whose email is taken): decide
    /// again, from what the operation has learnt meanwhile.
    Redecide,
}

/// What one row costs, for the ETA: the rate class that bounds it and how
/// many of its calls a row makes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cost {
    pub class: Option<RateClass>,
    pub calls_per_row: f64,
}

/// What an operation may use to set itself up once the rows to do are
/// known (list the project, say), before any row is handed out.
pub struct Prepare<'a> {
    pub checkpoint: &'a Checkpoint,
    pub run: i64,
    /// Rows still to do.
    pub open: u64,
    /// Of those, rows that were in flight when the last run stopped.
    pub in_flight: u64,
    pub dry_run: bool,
    /// Stopping (the time budget, Ctrl-C): a long preparation (a listing)
    /// returns a [`crate::exit::StoppedError`], and the run ends as a
    /// stopped one, resumable.
    pub stop: &'a Stop,
    /// For the progress of a long preparation (a listing: its own phase).
    pub progress: &'a Subscribers,
}

/// What an operation supplies; the engine owns everything else. Methods
/// that call the API return futures the workers await: generic, so each
/// operation's row handling is compiled in, with no boxing per row.
pub trait Operation: Send + Sync + Sized + 'static {
    /// A parsed, checked row.
    type Row: Send + 'static;

    /// `runs.kind` in the checkpoint, e.g. `testers.import`.
    fn kind(&self) -> &'static str;

    /// The actions a done row may have, in the order a summary lists them.
    fn actions(&self) -> &'static [&'static str];

    /// What this operation's intents are called once done (`create` ->
    /// `created`): a dry run's rows, and the name of an intent read back
    /// from the checkpoint (`None` for one it does not know).
    fn intent(&self, name: &str) -> Option<(Intent, &'static str)>;

    /// The input, opened, before any record is planned: its header row
    /// (an operation that maps columns builds its mapping here) and, if
    /// the operation wants, its first records (a date column whose first
    /// cells match no format stops the run here). An error refuses the run
    /// before any call.
    fn start(&mut self, input: &mut CsvInput) -> anyhow::Result<()>;

    /// Parses and checks one record; `Err` rejects it with that message.
    fn parse(&self, cells: &csv::StringRecord) -> Result<Parsed<Self::Row>, String>;

    /// The row's key, for duplicates within a file and for the reports.
    fn key<'r>(&self, row: &'r Self::Row) -> &'r str;

    /// What the key is, in messages (`email`, `id`).
    fn key_name(&self) -> &'static str {
        "key"
    }

    /// The input column the key is read from, once started, when it is not
    /// simply the column named [`Operation::key_name`] (a mapped email
    /// column): the results name a row rejected before it had a key by
    /// that cell.
    fn key_column(&self) -> Option<usize> {
        None
    }

    /// Whether sending a file again after a run finished it is harmless (an
    /// upsert finds everything unchanged). When not (points added twice), a
    /// finished file is not sent again: the run says so and does nothing,
    /// unless `--fresh`, which first says how many records it sends again.
    fn repeatable(&self) -> bool {
        false
    }

    /// Whether rows may be sent as they are read. `false` when the whole
    /// file must be checked first (a row may need a permission the run
    /// lacks: [`Operation::gate`]).
    fn single_pass(&self) -> bool {
        true
    }

    /// The order rows are sent in. Anything but the file's order plans
    /// the whole file first.
    fn order(&self) -> Order {
        Order::File
    }

    /// Where a row goes in a sorted run (smallest first; rows with equal
    /// keys keep the file's order).
    fn order_key(&self, _row: &Self::Row) -> i64 {
        i64::MAX
    }

    /// Whether calls carrying `intent` wait for their turn in a strict
    /// order.
    fn in_turn(&self, _intent: Intent) -> bool {
        false
    }

    /// Told of every row the planning pass records (not of duplicates or
    /// refused rows), with its line: an operation that links rows to each
    /// other notes here how they name each other.
    fn note_planned(
        &self,
        _checkpoint: &Checkpoint,
        _run: i64,
        _line: u64,
        _row: &Self::Row,
    ) -> anyhow::Result<()> {
        Ok(())
    }

    /// Told of every row done, with the record it acted on, before any
    /// row after it in a strict order is sent.
    fn finished(&self, _row: &mut Self::Row, _action: &'static str, _target: u64) {}

    /// Whether this row needs a permission the run was not given; counted
    /// in the planning pass, and the run is refused when any does.
    fn gate(&self, _row: &Self::Row) -> bool {
        false
    }

    /// The refusal when `rows` rows need that permission, the first at
    /// `first_line`.
    fn gate_refusal(&self, rows: u64, first_line: u64) -> anyhow::Error {
        usage(format!(
            "{rows} rows need a permission this run was not given (first at line {first_line})"
        ))
    }

    /// Sets the operation up before the first row is handed out.
    /// Not `Send`: it may hold the checkpoint, which one task owns.
    fn prepare(&mut self, p: Prepare<'_>) -> impl Future<Output = anyhow::Result<()>>;

    /// What a row costs, known once prepared.
    fn cost(&self) -> Cost;

    /// The intent known when the row is handed out, without any call (the
    /// checkpoint may know the record: a listing). `None` when the worker
    /// decides. The row may keep what was read.
    fn plan(
        &self,
        _checkpoint: &Checkpoint,
        _run: i64,
        _row: &mut Self::Row,
    ) -> anyhow::Result<Option<Intent>> {
        Ok(None)
    }

    /// Where the row is in the input, and the detail its intent was made
    /// durable with when the last run stopped (a row in flight then):
    /// given once, before the row is worked on. An operation that marks
    /// what it creates with the row's line, or that compares records
    /// before and after a create, keeps what it needs here.
    fn place(&self, _row: &mut Self::Row, _line: u64, _stopped_detail: Option<String>) {}

    /// What to make durable with `intent`, in the same write, for
    /// [`Operation::find_effect`] to prove the call's effect after a kill
    /// (the records there were before a create with no natural key).
    fn detail(&self, _row: &Self::Row, _intent: Intent) -> Option<String> {
        None
    }

    /// Did the call in doubt take effect? Asked for a row found `sending`
    /// on resume and after every call whose outcome is unknown, before
    /// anything is retried.
    fn find_effect(
        &self,
        row: &mut Self::Row,
        doubt: Doubt,
    ) -> impl Future<Output = Result<Effect, ApiError>> + Send;

    /// What the row needs.
    fn decide(
        &self,
        row: &mut Self::Row,
    ) -> impl Future<Output = Result<Decision, ApiError>> + Send;

    /// Sends `intent` (already durable).
    fn send(
        &self,
        row: &mut Self::Row,
        intent: Intent,
    ) -> impl Future<Output = Result<Sent, ApiError>> + Send;

    /// The settings that shape what is sent, once started (the mapping,
    /// the status of new users, ...). Stored with the run; a resume whose
    /// settings differ is refused, naming each difference.
    fn settings(&self) -> serde_json::Map<String, Value> {
        serde_json::Map::new()
    }

    /// Why a done row is as it is (`unchanged`: already delivered, already
    /// suppressed, ...), for the results file; `None` says nothing (and
    /// costs nothing).
    fn done_note(&self, _row: &Self::Row, _action: &str) -> Option<String> {
        None
    }

    /// Whether a drift stops the run (the rest stays to do, resumable) or
    /// only its row.
    fn stop_on_drift(&self) -> bool {
        false
    }

    /// Notes for the summary (how emails were resolved, ...).
    fn notes(&self) -> serde_json::Map<String, Value> {
        serde_json::Map::new()
    }
}

/// What every run of the engine takes, whatever its operation.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub beta: String,
    pub source: Source,
    pub concurrency: usize,
    pub dry_run: bool,
    pub checkpoint: PathBuf,
    pub errors: Option<PathBuf>,
    pub results: Option<PathBuf>,
    /// Written by a subscriber; here to be checked against the others.
    pub summary_json: Option<PathBuf>,
    pub fresh: bool,
    pub max_duration: Option<Duration>,
    pub encoding: Option<Encoding>,
    pub delimiter: Option<u8>,
    /// The operation's own options, stored with the run for the record.
    pub options: Value,
}

/// How a run ended: the counts, per action of its operation, and where the
/// reports are.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub run_id: i64,
    pub kind: &'static str,
    pub input: String,
    pub beta: String,
    pub dry_run: bool,
    pub resumed: bool,
    pub total_rows: u64,
    /// Done rows per action, every action of the operation named.
    #[serde(flatten)]
    pub actions: serde_json::Map<String, Value>,
    pub rejected: u64,
    /// Rows a rule kept out, per class (`flagged`, `would_suppress`).
    pub skipped: serde_json::Map<String, Value>,
    /// Each reason rows were skipped for, with its count, most frequent
    /// first.
    pub skip_reasons: Vec<(String, u64)>,
    pub pending: u64,
    pub api_calls: u64,
    pub throttled: u64,
    pub retries: u64,
    pub elapsed_secs: f64,
    pub stopped: bool,
    /// The earlier run that had already done this whole file: this run did
    /// nothing.
    pub already_done_by: Option<i64>,
    pub errors_file: Option<String>,
    pub results_file: Option<String>,
    pub checkpoint: String,
    /// The operation's notes.
    #[serde(flatten)]
    pub notes: serde_json::Map<String, Value>,
    /// Why the run ended early, when a failure ended it.
    #[serde(skip)]
    pub fatal: Option<String>,
}

impl RunSummary {
    /// Done rows with this action.
    pub fn count(&self, action: &str) -> u64 {
        self.actions
            .get(action)
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }
}

impl std::fmt::Display for RunSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.kind {
            "testers.import" => "import",
            k => k,
        };
        writeln!(
            f,
            "{}{what} of {} into project {}: {} rows",
            if self.dry_run { "dry run: " } else { "" },
            self.input,
            self.beta,
            self.total_rows
        )?;
        let mut parts: Vec<String> = self
            .actions
            .iter()
            .map(|(a, n)| {
                let verb = if self.dry_run && a != "unchanged" {
                    "would be "
                } else {
                    ""
                };
                format!("{verb}{a} {n}")
            })
            .collect();
        parts.push(format!("rejected {}", self.rejected));
        if self.pending > 0 {
            parts.push(format!("not done yet {}", self.pending));
        }
        writeln!(f, "  {}", parts.join(", "))?;
        if !self.skipped.is_empty() {
            let skipped: Vec<String> = self
                .skipped
                .iter()
                .map(|(class, n)| match class.as_str() {
                    "flagged" => format!("skipped as flagged {n}"),
                    "would_suppress" => format!(
                        "would be suppressed {n} (not imported; --suppress sends them as suppressions)"
                    ),
                    other => format!("skipped ({other}) {n}"),
                })
                .collect();
            writeln!(f, "  {}", skipped.join(", "))?;
            for (reason, n) in &self.skip_reasons {
                writeln!(f, "    {n} {reason}")?;
            }
        }
        writeln!(
            f,
            "  API calls {}, throttled answers {}, retries {}, time {:.1}s",
            self.api_calls, self.throttled, self.retries, self.elapsed_secs
        )?;
        if let Some(e) = &self.errors_file {
            writeln!(
                f,
                "  rejected rows: {e} (fix them and feed the file back in)"
            )?;
        }
        match &self.results_file {
            Some(r) if self.dry_run => writeln!(
                f,
                "  plan: {r} (each row's email, what would be done and why, the fields an update would change)"
            )?,
            Some(r) => writeln!(f, "  results: {r}")?,
            None => {}
        }
        if self.stopped {
            writeln!(
                f,
                "  stopped before the end: run the same command again to resume (run {})",
                self.run_id
            )?;
        }
        if let Some(run) = self.already_done_by {
            writeln!(
                f,
                "  nothing sent: run {run} already did this file (the counts are its own); --fresh sends it again"
            )?;
        }
        Ok(())
    }
}

/// The input's identity in the checkpoint: its absolute path.
fn input_key(source: &Source) -> String {
    match source {
        Source::File(p) => std::fs::canonicalize(p)
            .unwrap_or_else(|_| p.clone())
            .display()
            .to_string(),
        Source::Stdin | Source::Spooled(_) => "<stdin>".into(),
    }
}

/// The errors report's default place: beside the checkpoint, named after
/// it without its extension.
pub fn default_errors_path(checkpoint: &Path, run: i64) -> PathBuf {
    let stem = checkpoint
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "prefsync".into());
    checkpoint.with_file_name(format!("{stem}.run{run}.errors.csv"))
}

/// A dry run's plan when no `--results` is given: beside the checkpoint,
/// named after it (`prefsync-checkpoint.sqlite` gives
/// `prefsync-checkpoint.dry-run.csv`); each dry run replaces it.
pub fn default_plan_path(checkpoint: &Path) -> PathBuf {
    let stem = checkpoint
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "prefsync".into());
    checkpoint.with_file_name(format!("{stem}.dry-run.csv"))
}

/// The `--max-duration` timer of a run, stopped when the run returns.
struct Budget(tokio::task::JoinHandle<()>);

impl Drop for Budget {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Rows planned per checkpoint transaction.
const PLAN_BATCH: usize = 5_000;

/// Runs `op` over the input to its end, or until `stop`. Returns the
/// summary (also sent to the subscribers as [`Event::Finished`]) and the
/// operation, for what it learnt.
pub async fn run<O: Operation>(
    client: &Client,
    mut op: O,
    opts: &RunOptions,
    stop: Stop,
    subscribers: Subscribers,
) -> anyhow::Result<(RunSummary, Arc<O>)> {
    let started = Instant::now();
    // --max-duration stops the run cleanly, whatever phase it is in (a
    // listing before the first row included); the budget ends with the
    // run, however it returns.
    let budget = opts.max_duration.map(|d| Budget(stop.after(d)));
    let stats = client.stats();
    let before_calls = (
        stats.requests.load(Ordering::Relaxed),
        stats.throttled.load(Ordering::Relaxed),
        stats.retries.load(Ordering::Relaxed),
    );
    if opts.concurrency == 0 || opts.concurrency > 256 {
        return Err(usage("--concurrency must be from 1 to 256"));
    }

    // Standard input is spooled to a file: the run reads its input twice.
    let _spool;
    let source = match &opts.source {
        Source::Stdin => {
            let mut tmp = tempfile::NamedTempFile::new().with_context(|| {
                format!(
                    "failed to spool standard input into {} (set TMPDIR to a writable directory)",
                    std::env::temp_dir().display()
                )
            })?;
            let bytes = std::io::copy(&mut std::io::stdin().lock(), &mut tmp)
                .context("failed to read standard input")?;
            if bytes == 0 {
                return Err(usage(
                    "standard input is empty: give the CSV on standard input (a header row, then the rows) or use --file PATH",
                ));
            }
            let path = tmp.path().to_path_buf();
            _spool = tmp;
            tracing::info!("reading standard input: this run cannot be resumed if interrupted");
            Source::Spooled(path)
        }
        s => s.clone(),
    };
    let key = input_key(&opts.source);
    // A dry run always writes its plan (what each row would do, and why):
    // to --results, else beside the checkpoint.
    let results_file = opts
        .results
        .clone()
        .or_else(|| opts.dry_run.then(|| default_plan_path(&opts.checkpoint)));
    {
        let mut outputs: Vec<(&str, &Path)> = vec![];
        if !opts.dry_run {
            outputs.push(("--checkpoint", &opts.checkpoint));
        }
        for (flag, p) in [
            ("--errors", &opts.errors),
            ("--results", &results_file),
            ("--summary-json", &opts.summary_json),
        ] {
            if let Some(p) = p {
                outputs.push((flag, p));
            }
        }
        crate::output::check_outputs(source.path(), &outputs)?;
    }

    let mut csv = CsvInput::open(&source, opts.encoding, opts.delimiter)?;
    let found_delimiter = csv.format.delimiter;
    op.start(&mut csv)?;
    drop(csv);
    // The fingerprint and, when the run may be a single pass, its total
    // (the record count) each read the whole file before the first call:
    // side by side, on two cores. The count's error counts only in a
    // single pass, which uses it.
    let order = op.order();
    let may_single_pass = op.single_pass() && order == Order::File;
    let (fingerprint, records) = std::thread::scope(|s| {
        let counting = may_single_pass.then(|| {
            s.spawn(|| CsvInput::open(&source, opts.encoding, opts.delimiter)?.count_records())
        });
        let fingerprint = crate::input::fingerprint(&source, found_delimiter);
        let records = counting.map(|c| {
            c.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("counting the input's records panicked")))
        });
        (fingerprint, records)
    });
    let (size, hash) = fingerprint?;

    // The checkpoint: a temporary one for a dry run, which writes nothing.
    let _dry_dir;
    let ck_path = if opts.dry_run {
        let d = tempfile::tempdir().with_context(|| {
            format!(
                "failed to make the dry run's scratch checkpoint in {} (set TMPDIR to a writable directory)",
                std::env::temp_dir().display()
            )
        })?;
        let p = d.path().join("dry-run.sqlite");
        _dry_dir = d;
        p
    } else {
        opts.checkpoint.clone()
    };
    let _lock = if opts.dry_run {
        None
    } else {
        Some(RunLock::acquire(&ck_path)?)
    };
    let ck = Checkpoint::open(&ck_path)?;

    // What shapes the rows sent: the operation's settings, and how the
    // input is read.
    let mut settings = op.settings();
    settings.insert(
        "--encoding".into(),
        Value::String(match opts.encoding {
            None => "detected".into(),
            Some(e) => format!("{e:?}").to_lowercase(),
        }),
    );
    settings.insert(
        "--delimiter".into(),
        Value::String(
            opts.delimiter
                .map_or("detected".into(), |d| format!("{:?}", char::from(d))),
        ),
    );
    let options_json = {
        let mut v = opts.options.clone();
        if !v.is_object() {
            v = Value::Object(Default::default());
        }
        v["settings"] = Value::Object(settings.clone());
        v.to_string()
    };
    let stdin = matches!(opts.source, Source::Stdin | Source::Spooled(_));
    // A run left unfinished (say, a --fresh one killed) is resumed first.
    let mut unfinished = ck.unfinished_run(op.kind(), &key, &opts.beta)?;
    // A finished run that gave rows up as unclear ("run again to retry"):
    // running it again resumes it, and does exactly those rows.
    if unfinished.is_none()
        && !opts.fresh
        && !stdin
        && !opts.dry_run
        && let Some(done) = ck.finished_run(op.kind(), &key, &opts.beta, &hash)?
        && settings_differ(&done.options, &settings).is_empty()
    {
        let reopened = ck.reopen_given_up(done.id)?;
        if reopened > 0 {
            tracing::info!(
                run = done.id,
                "run {} gave up on {reopened} rows as unclear (retries exhausted, or an outcome it could not tell): trying them again",
                done.id
            );
            unfinished = ck.run(done.id)?;
        }
    }
    if !op.repeatable()
        && !stdin
        && !opts.dry_run
        && unfinished.is_none()
        && let Some(done) = ck.finished_run(op.kind(), &key, &opts.beta, &hash)?
        // The same file with other settings (another map, status, mode)
        // is other work: a new run.
        && settings_differ(&done.options, &settings).is_empty()
    {
        let c = ck.counts(done.id)?;
        let sent: u64 = c.done.iter().map(|(_, n)| n).sum();
        if !opts.fresh {
            tracing::warn!(
                "run {} already did this file for project {} ({} rows done): nothing to do. \
                 --fresh sends it again, doing its {sent} rows a second time",
                done.id,
                opts.beta,
                sent
            );
            let summary = summary_of_done(&op, &ck, &done, opts, started)?;
            // The subscribers hear of it too: a --summary-json that a
            // script reads says that nothing was sent, instead of being
            // missing (or a stale file). No report is rewritten.
            let headers = CsvInput::open(&source, opts.encoding, opts.delimiter)?.headers;
            subscribers.send(&Event::Finished {
                summary: &summary,
                records: &report::RunRecords {
                    checkpoint: &ck,
                    run: done.id,
                    headers: &headers,
                    key_name: op.key_name(),
                    key_column: op.key_column(),
                    errors: None,
                    results: None,
                },
            })?;
            return Ok((summary, Arc::new(op)));
        }
        tracing::warn!(
            "--fresh: run {} already did this file; its {sent} rows are done a second time",
            done.id
        );
    }
    let mut resumed = false;
    let run = match unfinished {
        Some(r) if !opts.fresh && !matches!(opts.source, Source::Stdin | Source::Spooled(_)) => {
            if r.input_size != Some(size) || r.input_hash.as_deref() != Some(hash.as_str()) {
                return Err(usage(format!(
                    "{} changed since run {} started on it (size or content differs); \
                     to start over with the new file, add --fresh",
                    opts.source.display(),
                    r.id
                )));
            }
            let differences = settings_differ(&r.options, &settings);
            if !differences.is_empty() {
                return Err(usage(format!(
                    "run {} on {} stopped with other settings than these: {}; \
                     resuming would shape part of the file one way and the rest another. \
                     Run it again with the settings it had to finish it, or add --fresh to start over with these",
                    r.id,
                    opts.source.display(),
                    differences.join("; ")
                )));
            }
            resumed = true;
            tracing::info!(run = r.id, "resuming run {}", r.id);
            r.id
        }
        other => {
            if let Some(r) = other {
                ck.abandon(r.id)?;
            }
            ck.new_run(
                op.kind(),
                &key,
                Some(size),
                Some(&hash),
                &opts.beta,
                &options_json,
            )?
        }
    };
    let planned = ck.run(run)?.is_some_and(|r| r.planned);

    // A new run whose rows need no look at the whole file before its first
    // call plans each row in a single pass and hands it out, so planning
    // overlaps the calls. Otherwise, and to finish the planning of a run
    // stopped during its single pass, every row is planned first.
    let single_pass = !planned && ck.counts(run)?.total() == 0 && may_single_pass;
    let total_rows = if single_pass {
        ck.set_state(run, "running")?;
        let records = records.expect("counted, as a single pass was possible")?;
        ck.expect_emails(records);
        records
    } else {
        if !planned {
            let total = plan(&op, &ck, run, &source, opts, order)?;
            if total.gated > 0 {
                ck.abandon(run)?;
                return Err(op.gate_refusal(total.gated, total.first_gated_line));
            }
            ck.set_planned(run, total.rows)?;
        } else {
            ck.set_state(run, "running")?;
        }
        ck.run(run)?.and_then(|r| r.total_rows).unwrap_or(0) as u64
    };
    let before = ck.counts(run)?;
    // Rows still to do: all of them in a single pass (none recorded yet).
    let open = if single_pass {
        total_rows
    } else {
        before.pending
    };
    let prepared = op
        .prepare(Prepare {
            checkpoint: &ck,
            run,
            open,
            in_flight: before.sending,
            dry_run: opts.dry_run,
            stop: &stop,
            progress: &subscribers,
        })
        .await;
    match prepared {
        // Stopped while preparing (a listing, by the time budget or
        // Ctrl-C): the run goes on to the end of a stopped run, handing
        // nothing out, and is resumed as any other.
        Err(e) if stop.is_set() && e.downcast_ref::<StoppedError>().is_some() => {
            tracing::warn!("{e}");
        }
        other => other?,
    }
    let op = Arc::new(op);
    subscribers.send(&Event::Started {
        kind: op.kind(),
        run,
        total: total_rows,
        done: before.finished(),
        resumed,
    })?;

    // The coordinator owns the checkpoint and the input from here on.
    let (wtx, wrx) = mpsc::channel::<coordinator::ToCoordinator>(opts.concurrency * 4 + 16);
    let (jtx, jrx) = mpsc::channel::<Vec<coordinator::Job<O::Row>>>(opts.concurrency * 2);
    let coordinator = {
        let csv = CsvInput::open(&source, opts.encoding, opts.delimiter)?;
        let sorted = match order {
            Order::File => None,
            Order::Sorted | Order::Strict => Some(coordinator::Sorted {
                at: crate::input::RecordAt::open(&csv)?,
                after: None,
                queue: Default::default(),
                turns: order == Order::Strict,
                next_turn: 0,
            }),
        };
        let rows = coordinator::RowSource {
            csv,
            op: op.clone(),
            plan_too: single_pass,
            run,
            open: Vec::new().into_iter().peekable(),
            last: 0,
            exhausted: false,
            sorted,
        };
        let progress = coordinator::ProgressFeed {
            subscribers: subscribers.clone(),
            client: client.clone(),
            cost: op.cost(),
            started,
            total: total_rows,
            done: before.finished(),
            last: None,
        };
        tokio::spawn(coordinator::coordinate(
            ck,
            rows,
            wrx,
            jtx,
            progress,
            stop.clone(),
        ))
    };

    let fatal = worker::work_all(
        client.clone(),
        op.clone(),
        (opts.concurrency, opts.dry_run, order == Order::Strict),
        jrx,
        wtx,
        stop.clone(),
    )
    .await?;
    drop(budget);
    let (ck, read_all) = coordinator.await.context("the coordinator panicked")??;
    // A single pass that read the whole input has planned every row.
    if single_pass && read_all {
        ck.set_planned(run, total_rows)?;
    }

    let counts = ck.counts(run)?;
    // Rows a stopped single pass never reached are not in the checkpoint.
    let pending = total_rows.saturating_sub(counts.finished());
    let stopped = pending > 0 || (single_pass && !read_all);
    // A stopped run is marked at once; a finished one only once its
    // reports are written (below): killed in between, the same command
    // again resumes it (every row done, no call) and writes them, instead
    // of starting a new run that would never report the first one's.
    if stopped {
        ck.set_state(run, "stopped")?;
    }

    let errors_file =
        (counts.rejected > 0 && (!opts.dry_run || opts.errors.is_some())).then(|| {
            opts.errors
                .clone()
                .unwrap_or_else(|| default_errors_path(&opts.checkpoint, run))
        });
    // A resumed run that left no row rejected: the errors report its
    // earlier part wrote names rows that are done now.
    if resumed && counts.rejected == 0 && !opts.dry_run {
        let stale = opts
            .errors
            .clone()
            .unwrap_or_else(|| default_errors_path(&opts.checkpoint, run));
        if stale.exists() {
            std::fs::remove_file(&stale)
                .with_context(|| format!("failed to remove {}", stale.display()))?;
        }
    }
    let stats = client.stats();
    let mut actions = serde_json::Map::new();
    for a in op.actions() {
        actions.insert((*a).to_string(), Value::from(counts.action(a)));
    }
    let summary = RunSummary {
        run_id: run,
        kind: op.kind(),
        input: opts.source.display(),
        beta: opts.beta.clone(),
        dry_run: opts.dry_run,
        resumed,
        total_rows,
        actions,
        rejected: counts.rejected,
        // Classes in a fixed order, whatever the rows met first.
        skipped: {
            let mut classes = counts.skipped.clone();
            classes.sort();
            classes
                .into_iter()
                .map(|(c, n)| (c, Value::from(n)))
                .collect()
        },
        skip_reasons: if counts.skipped.is_empty() {
            vec![]
        } else {
            ck.skip_reasons(run)?
        },
        pending,
        api_calls: stats.requests.load(Ordering::Relaxed) - before_calls.0,
        throttled: stats.throttled.load(Ordering::Relaxed) - before_calls.1,
        retries: stats.retries.load(Ordering::Relaxed) - before_calls.2,
        elapsed_secs: started.elapsed().as_secs_f64(),
        stopped,
        already_done_by: None,
        errors_file: errors_file.as_ref().map(|p| p.display().to_string()),
        results_file: results_file.as_ref().map(|p| p.display().to_string()),
        checkpoint: if opts.dry_run {
            "(none: dry run)".into()
        } else {
            opts.checkpoint.display().to_string()
        },
        notes: op.notes(),
        fatal: fatal.as_ref().map(ToString::to_string),
    };
    // The reports read the checkpoint; the input's header names the
    // errors report's columns.
    let headers = CsvInput::open(&source, opts.encoding, opts.delimiter)?.headers;
    let records = report::RunRecords {
        checkpoint: &ck,
        run,
        headers: &headers,
        key_name: op.key_name(),
        key_column: op.key_column(),
        errors: errors_file.as_deref(),
        results: results_file.as_deref(),
    };
    subscribers.send(&Event::Finished {
        summary: &summary,
        records: &records,
    })?;
    if !stopped {
        ck.set_state(run, "done")?;
    }
    if let Some(e) = fatal {
        return Err(anyhow::Error::new(e).context(format!("the run stopped:\n{summary}")));
    }
    Ok((summary, op))
}

/// The summary of an earlier run that finished this file, for a run that
/// does nothing.
fn summary_of_done<O: Operation>(
    op: &O,
    ck: &Checkpoint,
    done: &crate::checkpoint::Run,
    opts: &RunOptions,
    started: Instant,
) -> anyhow::Result<RunSummary> {
    let counts = ck.counts(done.id)?;
    let mut actions = serde_json::Map::new();
    for a in op.actions() {
        actions.insert((*a).to_string(), Value::from(counts.action(a)));
    }
    Ok(RunSummary {
        run_id: done.id,
        kind: op.kind(),
        input: opts.source.display(),
        beta: opts.beta.clone(),
        dry_run: false,
        resumed: false,
        total_rows: done.total_rows.unwrap_or(0) as u64,
        actions,
        rejected: counts.rejected,
        skipped: counts
            .skipped
            .iter()
            .map(|(c, n)| (c.clone(), Value::from(*n)))
            .collect(),
        skip_reasons: vec![],
        pending: 0,
        api_calls: 0,
        throttled: 0,
        retries: 0,
        elapsed_secs: started.elapsed().as_secs_f64(),
        stopped: false,
        already_done_by: Some(done.id),
        errors_file: None,
        results_file: None,
        checkpoint: opts.checkpoint.display().to_string(),
        notes: serde_json::Map::new(),
        fatal: None,
    })
}

struct PlanTotals {
    rows: u64,
    gated: u64,
    first_gated_line: u64,
}

/// The planning pass: every row checked and recorded before any call.
fn plan<O: Operation>(
    op: &O,
    ck: &Checkpoint,
    run: i64,
    source: &Source,
    opts: &RunOptions,
    order: Order,
) -> anyhow::Result<PlanTotals> {
    let mut csv = CsvInput::open(source, opts.encoding, opts.delimiter)?;
    let mut totals = PlanTotals {
        rows: 0,
        gated: 0,
        first_gated_line: 0,
    };
    let mut in_batch = 0;
    ck.begin()?;
    while let Some(rec) = csv.next_record()? {
        totals.rows += 1;
        match rec {
            Err(bad) => ck.apply(run, &validation_error(bad.line, bad.message, &bad.fields))?,
            Ok(r) => match op.parse(&r.fields) {
                Err(msg) => ck.apply(run, &validation_error(r.line, msg, &r.fields))?,
                Ok(Parsed::Skip { class, key, reason }) => {
                    ck.apply(run, &skipped(r.line, class, key, reason))?
                }
                Ok(Parsed::Row(row)) => match ck.plan_row(run, r.line, op.key(&row))? {
                    Some(first) => ck.apply(
                        run,
                        &validation_error(
                            r.line,
                            duplicate_message(op.key_name(), op.key(&row), first),
                            &r.fields,
                        ),
                    )?,
                    None => {
                        if order != Order::File {
                            ck.plan_order(run, op.order_key(&row), r.line, r.offset)?;
                        }
                        op.note_planned(ck, run, r.line, &row)?;
                        if op.gate(&row) {
                            totals.gated += 1;
                            if totals.first_gated_line == 0 {
                                totals.first_gated_line = r.line;
                            }
                        }
                    }
                },
            },
        }
        in_batch += 1;
        if in_batch >= PLAN_BATCH {
            ck.commit()?;
            ck.begin()?;
            in_batch = 0;
        }
    }
    ck.commit()?;
    Ok(totals)
}

/// A row a rule keeps out of the run.
fn skipped(line: u64, class: &'static str, key: Option<String>, reason: String) -> RowUpdate {
    RowUpdate::Skipped {
        line,
        class,
        key,
        message: reason,
    }
}

/// A row refused before any call.
fn validation_error(line: u64, message: String, cells: &csv::StringRecord) -> RowUpdate {
    RowUpdate::Rejected {
        line,
        class: "validation",
        http_status: None,
        message,
        raw: Some(cells_json(cells)),
    }
}

/// A row's original cells as the checkpoint keeps them for the report (a
/// JSON array of strings).
fn cells_json(cells: &csv::StringRecord) -> String {
    serde_json::to_string(&cells.iter().collect::<Vec<_>>()).unwrap()
}

fn duplicate_message(name: &str, key: &str, first: u64) -> String {
    format!("duplicate: the {name} {key:?} is already on line {first}")
}

/// The settings of a stopped run (its stored options) that differ from
/// `now`, each as `--flag was X, now Y`. A run stored before settings were
/// kept is compared on what it kept.
fn settings_differ(stored: &str, now: &serde_json::Map<String, Value>) -> Vec<String> {
    let stored: Value = serde_json::from_str(stored.trim_end_matches(" (abandoned by --fresh)"))
        .unwrap_or(Value::Null);
    let old = match stored.get("settings") {
        Some(Value::Object(m)) => m.clone(),
        _ => {
            // Runs of an import from before settings were kept: the options
            // as they were serialised.
            let mut m = serde_json::Map::new();
            for (flag, field) in [
                ("--mode", "mode"),
                ("--status", "default_status"),
                ("--allow-emails", "allow_emails"),
                ("--empty", "empty"),
            ] {
                if let Some(v) = stored.get(field) {
                    m.insert(flag.into(), v.clone());
                }
            }
            m
        }
    };
    let show = |v: &Value| match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    now.iter()
        .filter_map(|(flag, v)| {
            let was = old.get(flag)?;
            (was != v).then(|| format!("{flag} was {}, now {}", show(was), show(v)))
        })
        .collect()
}
