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
pub mod say;
pub mod stop;
pub mod sync;
pub mod time;

use std::io::Write;

use cli::{Cli, Command};
pub use exit::Exit;

/// Runs one command to its end and says how it ended.
pub async fn run(cli: Cli) -> anyhow::Result<Exit> {
    say::configure(
        cli.global.quiet,
        cli.global.log_format == cli::LogFormat::Json,
    );
    let conn = match cli.api() {
        Some(a) => Some(config::Connection::from_args(&a)?),
        None => None,
    };
    let result = run_command(&cli, conn.as_ref()).await;
    match (result, conn) {
        (Err(e), Some(conn)) => Err(explain_refused_project(&conn, e).await),
        (r, _) => r,
    }
}

async fn run_command(cli: &Cli, conn: Option<&config::Connection>) -> anyhow::Result<Exit> {
    // Set for exactly the subcommands `Command::api` names.
    let conn = || conn.ok_or_else(|| anyhow::anyhow!("internal: no connection for this command"));
    let progress = || progress_for(&cli.global);
    match &cli.command {
        Command::Sandbox(a) => {
            cmd::sandbox::run(a).await?;
            Ok(Exit::Done)
        }
        Command::Listen(a) => {
            let conn = conn()?;
            let beta = conn.require_beta()?.to_string();
            cmd::listen::run(&conn.client(), a, &beta).await
        }
        Command::Demo(a) => cmd::demo::run(a, progress()).await,
        Command::Completions(a) => cmd::docs::completions(a, &mut std::io::stdout().lock()),
        Command::Man(a) => cmd::docs::man(a, &mut std::io::stdout().lock()),
        Command::Check(a) => check(a, conn()?).await,
        Command::Import(c) => {
            let cli::ImportWhat::Testers(a) = &c.what;
            let conn = conn()?;
            let beta = conn.require_beta()?.to_string();
            cmd::import::run(&conn.client(), a, &beta, progress()).await
        }
        Command::Preset(p) => cmd::preset::run(&p.what),
        Command::Plan(p) => {
            let cli::PlanWhat::Testers(a) = &p.what;
            let conn = conn()?;
            let beta = conn.require_beta()?.to_string();
            cmd::sync::plan(&conn.client(), a, &beta, progress()).await
        }
        Command::Apply(a) => cmd::sync::apply(&conn()?.client(), a, progress()).await,
        Command::Sync(s) => {
            let cli::SyncWhat::Testers(a) = &s.what;
            let conn = conn()?;
            let beta = conn.require_beta()?.to_string();
            cmd::sync::run(&conn.client(), a, &beta, progress()).await
        }
        Command::Points(p) => {
            let conn = conn()?;
            let beta = conn.require_beta()?.to_string();
            cmd::points::run(&conn.client(), &p.what, &beta, progress()).await
        }
        Command::Rewards(r) => {
            let conn = conn()?;
            let beta = conn.require_beta()?.to_string();
            cmd::rewards::run(&conn.client(), &r.what, &beta, progress()).await
        }
        Command::Suppressions(c) => {
            let conn = conn()?;
            let beta = conn.require_beta()?.to_string();
            cmd::suppressions::run(&conn.client(), &c.what, &beta, progress()).await
        }
        Command::Testers(c) => {
            let conn = conn()?;
            let beta = conn.require_beta()?.to_string();
            cmd::testers::run(&conn.client(), &c.what, &beta, progress()).await
        }
        Command::Export(a) => {
            let conn = conn()?;
            cmd::export::run(&conn.client(), a, conn, progress()).await
        }
        Command::Runs(a) => cmd::runs::run(a),
        Command::Betas(a) => {
            let betas = conn()?.client().betas().await?;
            let mut out = std::io::stdout().lock();
            match a.output {
                cli::OutputFormat::Json => {
                    let projects: Vec<serde_json::Value> = betas
                        .iter()
                        .map(|b| {
                            serde_json::json!({
                                "id": b.id,
                                "uid": b.extra.get("uid").cloned().unwrap_or(serde_json::Value::Null),
                                "name": b.name,
                                "users": b.testers_count,
                            })
                        })
                        .collect();
                    let doc = serde_json::json!({ "projects": projects });
                    writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
                }
                cli::OutputFormat::Text => {
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
                }
            }
            Ok(Exit::Done)
        }
    }
}

