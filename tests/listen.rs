//! `prefsync listen` (issue 15): refused deliveries change nothing, 1,000
//! changes sent through the sandbox's webhooks (duplicates, reordering)
//! reach the mirror exactly, a kill -9 loses no accepted event, an unknown
//! event is kept and counted, and the listener never answers 410.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prefsync::api::Client;
use prefsync::export::sink::{Format, UNANNOUNCED_FIELDS};
use prefsync::export::{ExportOptions, Resource, export};
use prefsync::listen::signature::sign;
use prefsync::listen::{ListenConfig, Listener, Secrets, Status};
use prefsync::sandbox::{Sandbox, SandboxConfig, WebhookConfig};
use prefsync::stop::Stop;
use serde_json::{Value, json};

const SECRET: &str = "whsec_test";

fn config(mirror: &Path) -> ListenConfig {
    ListenConfig {
        mirror: mirror.to_path_buf(),
        beta: "1".into(),
        secrets: Secrets::from_text(&format!("old-secret\n{SECRET}\n")).unwrap(),
        path: "/prefinery".into(),
        tolerance: Duration::from_secs(300),
        max_pending: 100_000,
        drain: Duration::from_secs(10),
    }
}

async fn listener(s: &Sandbox, mirror: &Path) -> Listener {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Listener::start(config(mirror), common::unlimited_client(s), tcp)
        .await
        .unwrap()
}

fn now() -> i64 {
    prefsync::listen::now_unix()
}

async fn post(l: &Listener, body: &[u8], signature: Option<String>) -> u16 {
    let mut r = reqwest::Client::new()
        .post(format!("http://{}/prefinery", l.addr))
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(sig) = signature {
        r = r.header("X-Prefinery-Signature", sig);
    }
    let status = r.send().await.unwrap().status().as_u16();
    assert_ne!(status, 410, "the listener answered 410");
    status
}

