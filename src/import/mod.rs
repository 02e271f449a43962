//! `import testers`: CSV rows into tester create and update calls, through
//! concurrent, rate-limited workers, journalled in the checkpoint.
//!
//! A new run whose rows cannot set a status that emails people reads its
//! input once: a quick count for the progress, then a single pass that
//! checks each row, finds duplicates (through the checkpoint's duplicate
//! check, in bounded memory), records it `sending` or `rejected`, and hands it
//! to the workers. Otherwise (rows that may set `invited` must all be
//! counted before anything is sent; a run stopped during its single pass)
//! a planning pass records every row first, and the main pass reads the
//! file again for the rows still open. One task owns the input and the
//! checkpoint; workers report to it over a bounded channel, and a create
//! or update is sent only after its row is `sending` on disk with that
//! intent (decided at dispatch when the plan is known, else by the worker,
//! which waits for the commit). A row found
//! `sending` on resume, and every create whose outcome is unknown, is looked
//! up by email before anything is retried: nobody is created twice, nobody
//! is skipped, and the stored intent labels the row `created` or `updated`
//! even when the kill came between the call and its answer.

pub mod input;
pub mod mapping;
pub(crate) mod report;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt as _;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::api::{ApiError, Client, Op, PAGE_SIZE, Tester, TesterInput};
use crate::checkpoint::{Checkpoint, RowUpdate};
use crate::exit::{StoppedError, usage};
use crate::lock::RunLock;
use crate::progress::{Progress, Snapshot};
use crate::stop::Stop;
use input::{CsvInput, Encoding, Source};
use mapping::{EMAILING_STATUSES, EmptyCells, Mapping};

/// How long the coordinator holds workers' reports for company in one
/// transaction; a report somebody waits on is committed at once.
const GROUP_COMMIT_WINDOW: Duration = Duration::from_millis(2);
const GROUP_COMMIT_MAX: usize = 2048;
/// Rows planned per checkpoint transaction.
const PLAN_BATCH: usize = 5_000;
/// Open rows fetched from the checkpoint at a time.
const OPEN_CHUNK: usize = 10_000;
/// Times a create whose outcome stays unknown is tried before the row is
/// rejected as `outcome_unknown`.
const CREATE_TRIES: u32 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Mode {
    /// Create users that are new, update those that exist.
    Upsert,
    /// Only create; a user that exists is rejected.
    Create,
    /// Only update; a user that does not exist is rejected.
    Update,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Resolve {
    /// List the whole project once into the checkpoint.
    List,
    /// Look each email up (`email_is`).
    Lookup,
}

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
    pub fresh: bool,
    pub max_duration: Option<Duration>,
    #[serde(skip)]
    pub encoding: Option<Encoding>,
    pub delimiter: Option<char>,
    pub strict: bool,
    pub empty: EmptyCells,
    pub allow_emails: bool,
    pub resolve: Option<Resolve>,
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
            fresh: false,
            max_duration: None,
            encoding: None,
            delimiter: None,
            strict: false,
            empty: EmptyCells::Keep,
            allow_emails: false,
            resolve: None,
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
}

impl std::fmt::Display for ImportSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.dry_run { "would be " } else { "" };
        writeln!(
            f,
            "{}import of {} into project {}: {} rows",
            if self.dry_run { "dry run: " } else { "" },
            self.input,
            self.beta,
            self.total_rows
        )?;
        writeln!(
            f,
            "  {verb}created {}, {verb}updated {}, unchanged {}, rejected {}{}",
            self.created,
            self.updated,
            self.unchanged,
            self.rejected,
            if self.pending > 0 {
                format!(", not done yet {}", self.pending)
            } else {
                String::new()
            }
        )?;
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
        if let Some(r) = &self.results_file {
            writeln!(f, "  results: {r}")?;
        }
        if self.stopped {
            writeln!(
                f,
                "  stopped before the end: run the same command again to resume (run {})",
                self.run_id
            )?;
        }
        Ok(())
    }
}

/// The file's identity in the checkpoint: its absolute path.
fn input_key(source: &Source) -> String {
    match source {
        Source::File(p) => std::fs::canonicalize(p)
            .unwrap_or_else(|_| p.clone())
            .display()
            .to_string(),
        Source::Stdin => "<stdin>".into(),
    }
}

/// One row handed to a worker.
#[derive(Debug)]
struct Job {
    line: u64,
    email_key: String,
    input: TesterInput,
    raw: csv::StringRecord,
    /// The row was `sending` when the run stopped: look it up first.
    was_sending: bool,
    /// What the stopped run was about to send for it, if it got that far.
    stopped_intent: Option<&'static str>,
    /// The intent on disk now. A create or update is sent only once its
    /// intent is durable, so a resume after kill -9 labels the row right.
    durable: Option<&'static str>,
    /// The user as the project listing showed it (`--resolve list`).
    known: Option<Value>,
}

