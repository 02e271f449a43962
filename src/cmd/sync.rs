//! `prefsync sync testers`: flags to options, Ctrl-C, summary, exit code.

use std::sync::Arc;

use crate::api::Client;
use crate::cli::SyncArgs;
use crate::engine::Subscriber;
use crate::exit::Exit;
use crate::stop::Stop;
use crate::sync::{SyncOptions, sync};

pub async fn run(
    client: &Client,
    a: &SyncArgs,
    beta: &str,
    progress: Arc<dyn Subscriber>,
) -> anyhow::Result<Exit> {
    let stop = Stop::default();
    super::import::install_ctrl_c(&stop);
    let opts = SyncOptions {
        import: super::import::options(&a.import, beta),
        mirror: a.mirror.clone(),
        max_age: a.max_age,
        refresh: a.refresh,
        delete_missing: a.delete_missing,
        max_delete: a.max_delete,
        backup: a.backup.clone(),
    };
    let summary = sync(client, &opts, stop, progress).await?;
    eprint!("{summary}");
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
