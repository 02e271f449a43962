//! The bulk operations' common command: flags to the engine's options,
//! Ctrl-C, the subscribers (progress, reports, summary JSON), the summary
//! and the exit code. Each operation's command builds its operation and
//! hands it here.

use std::sync::Arc;

use crate::api::Client;
use crate::cli::BulkArgs;
use crate::engine::{Operation, RunOptions, RunSummary, Subscriber, Subscribers};
use crate::exit::Exit;
use crate::input::Source;
use crate::stop::Stop;

/// The engine's options from the common flags; `options` is the
/// operation's own, stored with the run for the record.
pub fn run_options(a: &BulkArgs, beta: &str, options: serde_json::Value) -> RunOptions {
    RunOptions {
        beta: beta.to_string(),
        source: Source::parse(&a.file),
        concurrency: a.concurrency,
        dry_run: a.dry_run,
        checkpoint: a.checkpoint.clone(),
        errors: a.errors.clone(),
        results: a.results.clone(),
        summary_json: a.summary_json.clone(),
        fresh: a.fresh,
        max_duration: a.max_duration,
        encoding: a.encoding,
        delimiter: a.delimiter.map(|c| c as u8),
        options,
    }
}

/// The exit code a finished run earns.
pub fn exit_of(s: &RunSummary) -> Exit {
    if s.stopped {
        Exit::Resumable
    } else if s.rejected > 0 {
        Exit::RowsRejected
    } else {
        Exit::Done
    }
}

/// Runs `op` over the file the flags name, to its end or until Ctrl-C.
pub async fn run<O: Operation>(
    client: &Client,
    op: O,
    a: &BulkArgs,
    beta: &str,
    options: serde_json::Value,
    progress: Arc<dyn Subscriber>,
) -> anyhow::Result<Exit> {
    let stop = Stop::default();
    super::import::install_ctrl_c(&stop);
    let opts = run_options(a, beta, options);
    let subs = Subscribers::standard(progress, a.excel_safe, opts.summary_json.as_deref());
    let (summary, _) = crate::engine::run(client, op, &opts, stop, subs).await?;
    crate::say::summary(summary.kind, &summary);
    crate::say::unfinished(
        summary.stopped,
        summary.rejected,
        summary.errors_file.as_deref(),
    );
    Ok(exit_of(&summary))
}
