//! `prefsync sync testers`: flags to options, Ctrl-C, summary, exit code.

use std::sync::Arc;

use crate::api::Client;
use crate::cli::SyncArgs;
use crate::engine::Subscriber;
use crate::exit::Exit;
use crate::stop::Stop;
use crate::sync::{ApplyOptions, SyncOptions, sync};

pub async fn run(
    client: &Client,
    a: &SyncArgs,
    beta: &str,
    progress: Arc<dyn Subscriber>,
) -> anyhow::Result<Exit> {
    let stop = Stop::default();
    super::import::install_ctrl_c(&stop);
    let opts = sync_options(a, beta);
    let summary = sync(client, &opts, stop, progress).await?;
    crate::say::summary("sync", &summary);
    crate::say::unfinished(
        summary.import.stopped,
        summary.import.rejected,
        summary.import.errors_file.as_deref(),
    );
    if let Some(d) = &summary.deleted {
        crate::say::unfinished(d.stopped, d.rejected, d.errors_file.as_deref());
    }
    Ok(
        if summary.import.stopped || summary.deleted.as_ref().is_some_and(|d| d.stopped) {
            Exit::Resumable
        } else if summary.import.rejected > 0
            || summary.deleted.as_ref().is_some_and(|d| d.rejected > 0)
        {
            Exit::RowsRejected
        } else {
            Exit::Done
        },
    )
}

fn sync_options(a: &SyncArgs, beta: &str) -> SyncOptions {
    SyncOptions {
        import: super::import::options(&a.import, beta),
        mirror: a.mirror.clone(),
        max_age: a.max_age,
        refresh: a.refresh,
        delete_missing: a.delete_missing,
        max_delete: a.max_delete,
        backup: a.backup.clone(),
    }
}

pub async fn plan(
    client: &Client,
    a: &crate::cli::PlanArgs,
    beta: &str,
    progress: Arc<dyn Subscriber>,
) -> anyhow::Result<Exit> {
    let stop = Stop::default();
    super::import::install_ctrl_c(&stop);
    let s = crate::sync::plan(client, &sync_options(&a.sync, beta), &a.out, stop, progress).await?;
    crate::say::summary("plan", &s);
    Ok(Exit::Done)
}

pub async fn apply(
    client: &Client,
    a: &crate::cli::ApplyArgs,
    progress: Arc<dyn Subscriber>,
) -> anyhow::Result<Exit> {
    let stop = Stop::default();
    super::import::install_ctrl_c(&stop);
    let opts = ApplyOptions {
        plan: a.plan.clone(),
        mirror: a.mirror.clone(),
        stop_on_drift: a.on_drift == crate::cli::OnDrift::Stop,
        concurrency: a.concurrency,
        dry_run: a.dry_run,
        checkpoint: a.checkpoint.clone(),
        errors: a.errors.clone(),
        results: a.results.clone(),
        summary_json: a.summary_json.clone(),
        max_duration: a.max_duration,
        fresh: a.fresh,
    };
    let s = crate::sync::apply(client, &opts, stop, progress).await?;
    crate::say::summary("apply", &s);
    crate::say::unfinished(s.stopped, s.rejected, s.errors_file.as_deref());
    Ok(super::bulk::exit_of(&s))
}