/// What workers tell the coordinator.
enum ToCoordinator {
    /// A worker's intent, decided after the dispatch (a lookup, a fallback);
    /// acknowledged once committed.
    Intend(u64, &'static str, oneshot::Sender<()>),
    /// What became of rows (a worker's chunk).
    Rows(Vec<RowUpdate>),
}

/// Rows the coordinator marks `sending` in one transaction before handing
/// them out. After a kill -9, at most this many plus those queued and in
/// flight are looked up on resume; a clean stop puts the unsent ones back.
const DISPATCH_BATCH: usize = 64;

/// Rows a worker takes at a time (one wake-up, one report to the coordinator).
const WORK_CHUNK: usize = 8;

/// A worker reports what it has done at least this often.
const REPORT_AFTER: Duration = Duration::from_millis(250);

struct Ctx {
    client: Client,
    beta: String,
    mode: Mode,
    resolve: Option<Resolve>,
    default_status: String,
    dry_run: bool,
    coordinator: mpsc::Sender<ToCoordinator>,
    stop: Stop,
    fatal: std::sync::Mutex<Option<ApiError>>,
}

/// Runs an import to its end, or until `stop`.
pub async fn import(
    client: &Client,
    opts: &ImportOptions,
    stop: Stop,
    progress: Arc<dyn Progress>,
) -> anyhow::Result<ImportSummary> {
    let started = Instant::now();
    let stats = client.stats();
    let before_calls = (
        stats.requests.load(Ordering::Relaxed),
        stats.throttled.load(Ordering::Relaxed),
        stats.retries.load(Ordering::Relaxed),
    );
    if opts.concurrency == 0 || opts.concurrency > 256 {
        return Err(usage("--concurrency must be from 1 to 256"));
    }
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

    // Standard input is spooled to a file: the run reads its input twice.
    let _spool;
    let source = match &opts.source {
        Source::Stdin => {
            let mut tmp =
                tempfile::NamedTempFile::new().context("failed to spool standard input")?;
            std::io::copy(&mut std::io::stdin().lock(), &mut tmp)
                .context("failed to read standard input")?;
            let path = tmp.path().to_path_buf();
            _spool = tmp;
            tracing::info!("reading standard input: this run cannot be resumed if interrupted");
            Source::File(path)
        }
        s => s.clone(),
    };
    let Source::File(path) = &source else {
        unreachable!()
    };
    let key = input_key(&opts.source);

    let delimiter = opts.delimiter.map(|c| c as u8);
    let csv = CsvInput::open(&source, opts.encoding, delimiter)?;
    let mapping = Mapping::build(&csv.headers, opts.map.as_deref(), opts.empty)?;
    if !mapping.unmapped.is_empty() {
        let list = mapping.unmapped.join(", ");
        if opts.strict {
            return Err(usage(format!(
                "columns that map to nothing: {list}. Map them with --map, or drop --strict to ignore them"
            )));
        }
        tracing::warn!(
            "these columns map to nothing and are ignored: {list} (use --map to map them, --strict to refuse)"
        );
    }
    drop(csv);
    // The fingerprint and, when the run may be a single pass, its total
    // (the record count) each read the whole file before the first call:
    // side by side, on two cores. The count's error counts only in a
    // single pass, which uses it.
    let may_single_pass = opts.allow_emails || !mapping.sets_status();
    let (fingerprint, records) = std::thread::scope(|s| {
        let counting = may_single_pass.then(|| {
            s.spawn(|| CsvInput::open(&source, opts.encoding, delimiter)?.count_records())
        });
        let fingerprint = input::fingerprint(path);
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
        let d = tempfile::tempdir()?;
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

    let options_json = serde_json::to_string(opts)?;
    let mut resumed = false;
    let run = match ck.unfinished_run("import", &key, &opts.beta)? {
        Some(r) if !opts.fresh && opts.source != Source::Stdin => {
            if r.input_size != Some(size) || r.input_hash.as_deref() != Some(hash.as_str()) {
                return Err(usage(format!(
                    "{} changed since run {} started on it (size or content differs); \
                     to start over with the new file, add --fresh",
                    opts.source.display(),
                    r.id
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
                "import",
                &key,
                Some(size),
                Some(&hash),
                &opts.beta,
                &options_json,
            )?
        }
    };
    let planned = ck.run(run)?.is_some_and(|r| r.planned);

    // A new run whose rows cannot set a status that emails people needs no
    // look at the whole file before its first call: a single pass plans
    // each row and hands it out, so planning overlaps the calls. Otherwise,
    // and to finish the planning of a run stopped during its single pass,
    // every row is planned before the first call.
    let single_pass = !planned && ck.counts(run)?.total() == 0 && may_single_pass;
    let total_rows = if single_pass {
        ck.set_state(run, "running")?;
        let records = records.expect("counted, as a single pass was possible")?;
        ck.expect_emails(records);
        records
    } else {
        if !planned {
            let total = plan(&ck, run, &source, opts, &mapping)?;
            if total.emailing > 0 && !opts.allow_emails {
                ck.abandon(run)?;
                return Err(usage(format!(
                    "{} rows set a status ({}) that makes Prefinery email these people (first at line {}); \
                     add --allow-emails to send them, or change the status",
                    total.emailing,
                    EMAILING_STATUSES.join(", "),
                    total.first_emailing_line
                )));
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

    // How to tell new users from existing ones.
    let resolve = match opts.mode {
        // Creating needs no resolving, except for the rows a stopped run had
        // in flight: each is looked up, unless listing the project is cheaper.
        Mode::Create if before.sending > 0 && !opts.dry_run => {
            let beta = client.beta(&opts.beta).await?;
            let pages = beta.testers_count.unwrap_or(0).div_ceil(PAGE_SIZE as u64);
            let list = pages < before.sending;
            tracing::info!(
                in_flight = before.sending,
                "{} rows were in flight when the last run stopped: {}",
                before.sending,
                if list {
                    format!("listing the project ({pages} testers-list calls) to find them")
                } else {
                    "looking each one up".to_string()
                }
            );
            list.then_some(Resolve::List)
        }
        Mode::Create => None,
        _ => Some(match opts.resolve {
            Some(r) => r,
            None => {
                let beta = client.beta(&opts.beta).await?;
                let users = beta.testers_count.unwrap_or(0);
                let pages = users.div_ceil(PAGE_SIZE as u64);
                let choice = if pages < open {
                    Resolve::List
                } else {
                    Resolve::Lookup
                };
                tracing::info!(
                    project_users = users,
                    rows_to_do = open,
                    "resolving emails by {}: listing costs {pages} testers-list calls, looking up costs {open}",
                    match choice {
                        Resolve::List => "listing the project",
                        Resolve::Lookup => "looking each email up",
                    }
                );
                choice
            }
        }),
    };
    if resolve == Some(Resolve::List) && open > 0 {
        list_project(client, &ck, run, &opts.beta, &stop).await?;
    }

    // The coordinator owns the checkpoint and the input from here on.
    let (wtx, wrx) = mpsc::channel::<ToCoordinator>(opts.concurrency * 4 + 16);
    let (jtx, jrx) = mpsc::channel::<Vec<Job>>(opts.concurrency * 2);
    let done_count = Arc::new(AtomicU64::new(before.finished()));
    let coordinator = {
        let rows = RowSource {
            csv: CsvInput::open(&source, opts.encoding, delimiter)?,
            mapping: mapping.clone(),
            mode: opts.mode,
            resolve,
            plan_too: single_pass,
            run,
            open: Vec::new().into_iter().peekable(),
            last: 0,
            exhausted: false,
        };
        tokio::spawn(coordinate(
            ck,
            rows,
            wrx,
            jtx,
            done_count.clone(),
            stop.clone(),
        ))
    };

    let ctx = Arc::new(Ctx {
        client: client.clone(),
        beta: opts.beta.clone(),
        mode: opts.mode,
        resolve,
        default_status: opts.default_status.clone(),
        dry_run: opts.dry_run,
        coordinator: wtx,
        stop: stop.clone(),
        fatal: std::sync::Mutex::new(None),
    });

    // --max-duration stops the run cleanly.
    let timer = opts.max_duration.map(|d| {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            tracing::warn!("--max-duration reached: stopping after the calls in flight");
            stop.trigger();
        })
    });
    let ticker = {
        let progress = progress.clone();
        let done = done_count.clone();
        let stats = client.stats().clone();
        let limiter = client.limiter().clone();
        let start_done = before.finished();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let d = done.load(Ordering::Relaxed);
                let elapsed = started.elapsed();
                let rate = (d - start_done) as f64 / elapsed.as_secs_f64().max(0.001);
                let left = total_rows.saturating_sub(d);
                // When lookups are needed, each row costs a testers-list
                // call: the limit, not the speed so far, bounds the ETA.
                let limit_rate = match resolve {
                    Some(Resolve::Lookup) => limiter
                        .quota(crate::api::RateClass::TestersList)
                        .map(|q| f64::from(q.count) / q.period.as_secs_f64()),
                    _ => None,
                };
                let eff = match limit_rate {
                    Some(l) if rate > 0.0 => rate.min(l),
                    Some(l) => l,
                    None => rate,
                };
                progress.update(&Snapshot {
                    done: d,
                    total: total_rows,
                    unit: "rows",
                    elapsed,
                    limiter_wait: Duration::from_millis(
                        stats.limiter_wait_ms.load(Ordering::Relaxed),
                    ),
                    throttled: stats.throttled.load(Ordering::Relaxed),
                    eta: (eff > 0.0).then(|| Duration::from_secs_f64(left as f64 / eff)),
                    items: None,
                });
            }
        })
    };

    // Workers are tasks of their own, so they run on every core (a
    // `for_each_concurrent` would poll them all from one task).
    let jobs = Arc::new(tokio::sync::Mutex::new(jrx));
    let workers: Vec<_> = (0..opts.concurrency)
        .map(|_| {
            let ctx = ctx.clone();
            let jobs = jobs.clone();
            tokio::spawn(async move {
                let mut updates = Vec::with_capacity(WORK_CHUNK);
                loop {
                    let chunk = jobs.lock().await.recv().await;
                    let Some(chunk) = chunk else { return };
                    let mut since = Instant::now();
                    let last = chunk.len() - 1;
                    for (i, job) in chunk.into_iter().enumerate() {
                        if let Some(u) = work(&ctx, job).await {
                            updates.push(u);
                        }
                        // Report at the end of the chunk, or sooner when rows
                        // are slow (rate-limited lookups), so progress and
                        // the checkpoint keep up.
                        if !updates.is_empty() && (i == last || since.elapsed() >= REPORT_AFTER) {
                            let rows =
                                std::mem::replace(&mut updates, Vec::with_capacity(WORK_CHUNK));
                            let _ = ctx.coordinator.send(ToCoordinator::Rows(rows)).await;
                            since = Instant::now();
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.context("an import worker panicked")?;
    }

    if let Some(t) = timer {
        t.abort();
    }
    ticker.abort();
    progress.finish();
    let fatal = ctx.fatal.lock().unwrap().take();
    drop(ctx);
    let (ck, read_all) = coordinator
        .await
        .context("the import coordinator panicked")??;
    // A single pass that read the whole input has planned every row.
    if single_pass && read_all {
        ck.set_planned(run, total_rows)?;
    }

    let counts = ck.counts(run)?;
    // Rows a stopped single pass never reached are not in the checkpoint.
    let pending = total_rows.saturating_sub(counts.finished());
    let stopped = pending > 0 || (single_pass && !read_all);
    ck.set_state(run, if stopped { "stopped" } else { "done" })?;

    // Reports, from the checkpoint, in line order.
    let errors_file = if counts.rejected > 0 && (!opts.dry_run || opts.errors.is_some()) {
        let p = opts
            .errors
            .clone()
            .unwrap_or_else(|| default_errors_path(&opts.checkpoint, run));
        let headers = CsvInput::open(&source, opts.encoding, delimiter)?.headers;
        report::write_errors(&ck, run, &headers, &p)?;
        Some(p.display().to_string())
    } else {
        None
    };
    let results_file = match &opts.results {
        Some(p) => {
            report::write_results(&ck, run, p)?;
            Some(p.display().to_string())
        }
        None => None,
    };

    let stats = client.stats();
    let summary = ImportSummary {
        run_id: run,
        input: opts.source.display(),
        beta: opts.beta.clone(),
        dry_run: opts.dry_run,
        resumed,
        total_rows,
        created: counts.created,
        updated: counts.updated,
        unchanged: counts.unchanged,
        rejected: counts.rejected,
        pending,
        api_calls: stats.requests.load(Ordering::Relaxed) - before_calls.0,
        throttled: stats.throttled.load(Ordering::Relaxed) - before_calls.1,
        retries: stats.retries.load(Ordering::Relaxed) - before_calls.2,
        elapsed_secs: started.elapsed().as_secs_f64(),
        stopped,
        resolve: match resolve {
            None => "none (create only)".into(),
            Some(Resolve::List) => "list".into(),
            Some(Resolve::Lookup) => "lookup".into(),
        },
        unmapped_columns: mapping.unmapped.clone(),
        errors_file,
        results_file,
        checkpoint: if opts.dry_run {
            "(none: dry run)".into()
        } else {
            opts.checkpoint.display().to_string()
        },
    };
    if let Some(e) = fatal {
        return Err(anyhow::Error::new(e).context(format!("import stopped:\n{summary}")));
    }
    Ok(summary)
}

/// The errors report's default place: beside the checkpoint.
pub fn default_errors_path(checkpoint: &Path, run: i64) -> PathBuf {
    let stem = checkpoint
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "prefsync".into());
    checkpoint.with_file_name(format!("{stem}.run{run}.errors.csv"))
}

struct PlanTotals {
    rows: u64,
    emailing: u64,
    first_emailing_line: u64,
}

/// The planning pass: every row validated and recorded.
fn plan(
    ck: &Checkpoint,
    run: i64,
    source: &Source,
    opts: &ImportOptions,
    mapping: &Mapping,
) -> anyhow::Result<PlanTotals> {
    let mut csv = CsvInput::open(source, opts.encoding, opts.delimiter.map(|c| c as u8))?;
    let mut totals = PlanTotals {
        rows: 0,
        emailing: 0,
        first_emailing_line: 0,
    };
    let mut in_batch = 0;
    ck.begin()?;
    while let Some(rec) = csv.next_record()? {
        totals.rows += 1;
        match rec {
            Err(bad) => ck.apply(run, &validation_error(bad.line, bad.message, &bad.fields))?,
            Ok(r) => match mapping.apply(&r.fields) {
                Err(msg) => ck.apply(run, &validation_error(r.line, msg, &r.fields))?,
                Ok(row) => match ck.plan_row(run, r.line, &row.email_key)? {
                    Some(first) => ck.apply(
                        run,
                        &validation_error(
                            r.line,
                            duplicate_message(&row.email_key, first),
                            &r.fields,
                        ),
                    )?,
                    None => {
                        let status = row.input.status.as_deref();
                        if status.is_some_and(|s| EMAILING_STATUSES.contains(&s)) {
                            totals.emailing += 1;
                            if totals.first_emailing_line == 0 {
                                totals.first_emailing_line = r.line;
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

/// Lists every user of the project into the checkpoint.
async fn list_project(
    client: &Client,
    ck: &Checkpoint,
    run: i64,
    beta: &str,
    stop: &Stop,
) -> anyhow::Result<()> {
    let mut pages = std::pin::pin!(client.pages::<Value>(
        Op::TestersList,
        Some(beta.to_string()),
        format!("betas/{beta}/testers.json"),
        vec![],
        1
    ));
    let mut n = 0u64;
    while let Some(page) = pages.next().await {
        if stop.is_set() {
            return Err(anyhow::Error::new(StoppedError(
                "stopped while listing the project".into(),
            )));
        }
        let page = page?;
        ck.begin()?;
        for t in &page.items {
            let (Some(email), Some(id)) = (
                t.get("email").and_then(Value::as_str),
                t.get("id").and_then(Value::as_u64),
            ) else {
                continue;
            };
            ck.store_known(run, &mapping::email_key(email), id, &t.to_string())?;
            n += 1;
        }
        ck.commit()?;
    }
    tracing::info!(users = n, "listed the project");
    Ok(())
}

/// The rows to hand out, in line order. In a single pass (`plan_too`)
/// every record of the input is planned on the way: checked, then rejected
/// or handed out; otherwise the rows were planned before, and the open ones
/// are read back from the checkpoint.
struct RowSource {
    csv: CsvInput,
    mapping: Mapping,
    mode: Mode,
    resolve: Option<Resolve>,
    plan_too: bool,
    run: i64,
    /// The next open rows (line, was it `sending`, intent), from the
    /// checkpoint, when not planning.
    open: std::iter::Peekable<std::vec::IntoIter<(u64, bool, Option<String>)>>,
    last: u64,
    exhausted: bool,
}

/// Rows read at one go: those to send, and (single pass) those refused.
#[derive(Default)]
struct Batch {
    jobs: Vec<Job>,
    invalid: Vec<RowUpdate>,
}

impl RowSource {
    /// Up to `max` rows to send (or `max` refused ones).
    fn next_batch(&mut self, ck: &Checkpoint, max: usize) -> anyhow::Result<Batch> {
        let mut b = Batch::default();
        while !self.exhausted && b.jobs.len() < max && b.invalid.len() < max {
            let Some(rec) = self.csv.next_record()? else {
                self.exhausted = true;
                break;
            };
            let line = match &rec {
                Ok(r) => r.line,
                Err(bad) => bad.line,
            };
            let (was_sending, stopped_intent) = if self.plan_too {
                (false, None)
            } else {
                if self.open.peek().is_none() {
                    let more = ck.open_rows(self.run, self.last, OPEN_CHUNK)?;
                    if more.is_empty() {
                        self.exhausted = true;
                        break;
                    }
                    self.open = more.into_iter().peekable();
                }
                while self.open.peek().is_some_and(|(l, _, _)| *l < line) {
                    self.last = self.open.next().unwrap().0;
                }
                let Some((l, was_sending, stopped_intent)) = self.open.peek().cloned() else {
                    continue;
                };
                if l != line {
                    continue;
                }
                self.open.next();
                self.last = line;
                (was_sending, stopped_intent)
            };
            let r = match rec {
                Ok(r) => r,
                Err(bad) => {
                    if self.plan_too {
                        b.invalid
                            .push(validation_error(bad.line, bad.message, &bad.fields));
                    }
                    continue;
                }
            };
            let row = match self.mapping.apply(&r.fields) {
                Ok(row) => row,
                Err(msg) => {
                    if self.plan_too {
                        b.invalid.push(validation_error(r.line, msg, &r.fields));
                    }
                    continue;
                }
            };
            let known = if self.resolve == Some(Resolve::List) {
                ck.known(self.run, &row.email_key)?
                    .and_then(|s| serde_json::from_str(&s).ok())
            } else {
                None
            };
            let stopped_intent = stopped_intent.as_deref().and_then(intent_named);
            let planned = planned_intent(self.mode, self.resolve, known.as_ref(), &row.input);
            b.jobs.push(Job {
                line,
                email_key: row.email_key,
                input: row.input,
                raw: r.fields,
                was_sending,
                stopped_intent,
                durable: stopped_intent.or(planned),
                known,
            });
        }
        Ok(b)
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

fn duplicate_message(email: &str, first: u64) -> String {
    format!("duplicate: the email {email:?} is already on line {first}")
}

/// What a row will send, when that is known before any call: a create when
/// the row is new to the project (or nothing was resolved), an update when
/// the listing shows a difference. `None` when a lookup must decide, or when
/// nothing will be sent.
fn planned_intent(
    mode: Mode,
    resolve: Option<Resolve>,
    known: Option<&Value>,
    input: &TesterInput,
) -> Option<&'static str> {
    match (resolve, known, mode) {
        (None, _, _) => Some("create"),
        (Some(Resolve::List), None, Mode::Upsert | Mode::Create) => Some("create"),
        (Some(Resolve::List), Some(t), Mode::Upsert | Mode::Update) => {
            mapping::diff(t, input).map(|_| "update")
        }
        _ => None,
    }
}

fn intent_named(s: &str) -> Option<&'static str> {
    match s {
        "create" => Some("create"),
        "update" => Some("update"),
        _ => None,
    }
}

impl ToCoordinator {
    /// Somebody waits for this to be committed.
    fn awaited(&self) -> bool {
        matches!(self, ToCoordinator::Intend(..))
    }
}

/// The one task that owns the checkpoint and the input. Each turn is one
/// transaction: what the workers reported, and, when the workers' queue has
/// taken every row handed out so far, the next rows read and marked
/// `sending` (planned too, in a single pass). Rows go to the queue only
/// once that is committed. Owning both, it needs no round trip between a
/// reader and a writer: one task, no thread hand-offs. Returns the
/// checkpoint and whether the whole input was read.
async fn coordinate(
    ck: Checkpoint,
    mut rows: RowSource,
    mut rx: mpsc::Receiver<ToCoordinator>,
    jobs: mpsc::Sender<Vec<Job>>,
    done: Arc<AtomicU64>,
    stop: Stop,
) -> anyhow::Result<(Checkpoint, bool)> {
    let run = rows.run;
    let background = ck.checkpoint_in_background()?;
    let mut jobs = Some(jobs);
    // Committed `sending`, not yet taken by the queue.
    let mut ready: std::collections::VecDeque<Job> = Default::default();
    // Worker reports gathered for the next transaction, and since when.
    let mut held: Vec<ToCoordinator> = Vec::new();
    let mut held_since: Option<tokio::time::Instant> = None;
    let hold = |held: &mut Vec<ToCoordinator>,
                since: &mut Option<tokio::time::Instant>,
                m: ToCoordinator| {
        held.push(m);
        since.get_or_insert_with(tokio::time::Instant::now);
    };
    let mut reports_open = true;
    loop {
        // Hand out what is committed while the queue has room.
        if let Some(tx) = &jobs {
            while !ready.is_empty() {
                let Ok(permit) = tx.try_reserve() else { break };
                permit.send(next_chunk(&mut ready));
            }
        }
        let stopped = stop.is_set();
        if stopped && !ready.is_empty() {
            // Never sent: back to pending, so a resume need not look them up.
            let back = ready
                .drain(..)
                .filter(|j| !j.was_sending)
                .map(|j| RowUpdate::Pending { line: j.line })
                .collect();
            hold(&mut held, &mut held_since, ToCoordinator::Rows(back));
        }
        let want_rows = ready.is_empty() && !rows.exhausted && !stopped && jobs.is_some();
        if !want_rows && ready.is_empty() && jobs.is_some() {
            // Nothing more to hand out: workers end once the queue is empty.
            jobs = None;
        }
        while held.len() < GROUP_COMMIT_MAX {
            match rx.try_recv() {
                Ok(m) => hold(&mut held, &mut held_since, m),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    reports_open = false;
                    break;
                }
            }
        }
        // Group commit: a transaction costs far more than a row, so reports
        // wait a little for company, unless somebody waits on them or rows
        // are to be marked anyway.
        let commit_now = want_rows
            || held.len() >= GROUP_COMMIT_MAX
            || held.iter().any(ToCoordinator::awaited)
            || (!held.is_empty() && !reports_open)
            || held_since.is_some_and(|t| t.elapsed() >= GROUP_COMMIT_WINDOW);
        if !commit_now {
            if !reports_open && held.is_empty() {
                break;
            }
            let deadline = held_since.map(|t| t + GROUP_COMMIT_WINDOW);
            let tx = jobs.as_ref();
            tokio::select! {
                m = rx.recv(), if reports_open => match m {
                    Some(m) => hold(&mut held, &mut held_since, m),
                    None => reports_open = false,
                },
                // Room in the queue for rows already committed.
                Ok(permit) = async { tx.unwrap().reserve().await }, if tx.is_some() && !ready.is_empty() => {
                    permit.send(next_chunk(&mut ready));
                }
                () = async { tokio::time::sleep_until(deadline.unwrap()).await }, if deadline.is_some() => {}
                () = stop.wait(), if !stopped && !ready.is_empty() => {}
            }
            continue;
        }

        ck.begin()?;
        let mut acks = Vec::new();
        // Every worker's reports in one go, so done rows share statements.
        // Their order across workers does not matter: each row has one
        // worker, and a row's intent is committed before its call.
        let mut updates = Vec::new();
        for m in held.drain(..) {
            match m {
                ToCoordinator::Intend(line, intent, ack) => {
                    ck.apply(run, &RowUpdate::Sending { line, intent })?;
                    acks.push(ack);
                }
                ToCoordinator::Rows(rows) => updates.extend(rows),
            }
        }
        ck.apply_all(run, &updates)?;
        let finished = updates
            .iter()
            .filter(|u| matches!(u, RowUpdate::Done { .. } | RowUpdate::Rejected { .. }))
            .count();
        done.fetch_add(finished as u64, Ordering::Relaxed);
        held_since = None;
        if want_rows {
            let batch = rows.next_batch(&ck, DISPATCH_BATCH)?;
            ck.apply_all(run, &batch.invalid)?;
            done.fetch_add(batch.invalid.len() as u64, Ordering::Relaxed);
            if rows.plan_too {
                let plan: Vec<_> = batch
                    .jobs
                    .iter()
                    .map(|j| (j.line, j.email_key.as_str(), j.durable))
                    .collect();
                let firsts = ck.plan_sending_all(run, &plan)?;
                for (job, first) in batch.jobs.into_iter().zip(firsts) {
                    match first {
                        Some(first) => {
                            let message = duplicate_message(&job.email_key, first);
                            ck.apply(run, &validation_error(job.line, message, &job.raw))?;
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        None => ready.push_back(job),
                    }
                }
            } else {
                // The batch holds every open row between its first and last
                // line: one statement per run of equal intents.
                let marks: Vec<_> = batch.jobs.iter().map(|j| (j.line, j.durable)).collect();
                for same in marks.chunk_by(|a, b| a.1 == b.1) {
                    let (from, to) = (same[0].0, same[same.len() - 1].0);
                    let intent = same[0].1;
                    ck.apply(run, &RowUpdate::Dispatched { from, to, intent })?;
                }
                ready.extend(batch.jobs);
            }
        }
        ck.commit()?;
        for a in acks {
            let _ = a.send(());
        }
        // The transaction ran on a runtime thread: let its other tasks in.
        tokio::task::yield_now().await;
    }
    drop(background);
    ck.checkpoint_on_commit()?;
    Ok((ck, rows.exhausted))
}

/// The next chunk a worker takes.
fn next_chunk(ready: &mut std::collections::VecDeque<Job>) -> Vec<Job> {
    let n = WORK_CHUNK.min(ready.len());
    ready.drain(..n).collect()
}

/// What became of one row.
enum Outcome {
    Row(RowUpdate),
    /// The whole run must stop (access denied, throttled past its budget).
    Abort(ApiError),
    /// Stopped before the row was sent: it stays open for the next run.
    Left,
}

/// Does one row; returns what the checkpoint should record of it.
async fn work(ctx: &Ctx, mut job: Job) -> Option<RowUpdate> {
    let outcome = if ctx.stop.is_set() {
        Outcome::Left
    } else {
        process(ctx, &mut job).await
    };
    match outcome {
        Outcome::Row(u) => Some(u),
        Outcome::Abort(e) => {
            let mut f = ctx.fatal.lock().unwrap();
            if f.is_none() {
                tracing::error!("stopping the import: {e}");
                *f = Some(e);
            }
            ctx.stop.trigger();
            None
        }
        // Never sent: back to pending, so a resume need not look it up.
        Outcome::Left => (!job.was_sending).then_some(RowUpdate::Pending { line: job.line }),
    }
}

fn rejected(job: &Job, class: &'static str, status: Option<u16>, message: String) -> Outcome {
    Outcome::Row(RowUpdate::Rejected {
        line: job.line,
        class,
        http_status: status,
        message,
        raw: Some(cells_json(&job.raw)),
    })
}

/// Sorts a failed call into the row's fate.
fn classify(job: &Job, e: ApiError) -> Outcome {
    match e {
        e if e.is_access_denied() => Outcome::Abort(e),
        e @ (ApiError::Throttled { .. }
        | ApiError::Unreachable { .. }
        | ApiError::Unavailable { .. }
        | ApiError::ProjectNotFound { .. }
        | ApiError::Cancelled { .. }) => Outcome::Abort(e),
        e @ (ApiError::Server { .. } | ApiError::Transport { .. }) => {
            let status = e.status();
            rejected(job, "retries_exhausted", status, e.to_string())
        }
        e @ ApiError::OutcomeUnknown { .. } => {
            rejected(job, "outcome_unknown", None, e.to_string())
        }
        e => {
            let status = e.status();
            rejected(job, "rejected_by_api", status, e.to_string())
        }
    }
}

/// The row's email as the file has it (trimmed), for a lookup.
fn email_of(job: &Job) -> &str {
    job.input.email.as_deref().unwrap_or_default()
}

async fn lookup(ctx: &Ctx, email: &str) -> Result<Option<Value>, ApiError> {
    let t: Option<Tester> = ctx.client.find_tester(&ctx.beta, email).await?;
    Ok(t.map(|t| serde_json::to_value(t).unwrap()))
}

fn id_of(t: &Value) -> u64 {
    t.get("id").and_then(Value::as_u64).unwrap_or(0)
}

/// Makes `intent` durable before the call that carries it out, unless the
/// dispatch already did. `false` when the coordinator is gone (the run is ending).
async fn intend(ctx: &Ctx, job: &mut Job, intent: &'static str) -> bool {
    if job.durable == Some(intent) {
        return true;
    }
    let (tx, rx) = oneshot::channel();
    if ctx
        .coordinator
        .send(ToCoordinator::Intend(job.line, intent, tx))
        .await
        .is_err()
        || rx.await.is_err()
    {
        return false;
    }
    job.durable = Some(intent);
    true
}

async fn process(ctx: &Ctx, job: &mut Job) -> Outcome {
    let existing = if job.was_sending {
        // The previous run may have created this user just before it died.
        // This run listed the project after that, so a listing answers as
        // well as a lookup (and costs no call).
        let found = if ctx.resolve == Some(Resolve::List) {
            Ok(job.known.clone())
        } else {
            lookup(ctx, email_of(job)).await
        };
        match found {
            Ok(Some(t)) if job.stopped_intent == Some("create") => {
                return Outcome::Row(RowUpdate::Done {
                    line: job.line,
                    action: "created",
                    tester_id: id_of(&t),
                });
            }
            Ok(t) => t,
            Err(e) => return classify(job, e),
        }
    } else {
        match ctx.resolve {
            None => None,
            Some(Resolve::List) => job.known.clone(),
            Some(Resolve::Lookup) => match lookup(ctx, email_of(job)).await {
                Ok(t) => t,
                Err(e) => return classify(job, e),
            },
        }
    };
    match (existing, ctx.mode) {
        (Some(t), Mode::Create) => rejected(
            job,
            "rejected_by_api",
            None,
            format!(
                "{} already exists in the project (id {}); --mode create does not update users",
                job.email_key,
                id_of(&t)
            ),
        ),
        (Some(t), _) => update(ctx, job, &t).await,
        (None, Mode::Update) => rejected(
            job,
            "rejected_by_api",
            None,
            format!(
                "{} is not in the project; --mode update does not create users",
                job.email_key
            ),
        ),
        (None, _) => create(ctx, job).await,
    }
}

async fn update(ctx: &Ctx, job: &mut Job, current: &Value) -> Outcome {
    let id = id_of(current);
    let Some(change) = mapping::diff(current, &job.input) else {
        // Nothing left to change: the stopped run's update went through.
        let action = if job.was_sending && job.stopped_intent == Some("update") {
            "updated"
        } else {
            "unchanged"
        };
        return Outcome::Row(RowUpdate::Done {
            line: job.line,
            action,
            tester_id: id,
        });
    };
    if ctx.dry_run {
        return Outcome::Row(RowUpdate::Done {
            line: job.line,
            action: "updated",
            tester_id: id,
        });
    }
    if !intend(ctx, job, "update").await {
        return Outcome::Left;
    }
    match ctx.client.update_tester(&ctx.beta, id, &change).await {
        Ok(_) => Outcome::Row(RowUpdate::Done {
            line: job.line,
            action: "updated",
            tester_id: id,
        }),
        Err(e) => classify(job, e),
    }
}

async fn create(ctx: &Ctx, job: &mut Job) -> Outcome {
    // New users get the default status; an existing one (the fallback to an
    // update below) keeps its own.
    let defaulted = job.input.status.is_none();
    if defaulted {
        job.input.status = Some(ctx.default_status.clone());
    }
    if ctx.dry_run {
        return Outcome::Row(RowUpdate::Done {
            line: job.line,
            action: "created",
            tester_id: 0,
        });
    }
    let mut unknown = 0u32;
    let mut refused = 0u32;
    while unknown < CREATE_TRIES {
        if ctx.stop.is_set() {
            return Outcome::Left;
        }
        if !intend(ctx, job, "create").await {
            return Outcome::Left;
        }
        match ctx.client.create_tester_id(&ctx.beta, &job.input).await {
            Ok(id) => {
                return Outcome::Row(RowUpdate::Done {
                    line: job.line,
                    action: "created",
                    tester_id: id,
                });
            }
            Err(ApiError::OutcomeUnknown { cause, status, .. }) => {
                tracing::debug!(line = job.line, %cause, "create outcome unknown; looking the email up");
                match lookup(ctx, email_of(job)).await {
                    Ok(Some(t)) => {
                        return Outcome::Row(RowUpdate::Done {
                            line: job.line,
                            action: "created",
                            tester_id: id_of(&t),
                        });
                    }
                    // A 503 says the server did not take the request on, and
                    // the lookup agrees: a refusal, not a doubt, so it does
                    // not use up the row's tries; the client paces it and
                    // stops the run (resumable) if the server stays down.
                    Ok(None) if status == Some(503) => {
                        refused += 1;
                        if let Err(e) = ctx
                            .client
                            .pause_to_resend(Op::TesterCreate, refused, &cause)
                            .await
                        {
                            return Outcome::Abort(e);
                        }
                    }
                    Ok(None) => unknown += 1,
                    Err(e) => return classify(job, e),
                }
            }
            Err(ApiError::Rejected {
                status: 422,
                messages,
                ..
            }) if messages.mentions("taken") || messages.mentions("already exists") => {
                // Someone else created it since it was resolved: update it.
                match lookup(ctx, email_of(job)).await {
                    Ok(Some(t)) if ctx.mode != Mode::Create => {
                        if defaulted {
                            job.input.status = None;
                        }
                        return update(ctx, job, &t).await;
                    }
                    Ok(_) => {
                        return rejected(
                            job,
                            "rejected_by_api",
                            Some(422),
                            format!("the API says the email is taken: {messages}"),
                        );
                    }
                    Err(e) => return classify(job, e),
                }
            }
            Err(e) => return classify(job, e),
        }
    }
    rejected(
        job,
        "outcome_unknown",
        None,
        format!(
            "the create was sent {CREATE_TRIES} times without a clear answer and the user is not in the project; run again to retry"
        ),
    )
}
