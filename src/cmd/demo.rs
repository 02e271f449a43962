//! `prefsync demo`: starts the sandbox in-process and runs the main job
//! against it, so a fresh machine with no key and no network shows what
//! prefsync does. The sample file and its map are built into the binary.

use std::sync::Arc;

use anyhow::Context;

use crate::api::{ApiKey, Client, Limiter, RetryPolicy};
use crate::cli::DemoArgs;
use crate::engine::Subscriber;
use crate::exit::Exit;
use crate::export::sink::Format;
use crate::export::{ExportOptions, Resource, export};
use crate::import::input::Source;
use crate::import::{ImportOptions, import};
use crate::sandbox::{DEFAULT_KEY, Sandbox, SandboxConfig};
use crate::stop::Stop;

const WAITLIST: &str = include_str!("../../samples/waitlist.csv");
const MAP: &str = include_str!("../../samples/map.toml");
/// The sample's bad rows: no email, a malformed email, a duplicate, an
/// unknown status, an impossible date.
const EXPECTED_REJECTED: u64 = 5;

pub async fn run(args: &DemoArgs, progress: Arc<dyn Subscriber>) -> anyhow::Result<Exit> {
    let dir = &args.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let csv = dir.join("waitlist.csv");
    let map = dir.join("map.toml");
    std::fs::write(&csv, WAITLIST)?;
    std::fs::write(&map, MAP)?;

    // The documented limits, 60 times faster, so the demo takes seconds.
    let sandbox = Sandbox::start(
        SandboxConfig {
            rate_scale: 60.0,
            ..Default::default()
        },
        0,
    )
    .await?;
    eprintln!(
        "demo: sandbox running at {} (project a9b8c7de)",
        sandbox.base_url()
    );
    let client = Client::new(
        sandbox.base_url().parse()?,
        ApiKey::new(DEFAULT_KEY),
        Limiter::new(&[
            "testers-list=60/1s".parse().unwrap(),
            "account-list=180/1s".parse().unwrap(),
            "rewards-list=60/1s".parse().unwrap(),
            "points-list=60/1s".parse().unwrap(),
            "betas=90/15s".parse().unwrap(),
        ]),
        RetryPolicy::default(),
    );

    let mut opts = ImportOptions::new(
        "a9b8c7de",
        Source::File(csv.clone()),
        dir.join("checkpoint.sqlite"),
    );
    opts.map = Some(map.clone());
    // Each demo starts a new, empty sandbox: start a new run too.
    opts.fresh = true;
    opts.errors = Some(dir.join("rejected-rows.csv"));
    opts.results = Some(dir.join("results.csv"));
    eprintln!(
        "demo: prefsync import testers --beta a9b8c7de --file {} --map {}",
        csv.display(),
        map.display()
    );
    let summary = import(&client, &opts, Stop::default(), progress).await?;
    eprint!("{summary}");

    let (users, emails) = sandbox
        .app
        .with_world(|w| (w.project(1).users.len(), w.outbox.len()));
    eprintln!(
        "demo: the sandbox now holds {users} users; emails Prefinery would have sent: {emails}"
    );

    // Then back out: the whole project into one SQLite file.
    let db = dir.join("demo.sqlite");
    eprintln!(
        "demo: prefsync export all --beta a9b8c7de --format sqlite --out {}",
        db.display()
    );
    let export_opts = {
        let mut o = ExportOptions::new(
            vec![
                Resource::Testers,
                Resource::Rewards,
                Resource::Suppressions,
                Resource::Points,
            ],
            vec!["a9b8c7de".into()],
            Format::Sqlite,
            db.clone(),
        );
        o.fresh = true;
        o
    };
    let exported = export(
        &client,
        &export_opts,
        Stop::default(),
        Arc::new(crate::progress::Silent),
    )
    .await?;
    eprint!("{exported}");
    sandbox.shutdown().await;
    eprintln!("demo: try these on {}:", db.display());
    eprintln!(
        "  sqlite3 {} \"SELECT status, count(*) FROM testers WHERE deleted_at IS NULL GROUP BY status\"",
        db.display()
    );
    eprintln!(
        "  sqlite3 {} \"SELECT email, json_extract(record, '$.profile.employer') AS employer FROM testers WHERE json_extract(record, '$.profile.country') = 'NO' LIMIT 5\"",
        db.display()
    );

    let as_intended = summary.rejected == EXPECTED_REJECTED
        && summary.created as usize == users
        && exported.complete
        && exported.rows as usize == users
        && summary.pending == 0
        && emails == 0;
    if as_intended {
        eprintln!(
            "demo: done. The {EXPECTED_REJECTED} bad rows of the sample are in {} with the reason for each.",
            dir.join("rejected-rows.csv").display()
        );
        Ok(Exit::Done)
    } else {
        eprintln!("demo: the run did not go as intended (see above)");
        Ok(Exit::Internal)
    }
}
