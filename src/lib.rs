//! prefsync: bulk import, export and sync for Prefinery waitlists.
//!
//! The binary is a thin shell around [`run`]; everything else is a library so
//! that tests drive it in-process against the [`sandbox`].

pub mod api;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod exit;
pub mod sandbox;

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
        Command::Demo(a) => cmd::demo::run(a).await,
        Command::Check => {
            let conn = config::Connection::from_args(&cli.global)?;
            let beta = conn.require_beta()?.to_string();
            let report = cmd::check::check(&conn.client(), &beta).await;
            print!("{report}");
            std::io::stdout().flush().ok();
            match report.failure {
                Some(e) => {
                    Err(anyhow::Error::new(e).context("the key does not work for this project"))
                }
                None => Ok(Exit::Done),
            }
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
