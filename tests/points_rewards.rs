//! `points add`, `rewards issue`, `rewards deliver` and `rewards revoke`
//! end to end: the command line run in-process against the in-process
//! sandbox, and a real process killed with SIGKILL mid-run. The server's
//! final state is checked exactly: no point or reward created twice, none
//! missing, every status set.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser as _;
use prefsync::cli::Cli;
use prefsync::sandbox::{Keys, Permission, Sandbox, SandboxConfig};
use serde_json::Value;

/// Quotas far above the sandbox's (its limits are off in these tests).
const RATES: [&str; 6] = [
    "--rate",
    "rewards-list=100000/1s",
    "--rate",
    "points-list=100000/1s",
    "--rate",
    "testers-list=100000/1s",
];

struct Fixture {
    dir: tempfile::TempDir,
    s: Sandbox,
    key_file: PathBuf,
}

impl Fixture {
    /// A sandbox with `users` users (`user{i}@example.com`, some holding
    /// rewards and points), its limits off.
    async fn new(users: usize, mut config: SandboxConfig) -> Fixture {
        config.rate_scale = 0.0;
        config.seed_testers = users;
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("key");
        std::fs::write(&key_file, common::KEY).unwrap();
        Fixture {
            s: common::sandbox(config).await,
            dir,
            key_file,
        }
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The command's arguments with the connection, the checkpoint and the
    /// reports added.
    fn args(&self, cmd: &[&str], file: &Path, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = vec!["prefsync".into()];
        a.extend(cmd.iter().map(|s| s.to_string()));
        let p = |n: &str| self.path(n).display().to_string();
        a.extend(
            [
                "--beta",
                "1",
                "-q",
                "--base-url",
                &self.s.base_url(),
                "--api-key-file",
                &self.key_file.display().to_string(),
                "--file",
                &file.display().to_string(),
                "--checkpoint",
                &p("ck.sqlite"),
                "--summary-json",
                &p("summary.json"),
                "--errors",
                &p("errors.csv"),
                "--results",
                &p("results.csv"),
            ]
            .map(String::from),
        );
        a.extend(RATES.iter().map(|s| s.to_string()));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// Runs the command in-process: its exit code, its error (with its
    /// causes) if it failed, and its summary if it wrote one.
    async fn run(&self, cmd: &[&str], file: &Path, extra: &[&str]) -> (i32, String, Value) {
        let _ = std::fs::remove_file(self.path("summary.json"));
        let cli = Cli::try_parse_from(self.args(cmd, file, extra)).expect("flags parse");
        let (code, err) = match prefsync::run(cli).await {
            Ok(exit) => (exit.code(), String::new()),
            Err(e) => (prefsync::exit::exit_for(&e).code(), format!("{e:#}")),
        };
        let summary = std::fs::read(self.path("summary.json"))
            .map(|b| serde_json::from_slice(&b).unwrap())
            .unwrap_or(Value::Null);
        (code, err, summary)
    }

    /// Answers of a route of the sandbox, by status.
    fn calls(&self, route: &str) -> u64 {
        self.s.app.stats_json()["routes"][route]
            .as_object()
            .map_or(0, |m| m.values().filter_map(Value::as_u64).sum())
    }

    fn user_id(&self, email: &str) -> u64 {
        self.s
            .app
            .with_world(|w| w.project(1).user_by_email(email).unwrap().id)
    }

    /// The user's points: (quantity, reason).
    fn points(&self, email: &str) -> Vec<(i64, Option<String>)> {
        let uid = self.user_id(email);
        self.s.app.with_world(|w| {
            w.project(1)
                .points
                .values()
                .filter(|p| p.user_id == uid)
                .map(|p| (p.quantity, p.reason.clone()))
                .collect()
        })
    }

    fn all_points(&self) -> usize {
        self.s.app.with_world(|w| w.project(1).points.len())
    }

    /// The user's rewards with this descriptor: (id, status).
    fn rewards(&self, email: &str, descriptor: &str) -> Vec<(u64, String)> {
        let uid = self.user_id(email);
        self.s.app.with_world(|w| {
            w.project(1)
                .rewards
                .values()
                .filter(|r| r.user_id == uid && r.descriptor == descriptor)
                .map(|r| (r.id, r.status.clone()))
                .collect()
        })
    }

    fn all_rewards(&self) -> BTreeMap<u64, String> {
        self.s.app.with_world(|w| {
            w.project(1)
                .rewards
                .values()
                .map(|r| (r.id, r.status.clone()))
                .collect()
        })
    }

    /// Gives the user a reward, as if earned.
    fn give(&self, email: &str, descriptor: &str) -> u64 {
        self.s.app.with_world(|w| {
            w.create_reward(
                1,
                &serde_json::json!({"email": email, "descriptor": descriptor}),
            )
            .unwrap()["id"]
                .as_u64()
                .unwrap()
        })
    }

    fn errors_report(&self) -> String {
        std::fs::read_to_string(self.path("errors.csv")).unwrap_or_default()
    }
}

/// `n` summary fields at once, for one assertion with the whole summary
/// in its message.
fn fields(s: &Value, names: &[&str]) -> Vec<u64> {
    names
        .iter()
        .map(|n| s[*n].as_u64().unwrap_or(u64::MAX))
        .collect()
}

// ---- points add ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_add_marks_each_point_rejects_bad_rows_and_does_not_repeat_a_finished_file() {
    let f = Fixture::new(10, SandboxConfig::default()).await;
    let file = f.file(
        "points.csv",
        "Email,Quantity,Reason\n\
         user1@example.com,10,Conference\n\
         user2@example.com,-3,\n\
         user3@example.com,0,zero is refused\n\
         nobody@example.com,5,no such user\n\
         user3@example.com,7,Beta feedback\n\
         user1@example.com,10,Conference\n",
    );
    let before = f.all_points();
    let (code, err, s) = f.run(&["points", "add"], &file, &[]).await;
    assert_eq!(code, 4, "rows were rejected: {err} {s}");
    assert_eq!(fields(&s, &["added", "rejected"]), [3, 3], "{s}");
    assert_eq!(f.all_points(), before + 3);

    let p1 = f.points("user1@example.com");
    assert_eq!(p1.len(), 1, "the line pasted twice is a duplicate: {p1:?}");
    let reason = p1[0].1.clone().unwrap();
    assert!(
        reason.starts_with("Conference [ps:") && reason.ends_with(":2]"),
        "{reason}"
    );
    let p2 = f.points("user2@example.com");
    assert_eq!(p2[0].0, -3);
    assert!(p2[0].1.as_deref().unwrap().starts_with("[ps:"), "{p2:?}");

    let report = f.errors_report();
    assert!(report.contains("quantity is 0"), "{report}");
    assert!(report.contains("Email not found"), "{report}");
    assert!(report.contains("duplicate"), "{report}");

    // The finished file again: nothing sent, and it says so.
    let creates = f.calls("points.create");
    let (code, _, s) = f.run(&["points", "add"], &file, &[]).await;
    assert_eq!(code, 4, "{s}");
    assert!(s["already_done_by"].as_i64().is_some(), "{s}");
    assert_eq!(f.calls("points.create"), creates);
    assert_eq!(f.all_points(), before + 3);

    // --fresh sends it again, as a new run with a new token.
    let (_, _, s) = f.run(&["points", "add"], &file, &["--fresh"]).await;
    assert_eq!(s["added"], 3, "{s}");
    assert_eq!(f.all_points(), before + 6);
    let p1 = f.points("user1@example.com");
    assert_ne!(p1[0].1, p1[1].1, "another run, another marker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_add_dry_run_and_no_marker() {
    let f = Fixture::new(5, SandboxConfig::default()).await;
    let file = f.file(
        "p.csv",
        "email,quantity,reason\nuser1@example.com,4,Thanks\nuser2@example.com,2,\n",
    );
    let before = f.all_points();
    let (code, err, s) = f.run(&["points", "add"], &file, &["--dry-run"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(s["added"], 2, "would be added: {s}");
    assert_eq!(f.calls("points.create"), 0);
    assert_eq!(f.all_points(), before);

    let (code, err, _) = f.run(&["points", "add"], &file, &["--no-marker"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        f.points("user1@example.com"),
        [(4, Some("Thanks".to_string()))]
    );
    assert_eq!(f.points("user2@example.com"), [(2, None)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_add_without_the_permission_exits_3_naming_it_and_gives_nothing() {
    let f = Fixture::new(
        5,
        SandboxConfig {
            keys: Keys::single_without(common::KEY, &[Permission::PointsCreate]),
            ..Default::default()
        },
    )
    .await;
    let file = f.file(
        "p.csv",
        "email,quantity\nuser1@example.com,1\nuser2@example.com,1\n",
    );
    let before = f.all_points();
    let (code, err, _) = f.run(&["points", "add"], &file, &[]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("lacks Points > Create"), "{err}");
    assert_eq!(f.all_points(), before);
}

/// Rows `user1..=n`, one point each, `i` points for row `i`.
fn points_file(n: usize) -> String {
    let mut t = String::from("email,quantity,reason\n");
    for i in 1..=n {
        t.push_str(&format!("user{i}@example.com,{i},bulk\n"));
    }
    t
}

/// Every row's point is there exactly once: one point with reason "bulk
/// [ps:...:LINE]" for each row, and no other point added.
fn assert_one_point_per_row(f: &Fixture, n: usize, before: usize) {
    let mut twice = vec![];
    let mut missing = vec![];
    for i in 1..=n {
        let mine: Vec<_> = f
            .points(&format!("user{i}@example.com"))
            .into_iter()
            .filter(|(q, r)| *q == i as i64 && r.as_deref().is_some_and(|r| r.starts_with("bulk")))
            .collect();
        match mine.len() {
            1 => {}
            0 => missing.push(i),
            _ => twice.push(i),
        }
    }
    assert!(
        twice.is_empty() && missing.is_empty(),
        "given twice: {twice:?}; missing: {missing:?}"
    );
    assert_eq!(f.all_points(), before + n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_add_after_write_faults_gives_each_point_once() {
    const N: usize = 300;
    let f = Fixture::new(
        N,
        SandboxConfig {
            fail_after_write_rate: 0.1,
            seed: 7,
            ..Default::default()
        },
    )
    .await;
    let file = f.file("p.csv", &points_file(N));
    let before = f.all_points();
    let (code, err, s) = f.run(&["points", "add"], &file, &[]).await;
    assert_eq!(code, 0, "{err} {s}");
    assert_eq!(s["added"], N as u64, "{s}");
    assert_one_point_per_row(&f, N, before);
    assert!(f.calls("points.list") > 0, "the faults were looked into");
    eprintln!(
        "points add, 10% after-write faults: {} calls for {N} rows ({} creates, {} points-list)",
        s["api_calls"],
        f.calls("points.create"),
        f.calls("points.list")
    );
}

// ---- rewards issue ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewards_issue_happy_path_unchanged_and_bad_rows() {
    let f = Fixture::new(30, SandboxConfig::default()).await;
    // user30 holds early-access already (seeded, earned).
    assert_eq!(f.rewards("user30@example.com", "early-access").len(), 1);
    let file = f.file(
        "issue.csv",
        "email,descriptor\n\
         user1@example.com,early-access\n\
         user2@example.com,free-month\n\
         user30@example.com,early-access\n\
         user3@example.com,\n\
         user4@example.com,no-such-reward\n\
         user1@example.com,early-access\n",
    );
    let before = f.all_rewards().len();
    let (code, err, s) = f.run(&["rewards", "issue"], &file, &[]).await;
    assert_eq!(code, 4, "{err} {s}");
    assert_eq!(
        fields(&s, &["issued", "unchanged", "rejected"]),
        [2, 1, 3],
        "{s}"
    );
    assert_eq!(f.all_rewards().len(), before + 2);
    assert_eq!(f.rewards("user1@example.com", "early-access").len(), 1);
    assert_eq!(f.rewards("user2@example.com", "free-month").len(), 1);
    assert_eq!(f.rewards("user30@example.com", "early-access").len(), 1);
    let report = f.errors_report();
    assert!(report.contains("descriptor is empty"), "{report}");
    assert!(report.contains("not found"), "{report}");

    // Done: the same file sends nothing.
    let creates = f.calls("rewards.create");
    let (_, _, s) = f.run(&["rewards", "issue"], &file, &[]).await;
    assert!(s["already_done_by"].as_i64().is_some(), "{s}");
    assert_eq!(f.calls("rewards.create"), creates);

    // --again issues to a user who holds it already.
    let again = f.file(
        "again.csv",
        "email,descriptor\nuser30@example.com,early-access\n",
    );
    let (code, err, s) = f.run(&["rewards", "issue"], &again, &["--again"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(s["issued"], 1, "{s}");
    assert_eq!(f.rewards("user30@example.com", "early-access").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewards_issue_dry_run_and_missing_permission() {
    let f = Fixture::new(
        5,
        SandboxConfig {
            keys: Keys::single_without(common::KEY, &[Permission::RewardsCreate]),
            ..Default::default()
        },
    )
    .await;
    let file = f.file(
        "i.csv",
        "email,descriptor\nuser1@example.com,early-access\nuser2@example.com,t-shirt\n",
    );
    let before = f.all_rewards();
    // A dry run reads (Rewards > Read) and writes nothing.
    let (code, err, s) = f.run(&["rewards", "issue"], &file, &["--dry-run"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(s["issued"], 2, "{s}");
    assert_eq!(f.calls("rewards.create"), 0);

    let (code, err, _) = f.run(&["rewards", "issue"], &file, &[]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("lacks Rewards > Create"), "{err}");
    assert_eq!(f.all_rewards(), before);
}

fn issue_file(n: usize, descriptor: &str) -> String {
    let mut t = String::from("email,descriptor\n");
    for i in 1..=n {
        t.push_str(&format!("user{i}@example.com,{descriptor}\n"));
    }
    t
}

/// Each user holds exactly one reward with the descriptor: the one issued,
/// or the one it held before (seeded users hold at most one, never
/// revoked; those are `unchanged`).
fn assert_issued_once(f: &Fixture, n: usize, descriptor: &str) {
    let wrong: Vec<(usize, usize)> = (1..=n)
        .map(|i| {
            (
                i,
                f.rewards(&format!("user{i}@example.com"), descriptor).len(),
            )
        })
        .filter(|(_, have)| *have != 1)
        .collect();
    assert!(wrong.is_empty(), "(user, rewards held): {wrong:?}");
}

/// The users `1..=n` that hold `descriptor` now.
fn holders(f: &Fixture, n: usize, descriptor: &str) -> Vec<usize> {
    (1..=n)
        .filter(|i| {
            !f.rewards(&format!("user{i}@example.com"), descriptor)
                .is_empty()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewards_issue_after_write_faults_issues_each_reward_once() {
    const N: usize = 300;
    let f = Fixture::new(
        N,
        SandboxConfig {
            fail_after_write_rate: 0.1,
            seed: 11,
            ..Default::default()
        },
    )
    .await;
    let held = holders(&f, N, "early-access");
    let file = f.file("i.csv", &issue_file(N, "early-access"));
    let (code, err, s) = f.run(&["rewards", "issue"], &file, &[]).await;
    assert_eq!(code, 0, "{err} {s}");
    assert_eq!(
        fields(&s, &["issued", "unchanged"]),
        [(N - held.len()) as u64, held.len() as u64],
        "{s}"
    );
    assert_issued_once(&f, N, "early-access");
    eprintln!(
        "rewards issue, 10% after-write faults: {} calls for {N} rows ({} creates, {} rewards-list)",
        s["api_calls"],
        f.calls("rewards.create"),
        f.calls("rewards.list")
    );
}

// ---- rewards deliver and revoke --------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewards_deliver_by_id_and_by_holder_unchanged_ambiguous_and_revoked() {
    let f = Fixture::new(30, SandboxConfig::default()).await;
    let a = f.give("user1@example.com", "early-access");
    f.give("user2@example.com", "free-month");
    // Two of one descriptor: ambiguous by email.
    let d1 = f.give("user3@example.com", "t-shirt");
    let d2 = f.give("user3@example.com", "t-shirt");
    let revoked = f.give("user4@example.com", "early-access");
    f.s.app
        .with_world(|w| w.update_reward(1, revoked, &serde_json::json!({"status": "revoked"})))
        .unwrap();
    // user20's t-shirt is seeded delivered.
    let (seeded, status) = f.rewards("user20@example.com", "t-shirt")[0].clone();
    assert_eq!(status, "delivered");

    let file = f.file(
        "deliver.csv",
        &format!(
            "reward_id,email,descriptor\n\
             {a},,\n\
             ,user2@example.com,free-month\n\
             {seeded},,\n\
             ,user3@example.com,t-shirt\n\
             {revoked},,\n\
             999999,,\n\
             ,user5@example.com,early-access\n"
        ),
    );
    let (code, err, s) = f.run(&["rewards", "deliver"], &file, &[]).await;
    assert_eq!(code, 4, "{err} {s}");
    assert_eq!(
        fields(&s, &["delivered", "unchanged", "rejected"]),
        [2, 1, 4],
        "{s}"
    );
    assert_eq!(s["unchanged_already_delivered"], 1, "{s}");
    assert_eq!(
        f.rewards("user1@example.com", "early-access")[0].1,
        "delivered"
    );
    assert_eq!(
        f.rewards("user2@example.com", "free-month")[0].1,
        "delivered"
    );
    assert_eq!(f.rewards("user3@example.com", "t-shirt")[0].1, "earned");
    let report = f.errors_report();
    assert!(report.contains(&format!("ids {d1}, {d2}")), "{report}");
    assert!(report.contains("was revoked"), "{report}");
    assert!(report.contains("no reward with id 999999"), "{report}");
    assert!(report.contains("holds no reward"), "{report}");
    // Only the two deliveries were written.
    assert_eq!(f.calls("rewards.update"), 2);

    let updates = f.calls("rewards.update");
    let (_, _, s) = f.run(&["rewards", "deliver"], &file, &[]).await;
    assert!(s["already_done_by"].as_i64().is_some(), "{s}");
    assert_eq!(f.calls("rewards.update"), updates);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewards_revoke_dry_run_and_missing_permission() {
    let f = Fixture::new(
        5,
        SandboxConfig {
            keys: Keys::single_without(common::KEY, &[Permission::RewardsUpdate]),
            ..Default::default()
        },
    )
    .await;
    let a = f.give("user1@example.com", "early-access");
    let b = f.give("user2@example.com", "free-month");
    f.s.app
        .with_world(|w| w.update_reward(1, b, &serde_json::json!({"status": "revoked"})))
        .unwrap();
    let file = f.file(
        "revoke.csv",
        &format!("reward_id,email,descriptor\n{a},,\n,user2@example.com,free-month\n"),
    );
    let before = f.all_rewards();
    let (code, err, _) = f.run(&["rewards", "revoke"], &file, &[]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("lacks Rewards > Update"), "{err}");
    assert_eq!(f.all_rewards(), before);

    // A dry run only reads, which the key may.
    let (code, err, s) = f.run(&["rewards", "revoke"], &file, &["--dry-run"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(fields(&s, &["revoked", "unchanged"]), [1, 1], "{s}");
    assert_eq!(f.all_rewards(), before);
    assert_eq!(f.calls("rewards.update"), 1, "only the refused one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewards_revoke_happy_path_and_already_revoked() {
    let f = Fixture::new(5, SandboxConfig::default()).await;
    let a = f.give("user1@example.com", "early-access");
    let b = f.give("user2@example.com", "free-month");
    f.s.app
        .with_world(|w| w.update_reward(1, b, &serde_json::json!({"status": "delivered"})))
        .unwrap();
    let c = f.give("user3@example.com", "t-shirt");
    f.s.app
        .with_world(|w| w.update_reward(1, c, &serde_json::json!({"status": "revoked"})))
        .unwrap();
    let file = f.file(
        "revoke.csv",
        &format!("reward_id,email,descriptor\n{a},,\n,user2@example.com,free-month\n{c},,\nx,,\n"),
    );
    let (code, err, s) = f.run(&["rewards", "revoke"], &file, &[]).await;
    assert_eq!(code, 4, "{err}");
    assert_eq!(
        fields(&s, &["revoked", "unchanged", "rejected"]),
        [2, 1, 1],
        "{s}"
    );
    assert_eq!(s["unchanged_already_revoked"], 1, "{s}");
    for id in [a, b, c] {
        assert_eq!(f.all_rewards()[&id], "revoked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewards_deliver_after_write_faults_delivers_each_once() {
    const N: usize = 200;
    let f = Fixture::new(
        N,
        SandboxConfig {
            fail_after_write_rate: 0.1,
            seed: 5,
            ..Default::default()
        },
    )
    .await;
    let ids: Vec<u64> = (1..=N)
        .map(|i| f.give(&format!("user{i}@example.com"), "free-month"))
        .collect();
    // Odd users by id; even ones by email and descriptor, those that hold
    // no other free-month (seeded), which would make them ambiguous.
    let mut by_id = String::from("reward_id\n");
    let mut by_holder = String::from("email,descriptor\n");
    let mut rows = 0;
    for (i, id) in (1..=N).zip(&ids) {
        let email = format!("user{i}@example.com");
        if i % 2 == 1 {
            by_id.push_str(&format!("{id}\n"));
        } else if f.rewards(&email, "free-month").len() == 1 {
            by_holder.push_str(&format!("{email},free-month\n"));
        } else {
            continue;
        }
        rows += 1;
    }
    let mut delivered = 0;
    for (name, text) in [("ids.csv", by_id), ("holders.csv", by_holder)] {
        let file = f.file(name, &text);
        let (code, err, s) = f.run(&["rewards", "deliver"], &file, &[]).await;
        assert_eq!(code, 0, "{err} {s}");
        assert_eq!(s["unchanged"], 0, "{s}");
        delivered += s["delivered"].as_u64().unwrap();
        eprintln!(
            "rewards deliver ({name}), 10% after-write faults: {} calls for {} rows",
            s["api_calls"], s["total_rows"]
        );
    }
    assert_eq!(delivered, rows);
    let all = f.all_rewards();
    let done = ids.iter().filter(|id| all[*id] == "delivered").count() as u64;
    assert_eq!(done, rows);
}

// ---- kill -9 mid-run, then the same command --------------------------------

fn spawn(f: &Fixture, cmd: &[&str], file: &Path, extra: &[&str]) -> Child {
    let args = f.args(cmd, file, extra);
    Command::new(assert_cmd::cargo::cargo_bin("prefsync"))
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
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

/// Waits until `done()` reaches `n`, then kills the process with SIGKILL.
async fn kill_at(mut child: Child, n: usize, done: impl Fn() -> usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while done() < n {
        assert!(Instant::now() < deadline, "the run made no progress");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

fn summary(f: &Fixture) -> Value {
    serde_json::from_slice(&std::fs::read(f.path("summary.json")).unwrap()).unwrap()
}

/// A sandbox with latency (calls in flight at the kill) and 10% after-write
/// faults.
async fn faulty(n: usize, seed: u64) -> Fixture {
    Fixture::new(
        n,
        SandboxConfig {
            fail_after_write_rate: 0.1,
            latency_ms: Some((2, 8)),
            seed,
            ..Default::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_add_kill_9_then_resume_gives_each_point_once() {
    const N: usize = 600;
    let f = faulty(N, 3).await;
    let file = f.file("p.csv", &points_file(N));
    let before = f.all_points();
    for at in [150, 400] {
        let child = spawn(&f, &["points", "add"], &file, &[]);
        kill_at(child, before + at, || f.all_points()).await;
        assert!(f.all_points() < before + N, "killed before the end");
    }
    let (code, stderr) = finish(spawn(&f, &["points", "add"], &file, &[])).await;
    assert_eq!(code, 0, "{stderr}");
    let s = summary(&f);
    assert_eq!(s["resumed"], true, "{s}");
    assert_eq!(s["added"], N as u64, "{s}");
    assert_one_point_per_row(&f, N, before);
}

/// With `--again`, users who hold the reward already get one more: only
/// the ids kept from before the create tell theirs from the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewards_issue_kill_9_then_resume_issues_each_reward_once() {
    const N: usize = 500;
    let f = faulty(N, 4).await;
    // Every third user holds one already, so the kill catches some in
    // flight.
    for i in (3..=N).step_by(3) {
        f.give(&format!("user{i}@example.com"), "free-month");
    }
    let held: Vec<usize> = (1..=N)
        .map(|i| {
            f.rewards(&format!("user{i}@example.com"), "free-month")
                .len()
        })
        .collect();
    let file = f.file("i.csv", &issue_file(N, "free-month"));
    let before = f.all_rewards().len();
    for at in [100, 300] {
        let child = spawn(&f, &["rewards", "issue"], &file, &["--again"]);
        kill_at(child, before + at, || f.all_rewards().len()).await;
    }
    let (code, stderr) = finish(spawn(&f, &["rewards", "issue"], &file, &["--again"])).await;
    assert_eq!(code, 0, "{stderr}");
    let s = summary(&f);
    assert_eq!(s["resumed"], true, "{s}");
    assert_eq!(fields(&s, &["issued", "unchanged"]), [N as u64, 0], "{s}");
    let wrong: Vec<(usize, usize, usize)> = (1..=N)
        .map(|i| {
            let now = f
                .rewards(&format!("user{i}@example.com"), "free-month")
                .len();
            (i, held[i - 1], now)
        })
        .filter(|(_, was, now)| *now != was + 1)
        .collect();
    assert!(
        wrong.is_empty(),
        "(user, held before, holds now): {wrong:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewards_deliver_and_revoke_kill_9_then_resume_label_every_row() {
    const N: usize = 500;
    let f = faulty(N, 6).await;
    let ids: Vec<u64> = (1..=N)
        .map(|i| f.give(&format!("user{i}@example.com"), "t-shirt"))
        .collect();
    let file = f.file(
        "ids.csv",
        &ids.iter()
            .fold("reward_id\n".to_string(), |acc, id| format!("{acc}{id}\n")),
    );
    let count = |status: &str| {
        let all = f.all_rewards();
        ids.iter().filter(|id| all[id] == status).count()
    };
    for (cmd, status) in [("deliver", "delivered"), ("revoke", "revoked")] {
        let child = spawn(&f, &["rewards", cmd], &file, &[]);
        kill_at(child, 200, || count(status)).await;
        assert!(count(status) < N);
        let (code, stderr) = finish(spawn(&f, &["rewards", cmd], &file, &[])).await;
        assert_eq!(code, 0, "{stderr}");
        let s = summary(&f);
        assert_eq!(s["resumed"], true, "{s}");
        // Every reward changed by one of the two runs is labelled so, none
        // `unchanged`: the rows in flight at the kill were asked about.
        assert_eq!(fields(&s, &[status, "unchanged"]), [N as u64, 0], "{s}");
        assert_eq!(count(status), N);
    }
}

#[test]
fn prefsync_help_lists_the_operations_and_each_has_an_example() {
    use clap::CommandFactory as _;
    let top = Cli::command().render_help().to_string();
    assert!(top.contains("points") && top.contains("rewards"), "{top}");
    for (group, op) in [
        ("points", "add"),
        ("rewards", "issue"),
        ("rewards", "deliver"),
        ("rewards", "revoke"),
    ] {
        let mut cli = Cli::command();
        let sub = cli
            .find_subcommand_mut(group)
            .and_then(|g| g.find_subcommand_mut(op))
            .unwrap();
        let help = sub.render_long_help().to_string();
        assert!(
            help.contains("Examples:") && help.contains(&format!("prefsync {group} {op} --beta")),
            "{help}"
        );
    }
}
