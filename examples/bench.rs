//! Benchmarks that print figures (not timed tests: these machines are
//! noisy; run each a few times and quote the median). `bench/run.sh` runs
//! them all in release mode.
//!
//! ```sh
//! cargo run --release --example bench -- sandbox-rps [SECS] [CONCURRENCY]
//! cargo run --release --example bench -- import [ROWS] [CONCURRENCY]
//! cargo run --release --example bench -- checkpoint [ROWS]
//! cargo run --release --example bench -- limiter [PAGES]
//! cargo run --release --example bench -- export-local [USERS]
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prefsync::api::{ApiKey, Client, Limiter, RateOverride, RetryPolicy, TesterInput};
use prefsync::checkpoint::{Checkpoint, RowUpdate};
use prefsync::export::sink::Format;
use prefsync::export::{ExportOptions, Resource, export};
use prefsync::import::input::Source;
use prefsync::import::{ImportOptions, Mode, import};
use prefsync::progress::Silent;
use prefsync::sandbox::{DEFAULT_KEY, Sandbox, SandboxConfig};
use prefsync::stop::Stop;

fn arg(i: usize, default: u64) -> u64 {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn unlimited(base: &str) -> Client {
    let rates: Vec<RateOverride> = [
        "testers-list=1000000/1s",
        "account-list=1000000/1s",
        "rewards-list=1000000/1s",
        "points-list=1000000/1s",
        "betas=1000000/1s",
    ]
    .iter()
    .map(|r| r.parse().unwrap())
    .collect();
    Client::new(
        base.parse().unwrap(),
        ApiKey::new(DEFAULT_KEY),
        Limiter::new(&rates),
        RetryPolicy::default(),
    )
}

/// Simple requests per second the sandbox serves (show one user), limits off.
async fn sandbox_rps(secs: u64, concurrency: u64) {
    let s = Sandbox::start(
        SandboxConfig {
            rate_scale: 0.0,
            seed_testers: 100,
            ..Default::default()
        },
        0,
    )
    .await
    .unwrap();
    let url = format!("{}/betas/1/testers/1.json", s.base_url());
    let http = reqwest::Client::new();
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (http, url, done) = (http.clone(), url.clone(), done.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let r = http
                        .get(&url)
                        .basic_auth(DEFAULT_KEY, Some(""))
                        .send()
                        .await
                        .unwrap();
                    assert!(r.status().is_success());
                    r.bytes().await.unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let n = done.load(Ordering::Relaxed);
    println!(
        "sandbox-rps: {:.0} requests/s ({n} GET show-user in {:.1}s, {concurrency} connections, client in the same process)",
        n as f64 / start.elapsed().as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
}

/// The import engine against a bare HTTP load of the same creates at the
/// same concurrency, into a sandbox with no rate limit.
async fn import_vs_bare(rows: u64, concurrency: u64) {
    let dir = match std::env::var("BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d).unwrap(),
        Err(_) => tempfile::tempdir().unwrap(),
    };
    let csv = dir.path().join("in.csv");
    let mut text = String::from("email,first_name,last_name,country\n");
    for i in 0..rows {
        text.push_str(&format!("bench{i}@example.com,First{i},Last{i},NO\n"));
    }
    std::fs::write(&csv, text).unwrap();

    // The import (checkpoint, CSV, mapping, workers).
    let s = Sandbox::start(
        SandboxConfig {
            rate_scale: 0.0,
            ..Default::default()
        },
        0,
    )
    .await
    .unwrap();
    let mut o = ImportOptions::new("1", Source::File(csv.clone()), dir.path().join("ck.sqlite"));
    o.concurrency = concurrency as usize;
    o.mode = Mode::Create;
    let t = Instant::now();
    let sum = import(
        &unlimited(&s.base_url()),
        &o,
        Stop::default(),
        Arc::new(Silent),
    )
    .await
    .unwrap();
    let import_secs = t.elapsed().as_secs_f64();
    assert_eq!(sum.created, rows);
    s.shutdown().await;

    // The same creates, bare: pre-built bodies, N tasks, one reqwest client.
    let s = Sandbox::start(
        SandboxConfig {
            rate_scale: 0.0,
            ..Default::default()
        },
        0,
    )
    .await
    .unwrap();
    let url = format!("{}/betas/1/testers.json", s.base_url());
    let http = reqwest::Client::new();
    let next = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (http, url, next) = (http.clone(), url.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= rows {
                        return;
                    }
                    let mut input = TesterInput {
                        email: Some(format!("bench{i}@example.com")),
                        status: Some("imported".into()),
                        ..Default::default()
                    };
                    input
                        .profile
                        .insert("first_name".into(), format!("First{i}").into());
                    input
                        .profile
                        .insert("last_name".into(), format!("Last{i}").into());
                    input.profile.insert("country".into(), "NO".into());
                    let r = http
                        .post(&url)
                        .basic_auth(DEFAULT_KEY, Some(""))
                        .header("content-type", "application/json")
                        .body(input.to_body().to_string())
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 201);
                    r.bytes().await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let bare_secs = t.elapsed().as_secs_f64();
    let (a, b) = (rows as f64 / import_secs, rows as f64 / bare_secs);
    println!(
        "import: {a:.0} rows/s importing {rows} rows (concurrency {concurrency}, checkpointed)"
    );
    println!(
        "bare-http: {b:.0} requests/s for the same creates (concurrency {concurrency}, no CSV, no checkpoint)"
    );
    println!("import/bare ratio: {:.2}", a / b);
}

/// The checkpoint alone: rows/s it absorbs for the work the import gives it
/// per row (planned, marked sending, marked done), batched as the import
/// batches them.
fn checkpoint_only(rows: u64) {
    let dir = tempfile::tempdir().unwrap();
    let ck = Checkpoint::open(&dir.path().join("ck.sqlite")).unwrap();
    let run = ck
        .new_run("import", "bench", None, None, "1", "{}")
        .unwrap();
    let t = Instant::now();
    ck.begin().unwrap();
    for i in 0..rows {
        ck.plan_row(run, i + 2, &format!("bench{i}@example.com"))
            .unwrap();
        if i % 5000 == 4999 {
            ck.commit().unwrap();
            ck.begin().unwrap();
        }
    }
    ck.commit().unwrap();
    let plan = t.elapsed().as_secs_f64();
    // The writer sees about `concurrency` messages per batch.
    let t = Instant::now();
    for chunk in (0..rows).collect::<Vec<_>>().chunks(8) {
        ck.begin().unwrap();
        for i in chunk {
            ck.apply(
                run,
                &RowUpdate::Sending {
                    line: i + 2,
                    intent: "create",
                },
            )
            .unwrap();
        }
        ck.commit().unwrap();
        ck.begin().unwrap();
        for i in chunk {
            ck.apply(
                run,
                &RowUpdate::Done {
                    line: i + 2,
                    action: "created",
                    tester_id: i + 1,
                },
            )
            .unwrap();
        }
        ck.commit().unwrap();
    }
    let send = t.elapsed().as_secs_f64();
    let total = plan + send;
    println!(
        "checkpoint: {:.0} rows/s alone ({:.1} µs a row: planning {:.1} µs, sending+done {:.1} µs, batches of 8)",
        rows as f64 / total,
        total / rows as f64 * 1e6,
        plan / rows as f64 * 1e6,
        send / rows as f64 * 1e6
    );
}

/// The testers-list rate against the sandbox enforcing the documented
/// limit at 60x (60 per second).
async fn limiter(pages: u64) {
    let s = Sandbox::start(
        SandboxConfig {
            rate_scale: 60.0,
            seed_testers: (pages * 25) as usize,
            ..Default::default()
        },
        0,
    )
    .await
    .unwrap();
    let rates: Vec<RateOverride> = ["testers-list=60/1s", "account-list=180/1s", "betas=90/15s"]
        .iter()
        .map(|r| r.parse().unwrap())
        .collect();
    let client = Client::new(
        s.base_url().parse().unwrap(),
        ApiKey::new(DEFAULT_KEY),
        Limiter::new(&rates),
        RetryPolicy::default(),
    );
    let dir = tempfile::tempdir().unwrap();
    let o = ExportOptions::new(
        vec![Resource::Testers],
        vec!["1".into()],
        Format::Jsonl,
        dir.path().join("t.jsonl"),
    );
    let sum = export(&client, &o, Stop::default(), Arc::new(Silent))
        .await
        .unwrap();
    let stats = s.app.stats_json();
    let w = &stats["windows"]["testers-list:1"];
    println!(
        "limiter: testers-list utilisation {:.4} of 60/s (the documented 60/min at --rate-scale 60), max {} requests in any 1 s window, {} throttled, {} pages",
        w["utilisation"].as_f64().unwrap(),
        w["max_in_any_window"],
        stats["throttled"],
        sum.pages
    );
}

/// Local cost per exported page: time writing pages, outside the network
/// and the limiter, for each format.
async fn export_local(users: u64) {
    let s = Sandbox::start(
        SandboxConfig {
            rate_scale: 0.0,
            seed_testers: users as usize,
            ..Default::default()
        },
        0,
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for format in [Format::Csv, Format::Jsonl, Format::Sqlite] {
        let o = ExportOptions::new(
            vec![Resource::Testers],
            vec!["1".into()],
            format,
            dir.path().join(format!("t.{format:?}")),
        );
        let t = Instant::now();
        let sum = export(
            &unlimited(&s.base_url()),
            &o,
            Stop::default(),
            Arc::new(Silent),
        )
        .await
        .unwrap();
        let secs = t.elapsed().as_secs_f64();
        println!(
            "export-local {format:?}: {:.2} ms a page writing ({} pages, {} users, {:.1}s in all, {:.0} users/s with no rate limit)",
            sum.local_secs / sum.pages as f64 * 1e3,
            sum.pages,
            sum.rows,
            secs,
            sum.rows as f64 / secs
        );
    }
}

#[tokio::main]
async fn main() {
    let which = std::env::args().nth(1).unwrap_or_default();
    match which.as_str() {
        "sandbox-rps" => sandbox_rps(arg(2, 5), arg(3, 32)).await,
        "import" => import_vs_bare(arg(2, 100_000), arg(3, 8)).await,
        "checkpoint" => checkpoint_only(arg(2, 100_000)),
        "limiter" => limiter(arg(2, 300)).await,
        "export-local" => export_local(arg(2, 100_000)).await,
        _ => {
            eprintln!("usage: bench sandbox-rps|import|checkpoint|limiter|export-local [ARGS]");
            std::process::exit(2);
        }
    }
}