async fn wait_status(l: &Listener, what: &str, ok: impl Fn(&Status) -> bool) -> Status {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = l.status();
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: {s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn sql_count(mirror: &Path, sql: &str) -> i64 {
    let c = rusqlite::Connection::open(mirror).unwrap();
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_deliveries_change_nothing() {
    let s = common::sandbox(SandboxConfig {
        rate_scale: 0.0,
        seed_testers: 3,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mirror = dir.path().join("m.sqlite");
    let l = listener(&s, &mirror).await;
    let body =
        json!({"event": "tester_updated", "tester": {"id": 1, "email": "user0@example.com"}})
            .to_string();
    let b = body.as_bytes();
    // A wrong secret, a body changed after signing, a time 10 minutes old,
    // a time in the future, no signature, no v1 entry.
    assert_eq!(
        post(&l, b, Some(sign("not-the-secret", now(), b))).await,
        401
    );
    assert_eq!(post(&l, b"{}", Some(sign(SECRET, now(), b))).await, 401);
    assert_eq!(post(&l, b, Some(sign(SECRET, now() - 600, b))).await, 401);
    assert_eq!(post(&l, b, Some(sign(SECRET, now() + 600, b))).await, 401);
    assert_eq!(post(&l, b, None).await, 401);
    assert_eq!(post(&l, b, Some(format!("t={},v0=00", now()))).await, 401);
    let st = l.shutdown().await.unwrap();
    assert_eq!((st.rejected_signature, st.received), (6, 0));
    assert_eq!(sql_count(&mirror, "SELECT count(*) FROM webhook_events"), 0);
    assert_eq!(sql_count(&mirror, "SELECT count(*) FROM testers"), 0);
    assert_eq!(
        s.app.stats_json()["routes"]["testers.show"],
        Value::Null,
        "no call for a refused delivery"
    );

    // The same delivery signed right (with the second secret of a
    // rotation) is taken and applied: the refusals were the signature's.
    let l = listener(&s, &mirror).await;
    assert_eq!(post(&l, b, Some(sign(SECRET, now(), b))).await, 200);
    wait_status(&l, "applied", |s| s.applied == 1).await;
    l.shutdown().await.unwrap();
    assert_eq!(sql_count(&mirror, "SELECT count(*) FROM testers"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_event_is_journalled_and_counted() {
    let s = common::sandbox(SandboxConfig {
        rate_scale: 0.0,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mirror = dir.path().join("m.sqlite");
    let l = listener(&s, &mirror).await;
    for body in [
        json!({"event": "survey_answered", "tester": {"id": 5}}).to_string(),
        json!({"event": "survey_answered", "tester": {"id": 6}}).to_string(),
        json!({"event": "tester_updated", "note": "names nobody"}).to_string(),
    ] {
        let b = body.as_bytes();
        assert_eq!(post(&l, b, Some(sign(SECRET, now(), b))).await, 200);
    }
    let st = wait_status(&l, "unknown counted", |s| s.unknown == 3).await;
    assert_eq!((st.applied, st.pending), (0, 0));
    l.shutdown().await.unwrap();
    assert_eq!(
        sql_count(
            &mirror,
            "SELECT count(*) FROM webhook_events WHERE state = 'unknown' AND event = 'survey_answered' AND body IS NOT NULL"
        ),
        2
    );
    // Kept across a restart, still counted, never applied.
    let l = listener(&s, &mirror).await;
    assert_eq!(l.status().unknown, 3);
    l.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_mirror_answers_429_never_410() {
    let s = common::sandbox(SandboxConfig {
        rate_scale: 0.0,
        seed_testers: 2,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mirror = dir.path().join("m.sqlite");
    let l = listener(&s, &mirror).await;
    let body = json!({"event": "tester_updated", "tester": {"id": 2}}).to_string();
    let b = body.as_bytes();
    // Another process holds the database's write lock.
    let other = rusqlite::Connection::open(&mirror).unwrap();
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();
    assert_eq!(post(&l, b, Some(sign(SECRET, now(), b))).await, 429);
    other.execute_batch("COMMIT").unwrap();
    drop(other);
    // Sent again (as Prefinery does after a 429): taken.
    assert_eq!(post(&l, b, Some(sign(SECRET, now(), b))).await, 200);
    // And once more: a duplicate, taken, not stored twice.
    assert_eq!(post(&l, b, Some(sign(SECRET, now(), b))).await, 200);
    // Other paths and methods are not 410 either.
    let http = reqwest::Client::new();
    for (m, p) in [
        ("GET", "/prefinery"),
        ("POST", "/other"),
        ("DELETE", "/prefinery"),
    ] {
        let st = http
            .request(m.parse().unwrap(), format!("http://{}{p}", l.addr))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        assert_ne!(st, 410, "{m} {p}");
    }
    let health = http
        .get(format!("http://{}/healthz", l.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let st = wait_status(&l, "applied", |s| s.applied == 1).await;
    assert_eq!((st.refused_busy, st.received, st.duplicates), (1, 2, 1));
    l.shutdown().await.unwrap();
    assert_eq!(sql_count(&mirror, "SELECT count(*) FROM webhook_events"), 1);
}

/// A sandbox that sends its webhooks to `url`: duplicates at 20%,
/// reordered, delayed 0-20 ms, retries 60 times faster than Prefinery's.
async fn webhook_sandbox(url: String) -> Sandbox {
    common::sandbox(SandboxConfig {
        rate_scale: 0.0,
        webhook: Some(WebhookConfig {
            url,
            secret: SECRET.into(),
            duplicate_rate: 0.2,
            reorder: true,
            delay_ms: Some((0, 20)),
            retry_scale: 60.0,
            timeout: Duration::from_secs(15),
        }),
        ..Default::default()
    })
    .await
}

/// 1,000 changes through the API: creates, updates, status changes,
/// check-ins, points, rewards, unsubscriptions and deletes, on 250 users.
async fn make_changes(client: &Client) -> usize {
    let mut n = 0;
    let mut ids = Vec::new();
    for i in 0..250 {
        let status = if i % 3 == 0 { "imported" } else { "applied" };
        let r = client
            .call(
                prefsync::api::Op::TesterCreate,
                Some("1"),
                "betas/1/testers.json",
                &[],
                Some(
                    &json!({"tester": {"email": format!("p{i}@example.org"), "status": status,
                    "profile": {"first_name": format!("P{i}")}}}),
                ),
            )
            .await
            .unwrap();
        let v: Value = r.json(prefsync::api::Op::TesterCreate).unwrap();
        ids.push(v["id"].as_u64().unwrap());
        n += 1;
    }
    let mut round = 0;
    while n < 1000 {
        for (i, id) in ids.clone().iter().enumerate() {
            if n >= 1000 {
                break;
            }
            let email = format!("p{i}@example.org");
            let (op, path, body): (_, String, Value) = match (round + i) % 7 {
                0..=2 => (
                    prefsync::api::Op::TesterUpdate,
                    format!("betas/1/testers/{id}.json"),
                    json!({"tester": {"profile": {"first_name": format!("P{i}-{round}"), "custom_var1": format!("r{round}")}}}),
                ),
                3 => (
                    prefsync::api::Op::TesterUpdate,
                    format!("betas/1/testers/{id}.json"),
                    json!({"tester": {"status": if round % 2 == 0 { "active" } else { "applied" }}}),
                ),
                4 => (
                    prefsync::api::Op::PointCreate,
                    "betas/1/points.json".into(),
                    json!({"email": email, "quantity": 3, "reason": "bench"}),
                ),
                5 => (
                    prefsync::api::Op::RewardCreate,
                    "betas/1/rewards.json".into(),
                    json!({"reward": {"email": email, "descriptor": "early-access"}}),
                ),
                _ => (
                    prefsync::api::Op::TesterCheckin,
                    format!("betas/1/testers/{id}/checkin.json"),
                    json!({}),
                ),
            };
            // A status change the sandbox refuses is no change: not counted.
            if client
                .call(op, Some("1"), &path, &[], Some(&body))
                .await
                .is_ok()
            {
                n += 1;
            }
        }
        round += 1;
    }
    // Deletes and unsubscriptions count among the thousand's last ones.
    for (i, id) in ids.iter().enumerate().take(20) {
        if i % 2 == 0 {
            client
                .call(
                    prefsync::api::Op::TesterDelete,
                    Some("1"),
                    &format!("betas/1/testers/{id}.json"),
                    &[],
                    None,
                )
                .await
                .unwrap();
        } else {
            client
                .call(
                    prefsync::api::Op::SuppressionCreate,
                    Some("1"),
                    "betas/1/suppressions.json",
                    &[],
                    Some(&json!({"email": format!("p{i}@example.org"), "reason": "Unsubscribe"})),
                )
                .await
                .unwrap();
        }
    }
    n + 20
}

/// The records of `table` not deleted, by id, without the fields no
/// webhook announces.
fn records(path: &Path, table: &str) -> std::collections::BTreeMap<i64, Value> {
    let c = rusqlite::Connection::open(path).unwrap();
    let mut st = c
        .prepare(&format!(
            "SELECT id, record FROM {table} WHERE deleted_at IS NULL ORDER BY id"
        ))
        .unwrap();
    st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
        .unwrap()
        .map(|r| {
            let (id, rec) = r.unwrap();
            let mut v: Value = serde_json::from_str(&rec).unwrap();
            for f in UNANNOUNCED_FIELDS {
                v.as_object_mut().unwrap().remove(f);
            }
            (id, v)
        })
        .collect()
}

async fn fresh_export(s: &Sandbox, out: &Path) -> prefsync::export::ExportSummary {
    let opts = ExportOptions::new(
        vec![Resource::Testers, Resource::Rewards, Resource::Points],
        vec!["1".into()],
        Format::Sqlite,
        out.to_path_buf(),
    );
    let summary = export(
        &common::unlimited_client(s),
        &opts,
        Stop::default(),
        std::sync::Arc::new(prefsync::progress::Silent),
    )
    .await
    .unwrap();
    assert!(summary.complete);
    summary
}

/// The mirror holds what a fresh export holds: every user, and the
/// rewards and points of every user who exists. (The rewards and points of
/// a user deleted before the listener read them cannot be read by email
/// any more; the sandbox keeps them, and only an export sees them.)
fn assert_same(mirror: &Path, fresh: &Path) {
    let users = records(fresh, "testers");
    for table in ["testers", "rewards", "points"] {
        let keep = |(id, r): (i64, Value)| {
            (table == "testers" || users.contains_key(&r["user_id"].as_i64().unwrap()))
                .then_some((id, r))
        };
        let m: std::collections::BTreeMap<i64, Value> = records(mirror, table)
            .into_iter()
            .filter_map(keep)
            .collect();
        let f: std::collections::BTreeMap<i64, Value> =
            records(fresh, table).into_iter().filter_map(keep).collect();
        assert!(!f.is_empty(), "{table}: records to compare");
        let only_m: Vec<_> = m.keys().filter(|k| !f.contains_key(k)).collect();
        let only_f: Vec<_> = f.keys().filter(|k| !m.contains_key(k)).collect();
        assert!(
            only_m.is_empty() && only_f.is_empty(),
            "{table}: only in the mirror {only_m:?}, only in the export {only_f:?}"
        );
        for (id, rec) in &f {
            assert_eq!(&m[id], rec, "{table} {id}: field for field");
        }
    }
}

async fn wait_delivered(s: &Sandbox, limit: Duration) {
    let deadline = Instant::now() + limit;
    let hooks = &s.app.webhooks.as_ref().unwrap().stats;
    while hooks.outstanding.load(std::sync::atomic::Ordering::Relaxed) > 0 {
        assert!(
            Instant::now() < deadline,
            "webhooks still outstanding: {}",
            hooks.to_json()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_changes_reach_the_mirror_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mirror = dir.path().join("mirror.sqlite");
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let s = webhook_sandbox(format!("http://{addr}/prefinery")).await;
    let l = Listener::start(config(&mirror), common::unlimited_client(&s), tcp)
        .await
        .unwrap();
    let changes = make_changes(&common::unlimited_client(&s)).await;
    assert!(changes >= 1000);
    let last_change = Instant::now();
    wait_delivered(&s, Duration::from_secs(60)).await;
    wait_status(&l, "all applied", |st| st.pending == 0).await;
    let lag = last_change.elapsed();
    let hooks = s.app.webhooks.as_ref().unwrap().stats.to_json();
    let st = l.shutdown().await.unwrap();
    eprintln!(
        "{changes} changes; mirror current {lag:?} after the last; {st:?}; sender {}",
        {
            let mut h = hooks.clone();
            h["accepted_ids"] = json!(h["accepted_ids"].as_array().unwrap().len());
            h
        }
    );
    assert!(lag < Duration::from_secs(20), "bounded time: {lag:?}");
    assert!(st.duplicates > 100, "duplicates were sent: {st:?}");
    assert_eq!((st.unknown, st.rejected_signature), (0, 0));
    let fresh = dir.path().join("fresh.sqlite");
    fresh_export(&s, &fresh).await;
    assert_same(&mirror, &fresh);
    assert_eq!(records(&mirror, "testers").len(), 240);

    // The nightly export into the mirror reconciles: nothing differed from
    // what the webhooks wrote.
    let differed = |s: &prefsync::export::ExportSummary| {
        s.parts
            .iter()
            .find(|p| p.resource == Resource::Testers)
            .and_then(|p| p.differed)
            .unwrap()
    };
    let night = fresh_export(&s, &mirror).await;
    assert_eq!(differed(&night).total(), 0, "{night}");
    // Two webhooks lost (changes made with none sent): the next one says so.
    s.app.with_world(|w| {
        w.update_user(1, 30, &json!({"profile": {"first_name": "Lost"}}))
            .unwrap();
        w.delete_user(1, 31).unwrap();
        w.changes.as_mut().unwrap().clear();
    });
    let night = fresh_export(&s, &mirror).await;
    let d = differed(&night);
    assert_eq!((d.new, d.changed, d.gone), (0, 1, 1), "{night}");
    assert!(
        night
            .to_string()
            .contains("reconciliation: 2 records differed"),
        "{night}"
    );
}

fn spawn_listener(s: &Sandbox, mirror: &Path, secret_file: &Path, port: u16) -> Child {
    Command::new(assert_cmd::cargo::cargo_bin("prefsync"))
        .args(["listen", "--beta", "1", "--mirror"])
        .arg(mirror)
        .arg("--secret-file")
        .arg(secret_file)
        .args(["--bind", &format!("127.0.0.1:{port}")])
        // The sandbox runs without limits; the documented 60 rewards and
        // points lists a minute would make this test take minutes.
        .args([
            "--rate",
            "rewards-list=100000/1s",
            "--rate",
            "points-list=100000/1s",
        ])
        .env("PREFINERY_BASE_URL", s.base_url())
        .env("PREFINERY_API_KEY", common::KEY)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

async fn wait_healthy(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let http = reqwest::Client::new();
    while http
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the listener did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_no_accepted_event() {
    let dir = tempfile::tempdir().unwrap();
    let mirror = dir.path().join("mirror.sqlite");
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let port = {
        let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        t.local_addr().unwrap().port()
    };
    let s = webhook_sandbox(format!("http://127.0.0.1:{port}/prefinery")).await;
    let mut child = spawn_listener(&s, &mirror, &secret_file, port);
    wait_healthy(port).await;
    let hooks = s.app.webhooks.as_ref().unwrap().stats.clone();
    let client = common::unlimited_client(&s);
    let maker = tokio::spawn(async move { make_changes(&client).await });
    // Killed twice mid-stream, restarted each time.
    for at in [200, 600] {
        while hooks.delivered.load(std::sync::atomic::Ordering::Relaxed) < at {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        child = spawn_listener(&s, &mirror, &secret_file, port);
        wait_healthy(port).await;
    }
    maker.await.unwrap();
    wait_delivered(&s, Duration::from_secs(90)).await;
    // A clean stop (SIGTERM) applies what is journalled.
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("stopped:"), "{stderr}");
    assert!(
        hooks.retried.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the kills were felt"
    );
    // Every event the sandbox saw accepted is in the journal.
    let accepted = hooks.accepted_ids.lock().unwrap().clone();
    let c = rusqlite::Connection::open(&mirror).unwrap();
    let journalled: std::collections::HashSet<String> = c
        .prepare("SELECT json_extract(CAST(body AS TEXT), '$.id') FROM webhook_events")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let lost: Vec<&String> = accepted
        .iter()
        .filter(|id| !journalled.contains(*id))
        .collect();
    assert!(lost.is_empty(), "accepted but not journalled: {lost:?}");
    let pending: i64 = c
        .query_row(
            "SELECT count(*) FROM webhook_events WHERE state = 'pending'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        pending, 0,
        "a clean stop applies what is journalled: {stderr}"
    );
    let fresh = dir.path().join("fresh.sqlite");
    fresh_export(&s, &fresh).await;
    assert_same(&mirror, &fresh);
}
