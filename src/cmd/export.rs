//! `prefsync export`: flags to options, signals, summary, exit code.

use std::path::Path;
use std::sync::Arc;

use crate::api::Client;
use crate::cli::{ExportArgs, ExportWhat};
use crate::config::Connection;
use crate::engine::Subscriber;
use crate::exit::{Exit, usage};
use crate::export::sink::{CsvOptions, Format};
use crate::export::{ExportOptions, ExportSummary, Resource, export};
use crate::stop::Stop;

/// The format a known extension of the output names.
fn format_of_extension(out: &Path) -> Option<(Format, String)> {
    let ext = out.extension()?.to_str()?.to_ascii_lowercase();
    let f = match ext.as_str() {
        "csv" => Format::Csv,
        "jsonl" | "ndjson" => Format::Jsonl,
        "sqlite" | "sqlite3" | "db" => Format::Sqlite,
        _ => return None,
    };
    Some((f, ext))
}

fn format_name(f: Format) -> &'static str {
    match f {
        Format::Csv => "csv",
        Format::Jsonl => "jsonl",
        Format::Sqlite => "sqlite",
    }
}

/// `--format`, or the format the output's extension names. A format that
/// contradicts a known extension is refused: a cron job that writes JSONL
/// into `users.csv` breaks whatever reads that file next.
pub fn format_for(given: Option<Format>, out: &Path) -> anyhow::Result<Format> {
    match (given, format_of_extension(out)) {
        (Some(f), Some((by_ext, ext))) if f != by_ext => Err(usage(format!(
            "--format {} contradicts the output's extension: {} is a .{ext} name, which means {}. \
             hint: name the output for its format (e.g. .{}), or drop --format to write {}",
            format_name(f),
            out.display(),
            format_name(by_ext),
            match f {
                Format::Csv => "csv",
                Format::Jsonl => "jsonl",
                Format::Sqlite => "sqlite",
            },
            format_name(by_ext),
        ))),
        (Some(f), _) => Ok(f),
        (None, Some((f, _))) => Ok(f),
        (None, None) => Err(usage(
            "give --format csv|jsonl|sqlite (the output's extension does not tell)",
        )),
    }
}

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
    let format = format_for(a.format, &a.out)?;
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

#[cfg(test)]
mod format_tests {
    use super::*;

    /// Regression (issue 16, defect 8): `--format jsonl --out users.csv`
    /// wrote JSONL into a .csv name without a word.
    #[test]
    fn a_format_that_contradicts_the_extension_is_refused() {
        let err = format_for(Some(Format::Jsonl), Path::new("users.csv")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("--format jsonl") && msg.contains(".csv"),
            "{msg}"
        );
        assert_eq!(crate::exit::exit_for(&err).code(), 2);
        assert!(format_for(Some(Format::Sqlite), Path::new("users.CSV")).is_err());
        // Agreeing, guessed, or an extension that names nothing.
        assert_eq!(
            format_for(Some(Format::Csv), Path::new("users.csv")).unwrap(),
            Format::Csv
        );
        assert_eq!(
            format_for(None, Path::new("users.ndjson")).unwrap(),
            Format::Jsonl
        );
        assert_eq!(
            format_for(Some(Format::Jsonl), Path::new("users.txt")).unwrap(),
            Format::Jsonl
        );
        assert_eq!(
            format_for(Some(Format::Csv), Path::new("users")).unwrap(),
            Format::Csv
        );
        assert!(format_for(None, Path::new("users.txt")).is_err());
    }
}
