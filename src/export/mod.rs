//! `export`: pages users, rewards, suppressions, points and projects into
//! CSV, JSONL or SQLite; streamed, resumable, cron-ready.
//!
//! Pages are written as they arrive, each with its checkpoint (see
//! [`sink`]). Pages shift when users join or leave during a long export:
//! records are deduplicated by id, and when the list's size changed between
//! the first and the last page, the list is read once more from the start to
//! pick up what shifted, and the summary says the export is not a consistent
//! snapshot. The sizes seen are checkpointed with the pages, so an export
//! stopped (or killed) and resumed notices a change made while it was
//! stopped the same way.

pub mod resource;
pub mod sink;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use serde_json::Value;

use crate::api::{Client, PAGE_SIZE, Pagination, RateClass};
use crate::engine::events::{Event, Subscriber};
use crate::exit::usage;
use crate::lock::RunLock;
use crate::progress::{Items, Snapshot};
use crate::stop::Stop;
pub use resource::Resource;
use sink::{CsvOptions, FileSink, Format, ListSize, Part, Sink, SqliteSink, Started};

/// Projects exported at once: three at 60 a minute each fill the company's
/// 180 a minute for testers lists.
const PROJECTS_AT_ONCE: usize = 3;

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub resources: Vec<Resource>,
    pub betas: Vec<String>,
    pub all_betas: bool,
    pub format: Format,
    pub out: PathBuf,
    /// API filters, e.g. `("email_contains", "@gmail.com")`.
    pub filters: Vec<(String, String)>,
    pub checkpoint: Option<PathBuf>,
    pub max_duration: Option<Duration>,
    pub csv: CsvOptions,
    pub fresh: bool,
}

impl ExportOptions {
    /// Options with no filter, no checkpoint override, no time limit, plain
    /// CSV, resuming an unfinished export.
    pub fn new(
        resources: Vec<Resource>,
        betas: Vec<String>,
        format: Format,
        out: PathBuf,
    ) -> ExportOptions {
        ExportOptions {
            resources,
            betas,
            all_betas: false,
            format,
            out,
            filters: vec![],
            checkpoint: None,
            max_duration: None,
            csv: CsvOptions {
                excel_safe: false,
                bom: false,
            },
            fresh: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PartSummary {
    /// The project's numeric id, as the API reports it (0 for the list of
    /// projects itself).
    pub beta_id: i64,
    /// Its UID and name, as the API reports them.
    pub beta_uid: Option<String>,
    pub beta_name: Option<String>,
    pub resource: Resource,
    pub rows: u64,
    pub pages: u64,
    pub complete: bool,
    pub consistent: bool,
    pub reread: bool,
    pub deleted: u64,
    pub resumed_from_page: u64,
    /// Users in a SQLite mirror: how many records the listing found
    /// otherwise than the mirror held them (what webhooks had written, with
    /// `prefsync listen`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub differed: Option<Differed>,
}

/// The reconciliation figure of a listing of users into a mirror: records
/// the mirror lacked (`new`), held with other fields (`changed`, waitlist
/// positions aside) or held though they are gone (`gone`, marked deleted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Differed {
    pub new: u64,
    pub changed: u64,
    pub gone: u64,
}

impl Differed {
    pub fn total(&self) -> u64 {
        self.new + self.changed + self.gone
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportSummary {
    pub out: String,
    pub format: Format,
    pub complete: bool,
    pub consistent: bool,
    pub parts: Vec<PartSummary>,
    pub rows: u64,
    pub pages: u64,
    pub api_calls: u64,
    pub throttled: u64,
    pub elapsed_secs: f64,
    /// Time spent writing pages (outside the network and the limiter).
    pub local_secs: f64,
}

impl std::fmt::Display for ExportSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "export to {} ({}): {} records in {} pages",
            self.out, self.format, self.rows, self.pages
        )?;
        for p in &self.parts {
            let what = if p.resource == Resource::Betas {
                "projects".to_string()
            } else {
                let known: Vec<&str> = [&p.beta_uid, &p.beta_name]
                    .into_iter()
                    .filter_map(|x| x.as_deref())
                    .collect();
                format!(
                    "project {}{} {}",
                    p.beta_id,
                    if known.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", known.join(", "))
                    },
                    p.resource.name()
                )
            };
            writeln!(
                f,
                "  {what}: {} records{}{}{}{}",
                p.rows,
                if p.complete { "" } else { ", NOT complete" },
                if p.consistent {
                    ""
                } else {
                    ", not a consistent snapshot (the list changed while it was read)"
                },
                if p.reread { ", re-read once" } else { "" },
                if p.deleted > 0 {
                    format!(", {} marked deleted", p.deleted)
                } else {
                    String::new()
                },
            )?;
            if let Some(d) = p.differed {
                writeln!(
                    f,
                    "    reconciliation: {} records differed from the mirror ({} new to it, {} changed, {} gone)",
                    d.total(),
                    d.new,
                    d.changed,
                    d.gone
                )?;
            }
        }
        writeln!(
            f,
            "  API calls {}, throttled answers {}, time {:.1}s (local work {:.2}s)",
            self.api_calls, self.throttled, self.elapsed_secs, self.local_secs
        )?;
        if !self.complete {
            writeln!(
                f,
                "  stopped before the end: run the same command again to resume"
            )?;
        }
        Ok(())
    }
}

