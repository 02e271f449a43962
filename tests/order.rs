//! Creates sent oldest signup first: the order Prefinery receives them in
//! (the sandbox numbers users as it creates them), at --concurrency 8, in
//! bounded memory (rows read back by offset), across a kill -9; and
//! referrers linked from this run's results with --link-referrers.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prefsync::engine::Order;
use prefsync::import::input::Source;
use prefsync::import::{ImportOptions, ImportSummary, import};
use prefsync::progress::Silent;
use prefsync::sandbox::{Sandbox, SandboxConfig};
use prefsync::stop::Stop;
use serde_json::Value;

const MAP: &str = r#"
order_by = "profile.signed_up_at"
strict_order = true

[columns]
"joined" = { to = "profile.signed_up_at", date = ["%d/%m/%Y %H:%M", "auto"] }
"code" = "profile.source_referral_code"
"referred_by" = "profile.source_referrer"

[referrals]
referrer = "profile.source_referrer"
matches = "profile.source_referral_code"
"#;

/// `n` people whose signup times are a scramble of the file's order (a
/// fixed permutation), some written day-first, a few with no date at all.
fn write_people(dir: &Path, n: usize) -> PathBuf {
    let mut text = String::from("email,first_name,joined,code,referred_by\n");
    for i in 0..n {
        // 7919 is prime: i -> i*7919 mod n visits every minute once.
        let minute = (i * 7919) % n;
        let joined = if i % 50 == 49 {
            String::new()
        } else if i % 3 == 0 {
            // Day-first, as some tools write it.
            let t =
                chrono::DateTime::from_timestamp(1_700_000_000 + minute as i64 * 60, 0).unwrap();
            t.format("%d/%m/%Y %H:%M").to_string()
        } else {
            chrono::DateTime::from_timestamp(1_700_000_000 + minute as i64 * 60, 0)
                .unwrap()
                .to_rfc3339()
        };
        text.push_str(&format!("p{i}@example.org,P{i},{joined},c{i},\n"));
    }
    let path = dir.join("people.csv");
    std::fs::write(&path, text).unwrap();
    path
}

/// The users of project 1 in the order the sandbox created them.
fn created_order(s: &Sandbox) -> Vec<Value> {
    let mut users = common::users(s, 1);
    users.sort_by_key(|u| u["id"].as_u64().unwrap());
    users
}

