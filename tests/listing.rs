//! Listing the project (`--resolve list`) is a phase like any other: it
//! shows progress, stops on the time budget and on Ctrl-C (the engine's
//! stopped outcome, exit 5), and a resumed run lists only the pages left.
//! Against the sandbox enforcing its limits at 10x (10 pages a second).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prefsync::engine::{Event, Subscriber};
use prefsync::import::input::Source;
use prefsync::import::{ImportOptions, Resolve, import};
use prefsync::sandbox::{Sandbox, SandboxConfig};
use prefsync::stop::Stop;

/// 10x the documented limits: testers-list 10 a second.
const SCALE: f64 = 10.0;
const RATES: [&str; 3] = ["testers-list=10/1s", "account-list=30/1s", "betas=100/1s"];
/// 48 pages of 25: 4.8 s of listing.
const USERS: usize = 1_200;

async fn sandbox() -> Sandbox {
    common::sandbox(SandboxConfig {
        rate_scale: SCALE,
        seed_testers: USERS,
        ..Default::default()
    })
    .await
}

/// Testers-list calls the sandbox answered so far.
fn list_calls(s: &Sandbox) -> u64 {
    s.app.stats_json()["routes"]["testers.list"]["200"]
        .as_u64()
        .unwrap_or(0)
}

/// (phase, done, total, users) of each progress event.
#[derive(Default)]
struct Recorder(Mutex<Vec<(&'static str, u64, u64, u64)>>);

impl Subscriber for Recorder {
    fn event(&self, e: &Event<'_>) -> anyhow::Result<()> {
        if let Event::Progress(s) = e {
            self.0
                .lock()
                .unwrap()
                .push((s.phase, s.done, s.total, s.items.map_or(0, |i| i.done)));
        }
        Ok(())
    }
}

fn options(dir: &std::path::Path) -> ImportOptions {
    // Rows naming existing users (renamed: an update each) and new ones.
    let mut csv = String::from("email,first_name\n");
    for i in 1..=20 {
        csv.push_str(&format!("user{i}@example.com,Renamed{i}\n"));
    }
    for i in 0..5 {
        csv.push_str(&format!("new{i}@x.io,New\n"));
    }
    let file = dir.join("in.csv");
    std::fs::write(&file, csv).unwrap();
    let mut o = ImportOptions::new("a9b8c7de", Source::File(file), dir.join("ck.sqlite"));
    o.resolve = Some(Resolve::List);
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_stops_on_the_time_budget_and_resumes_where_it_stopped() {
    let s = sandbox().await;
    let client = common::client_for(&s.base_url(), common::KEY, &RATES);
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path());
    o.max_duration = Some(Duration::from_millis(1_500));
    let events = Arc::new(Recorder::default());

    let t = Instant::now();
    let first = import(&client, &o, Stop::default(), events.clone())
        .await
        .unwrap();
    let took = t.elapsed();
    assert!(first.stopped, "the budget stops the listing");
    assert_eq!(
        prefsync::cmd::import::exit_of(&first),
        prefsync::exit::Exit::Resumable,
        "exit 5"
    );
    assert!(
        took < Duration::from_millis(2_500),
        "stopped after {took:?}"
    );
    assert_eq!(first.created + first.updated, 0, "nothing sent yet");
    let listed_first = list_calls(&s);
    assert!(
        (5..40).contains(&listed_first),
        "{listed_first} pages listed in 1.5 s at 10 a second"
    );

    // Progress while listing: pages of the total, users, rising.
    let seen = events.0.lock().unwrap().clone();
    let listing: Vec<_> = seen.iter().filter(|e| e.0 == "listing").collect();
    assert!(listing.len() >= 5, "{seen:?}");
    assert!(listing.iter().skip(1).all(|e| e.2 == 48), "{listing:?}");
    assert!(
        listing
            .windows(2)
            .all(|w| w[1].1 >= w[0].1 && w[1].3 >= w[0].3)
    );
    assert!(listing.last().unwrap().3 >= 100, "{listing:?}");

    // The same command again lists only the pages left, then sends.
    let mut o = o.clone();
    o.max_duration = None;
    let events = Arc::new(Recorder::default());
    let second = import(&client, &o, Stop::default(), events.clone())
        .await
        .unwrap();
    assert!(!second.stopped && second.resumed);
    assert_eq!((second.updated, second.created), (20, 5));
    let listed_second = list_calls(&s) - listed_first;
    // A page whose answer the stop dropped is asked again: at most one.
    assert!(
        (48 - listed_first..=48 - listed_first + 1).contains(&listed_second),
        "{listed_first} pages listed, then {listed_second}"
    );
    let seen = events.0.lock().unwrap().clone();
    let resumed_at = seen.iter().find(|e| e.0 == "listing").unwrap();
    assert!(resumed_at.1 + 1 >= listed_first, "{resumed_at:?}");
    assert!(seen.iter().any(|e| e.0 == "sending"), "{seen:?}");
}

/// Ctrl-C triggers the run's stop: the listing ends at once, resumable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_stops_on_ctrl_c() {
    let s = sandbox().await;
    let client = common::client_for(&s.base_url(), common::KEY, &RATES);
    let dir = tempfile::tempdir().unwrap();
    let o = options(dir.path());
    let stop = Stop::default();
    let trigger = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(800)).await;
        trigger.trigger();
    });
    let t = Instant::now();
    let first = import(&client, &o, stop, Arc::new(Recorder::default()))
        .await
        .unwrap();
    assert!(first.stopped);
    assert!(
        t.elapsed() < Duration::from_millis(1_800),
        "{:?}",
        t.elapsed()
    );
    assert!(list_calls(&s) < 20);
}

/// What the process shows: exit 5 within about the budget, and log lines
/// of the listing's progress before it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_exits_5_within_the_budget_and_logs_the_listing() {
    let s = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let o = options(dir.path());
    let Source::File(file) = &o.source else {
        unreachable!()
    };
    let mut c = assert_cmd::Command::cargo_bin("prefsync").unwrap();
    c.env_remove("PREFINERY_BETA")
        .env("PREFINERY_API_KEY", common::KEY)
        .env("PREFINERY_BASE_URL", s.base_url())
        .timeout(Duration::from_secs(60))
        .args([
            "import",
            "testers",
            "--beta",
            "a9b8c7de",
            "--resolve",
            "list",
        ])
        .arg("--file")
        .arg(file)
        .arg("--checkpoint")
        .arg(dir.path().join("ck.sqlite"))
        .args(["--max-duration", "2s"]);
    for r in RATES {
        c.args(["--rate", r]);
    }
    let t = Instant::now();
    let out = tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap();
    let took = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(took < Duration::from_secs(4), "{took:?}: {stderr}");
    assert!(stderr.contains("listing: pages"), "{stderr}");
    assert!(
        stderr.contains("stopped while listing the project"),
        "{stderr}"
    );
}
