//! `prefsync export`: flags to options, signals, summary, exit code.

use std::sync::Arc;

use crate::api::Client;
use crate::cli::{ExportArgs, ExportWhat};
use crate::config::Connection;
use crate::engine::Subscriber;
use crate::exit::{Exit, usage};
use crate::export::sink::{CsvOptions, Format};
use crate::export::{ExportOptions, ExportSummary, Resource, export};
use crate::stop::Stop;

pub fn options(a: &ExportArgs, conn: &Connection) -> anyhow::Result<ExportOptions> {
    let resources = match a.what {
        ExportWhat::Testers => vec![Resource::Testers],
        ExportWhat::Rewards => vec![Resource::Rewards],
        ExportWhat::Suppressions => vec![Resource::Suppressions],
        ExportWhat::Points => vec![Resource::Points],
        ExportWhat::Betas => vec![Resource::Betas],
        ExportWhat::All => vec![
            Resource::Testers,
            Resource::Rewards,
            Resource::Suppressions,
            Resource::Points,
        ],
    };
    let format = match a.format {
        Some(f) => f,
        None => match a.out.extension().and_then(|e| e.to_str()) {
            Some("csv") => Format::Csv,
            Some("jsonl" | "ndjson") => Format::Jsonl,
            Some("sqlite" | "sqlite3" | "db") => Format::Sqlite,
            _ => {
                return Err(usage(
                    "give --format csv|jsonl|sqlite (the output's extension does not tell)",
                ));
            }
        },
    };
    if a.what == ExportWhat::All && format != Format::Sqlite {
        return Err(usage(
            "export all writes one SQLite file: use --format sqlite",
        ));
    }
    let mut filters = Vec::new();
    let allowed: &[&str] = match a.what {
        ExportWhat::Testers => &["email_contains", "name", "referral_code", "custom_vars"],
        ExportWhat::Rewards => &["status", "email"],
        ExportWhat::Suppressions | ExportWhat::Points => &["email"],
        _ => &[],
    };
    for (k, v) in [
        ("email_contains", &a.email_contains),
        ("name", &a.name),
        ("referral_code", &a.referral_code),
        ("custom_vars", &a.custom_vars),
        ("status", &a.status),
        ("email", &a.email),
    ] {
        if let Some(v) = v {
            if !allowed.contains(&k) {
                return Err(usage(format!(
                    "--{} does not filter this export (filters here: {})",
                    k.replace('_', "-"),
                    if allowed.is_empty() {
                        "none".to_string()
                    } else {
                        allowed
                            .iter()
                            .map(|a| format!("--{}", a.replace('_', "-")))
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                )));
            }
            filters.push((k.to_string(), v.clone()));
        }
    }
    Ok(ExportOptions {
        resources,
        betas: conn.betas.clone(),
        all_betas: a.all_betas,
        format,
        out: a.out.clone(),
        filters,
        checkpoint: a.checkpoint.clone(),
        max_duration: a.max_duration,
        csv: CsvOptions {
            excel_safe: a.excel_safe,
            bom: a.bom,
        },
        fresh: a.fresh,
    })
}

pub fn exit_of(s: &ExportSummary) -> Exit {
    if s.complete {
        Exit::Done
    } else {
        Exit::Resumable
    }
}

pub async fn run(
    client: &Client,
    a: &ExportArgs,
    conn: &Connection,
    progress: Arc<dyn Subscriber>,
) -> anyhow::Result<Exit> {
    let opts = options(a, conn)?;
    let stop = Stop::default();
    super::import::install_ctrl_c(&stop);
    let summary = export(client, &opts, stop, progress).await?;
    crate::say::summary("export", &summary);
    crate::say::unfinished(!summary.complete, 0, None);
    if let Some(p) = &a.summary_json {
        crate::output::write_json(p, &summary)?;
    }
    Ok(exit_of(&summary))
}
