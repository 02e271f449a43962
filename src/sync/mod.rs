//! `sync testers`: compare a file with the local mirror and send only what
//! changed.
//!
//! The mirror is refreshed first when its latest listing of the project's
//! users is older than `--max-age`, incomplete or filtered (a full listing,
//! at the rate limit, resumable: the export's). Then every row is compared
//! with the mirror's record, with no call: a new user is created, an
//! existing one updated with the fields that differ, an identical one left
//! alone. So a sync costs (list pages, when refreshed) + (rows that
//! changed) calls. What the API returns is written back to the mirror, so
//! the next sync starts from the truth without listing again.
//!
//! Sync never re-subscribes anyone: a suppressed email is not created
//! again, an unsubscribed user's status is never sent. With
//! `--delete-missing`, users of the project absent from the file are
//! deleted, only after a complete, unfiltered, fresh listing, only within
//! `--max-delete`, and only after their records are written to a backup.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::api::Client;
use crate::engine::{RunOptions, RunSummary, Subscriber, Subscribers};
use crate::exit::usage;
use crate::export::sink::Format;
use crate::export::{ExportOptions, Resource, export};
use crate::import::{ImportOptions, ImportSummary, import};
use crate::input::{CsvInput, Source};
use crate::mirror::Mirror;
use crate::stop::Stop;

/// How many users `--delete-missing` may delete.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DeleteBound {
    Count(u64),
    /// A percentage of the project's users in the mirror.
    Percent(f64),
}

impl std::str::FromStr for DeleteBound {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("invalid percentage {s:?}: expected e.g. 5%"))?;
            if !(0.0..=100.0).contains(&p) {
                return Err(format!("{s:?}: a percentage is from 0% to 100%"));
            }
            return Ok(DeleteBound::Percent(p));
        }
        s.parse().map(DeleteBound::Count).map_err(|_| {
            format!("invalid --max-delete {s:?}: expected a count (500) or a percentage (5%)")
        })
    }
}