pub async fn export(
    client: &Client,
    opts: &ExportOptions,
    stop: Stop,
    progress: Arc<dyn Subscriber>,
) -> anyhow::Result<ExportSummary> {
    let started = Instant::now();
    let calls_before = client.stats().requests.load(Ordering::Relaxed);
    let throttled_before = client.stats().throttled.load(Ordering::Relaxed);
    let only_betas = opts.resources == [Resource::Betas];
    if opts.format != Format::Sqlite {
        if opts.resources.len() != 1 {
            return Err(usage(
                "several resources go to one file only with --format sqlite",
            ));
        }
        if opts.all_betas || opts.betas.len() > 1 {
            return Err(usage(
                "several projects go to one file only with --format sqlite",
            ));
        }
    }
    if !only_betas && opts.betas.is_empty() && !opts.all_betas {
        return Err(usage(
            "no project given: pass --beta ID (repeatable) or --all-betas",
        ));
    }
    let _lock = RunLock::acquire(&opts.out)?;

    // The projects, by numeric id (a UID and an id name the same project).
    let mut betas: Vec<(i64, String)> = Vec::new();
    // Each project's UID and name, kept in a SQLite output (the mirror).
    let mut projects: Vec<crate::api::Beta> = Vec::new();
    if only_betas {
        betas.push((0, String::new()));
    } else if opts.all_betas {
        for b in client.betas().await? {
            betas.push((b.id as i64, b.id.to_string()));
            projects.push(b);
        }
    } else {
        // Every format names the project as the API does (its id, UID
        // and name), in the summary and in the checkpoint.
        for b in &opts.betas {
            let beta = client.beta(b).await?;
            let id = beta.id as i64;
            projects.push(beta);
            betas.push((id, b.clone()));
        }
    }

    let sink: Box<dyn Sink> = match opts.format {
        Format::Sqlite => Box::new(SqliteSink::open(&opts.out)?),
        f => {
            let ck = opts.checkpoint.clone().unwrap_or_else(|| {
                let name = opts
                    .out
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                opts.out.with_file_name(format!("{name}.prefsync.sqlite"))
            });
            Box::new(FileSink::open(&opts.out, &ck, f, opts.csv)?)
        }
    };
    let mut sink = sink;
    for p in &projects {
        // The UID when the API tells it, else the --beta that named this
        // project by one (the reference shows no `uid` in a project's
        // record): a mirror made with --beta UID is found again by it.
        let given = betas
            .iter()
            .find(|(id, b)| *id == p.id as i64 && b.parse::<i64>().is_err())
            .map(|(_, b)| b.as_str());
        let uid = p
            .extra
            .get("uid")
            .and_then(serde_json::Value::as_str)
            .or(given);
        sink.note_project(p.id as i64, uid, p.name.as_deref())?;
    }
    let sink = Arc::new(Mutex::new(sink));
    let filters = opts
        .filters
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");

    let timer = opts.max_duration.map(|d| stop.after(d));

    let shared = Arc::new(Shared {
        progress,
        started,
        pages_done: Default::default(),
        pages_total: Default::default(),
        records_total: Default::default(),
        records_approximate: Default::default(),
        rows: Default::default(),
        local_ns: Default::default(),
    });
    // How each --beta given resolved, to name a project by its UID.
    let all_ids: std::collections::HashMap<String, i64> =
        betas.iter().map(|(id, b)| (b.clone(), *id)).collect();
    let mut jobs = Vec::new();
    for (beta_id, beta) in betas {
        jobs.push((beta_id, beta));
    }
    let results: Vec<anyhow::Result<Vec<PartSummary>>> = futures::stream::iter(jobs)
        .map(|(beta_id, beta)| {
            let sink = sink.clone();
            let client = client.clone();
            let stop = stop.clone();
            let shared = shared.clone();
            let filters = filters.clone();
            let resources = opts.resources.clone();
            let query = opts.filters.clone();
            let fresh = opts.fresh;
            async move {
                let mut out = Vec::new();
                for r in resources {
                    if stop.is_set() {
                        break;
                    }
                    let part = Part {
                        beta_id,
                        resource: r,
                        filters: filters.clone(),
                    };
                    out.push(
                        export_part(&client, &beta, &part, &query, &sink, &stop, &shared, fresh)
                            .await?,
                    );
                }
                Ok(out)
            }
        })
        .buffer_unordered(PROJECTS_AT_ONCE)
        .collect()
        .await;
    if let Some(t) = timer {
        t.abort();
    }
    // A display that fails does not fail the export.
    let _ = shared.progress.event(&Event::ExportFinished);
    let mut parts = Vec::new();
    for r in results {
        parts.extend(r?);
    }
    sink.lock().unwrap().close()?;
    for p in &mut parts {
        if let Some(b) = projects.iter().find(|b| b.id as i64 == p.beta_id) {
            // The UID when the API tells it, else as --beta gave it.
            let given = opts
                .betas
                .iter()
                .find(|g| **g != b.id.to_string() && all_ids.get(*g) == Some(&p.beta_id));
            p.beta_uid = b
                .extra
                .get("uid")
                .and_then(Value::as_str)
                .or(given.map(String::as_str))
                .map(str::to_string);
            p.beta_name = b.name.clone();
        }
    }
    parts.sort_by_key(|p| (p.beta_id, p.resource.name()));
    let stats = client.stats();
    let complete = parts.iter().all(|p| p.complete) && !parts.is_empty();
    Ok(ExportSummary {
        out: opts.out.display().to_string(),
        format: opts.format,
        complete,
        consistent: parts.iter().all(|p| p.consistent),
        rows: parts.iter().map(|p| p.rows).sum(),
        pages: parts.iter().map(|p| p.pages).sum(),
        parts,
        api_calls: stats.requests.load(Ordering::Relaxed) - calls_before,
        throttled: stats.throttled.load(Ordering::Relaxed) - throttled_before,
        elapsed_secs: started.elapsed().as_secs_f64(),
        local_secs: shared.local_ns.load(Ordering::Relaxed) as f64 / 1e9,
    })
}

