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
    let beta = opts.import.beta.clone();
    if opts.delete_missing && opts.max_delete.is_none() {
        return Err(usage(
            "--delete-missing needs --max-delete N or N% (how many users it may delete at most); nothing is deleted without a bound",
        ));
    }
    let mirror = Mirror::open(&opts.mirror)?;
    let known_id = mirror.project_id(&beta)?;
    let listing = match known_id {
        Some(id) => mirror.latest_listing(id)?,
        None => None,
    };
    let fresh = !opts.refresh
        && listing.as_ref().is_some_and(|l| {
            l.complete && !l.filtered && l.age().is_some_and(|a| a <= opts.max_age)
        });
    let calls_before = client
        .stats()
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);
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
    let refresh_calls = client
        .stats()
        .requests
        .load(std::sync::atomic::Ordering::Relaxed)
        - calls_before;
    drop(mirror);

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
