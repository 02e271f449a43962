//! `prefsync listen`: flags to a [`ListenConfig`], signals, the final
//! counts.

use anyhow::Context;

use crate::api::Client;
use crate::cli::ListenArgs;
use crate::exit::{Exit, usage};
use crate::listen::{ListenConfig, Listener, Secrets};

pub fn config_from_args(a: &ListenArgs, beta: &str) -> anyhow::Result<ListenConfig> {
    let text = std::fs::read_to_string(&a.secret_file).map_err(|e| {
        usage(format!(
            "failed to read the secret file {}: {e}",
            a.secret_file.display()
        ))
    })?;
    let secrets = Secrets::from_text(&text).ok_or_else(|| {
        usage(format!(
            "the secret file {} holds no secret: put the signing secret (Integrations > Webhooks > View secret) on its first line",
            a.secret_file.display()
        ))
    })?;
    if !a.path.starts_with('/') || a.path.contains(char::is_whitespace) {
        return Err(usage(format!(
            "invalid --path {:?}: expected an absolute URL path such as /prefinery",
            a.path
        )));
    }
    Ok(ListenConfig {
        mirror: a.mirror.clone(),
        beta: beta.to_string(),
        secrets,
        path: a.path.clone(),
        tolerance: a.tolerance,
        max_pending: a.max_pending.max(1),
        drain: a.drain,
    })
}

pub async fn run(client: &Client, a: &ListenArgs, beta: &str) -> anyhow::Result<Exit> {
    let config = config_from_args(a, beta)?;
    let tcp = tokio::net::TcpListener::bind(&a.bind)
        .await
        .map_err(|e| usage(format!("failed to listen on {}: {e}", a.bind)))?;
    let listener = Listener::start(config, client.clone(), tcp).await?;
    if let Some(p) = &a.port_file {
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, listener.addr.port().to_string())
            .and_then(|_| std::fs::rename(&tmp, p))
            .with_context(|| format!("failed to write the port file {}", p.display()))?;
    }
    eprintln!(
        "listening on http://{}{} for project {beta}; status at /status. Ctrl-C or SIGTERM stops it.",
        listener.addr, a.path
    );
    let stop = listener.stopper();
    tokio::spawn(async move {
        wait_for_signal().await;
        eprintln!(
            "stopping: applying what is journalled (again to quit at once; the rest is applied at the next start)"
        );
        stop.trigger();
        wait_for_signal().await;
        std::process::exit(Exit::Resumable.code());
    });
    let s = listener.wait().await?;
    eprintln!(
        "stopped: {} deliveries accepted ({} duplicates), {} refused by signature, {} answered 429; journal: {} applied, {} pending, {} unknown",
        s.received,
        s.duplicates,
        s.rejected_signature,
        s.refused_busy,
        s.applied,
        s.pending,
        s.unknown
    );
    Ok(Exit::Done)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