impl DeleteBound {
    fn of(self, users: u64) -> u64 {
        match self {
            DeleteBound::Count(n) => n,
            DeleteBound::Percent(p) => ((users as f64) * p / 100.0).floor() as u64,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// The import's options (file, mapping, checkpoint, reports, ...).
    pub import: ImportOptions,
    pub mirror: PathBuf,
    /// A listing older than this is refreshed first.
    pub max_age: Duration,
    /// Refresh the mirror whatever its age.
    pub refresh: bool,
    /// Delete users of the project absent from the file.
    pub delete_missing: bool,
    /// The bound on those deletions (none given: nothing is deleted).
    pub max_delete: Option<DeleteBound>,
    /// Where the users to delete are written first (default beside the
    /// mirror).
    pub backup: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SyncSummary {
    /// Whether the mirror was refreshed, and the calls that took.
    pub refreshed: bool,
    pub refresh_calls: u64,
    pub import: ImportSummary,
    /// The deletion of missing users, when asked and there were any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deleted: Option<RunSummary>,
}

impl std::fmt::Display for SyncSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.refreshed {
            writeln!(
                f,
                "mirror refreshed first: {} API calls",
                self.refresh_calls
            )?;
        } else {
            writeln!(f, "mirror fresh: no listing needed")?;
        }
        write!(f, "{}", self.import)?;
        if let Some(d) = &self.deleted {
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// Runs a sync to its end, or until `stop`.
pub async fn sync(
    client: &Client,
    opts: &SyncOptions,
    stop: Stop,
    progress: Arc<dyn Subscriber>,
) -> anyhow::Result<SyncSummary> {
    check_bound(opts)?;
    // One --max-duration for the whole sync (refreshing the mirror, the
    // rows, the deletions), not one for each phase.
    struct Budget(Option<tokio::task::JoinHandle<()>>);
    impl Drop for Budget {
        fn drop(&mut self) {
            if let Some(t) = &self.0 {
                t.abort();
            }
        }
    }
    let _budget = Budget(opts.import.max_duration.map(|d| stop.after(d)));
    let mut opts = opts.clone();
    opts.import.max_duration = None;
    let opts = &opts;
    let (fresh, refresh_calls) = refresh(client, opts, &stop, &progress).await?;
    let mut io = opts.import.clone();
    io.mirror = Some(opts.mirror.clone());
    io.by_mirror = true;
    let summary = import(client, &io, stop.clone(), progress.clone()).await?;
    let deleted = if opts.delete_missing && !summary.stopped {
        delete_missing(client, opts, stop, progress).await?
    } else {
        None
    };
    Ok(SyncSummary {
        refreshed: !fresh,
        refresh_calls,
        import: summary,
        deleted,
    })
}

fn check_bound(opts: &SyncOptions) -> anyhow::Result<()> {
    if opts.delete_missing && opts.max_delete.is_none() {
        return Err(usage(
            "--delete-missing needs --max-delete N or N% (how many users it may delete at most); nothing is deleted without a bound",
        ));
    }
    Ok(())
}

/// Lists the project into the mirror when its latest listing is stale,
/// incomplete or filtered (or `--refresh`). Returns whether it was fresh
/// already, and the calls the refresh took.
async fn refresh(
    client: &Client,
    opts: &SyncOptions,
    stop: &Stop,
    progress: &Arc<dyn Subscriber>,
) -> anyhow::Result<(bool, u64)> {
    let beta = opts.import.beta.clone();
    let mirror = Mirror::open(&opts.mirror)?;
    let listing = match mirror.project_id(&beta)? {
        Some(id) => mirror.latest_listing(id)?,
        None => None,
    };
    drop(mirror);
    let fresh = !opts.refresh
        && listing.as_ref().is_some_and(|l| {
            l.complete && !l.filtered && l.age().is_some_and(|a| a <= opts.max_age)
        });
    let calls = || {
        client
            .stats()
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = calls();
    if !fresh {
        tracing::info!(
            "the mirror {} has no fresh, complete listing of project {beta}: listing it first",
            opts.mirror.display()
        );
        let mut e = ExportOptions::new(
            vec![Resource::Testers, Resource::Suppressions],
            vec![beta.clone()],
            Format::Sqlite,
            opts.mirror.clone(),
        );
        e.max_duration = opts.import.max_duration;
        let exported = export(client, &e, stop.clone(), progress.clone()).await?;
        if !exported.complete {
            return Err(anyhow::Error::new(crate::exit::StoppedError(
                "stopped while refreshing the mirror: run the same command again to resume".into(),
            )));
        }
    }
    Ok((fresh, calls() - before))
}

/// Deletes the users of the mirror's fresh, complete, unfiltered listing
/// whose email is in no row of the file, within the bound, after writing
/// them to a backup (the delete operation does both, before its first
/// call).
async fn delete_missing(
    client: &Client,
    opts: &SyncOptions,
    stop: Stop,
    progress: Arc<dyn Subscriber>,
) -> anyhow::Result<Option<RunSummary>> {
    let beta = &opts.import.beta;
    let Some(Missing {
        mirror,
        beta_id,
        users: missing,
        bound,
    }) = missing_users(opts)?
    else {
        return Ok(None);
    };
    // The deletions are a run of the delete operation over the list, in a
    // file beside the checkpoint (the same list for a resumed run).
    let list = opts
        .import
        .checkpoint
        .with_file_name(format!("{}.delete-missing.csv", beta_id));
    {
        let out = crate::output::AtomicFile::create(&list)?;
        let mut w = csv::Writer::from_writer(out.writer());
        w.write_record(["id", "email"])?;
        for (id, email) in &missing {
            w.write_record([id.to_string(), email.clone()])?;
        }
        drop(
            w.into_inner()
                .map_err(|e| anyhow::anyhow!("failed to write {}: {e}", list.display()))?,
        );
        out.commit()?;
    }
    let backup = opts.backup.clone().unwrap_or_else(|| {
        opts.mirror
            .with_file_name(format!("{}.deleted-users.backup.csv", beta_id))
    });
    let mut op = crate::ops::testers_delete::TestersDelete::new(
        client.clone(),
        beta.clone(),
        opts.import.checkpoint.clone(),
    );
    op.max_delete = Some(bound);
    op.yes = true;
    op.backup = Some(backup);
    let run = RunOptions {
        beta: beta.clone(),
        source: Source::File(list),
        concurrency: opts.import.concurrency,
        dry_run: opts.import.dry_run,
        checkpoint: opts.import.checkpoint.clone(),
        errors: None,
        results: None,
        summary_json: None,
        fresh: false,
        max_duration: opts.import.max_duration,
        encoding: None,
        delimiter: None,
        options: serde_json::json!({ "delete_missing": true, "bound": bound }),
    };
    let subs = Subscribers::default().with(progress);
    let (summary, _) = crate::engine::run(client, op, &run, stop, subs).await?;
    // The mirror learns what was deleted.
    // When a row was refused, which ones went is the next listing's to
    // tell.
    if !summary.dry_run && !summary.stopped && summary.rejected == 0 {
        for (id, _) in &missing {
            mirror.mark_deleted(beta_id, *id)?;
        }
    }
    Ok(Some(summary))
}

/// The users of the mirror's fresh, complete, unfiltered listing whose
/// email is in no row of the file, and the bound on deleting them; refused
/// (naming the count) when there are more than the bound allows.
struct Missing {
    mirror: Mirror,
    beta_id: i64,
    users: Vec<(u64, String)>,
    bound: u64,
}

fn missing_users(opts: &SyncOptions) -> anyhow::Result<Option<Missing>> {
    let mirror = Mirror::open(&opts.mirror)?;
    let beta = &opts.import.beta;
    let beta_id = mirror
        .project_id(beta)?
        .ok_or_else(|| usage(format!("the mirror does not know project {beta}")))?;
    let listing = mirror.latest_listing(beta_id)?;
    match &listing {
        Some(l) if l.complete && !l.filtered && l.age().is_some_and(|a| a <= opts.max_age) => {}
        _ => {
            return Err(usage(format!(
                "--delete-missing needs the mirror's latest listing of project {beta} to be complete, unfiltered and \
                 younger than --max-age; it is not (run again with --refresh)"
            )));
        }
    }
    // Every email the file names, valid row or not: a user whose row was
    // rejected is still in the file, and is not deleted.
    let Source::File(path) = &opts.import.source else {
        return Err(usage(
            "--delete-missing needs --file PATH, not standard input",
        ));
    };
    let mut csv = CsvInput::open(
        &opts.import.source,
        opts.import.encoding,
        opts.import.delimiter.map(|c| c as u8),
    )?;
    let email_cols: Vec<usize> = csv
        .headers
        .iter()
        .enumerate()
        .filter(|(_, h)| {
            let h = h.trim().to_lowercase().replace([' ', '-'], "_");
            h == "email" || h == "e_mail" || h == "email_address"
        })
        .map(|(i, _)| i)
        .collect();
    let mut in_file: HashSet<String> = HashSet::new();
    while let Some(rec) = csv.next_record()? {
        let cells: Vec<String> = match rec {
            Ok(r) => r.fields.iter().map(str::to_string).collect(),
            Err(bad) => bad.fields.iter().map(str::to_string).collect(),
        };
        for i in &email_cols {
            if let Some(e) = cells.get(*i) {
                in_file.insert(e.trim().to_ascii_lowercase());
            }
        }
    }
    if email_cols.is_empty() {
        return Err(usage(format!(
            "--delete-missing: {} has no email column to compare with the project",
            path.display()
        )));
    }
    let users = mirror.testers(beta_id)?;
    let missing: Vec<(u64, String)> = users
        .iter()
        .filter(|(_, email, _)| !in_file.contains(&email.to_ascii_lowercase()))
        .map(|(id, email, _)| (*id, email.clone()))
        .collect();
    let bound = opts
        .max_delete
        .expect("checked at the start")
        .of(users.len() as u64);
    tracing::info!(
        missing = missing.len(),
        bound,
        "{} of the project's {} users are not in the file",
        missing.len(),
        users.len()
    );
    if missing.is_empty() {
        return Ok(None);
    }
    if missing.len() as u64 > bound {
        return Err(usage(format!(
            "--delete-missing would delete {} users, more than --max-delete allows ({bound}); nothing was deleted",
            missing.len()
        )));
    }
    Ok(Some(Missing {
        mirror,
        beta_id,
        users: missing,
        bound,
    }))
}

/// What `plan` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct PlanSummary {
    pub plan: String,
    pub identity: String,
    pub refreshed: bool,
    pub refresh_calls: u64,
    /// Rows per action: create, update, unchanged, delete, reject.
    pub actions: std::collections::BTreeMap<String, u64>,
}

impl std::fmt::Display for PlanSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .actions
            .iter()
            .map(|(a, n)| format!("{a} {n}"))
            .collect();
        writeln!(
            f,
            "plan written to {} ({}): {}",
            self.plan,
            self.identity,
            parts.join(", ")
        )?;
        writeln!(f, "  review it, then: prefsync apply {}", self.plan)
    }
}

/// The plan's identity, beside it (`PLAN.json`): what it was made from, so
/// that `apply` does that plan and refuses one edited since.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PlanIdentity {
    pub plan_version: u32,
    pub beta: String,
    pub beta_id: i64,
    pub mirror: PathBuf,
    pub mirror_listing: Option<i64>,
    pub input: String,
    pub input_size: i64,
    pub input_sha1: String,
    pub plan_sha1: String,
    pub created_at: String,
}

/// The columns of a plan: one line per field a row changes (one line for a
/// row that changes nothing, or is refused, or deleted).
pub const PLAN_COLUMNS: [&str; 9] = [
    "line",
    "email",
    "action",
    "field",
    "old",
    "new",
    "reason",
    "target_id",
    "base_updated_at",
];

/// Writes what a sync would do to `out`, and its identity beside it; sends
/// nothing (but the listing, when the mirror is stale).
pub async fn plan(
    client: &Client,
    opts: &SyncOptions,
    out: &std::path::Path,
    stop: Stop,
    progress: Arc<dyn Subscriber>,
) -> anyhow::Result<PlanSummary> {
    use crate::engine::{Operation, Parsed};
    use crate::ops::testers_import::{MirrorUse, Resolve, TestersImport, cell_of};
    check_bound(opts)?;
    crate::output::check_outputs(
        opts.import.source.path(),
        &[("--out", out), ("--mirror", &opts.mirror)],
    )?;
    let (fresh, refresh_calls) = refresh(client, opts, &stop, &progress).await?;
    let mirror = Arc::new(Mirror::open(&opts.mirror)?);
    let beta = opts.import.beta.clone();
    let beta_id = mirror
        .project_id(&beta)?
        .ok_or_else(|| usage(format!("the mirror does not know project {beta}")))?;
    let listing = mirror.latest_listing(beta_id)?.map(|l| l.run);
    let io = &opts.import;
    let mut op = TestersImport::new(client.clone(), beta.clone());
    op.mode = io.mode;
    op.status = io.default_status.clone();
    op.allow_emails = io.allow_emails;
    op.map = io.map.clone();
    op.preset = io.preset.clone();
    op.mailchimp_list = io.mailchimp_list;
    op.include_flagged = io.include_flagged;
    op.empty = io.empty;
    op.strict = io.strict;
    op.resolve = Some(Resolve::Mirror);
    op.mirror = Some(MirrorUse {
        mirror: mirror.clone(),
        beta_id,
    });
    let delimiter = io.delimiter.map(|c| c as u8);
    let Source::File(path) = &io.source else {
        return Err(usage("plan needs --file PATH, not standard input"));
    };
    let mut csv = CsvInput::open(&io.source, io.encoding, delimiter)?;
    op.start(&mut csv)?;
    let (size, sha1) = crate::input::fingerprint(&io.source, csv.format.delimiter)?;
    let mut csv = CsvInput::open(&io.source, io.encoding, delimiter)?;

    let file = crate::output::AtomicFile::create(out)?;
    let mut w = csv::Writer::from_writer(file.writer());
    w.write_record(PLAN_COLUMNS)?;
    let mut counts = std::collections::BTreeMap::<String, u64>::new();
    let mut seen = std::collections::HashMap::<String, u64>::new();
    let (mut gated, mut first_gated) = (0u64, 0u64);
    let line_of = |w: &mut csv::Writer<_>, rec: [String; 9]| -> anyhow::Result<()> {
        w.write_record(&rec)?;
        Ok(())
    };
    while let Some(rec) = csv.next_record()? {
        let (line, planned) = match rec {
            Err(bad) => (bad.line, Err((String::new(), bad.message))),
            Ok(r) => match op.parse(&r.fields) {
                Err(msg) => (r.line, Err((String::new(), msg))),
                Ok(Parsed::Skip { key, reason, .. }) => {
                    (r.line, Ok((key.unwrap_or_default(), None, reason)))
                }
                Ok(Parsed::Row(row)) => {
                    let key = op.key(&row).to_string();
                    if op.gate(&row) {
                        gated += 1;
                        if first_gated == 0 {
                            first_gated = r.line;
                        }
                    }
                    match seen.get(&key) {
                        Some(first) => (
                            r.line,
                            Err((
                                key.clone(),
                                format!("duplicate: the email {key:?} is already on line {first}"),
                            )),
                        ),
                        None => {
                            seen.insert(key.clone(), r.line);
                            let p = op.planned(&row);
                            (r.line, Ok((key, Some(p), String::new())))
                        }
                    }
                }
            },
        };
        match planned {
            Err((email, reason)) => {
                *counts.entry("reject".into()).or_default() += 1;
                line_of(
                    &mut w,
                    [
                        line.to_string(),
                        email,
                        "reject".into(),
                        String::new(),
                        String::new(),
                        String::new(),
                        reason,
                        String::new(),
                        String::new(),
                    ],
                )?;
            }
            // Kept out by a rule (a suppressed email, a spam flag): nothing
            // is done, and the plan says why.
            Ok((email, None, reason)) => {
                *counts.entry("unchanged".into()).or_default() += 1;
                line_of(
                    &mut w,
                    [
                        line.to_string(),
                        email,
                        "unchanged".into(),
                        String::new(),
                        String::new(),
                        String::new(),
                        reason,
                        String::new(),
                        String::new(),
                    ],
                )?;
            }
            Ok((email, Some(p), _)) => {
                *counts.entry(p.action.into()).or_default() += 1;
                let target = p.target.map(|t| t.to_string()).unwrap_or_default();
                let base = p.base_updated_at.clone().unwrap_or_default();
                if p.fields.is_empty() {
                    line_of(
                        &mut w,
                        [
                            line.to_string(),
                            email,
                            p.action.into(),
                            String::new(),
                            String::new(),
                            String::new(),
                            p.reason.clone(),
                            target,
                            base,
                        ],
                    )?;
                } else {
                    for (field, old, new) in &p.fields {
                        line_of(
                            &mut w,
                            [
                                line.to_string(),
                                email.clone(),
                                p.action.into(),
                                field.clone(),
                                old.clone(),
                                new.clone(),
                                p.reason.clone(),
                                target.clone(),
                                base.clone(),
                            ],
                        )?;
                    }
                }
            }
        }
    }
    if gated > 0 {
        return Err(op.gate_refusal(gated, first_gated));
    }
    if opts.delete_missing
        && let Some(m) = missing_users(opts)?
    {
        for (id, email) in &m.users {
            let rec = m.mirror.tester(beta_id, email)?;
            let base = cell_of(rec.as_ref().and_then(|r| r.get("updated_at")));
            *counts.entry("delete".into()).or_default() += 1;
            line_of(
                &mut w,
                [
                    String::new(),
                    email.clone(),
                    "delete".into(),
                    String::new(),
                    String::new(),
                    String::new(),
                    "not in the file (--delete-missing)".into(),
                    id.to_string(),
                    base,
                ],
            )?;
        }
    }
    drop(
        w.into_inner()
            .map_err(|e| anyhow::anyhow!("failed to write {}: {e}", out.display()))?,
    );
    file.commit()?;
    let bytes = std::fs::read(out)?;
    let identity = PlanIdentity {
        plan_version: 1,
        beta: beta.clone(),
        beta_id,
        mirror: std::fs::canonicalize(&opts.mirror).unwrap_or_else(|_| opts.mirror.clone()),
        mirror_listing: listing,
        input: std::fs::canonicalize(path)
            .unwrap_or_else(|_| path.clone())
            .display()
            .to_string(),
        input_size: size,
        input_sha1: sha1,
        plan_sha1: sha1_smol::Sha1::from(&bytes).digest().to_string(),
        created_at: crate::time::iso8601(std::time::SystemTime::now()),
    };
    let id_path = identity_path(out);
    crate::output::write_json(&id_path, &identity)?;
    Ok(PlanSummary {
        plan: out.display().to_string(),
        identity: id_path.display().to_string(),
        refreshed: !fresh,
        refresh_calls,
        actions: counts,
    })
}

/// Where a plan's identity is kept: beside it.
pub fn identity_path(plan: &std::path::Path) -> PathBuf {
    let name = plan
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plan.csv".into());
    plan.with_file_name(format!("{name}.json"))
}

/// What `apply` takes besides the plan.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    pub plan: PathBuf,
    /// The mirror to write back to (default: the one the plan names).
    pub mirror: Option<PathBuf>,
    pub stop_on_drift: bool,
    pub concurrency: usize,
    pub dry_run: bool,
    pub checkpoint: PathBuf,
    pub errors: Option<PathBuf>,
    pub results: Option<PathBuf>,
    pub summary_json: Option<PathBuf>,
    pub max_duration: Option<Duration>,
    pub fresh: bool,
}

