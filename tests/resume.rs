//! Interrupted imports resume with nobody created twice and nobody skipped:
//! kill -9 of a real process mid-run, Ctrl-C (SIGINT), and the lock against
//! a second run.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prefsync::sandbox::{Sandbox, SandboxConfig};

const ROWS: usize = 1200;

/// Imports `dir/NAME.csv`, with its checkpoint and summary beside it.
fn spawn_import(s: &Sandbox, dir: &std::path::Path, name: &str) -> Child {
    spawn_import_with(s, dir, name, &[])
}

fn spawn_import_with(s: &Sandbox, dir: &std::path::Path, name: &str, extra: &[&str]) -> Child {
    Command::new(assert_cmd::cargo::cargo_bin("prefsync"))
        .args([
            "import",
            "testers",
            "--beta",
            "1",
            "--concurrency",
            "8",
            "-q",
        ])
        // The sandbox enforces the documented limits at 60x.
        .args([
            "--rate",
            "testers-list=60/1s",
            "--rate",
            "account-list=180/1s",
            "--rate",
            "betas=90/15s",
            "--file",
        ])
        .arg(dir.join(format!("{name}.csv")))
        .arg("--checkpoint")
        .arg(dir.join(format!("{name}.ck.sqlite")))
        .arg("--summary-json")
        .arg(dir.join(format!("{name}.summary.json")))
        .args(extra)
        .env("PREFINERY_BASE_URL", s.base_url())
        .env("PREFINERY_API_KEY", common::KEY)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `ROWS` people, their first names prefixed with `prefix`.
fn write_input(dir: &std::path::Path, name: &str, prefix: &str) {
    let mut text = String::from("email,first_name\n");
    for i in 0..ROWS {
        text.push_str(&format!("person{i}@example.org,{prefix}{i}\n"));
    }
    std::fs::write(dir.join(format!("{name}.csv")), text).unwrap();
}

fn summary(dir: &std::path::Path, name: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.summary.json"))).unwrap())
        .unwrap()
}

async fn wait_for_users(s: &Sandbox, n: usize) {
    wait_for(s, n, |_| true).await
}

/// Waits until `n` users of project 1 match `pred`.
async fn wait_for(s: &Sandbox, n: usize, pred: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::users(s, 1).iter().filter(|u| pred(u)).count() < n {
        assert!(Instant::now() < deadline, "the import made no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A sandbox enforcing the documented limits at 60x, with some latency,
/// and a folder for the run's files.
async fn limited_sandbox() -> (Sandbox, tempfile::TempDir) {
    let s = common::sandbox(SandboxConfig {
        latency_ms: Some((2, 8)),
        rate_scale: 60.0,
        ..Default::default()
    })
    .await;
    (s, tempfile::tempdir().unwrap())
}

async fn finish(child: Child) -> (i32, String) {
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_exactly_once(s: &Sandbox) {
    let users = common::users(s, 1);
    assert_eq!(users.len(), ROWS, "nobody skipped");
    let stats = s.app.stats_json();
    let creates = &stats["routes"]["testers.create"];
    assert!(
        creates.get("422").is_none(),
        "a create was sent twice: {creates}"
    );
    assert_eq!(creates["201"].as_u64().unwrap() as usize, ROWS, "{creates}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_then_resume() {
    let (s, dir) = limited_sandbox().await;
    write_input(dir.path(), "in", "P");
    for stop_at in [200, 700] {
        let mut child = spawn_import(&s, dir.path(), "in");
        wait_for_users(&s, stop_at).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let n = common::users(&s, 1).len();
        assert!(n < ROWS, "killed before the end ({n})");
    }
    let (code, stderr) = finish(spawn_import(&s, dir.path(), "in")).await;
    assert_eq!(code, 0, "{stderr}");
    let summary = summary(dir.path(), "in");
    assert_eq!(summary["resumed"], true);
    assert_eq!(
        summary["created"].as_u64().unwrap() as usize,
        ROWS,
        "{summary}"
    );
    assert_exactly_once(&s);
}

/// `--mode create` resolves nothing, except the rows in flight at the kill:
/// the resume finds them by listing the project when that is cheaper than a
/// lookup each, and creates nobody twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_create_mode_resumes_by_listing() {
    let (s, dir) = limited_sandbox().await;
    write_input(dir.path(), "in", "P");
    let mode = ["--mode", "create"];
    let mut child = spawn_import_with(&s, dir.path(), "in", &mode);
    wait_for_users(&s, 300).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let (code, stderr) = finish(spawn_import_with(&s, dir.path(), "in", &mode)).await;
    assert_eq!(code, 0, "{stderr}");
    let summary = summary(dir.path(), "in");
    assert_eq!(
        summary["created"].as_u64().unwrap() as usize,
        ROWS,
        "{summary}"
    );
    assert_exactly_once(&s);
    // No more list calls than pages of what existed at the resume.
    let lists = s.app.stats_json()["routes"]["testers.list"]["200"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        lists <= (ROWS as u64).div_ceil(25) + 1,
        "{lists} list calls"
    );
}

/// Every row labelled right across kills too: a user updated just before
/// the kill is `updated` on resume, not `unchanged`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_update_then_resume() {
    let (s, dir) = limited_sandbox().await;
    write_input(dir.path(), "first", "P");
    let (code, stderr) = finish(spawn_import(&s, dir.path(), "first")).await;
    assert_eq!(code, 0, "{stderr}");

    write_input(dir.path(), "second", "Q");
    let renamed = |u: &serde_json::Value| {
        u["profile"]["first_name"]
            .as_str()
            .is_some_and(|n| n.starts_with('Q'))
    };
    for stop_at in [150, 600] {
        let mut child = spawn_import(&s, dir.path(), "second");
        wait_for(&s, stop_at, renamed).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    let (code, stderr) = finish(spawn_import(&s, dir.path(), "second")).await;
    assert_eq!(code, 0, "{stderr}");
    let summary = summary(dir.path(), "second");
    assert_eq!(summary["resumed"], true);
    assert_eq!(
        summary["updated"].as_u64().unwrap() as usize,
        ROWS,
        "{summary}"
    );
    assert_eq!(summary["created"], 0, "{summary}");
    let users = common::users(&s, 1);
    assert_eq!(users.len(), ROWS);
    assert!(users.iter().all(renamed));
    assert_exactly_once(&s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_with_exit_5_and_the_lock_holds_off_a_second_run() {
    let (s, dir) = limited_sandbox().await;
    write_input(dir.path(), "in", "P");
    let child = spawn_import(&s, dir.path(), "in");
    wait_for_users(&s, 100).await;

    // A second run on the same checkpoint is refused with exit 6.
    let (code, stderr) = finish(spawn_import(&s, dir.path(), "in")).await;
    assert_eq!(code, 6, "{stderr}");
    assert!(stderr.contains(&format!("pid {}", child.id())), "{stderr}");

    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let (code, stderr) = finish(child).await;
    assert_eq!(code, 5, "{stderr}");
    assert!(
        stderr.contains("run the same command again to resume"),
        "{stderr}"
    );
    let n = common::users(&s, 1).len();
    assert!(n < ROWS);

    let (code, stderr) = finish(spawn_import(&s, dir.path(), "in")).await;
    assert_eq!(code, 0, "{stderr}");
    assert_exactly_once(&s);
}

/// SIGTERM (what cron, systemd and container runtimes send) stops a run
/// as Ctrl-C does: the calls in flight finish, exit 5, and the same
/// command again finishes it with nobody created twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_with_exit_5() {
    let (s, dir) = limited_sandbox().await;
    write_input(dir.path(), "in", "P");
    let child = spawn_import(&s, dir.path(), "in");
    wait_for_users(&s, 100).await;
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let (code, stderr) = finish(child).await;
    assert_eq!(code, 5, "{stderr}");
    assert_eq!(summary(dir.path(), "in")["stopped"], true);
    assert!(common::users(&s, 1).len() < ROWS);
    let (code, stderr) = finish(spawn_import(&s, dir.path(), "in")).await;
    assert_eq!(code, 0, "{stderr}");
    assert_exactly_once(&s);
}