struct Shared {
    progress: Arc<dyn Subscriber>,
    started: Instant,
    pages_done: std::sync::atomic::AtomicU64,
    pages_total: std::sync::atomic::AtomicU64,
    /// Records in all the parts, as far as the servers told (0: unknown).
    records_total: std::sync::atomic::AtomicU64,
    /// Some part's record count is an upper bound (pages × page size).
    records_approximate: std::sync::atomic::AtomicBool,
    rows: std::sync::atomic::AtomicU64,
    local_ns: std::sync::atomic::AtomicU64,
}

/// Moves `total` from this part's old share `mine` to `new`.
fn adjust(total: &std::sync::atomic::AtomicU64, mine: &mut u64, new: u64) {
    if new >= *mine {
        total.fetch_add(new - *mine, Ordering::Relaxed);
    } else {
        total.fetch_sub(*mine - new, Ordering::Relaxed);
    }
    *mine = new;
}

fn list_size(p: &Option<Pagination>) -> Option<ListSize> {
    p.as_ref()
        .and_then(|p| p.pages.map(|pages| (pages, p.total)))
}

#[expect(
    clippy::too_many_arguments,
    reason = "one call site; a struct would only rename the arguments"
)]
async fn export_part(
    client: &Client,
    beta: &str,
    part: &Part,
    query: &[(String, String)],
    sink: &Arc<Mutex<Box<dyn Sink>>>,
    stop: &Stop,
    shared: &Shared,
    fresh: bool,
) -> anyhow::Result<PartSummary> {
    let Started {
        run,
        next_page: first_page,
        rows: rows_before,
        sizes,
        reread,
    } = sink.lock().unwrap().start(part, fresh)?;
    if first_page > 1 {
        tracing::info!(
            project = part.beta_id,
            resource = part.resource.name(),
            "resuming at page {first_page}"
        );
    }
    let mut summary = PartSummary {
        beta_id: part.beta_id,
        beta_uid: None,
        beta_name: None,
        resource: part.resource,
        rows: rows_before,
        pages: first_page - 1,
        complete: false,
        consistent: !reread,
        reread,
        deleted: 0,
        resumed_from_page: first_page,
        differed: None,
    };
    let class = match part.resource {
        Resource::Testers => Some(RateClass::TestersList),
        Resource::Rewards => Some(RateClass::RewardsList),
        Resource::Points => Some(RateClass::PointsList),
        Resource::Betas => Some(RateClass::Betas),
        Resource::Suppressions => None,
    };
    let beta_opt = (!beta.is_empty()).then(|| beta.to_string());
    // What the pass in progress saw before a stop counts as seen now: a list
    // that changed while the export was stopped has shifted records across
    // the pages already read. (A pass that starts at page 1 has read none.)
    let mut sizes_seen: Vec<ListSize> = if first_page > 1 { sizes } else { vec![] };
    // This part's share of the run's totals so far: (pages, records).
    let mut counted = (0u64, 0u64);
    let mut passes = 0;
    // One re-read at most, counting one begun before a stop.
    let mut may_reread = !reread;
    let mut start = first_page;
    loop {
        passes += 1;
        let pages = client.pages::<Value>(
            part.resource.op(),
            beta_opt.clone(),
            part.resource.path(beta),
            query.to_vec(),
            start,
        );
        let mut pages = std::pin::pin!(pages);
        let finished = loop {
            let next = tokio::select! {
                p = pages.next() => p,
                _ = stop.wait() => None,
            };
            let Some(page) = next else {
                break !stop.is_set();
            };
            let page = page?;
            if let Some(s) = list_size(&page.pagination) {
                if sizes_seen.last() != Some(&s) {
                    sizes_seen.push(s);
                }
                if passes == 1 {
                    // What is left of this part, added once to the run's
                    // totals (and corrected if the list's size changes).
                    let skipped = first_page.saturating_sub(1);
                    let pages_left = s.0.saturating_sub(skipped);
                    let per_page = PAGE_SIZE as u64;
                    let records_left = match s.1 {
                        Some(r) => r.saturating_sub(skipped * per_page),
                        None => {
                            shared.records_approximate.store(true, Ordering::Relaxed);
                            pages_left * per_page
                        }
                    };
                    adjust(&shared.pages_total, &mut counted.0, pages_left);
                    adjust(&shared.records_total, &mut counted.1, records_left);
                }
            }
            let t = Instant::now();
            let new =
                sink.lock()
                    .unwrap()
                    .page(run, part, &page.items, page.number + 1, &sizes_seen)?;
            shared
                .local_ns
                .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            summary.rows += new;
            summary.pages += 1;
            let done = shared.pages_done.fetch_add(1, Ordering::Relaxed) + 1;
            let rows = shared.rows.fetch_add(new, Ordering::Relaxed) + new;
            let total = shared.pages_total.load(Ordering::Relaxed).max(done);
            let quota = class
                .and_then(|c| client.limiter().quota(c))
                .map(|q| f64::from(q.count) / q.period.as_secs_f64());
            let _ = shared.progress.event(&Event::Progress(&Snapshot {
                phase: "exporting",
                done,
                total,
                unit: "pages",
                elapsed: shared.started.elapsed(),
                limiter_wait: client.limiter().waited(),
                throttled: client.stats().throttled.load(Ordering::Relaxed),
                state: client.limiter().condition(),
                // The quota is the ceiling: 60 pages a minute is 1,500 users.
                ceiling: quota,
                items: Some(Items {
                    done: rows,
                    total: Some(shared.records_total.load(Ordering::Relaxed)).filter(|t| *t > 0),
                    approximate: shared.records_approximate.load(Ordering::Relaxed),
                    unit: part.resource.unit(),
                }),
            }));
            tracing::debug!(page = page.number, rows, "page written");
            if page.last {
                break true;
            }
        };
        if !finished {
            return Ok(summary);
        }
        // A list whose size changed while it was read may have shifted
        // records across page boundaries: read it once more from the start.
        let changed = sizes_seen.len() > 1;
        if changed && may_reread {
            may_reread = false;
            tracing::warn!(
                project = part.beta_id,
                resource = part.resource.name(),
                "the list changed while it was read ({:?}); reading it once more to pick up what shifted",
                sizes_seen
            );
            summary.reread = true;
            summary.consistent = false;
            sizes_seen = sizes_seen.split_off(sizes_seen.len() - 1);
            sink.lock().unwrap().reread(run, part, &sizes_seen)?;
            start = 1;
            continue;
        }
        break;
    }
    let last_pass_stable = sizes_seen.len() <= 1;
    // After a re-read the output holds every record that is there now; a
    // CSV or JSONL file may also hold some that left while it was read (a
    // SQLite export marks them deleted): not a snapshot.
    summary.complete = true;
    let mut sink = sink.lock().unwrap();
    summary.deleted = sink.finish(run, part, true, summary.consistent, last_pass_stable)?;
    summary.differed = sink.reconciliation(run)?.map(|(new, changed)| Differed {
        new,
        changed,
        gone: summary.deleted,
    });
    Ok(summary)
}
