//! `prefsync import testers`: flags to options, signals, progress, summary.

use std::sync::Arc;

use crate::api::Client;
use crate::cli::ImportArgs;
use crate::engine::Subscriber;
use crate::exit::Exit;
use crate::import::input::Source;
use crate::import::{ImportOptions, ImportSummary, import};
use crate::stop::Stop;

pub fn options(a: &ImportArgs, beta: &str) -> ImportOptions {
    let mut o = ImportOptions::new(beta, Source::parse(&a.file), a.checkpoint.clone());
    o.mode = a.mode.into();
    o.map = a.map.clone();
    o.preset = a.preset.clone();
    o.mailchimp_list = a.mailchimp_list;
    o.include_flagged = a.include_flagged;
    o.default_status = a.status.as_ref().map(|s| s.trim().to_lowercase());
    o.concurrency = a.concurrency;
    o.dry_run = a.dry_run;
    o.errors = a.errors.clone();
    o.results = a.results.clone();
    o.summary_json = a.summary_json.clone();
    o.fresh = a.fresh;
    o.max_duration = a.max_duration;
    o.encoding = a.encoding;
    o.delimiter = a.delimiter;
    o.strict = a.strict;
    o.empty = a.empty;
    o.allow_emails = a.allow_emails;
    o.resolve = a.resolve.map(Into::into);
    o.excel_safe = a.excel_safe;
    o.order = a.order.map(Into::into);
    o.link_referrers = a.link_referrers;
    o.suppress = a.suppress;
    o
}

/// The first Ctrl-C (or SIGTERM, as cron, systemd and container runtimes
/// send) stops new work and lets calls in flight finish; the second exits
/// at once (the checkpoint is still safe to resume from).
pub fn install_ctrl_c(stop: &Stop) {
    let stop = stop.clone();
    tokio::spawn(async move {
        if interrupted().await {
            eprintln!(
                "\nstopping: finishing the calls in flight (Ctrl-C again to quit at once; the run can be resumed)"
            );
            stop.trigger();
            if interrupted().await {
                eprintln!("quitting at once; run the same command again to resume");
                std::process::exit(Exit::Resumable.code());
            }
        }
    });
}

/// Waits for Ctrl-C or SIGTERM; `false` when neither can be listened for.
async fn interrupted() -> bool {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            return tokio::signal::ctrl_c().await.is_ok();
        };
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.is_ok(),
            s = term.recv() => s.is_some(),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.is_ok()
    }
}

pub fn exit_of(s: &ImportSummary) -> Exit {
    if s.stopped {
        Exit::Resumable
    } else if s.rejected > 0 {
        Exit::RowsRejected
    } else {
        Exit::Done
    }
}

pub async fn run(
    client: &Client,
    a: &crate::cli::ImportTestersArgs,
    beta: &str,
    progress: Arc<dyn Subscriber>,
) -> anyhow::Result<Exit> {
    let stop = Stop::default();
    install_ctrl_c(&stop);
    let mut opts = options(&a.import, beta);
    opts.mirror = a.mirror.clone();
    let summary = import(client, &opts, stop, progress).await?;
    crate::say::summary("import", &summary);
    crate::say::unfinished(
        summary.stopped,
        summary.rejected,
        summary.errors_file.as_deref(),
    );
    Ok(exit_of(&summary))
}
