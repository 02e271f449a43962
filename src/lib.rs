//! prefsync: bulk import, export and sync for Prefinery waitlists.
//!
//! The binary is a thin shell around [`run`]; everything else is a library so
//! that tests drive it in-process against the [`sandbox`].

pub mod api;
pub mod checkpoint;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod engine;
pub mod exit;
pub mod export;
pub mod fsutil;
pub mod import;
pub mod input;
pub mod listen;
pub mod lock;
pub mod mirror;
pub mod ops;
pub mod output;
pub mod progress;
pub mod sandbox;
pub mod stop;
pub mod sync;
pub mod time;

use std::io::Write;

use cli::{Cli, Command};
pub use exit::Exit;

/// Runs one command to its end and says how it ended.
pub async fn run(cli: Cli) -> anyhow::Result<Exit> {
    match &cli.command {
        Command::Sandbox(a) => {
            cmd::sandbox::run(a).await?;
            Ok(Exit::Done)
        }
        Command::Listen(a) => {
            let conn = config::Connection::from_args(&cli.global)?;
            let beta = conn.require_beta()?.to_string();
            cmd::listen::run(&conn.client(), a, &beta).await
        }
        Command::Demo(a) => cmd::demo::run(a, progress_for(&cli.global)).await,
        Command::Check => {
            let conn = config::Connection::from_args(&cli.global)?;
            let beta = conn.require_beta()?.to_string();
            let report = cmd::check::check(&conn.client(), &beta).await;
            // A closed pipe (`prefsync check | head -1`) is not a failure,
            // and must not panic as print! would.
            let mut out = std::io::stdout().lock();
            if let Err(e) = write!(out, "{report}").and_then(|()| out.flush())
                && e.kind() != std::io::ErrorKind::BrokenPipe
            {
                return Err(e.into());
            }
            match report.failure {
                // Only the key's own refusals blame the key: a network, DNS
                // or TLS failure says nothing about it.
                Some(
                    e @ (api::ApiError::Unauthorized { .. } | api::ApiError::Forbidden { .. }),
                ) => Err(anyhow::Error::new(e).context("the key does not work for this project")),
                Some(e) => {
                    Err(anyhow::Error::new(e).context("failed to check the key and the project"))
                }
                None => Ok(Exit::Done),
            }
        }
        Command::Import(cmd) => {
            let cli::ImportWhat::Testers(a) = &cmd.what;
            let conn = config::Connection::from_args(&cli.global)?;
            let beta = conn.require_beta()?.to_string();
            cmd::import::run(&conn.client(), a, &beta, progress_for(&cli.global)).await
        }
        Command::Preset(p) => cmd::preset::run(&p.what),
        Command::Plan(p) => {
            let cli::PlanWhat::Testers(a) = &p.what;
            let conn = config::Connection::from_args(&cli.global)?;
            let beta = conn.require_beta()?.to_string();
            cmd::sync::plan(&conn.client(), a, &beta, progress_for(&cli.global)).await
        }
        Command::Apply(a) => {
            let conn = config::Connection::from_args(&cli.global)?;
            cmd::sync::apply(&conn.client(), a, progress_for(&cli.global)).await
        }
        Command::Sync(s) => {
            let cli::SyncWhat::Testers(a) = &s.what;
            let conn = config::Connection::from_args(&cli.global)?;
            let beta = conn.require_beta()?.to_string();
            cmd::sync::run(&conn.client(), a, &beta, progress_for(&cli.global)).await
        }
        Command::Points(p) => {
            let conn = config::Connection::from_args(&cli.global)?;
            let beta = conn.require_beta()?.to_string();
            cmd::points::run(&conn.client(), &p.what, &beta, progress_for(&cli.global)).await
        }
        Command::Rewards(r) => {
            let conn = config::Connection::from_args(&cli.global)?;
            let beta = conn.require_beta()?.to_string();
            cmd::rewards::run(&conn.client(), &r.what, &beta, progress_for(&cli.global)).await
        }
        Command::Suppressions(c) => {
            let conn = config::Connection::from_args(&cli.global)?;
            let beta = conn.require_beta()?.to_string();
            cmd::suppressions::run(&conn.client(), &c.what, &beta, progress_for(&cli.global)).await
        }
        Command::Testers(c) => {
            let conn = config::Connection::from_args(&cli.global)?;
            let beta = conn.require_beta()?.to_string();
            cmd::testers::run(&conn.client(), &c.what, &beta, progress_for(&cli.global)).await
        }
        Command::Export(a) => {
            let conn = config::Connection::from_args(&cli.global)?;
            cmd::export::run(&conn.client(), a, &conn, progress_for(&cli.global)).await
        }
        Command::Runs(a) => {
            if !a.checkpoint.exists() {
                return Err(exit::usage(format!(
                    "no checkpoint at {}",
                    a.checkpoint.display()
                )));
            }
            let ck = checkpoint::Checkpoint::open(&a.checkpoint)?;
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{:>4}  {:<16}  {:<8}  {:>8}  {:>8}  {:>8}  {:<10}  {:<40}  input",
                "run", "kind", "state", "rows", "rejected", "open", "project", "done"
            )?;
            for r in ck.runs()? {
                let c = ck.counts(r.id)?;
                // Each kind's own actions, as its rows were done.
                let done: Vec<String> = c.done.iter().map(|(a, n)| format!("{a} {n}")).collect();
                writeln!(
                    out,
                    "{:>4}  {:<16}  {:<8}  {:>8}  {:>8}  {:>8}  {:<10}  {:<40}  {}",
                    r.id,
                    r.kind,
                    r.state,
                    r.total_rows.unwrap_or(0),
                    c.rejected,
                    c.pending,
                    r.beta,
                    if done.is_empty() {
                        "-".to_string()
                    } else {
                        done.join(", ")
                    },
                    r.input_path
                )?;
            }
            Ok(Exit::Done)
        }
        Command::Betas => {
            let conn = config::Connection::from_args(&cli.global)?;
            let betas = conn.client().betas().await?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{:>10}  {:>8}  name", "id", "users")?;
            for b in betas {
                writeln!(
                    out,
                    "{:>10}  {:>8}  {}",
                    b.id,
                    b.testers_count.unwrap_or(0),
                    b.name.as_deref().unwrap_or("")
                )?;
            }
            Ok(Exit::Done)
        }
    }
}

/// A bar on a terminal, a log line every few seconds otherwise, nothing
/// with `--quiet`.
pub fn progress_for(g: &cli::GlobalArgs) -> std::sync::Arc<dyn engine::Subscriber> {
    use std::io::IsTerminal;
    if g.quiet {
        std::sync::Arc::new(progress::Silent)
    } else if std::io::stderr().is_terminal() {
        std::sync::Arc::new(progress::Bar::new())
    } else {
        std::sync::Arc::new(progress::LogLines::new(std::time::Duration::from_secs(5)))
    }
}
