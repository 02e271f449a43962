//! The `prefsync` binary: parse, set up logging, run, map the outcome to an
//! exit code. Everything else lives in the library.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use prefsync::cli::{Cli, LogFormat};
use prefsync::exit::{Exit, exit_for, render};

fn init_logging(cli: &Cli) {
    let level = if cli.global.quiet {
        "error"
    } else {
        match cli.global.verbose {
            0 => "info",
            1 => "debug",
            _ => "trace",
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PREFSYNC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("prefsync={level},warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match cli.global.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // --help and --version are not errors.
            let code = if e.use_stderr() {
                Exit::Usage.code()
            } else {
                0
            };
            let _ = e.print();
            return ExitCode::from(code as u8);
        }
    };
    init_logging(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: failed to start the async runtime: {e}");
            return ExitCode::from(Exit::Internal.code() as u8);
        }
    };
    let quiet = cli.global.quiet;
    let json = cli.global.log_format == LogFormat::Json;
    let result = runtime.block_on(prefsync::run(cli));
    // Don't wait for stray tasks (a blocked stdin reader, say).
    runtime.shutdown_background();
    match result {
        Ok(exit) => ExitCode::from(exit.code() as u8),
        Err(e) => {
            if is_broken_pipe(&e) {
                return ExitCode::SUCCESS;
            }
            let (reports, message) = render(&e);
            let code = exit_for(&e).code();
            if json {
                // Every line on stderr stays a JSON event, the failure too.
                let report = (!quiet && !reports.is_empty()).then(|| reports.join("\n"));
                tracing::error!(exit_code = code, report, "{message}");
            } else {
                if !quiet {
                    for r in reports {
                        eprintln!("{r}");
                    }
                }
                eprintln!("error: {message}");
            }
            ExitCode::from(code as u8)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