/// The signup times of users in creation order: each no earlier than the
/// one before, users without one last.
fn assert_oldest_first(users: &[Value]) {
    let key = |u: &Value| {
        u["profile"]["signed_up_at"]
            .as_str()
            .map(|s| chrono::DateTime::parse_from_rfc3339(s).unwrap().timestamp())
            .unwrap_or(i64::MAX)
    };
    for w in users.windows(2) {
        assert!(
            key(&w[0]) <= key(&w[1]),
            "{} ({:?}) was created before {} ({:?})",
            w[0]["email"],
            w[0]["profile"]["signed_up_at"],
            w[1]["email"],
            w[1]["profile"]["signed_up_at"]
        );
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    sandbox: Sandbox,
}

impl Fixture {
    async fn new(latency: Option<(u64, u64)>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("map.toml"), MAP).unwrap();
        Fixture {
            dir,
            sandbox: common::sandbox(SandboxConfig {
                rate_scale: 0.0,
                latency_ms: latency,
                ..Default::default()
            })
            .await,
        }
    }

    fn opts(&self, file: &Path) -> ImportOptions {
        let mut o = ImportOptions::new(
            "1",
            Source::File(file.to_path_buf()),
            self.dir.path().join("ck.sqlite"),
        );
        o.map = Some(self.dir.path().join("map.toml"));
        o.results = Some(self.dir.path().join("results.csv"));
        o.concurrency = 8;
        o
    }

    async fn run(&self, o: &ImportOptions) -> anyhow::Result<ImportSummary> {
        import(
            &common::unlimited_client(&self.sandbox),
            o,
            Stop::default(),
            Arc::new(Silent),
        )
        .await
    }

    fn results(&self) -> Vec<Vec<String>> {
        let mut r = csv::Reader::from_path(self.dir.path().join("results.csv")).unwrap();
        r.records()
            .map(|r| r.unwrap().iter().map(str::to_string).collect())
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_order_creates_oldest_signup_first_at_concurrency_8() {
    // Latency that varies call to call would let concurrent creates
    // overtake each other; the strict order must not.
    let f = Fixture::new(Some((0, 3))).await;
    let file = write_people(f.dir.path(), 400);
    let s = f.run(&f.opts(&file)).await.unwrap();
    assert_eq!(s.created, 400, "{s:?}");
    let users = created_order(&f.sandbox);
    assert_eq!(users.len(), 400);
    assert_oldest_first(&users);
    // The results file still reports the file's lines, in the file's order.
    let results = f.results();
    assert_eq!(results.len(), 400);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r[0], (i + 2).to_string(), "{r:?}");
        assert_eq!(r[1], format!("p{i}@example.org"), "{r:?}");
        assert_eq!(r[2], "created", "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_order_stays_when_asked_and_sorted_needs_a_field() {
    let f = Fixture::new(None).await;
    let file = write_people(f.dir.path(), 60);
    let mut o = f.opts(&file);
    o.order = Some(Order::File);
    o.concurrency = 1;
    f.run(&o).await.unwrap();
    let users = created_order(&f.sandbox);
    let emails: Vec<_> = users.iter().map(|u| u["email"].as_str().unwrap()).collect();
    let expected: Vec<_> = (0..60).map(|i| format!("p{i}@example.org")).collect();
    assert_eq!(emails, expected);

    // No order_by in the map: sorting is refused before any call.
    let plain = f.dir.path().join("plain.toml");
    std::fs::write(&plain, "[columns]\n\"joined\" = \"ignore\"\n").unwrap();
    let mut o = f.opts(&file);
    o.map = Some(plain);
    o.order = Some(Order::Sorted);
    o.checkpoint = f.dir.path().join("other.sqlite");
    let before = f.sandbox.app.stats_json();
    let err = f.run(&o).await.unwrap_err();
    assert!(format!("{err:#}").contains("order_by"), "{err:#}");
    assert_eq!(
        before["routes"]["testers.create"],
        f.sandbox.app.stats_json()["routes"]["testers.create"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_are_linked_from_this_runs_results() {
    let f = Fixture::new(None).await;
    // Ann (c-ann) signed up first; Bob names her; Cy names a code no row
    // has; Dee names Eve, who signed up after Dee; Eve names nobody.
    let text = "email,joined,code,referred_by\n\
                dee@example.org,2024-01-03T00:00:00Z,c-dee,c-eve\n\
                bob@example.org,2024-01-02T00:00:00Z,c-bob,c-ann\n\
                ann@example.org,2024-01-01T00:00:00Z,c-ann,\n\
                cy@example.org,2024-01-04T00:00:00Z,c-cy,c-nobody\n\
                eve@example.org,2024-01-05T00:00:00Z,c-eve,\n";
    let file = f.dir.path().join("refs.csv");
    std::fs::write(&file, text).unwrap();

    let mut o = f.opts(&file);
    o.link_referrers = true;
    let s = f.run(&o).await.unwrap();
    assert_eq!(s.created, 5);
    let user = |email: &str| {
        common::users(&f.sandbox, 1)
            .into_iter()
            .find(|u| u["email"] == email)
            .unwrap()
    };
    let ann = user("ann@example.org");
    assert_eq!(
        user("bob@example.org")["referred_by"],
        Value::String(ann["id"].as_u64().unwrap().to_string())
    );
    for nobody in ["ann@example.org", "cy@example.org", "dee@example.org"] {
        assert!(user(nobody)["referred_by"].is_null(), "{nobody}");
    }
    let results = f.results();
    let note = |email: &str| {
        results
            .iter()
            .find(|r| r[1] == email)
            .map(|r| r.last().unwrap().clone())
            .unwrap()
    };
    assert!(
        note("bob@example.org").contains("referrer linked"),
        "{results:?}"
    );
    assert!(
        note("cy@example.org").contains("no row of this file"),
        "{results:?}"
    );
    assert!(note("dee@example.org").contains("line 6"), "{results:?}");
    let summary = serde_json::to_value(&s).unwrap();
    assert_eq!(summary["referrers_linked"], 1, "{summary}");
    assert_eq!(summary["referrers_not_linked"], 2, "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_flag_no_referrer_is_sent() {
    let f = Fixture::new(None).await;
    let text = "email,joined,code,referred_by\n\
                bob@example.org,2024-01-02T00:00:00Z,c-bob,c-ann\n\
                ann@example.org,2024-01-01T00:00:00Z,c-ann,\n";
    let file = f.dir.path().join("refs.csv");
    std::fs::write(&file, text).unwrap();
    f.run(&f.opts(&file)).await.unwrap();
    let users = created_order(&f.sandbox);
    assert_eq!(users[0]["email"], "ann@example.org");
    assert!(
        users.iter().all(|u| u["referred_by"].is_null()),
        "{users:?}"
    );
    assert_eq!(users[1]["profile"]["source_referrer"], "c-ann");
}

/// A sorted run killed with kill -9 and run again: nobody created twice,
/// nobody skipped, and still oldest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_sorted_run_resumes_in_order() {
    let f = Fixture::new(Some((1, 4))).await;
    let n = 600;
    let file = write_people(f.dir.path(), n);
    let (map, ck, base) = (
        f.dir.path().join("map.toml"),
        f.dir.path().join("ck.sqlite"),
        f.sandbox.base_url(),
    );
    let spawn = move || {
        Command::new(assert_cmd::cargo::cargo_bin("prefsync"))
            .args(["import", "testers", "--beta", "1", "-q", "--file"])
            .arg(&file)
            .arg("--map")
            .arg(&map)
            .arg("--checkpoint")
            .arg(&ck)
            .env("PREFINERY_BASE_URL", &base)
            .env("PREFINERY_API_KEY", common::KEY)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    for stop_at in [150, 400] {
        let mut child = spawn();
        let deadline = Instant::now() + Duration::from_secs(60);
        while common::users(&f.sandbox, 1).len() < stop_at {
            assert!(Instant::now() < deadline, "no progress");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let last = spawn();
    let out = tokio::task::spawn_blocking(move || last.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let users = created_order(&f.sandbox);
    assert_eq!(users.len(), n, "nobody skipped");
    let creates = &f.sandbox.app.stats_json()["routes"]["testers.create"];
    assert_eq!(creates["201"].as_u64().unwrap() as usize, n, "{creates}");
    assert!(
        creates.get("422").is_none(),
        "a create sent twice: {creates}"
    );
    assert_oldest_first(&users);
}