/// Does exactly the plan: its creates, updates and deletes, in its order,
/// each checked for drift first; nothing else.
pub async fn apply(
    client: &Client,
    opts: &ApplyOptions,
    stop: Stop,
    progress: Arc<dyn Subscriber>,
) -> anyhow::Result<RunSummary> {
    use crate::ops::testers_apply::TestersApply;
    use crate::ops::testers_import::MirrorUse;
    let id_path = identity_path(&opts.plan);
    let text = std::fs::read_to_string(&id_path).map_err(|e| {
        usage(format!(
            "failed to read the plan's identity {}: {e} (apply takes a plan written by `prefsync plan`, with its .json beside it)",
            id_path.display()
        ))
    })?;
    let identity: PlanIdentity = serde_json::from_str(&text).map_err(|e| {
        usage(format!(
            "{} does not read as a plan's identity: {e}",
            id_path.display()
        ))
    })?;
    let bytes = std::fs::read(&opts.plan).map_err(|e| {
        usage(format!(
            "failed to read the plan {}: {e}",
            opts.plan.display()
        ))
    })?;
    if sha1_smol::Sha1::from(&bytes).digest().to_string() != identity.plan_sha1 {
        return Err(usage(format!(
            "{} changed since it was written (saved from a spreadsheet?): apply does exactly a plan as it was made; make a new one with `prefsync plan`",
            opts.plan.display()
        )));
    }
    // The plan's actions, one row a user, in a file of their own beside
    // it: the engine's input (the same bytes for the same plan, so a
    // stopped apply resumes).
    let actions = opts.plan.with_file_name(format!(
        "{}.actions.csv",
        opts.plan
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    {
        let mut r = csv::Reader::from_reader(bytes.as_slice());
        type Action = (
            String,
            String,
            String,
            String,
            String,
            serde_json::Map<String, serde_json::Value>,
            serde_json::Map<String, serde_json::Value>,
        );
        let mut rows: Vec<Action> = vec![];
        for rec in r.records() {
            let rec = rec?;
            let get = |i: usize| rec.get(i).unwrap_or_default().to_string();
            let (line, email, action, field, old, new, target, base) = (
                get(0),
                get(1),
                get(2),
                get(3),
                get(4),
                get(5),
                get(7),
                get(8),
            );
            if !matches!(action.as_str(), "create" | "update" | "delete") {
                continue;
            }
            let same = rows
                .last()
                .is_some_and(|l| l.0 == line && l.1 == email && l.2 == action);
            if !same {
                rows.push((
                    line,
                    email,
                    action,
                    target,
                    base,
                    serde_json::Map::new(),
                    serde_json::Map::new(),
                ));
            }
            if !field.is_empty() {
                let last = rows.last_mut().expect("pushed above");
                last.5.insert(field.clone(), serde_json::Value::String(new));
                last.6.insert(field, serde_json::Value::String(old));
            }
        }
        // The users the plan deletes are written to a backup first, whole,
        // from the mirror the plan was made from (kept from a first try:
        // a resumed apply may have deleted some already).
        let doomed: HashSet<u64> = rows
            .iter()
            .filter(|r| r.2 == "delete")
            .filter_map(|r| r.3.parse().ok())
            .collect();
        if !doomed.is_empty() {
            let backup = opts.plan.with_file_name(format!(
                "{}.deleted-users.backup.csv",
                opts.plan
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ));
            if !backup.exists() {
                let mirror_path = opts
                    .mirror
                    .clone()
                    .unwrap_or_else(|| identity.mirror.clone());
                let m = Mirror::open(&mirror_path)?;
                let records: Vec<serde_json::Value> = m
                    .testers(identity.beta_id)?
                    .into_iter()
                    .filter(|(id, _, _)| doomed.contains(id))
                    .map(|(_, _, r)| r)
                    .collect();
                if records.len() != doomed.len() {
                    return Err(usage(format!(
                        "the plan deletes {} users, and the mirror {} holds {} of them: their backup cannot be written, so nothing is deleted; make a new plan",
                        doomed.len(),
                        mirror_path.display(),
                        records.len()
                    )));
                }
                let dir = backup
                    .parent()
                    .map(std::path::Path::to_path_buf)
                    .unwrap_or_default();
                let mut spool = tempfile::NamedTempFile::new_in(if dir.as_os_str().is_empty() {
                    std::path::Path::new(".")
                } else {
                    &dir
                })?;
                for r in &records {
                    std::io::Write::write_all(&mut spool, format!("{r}\n").as_bytes())?;
                }
                std::io::Write::flush(&mut spool)?;
                crate::export::sink::write_csv(
                    spool.path(),
                    &backup,
                    Resource::Testers,
                    crate::export::sink::CsvOptions {
                        excel_safe: false,
                        bom: false,
                    },
                )?;
                tracing::info!(
                    "the {} users the plan deletes are backed up in {}",
                    records.len(),
                    backup.display()
                );
            }
        }
        let out = crate::output::AtomicFile::create(&actions)?;
        let mut w = csv::Writer::from_writer(out.writer());
        w.write_record([
            "line",
            "email",
            "action",
            "target_id",
            "base_updated_at",
            "changes",
            "olds",
        ])?;
        for (line, email, action, target, base, changes, olds) in rows {
            w.write_record([
                line,
                email,
                action,
                target,
                base,
                serde_json::Value::Object(changes).to_string(),
                serde_json::Value::Object(olds).to_string(),
            ])?;
        }
        drop(
            w.into_inner()
                .map_err(|e| anyhow::anyhow!("failed to write {}: {e}", actions.display()))?,
        );
        out.commit()?;
    }
    let mirror_path = opts
        .mirror
        .clone()
        .unwrap_or_else(|| identity.mirror.clone());
    let mut op = TestersApply::new(client.clone(), identity.beta.clone());
    op.stop_on_drift = opts.stop_on_drift;
    if mirror_path.exists() {
        op.mirror = Some(MirrorUse {
            mirror: Arc::new(Mirror::open(&mirror_path)?),
            beta_id: identity.beta_id,
        });
    }
    let run = RunOptions {
        beta: identity.beta.clone(),
        source: Source::File(actions),
        concurrency: opts.concurrency,
        dry_run: opts.dry_run,
        checkpoint: opts.checkpoint.clone(),
        errors: opts.errors.clone(),
        results: opts.results.clone(),
        summary_json: opts.summary_json.clone(),
        fresh: opts.fresh,
        max_duration: opts.max_duration,
        encoding: None,
        delimiter: None,
        options: serde_json::json!({ "plan": opts.plan, "stop_on_drift": opts.stop_on_drift }),
    };
    let subs = Subscribers::standard(progress, false, opts.summary_json.as_deref());
    let (summary, _) = crate::engine::run(client, op, &run, stop, subs).await?;
    Ok(summary)
}