/// `prefsync check`: the report on stdout (text or JSON); a failure is
/// the command's error, printed once, on stderr, by the caller.
async fn check(a: &cli::CheckArgs, conn: &config::Connection) -> anyhow::Result<Exit> {
    let beta = conn.require_beta()?.to_string();
    let report = cmd::check::check(&conn.client(), &beta).await;
    // A project refused with 403 reads as a key without Projects > Read;
    // the key's list of projects tells whether it is the project instead.
    if report.works()
        && report.project.is_none()
        && report.grant("Projects > Read") == Some(&cmd::check::Grant::Missing)
        && let Some(e) = project_not_visible(conn, 403).await
    {
        return Err(e);
    }
    let text = match a.output {
        cli::OutputFormat::Json => serde_json::to_string_pretty(&report.to_json(a.for_job))? + "\n",
        cli::OutputFormat::Text => {
            let mut t = report.to_string();
            if let Some(job) = a.for_job {
                let v = report.verdict(job);
                let name = cmd::check::job_name(job);
                if report.works() {
                    t.push_str(&if v.missing.is_empty() {
                        format!("for {name}: the key has every permission it needs\n")
                    } else {
                        format!("for {name}: missing {}\n", v.missing.join(", "))
                    });
                }
                if let Some(note) = cmd::check::job_notes(job) {
                    t.push_str(&format!("note: {note}\n"));
                }
            }
            t
        }
    };
    // A closed pipe (`prefsync check | head -1`) is not a failure, and
    // must not panic as print! would.
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush())
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        return Err(e.into());
    }
    if let Some(e) = report.failure {
        return Err(anyhow::Error::new(e));
    }
    if let Some(job) = a.for_job {
        let v = report.verdict(job);
        let name = cmd::check::job_name(job);
        if !v.missing.is_empty() {
            return Err(anyhow::Error::new(exit::AccessDeniedError(format!(
                "the API key lacks {}, which {name} needs. hint: edit the key under Company Settings > API Keys, then check again",
                v.missing.join(" and ")
            ))));
        }
        if !v.unknown.is_empty() {
            tracing::warn!(
                "could not tell whether the key has {}, which {name} needs (see the report)",
                v.unknown.join(", ")
            );
        }
    }
    Ok(Exit::Done)
}

/// A project the key may not see is not always answered 404: an API may
/// answer 401 or 403 for it as for a bad key. When the project's own calls
/// were refused so, the key's list of projects tells the two apart: if
/// the key lists projects and this one is not among them, it is the
/// project that is wrong (exit 2), not the key.
async fn explain_refused_project(conn: &config::Connection, e: anyhow::Error) -> anyhow::Error {
    let refused = e.chain().find_map(|c| c.downcast_ref::<api::ApiError>());
    let status = match refused {
        Some(api::ApiError::Unauthorized { .. }) => 401,
        Some(api::ApiError::Forbidden { op, .. }) if *op == api::Op::BetaShow.describe() => 403,
        _ => return e,
    };
    project_not_visible(conn, status).await.unwrap_or(e)
}

/// The error for a project the API refused with `status` when the key
/// lists other projects and not this one; `None` when the key cannot list
/// projects either, or lists this one (then the refusal is the key's).
async fn project_not_visible(conn: &config::Connection, status: u16) -> Option<anyhow::Error> {
    let [beta] = conn.betas.as_slice() else {
        return None;
    };
    let visible = conn.client().betas().await.ok()?;
    let uid = |b: &api::Beta| {
        b.extra
            .get("uid")
            .and_then(|u| u.as_str())
            .map(str::to_string)
    };
    if visible
        .iter()
        .any(|b| b.id.to_string() == *beta || uid(b).as_deref() == Some(beta.as_str()))
    {
        return None;
    }
    let names: Vec<String> = visible
        .iter()
        .take(5)
        .map(|b| format!("{} {}", b.id, b.name.as_deref().unwrap_or("(no name)")))
        .collect();
    Some(exit::usage(format!(
        "project {beta:?} was not found, or is not visible to this key: the API refused it (HTTP {status}), \
         yet the same key lists {} other project(s){}. hint: check --beta (the numeric API Beta ID or the \
         project UID, under the project's Settings > General); `prefsync betas` lists the projects this key sees",
        visible.len(),
        if names.is_empty() {
            String::new()
        } else {
            format!(": {}", names.join(", "))
        }
    )))
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
