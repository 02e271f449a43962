//! The bulk operations on suppressions and users, end to end against the
//! sandbox: `suppressions add|remove`, `testers delete|checkin`. In-process
//! for the behaviour; a real process killed with SIGKILL, against a sandbox
//! that fails 10% of writes after applying them, for exactly once.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser as _;
use prefsync::cli::Cli;
use prefsync::exit::exit_for;
use prefsync::sandbox::{Keys, Permission, Sandbox, SandboxConfig};
use serde_json::{Value, json};

struct Fx {
    dir: tempfile::TempDir,
    s: Sandbox,
}

impl Fx {
    async fn new(mut config: SandboxConfig) -> Fx {
        if config.rate_scale == 1.0 {
            config.rate_scale = 0.0;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("key"), common::KEY).unwrap();
        Fx {
            dir,
            s: common::sandbox(config).await,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// The command line of `sub` on `file`, with its checkpoint, summary and
    /// results in the fixture's folder.
    fn args(&self, sub: &[&str], file: &str, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = ["-q", "--beta", "1", "--base-url"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.push(self.s.base_url());
        a.push("--api-key-file".into());
        a.push(self.path("key").display().to_string());
        for r in [
            "testers-list=100000/1s",
            "account-list=100000/1s",
            "betas=100000/1s",
        ] {
            a.push("--rate".into());
            a.push(r.into());
        }
        a.extend(sub.iter().map(|s| s.to_string()));
        for (flag, v) in [
            ("--file", self.path(file)),
            ("--checkpoint", self.path("ck.sqlite")),
            ("--summary-json", self.path("summary.json")),
            ("--results", self.path("results.csv")),
        ] {
            a.push(flag.into());
            a.push(v.display().to_string());
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// Runs in-process: the exit code, the error's text, the summary.
    async fn run(&self, sub: &[&str], file: &str, extra: &[&str]) -> (i32, String, Value) {
        let _ = std::fs::remove_file(self.path("summary.json"));
        let mut argv = vec!["prefsync".to_string()];
        argv.extend(self.args(sub, file, extra));
        let cli = Cli::try_parse_from(argv).unwrap();
        let (code, err) = match prefsync::run(cli).await {
            Ok(e) => (e.code(), String::new()),
            Err(e) => (exit_for(&e).code(), format!("{e:#}")),
        };
        let summary = std::fs::read(self.path("summary.json"))
            .map(|b| serde_json::from_slice(&b).unwrap())
            .unwrap_or(Value::Null);
        (code, err, summary)
    }

    fn spawn(&self, sub: &[&str], file: &str, extra: &[&str]) -> Child {
        Command::new(assert_cmd::cargo::cargo_bin("prefsync"))
            .args(self.args(sub, file, extra))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn add_user(&self, email: &str) -> u64 {
        self.s.app.with_world(|w| {
            w.create_user(1, &json!({ "email": email })).unwrap()["id"]
                .as_u64()
                .unwrap()
        })
    }

    fn suppress(&self, email: &str) -> u64 {
        self.s.app.with_world(|w| {
            w.create_suppression(1, &json!({ "email": email, "reason": "Manual" }))
                .unwrap()["id"]
                .as_u64()
                .unwrap()
        })
    }

    fn suppressions(&self) -> Vec<Value> {
        self.s.app.with_world(|w| {
            w.project(1)
                .suppressions
                .values()
                .map(|s| serde_json::to_value(s).unwrap())
                .collect()
        })
    }

    fn user(&self, email: &str) -> Option<Value> {
        common::users(&self.s, 1)
            .into_iter()
            .find(|u| u["email"] == email)
    }

    /// Answers of the sandbox to `route`, by status.
    fn calls(&self, route: &str) -> Value {
        self.s.app.stats_json()["routes"][route].clone()
    }

    fn writes(&self, route: &str) -> u64 {
        self.calls(route)
            .as_object()
            .map_or(0, |m| m.values().filter_map(Value::as_u64).sum())
    }
}

fn n(summary: &Value, action: &str) -> u64 {
    summary[action]
        .as_u64()
        .unwrap_or_else(|| panic!("no {action} in {summary}"))
}

#[tokio::test]
async fn suppressions_add_counts_unsubscribes_and_takes_2702_as_unchanged() {
    let fx = Fx::new(SandboxConfig::default()).await;
    fx.add_user("ann@example.com");
    fx.suppress("cat@example.com");
    fx.file(
        "in.csv",
        "email,reason\nann@example.com,Unsubscribe\nbob@example.com,manual\ncat@example.com,Manual\ndan@example.com,Bounce\neve@example.com,\nnobody@example.com,Unsubscribe\n",
    );
    let add = ["suppressions", "add"];

    // A dry run counts the real user an Unsubscribe touches, and sends nothing.
    let (code, err, s) = fx.run(&add, "in.csv", &["--dry-run"]).await;
    assert_eq!(code, 4, "{err}");
    assert_eq!(
        (n(&s, "unsubscribed"), n(&s, "added"), n(&s, "rejected")),
        (1, 4, 1),
        "{s}"
    );
    assert_eq!(fx.writes("suppressions.create"), 0);
    assert_eq!(fx.suppressions().len(), 1);

    let (code, err, s) = fx.run(&add, "in.csv", &[]).await;
    assert_eq!(code, 4, "{err}");
    assert_eq!(
        (
            n(&s, "added"),
            n(&s, "unsubscribed"),
            n(&s, "unchanged"),
            n(&s, "rejected")
        ),
        (3, 1, 1, 1),
        "{s}"
    );
    assert_eq!(fx.suppressions().len(), 5);
    assert!(!fx.user("ann@example.com").unwrap()["unsubscribed_at"].is_null());
    let results = std::fs::read_to_string(fx.path("results.csv")).unwrap();
    assert!(results.contains("cat@example.com,unchanged,"), "{results}");
    // The row says why it is unchanged.
    assert!(
        results
            .lines()
            .any(|l| l.contains("cat@example.com,unchanged,")
                && l.contains("suppressed already (error 2702)")),
        "{results}"
    );
    let errors = std::fs::read_to_string(fx.path("ck.run1.errors.csv")).unwrap();
    assert!(errors.contains("Bounce"), "{errors}");

    // Run again after it finished: nothing sent, and it says so.
    let (_, err, s) = fx.run(&add, "in.csv", &[]).await;
    assert_eq!(s["already_done_by"], 1, "{err}{s}");
    assert_eq!(s["api_calls"], 0, "{s}");
    // Sent again with --fresh, every suppression is there already:
    // unchanged, none twice.
    let (code, err, s) = fx.run(&add, "in.csv", &["--fresh"]).await;
    assert_eq!(code, 4, "{err}");
    assert_eq!((n(&s, "unchanged"), n(&s, "added")), (5, 0), "{s}");
    assert_eq!(fx.suppressions().len(), 5);
}

#[tokio::test]
async fn suppressions_remove_by_id_or_email_and_already_removed_is_unchanged() {
    let fx = Fx::new(SandboxConfig::default()).await;
    let x = fx.suppress("x@example.com");
    fx.suppress("y@example.com");
    fx.suppress("z@example.com");
    fx.file(
        "in.csv",
        &format!("suppression_id,email\n{x},\n,Y@example.com\n,gone@example.com\nabc,\n999999,\n"),
    );
    let rm = ["suppressions", "remove"];
    let (code, err, _) = fx.run(&rm, "in.csv", &["--dry-run"]).await;
    assert_eq!(code, 4, "{err}");
    assert_eq!(fx.writes("suppressions.delete"), 0);

    let (code, err, s) = fx.run(&rm, "in.csv", &[]).await;
    assert_eq!(code, 4, "{err}");
    assert_eq!(
        (n(&s, "removed"), n(&s, "unchanged"), n(&s, "rejected")),
        (2, 2, 1),
        "{s}"
    );
    let left: Vec<Value> = fx.suppressions();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["email"], "z@example.com");
}

#[tokio::test]
async fn testers_delete_refuses_without_yes_bounds_and_backs_up_first() {
    let fx = Fx::new(SandboxConfig::default()).await;
    for i in 1..=5 {
        fx.add_user(&format!("u{i}@example.com"));
    }
    let u2 = fx.user("u2@example.com").unwrap()["id"].as_u64().unwrap();
    fx.add_user("keep@example.com");
    fx.file(
        "in.csv",
        &format!(
            "email,id\nu1@example.com,\n,{u2}\nghost@example.com,\nnot an email,\nU3@example.com,\n"
        ),
    );
    let del = ["testers", "delete"];
    let backup = fx.path("backup.csv");
    let b = backup.to_str().unwrap();

    let (code, err, _) = fx.run(&del, "in.csv", &["--backup", b]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("3 users would be deleted"), "{err}");
    assert!(err.contains("--yes"), "{err}");
    let (code, err, _) = fx
        .run(&del, "in.csv", &["--backup", b, "--max-delete", "2"])
        .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("more than --max-delete 2"), "{err}");
    let (code, err, s) = fx.run(&del, "in.csv", &["--backup", b, "--dry-run"]).await;
    assert_eq!(code, 4, "{err}");
    assert_eq!(n(&s, "deleted"), 3, "{s}");
    assert_eq!(fx.writes("testers.delete"), 0);
    assert!(!backup.exists(), "a refused or dry run writes no backup");
    assert_eq!(common::users(&fx.s, 1).len(), 6);

    let (code, err, s) = fx
        .run(&del, "in.csv", &["--backup", b, "--max-delete", "3"])
        .await;
    assert_eq!(code, 4, "{err}");
    assert_eq!(
        (n(&s, "deleted"), n(&s, "unchanged"), n(&s, "rejected")),
        (3, 1, 1),
        "{s}"
    );
    let mut left: Vec<String> = common::users(&fx.s, 1)
        .iter()
        .map(|u| u["email"].as_str().unwrap().to_string())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["keep@example.com", "u4@example.com", "u5@example.com"]
    );
    assert_backup(
        &backup,
        &["u1@example.com", "u2@example.com", "u3@example.com"],
    );

    // Run again after it finished: nothing sent, and it says so.
    let (_, err, s) = fx.run(&del, "in.csv", &["--backup", b]).await;
    assert_eq!(s["api_calls"], 0, "{err}{s}");
    assert!(s["already_done_by"].is_number(), "{s}");
    // With --fresh: nobody left to delete, nothing refused.
    let (code, err, s) = fx.run(&del, "in.csv", &["--backup", b, "--fresh"]).await;
    assert_eq!(code, 4, "{err}");
    assert_eq!((n(&s, "deleted"), n(&s, "unchanged")), (0, 4), "{s}");
}

/// The backup holds exactly these users, whole, and only its owner reads it.
fn assert_backup(path: &Path, emails: &[&str]) {
    let mut r = csv::Reader::from_path(path).unwrap();
    let h = r.headers().unwrap().clone();
    let at = h.iter().position(|c| c == "email").unwrap();
    assert!(h.iter().any(|c| c == "invitation_code"), "{h:?}");
    let mut got: Vec<String> = r.records().map(|x| x.unwrap()[at].to_string()).collect();
    got.sort();
    assert_eq!(got, emails);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}

#[tokio::test]
async fn testers_checkin_by_email_or_id_counts_one_visit_each() {
    let fx = Fx::new(SandboxConfig::default()).await;
    fx.add_user("u1@example.com");
    let u2 = fx.add_user("u2@example.com");
    fx.add_user("u3@example.com");
    fx.file(
        "in.csv",
        &format!("email,id\nu1@example.com,\n,{u2}\nghost@example.com,\n"),
    );
    let ci = ["testers", "checkin"];
    let (code, err, s) = fx.run(&ci, "in.csv", &["--dry-run"]).await;
    assert_eq!(code, 4, "{err}");
    assert_eq!(n(&s, "checked_in"), 2, "{s}");
    assert_eq!(
        fx.writes("checkins.create") + fx.writes("testers.checkin"),
        0
    );

    let (code, err, s) = fx.run(&ci, "in.csv", &[]).await;
    assert_eq!(code, 4, "{err}");
    assert_eq!((n(&s, "checked_in"), n(&s, "rejected")), (2, 1), "{s}");
    let visits = |e: &str| fx.user(e).unwrap()["checkins_count"].as_u64().unwrap();
    assert_eq!(
        (
            visits("u1@example.com"),
            visits("u2@example.com"),
            visits("u3@example.com")
        ),
        (1, 1, 0)
    );
    assert_eq!(fx.user("u1@example.com").unwrap()["status"], "active");

    // Done already: a second visit each would be wrong; nothing is sent
    // (the run says so, with the first run's counts, its rejected row too).
    let sent = fx.writes("checkins.create") + fx.writes("testers.checkin");
    let (code, err, _) = fx.run(&ci, "in.csv", &[]).await;
    assert_eq!(code, 4, "{err}");
    assert_eq!(
        fx.writes("checkins.create") + fx.writes("testers.checkin"),
        sent
    );
    assert_eq!((visits("u1@example.com"), visits("u2@example.com")), (1, 1));
}

/// A key without the permission an operation needs: exit 3, the permission
/// named, nothing changed.
#[tokio::test]
async fn a_missing_permission_stops_each_operation_with_exit_3() {
    let cases: [(&[&str], Permission, &str, &str); 4] = [
        (
            &["suppressions", "add"],
            Permission::SuppressionsCreate,
            "Email Suppressions > Create",
            "email\na@example.com\nb@example.com\n",
        ),
        (
            &["suppressions", "remove"],
            Permission::SuppressionsDelete,
            "Email Suppressions > Delete",
            "email\nsup@example.com\n",
        ),
        (
            &["testers", "delete"],
            Permission::UsersDelete,
            "Users > Delete",
            "email\na@example.com\nb@example.com\n",
        ),
        (
            &["testers", "checkin"],
            Permission::UsersUpdate,
            "Users > Update",
            "email\na@example.com\nb@example.com\n",
        ),
    ];
    for (sub, missing, name, input) in cases {
        let fx = Fx::new(SandboxConfig {
            keys: Keys::single_without(common::KEY, &[missing]),
            ..Default::default()
        })
        .await;
        fx.add_user("a@example.com");
        fx.add_user("b@example.com");
        fx.suppress("sup@example.com");
        let before =
            fx.s.app
                .with_world(|w| serde_json::to_value(w.project(1)).unwrap());
        fx.file("in.csv", input);
        let backup = fx.path("backup.csv");
        let extra: Vec<&str> = if sub[1] == "delete" {
            vec!["--yes", "--backup", backup.to_str().unwrap()]
        } else {
            vec![]
        };
        let (code, err, _) = fx.run(sub, "in.csv", &extra).await;
        assert_eq!(code, 3, "{sub:?}: {err}");
        assert!(err.contains(name), "{sub:?}: {err}");
        let after =
            fx.s.app
                .with_world(|w| serde_json::to_value(w.project(1)).unwrap());
        assert_eq!(before, after, "{sub:?} changed the project");
        if sub[1] == "delete" {
            // Written before the first delete, which the API refused.
            assert_backup(&backup, &["a@example.com", "b@example.com"]);
        }
    }
}

// ---- kill -9 and after-write faults -----------------------------------------

const ROWS: usize = 400;

/// A sandbox with latency, failing 10% of writes after applying them.
async fn faulty() -> Fx {
    Fx::new(SandboxConfig {
        latency_ms: Some((2, 8)),
        fail_after_write_rate: 0.1,
        seed: 7,
        ..Default::default()
    })
    .await
}

/// Runs `sub` in a real process, kills it (SIGKILL) once `progress` reaches
/// `at`, then runs the same command again in-process to the end.
async fn kill_then_finish(
    fx: &Fx,
    sub: &[&str],
    extra: &[&str],
    at: usize,
    progress: impl Fn(&Fx) -> usize,
) -> Value {
    let mut child = fx.spawn(sub, "in.csv", extra);
    let deadline = Instant::now() + Duration::from_secs(60);
    while progress(fx) < at {
        assert!(Instant::now() < deadline, "no progress");
        if let Ok(Some(status)) = child.try_wait() {
            let mut e = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut e).unwrap();
            panic!("the run ended before the kill: {status}: {e}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(progress(fx) < ROWS, "killed before the end");
    let (code, err, s) = fx.run(sub, "in.csv", extra).await;
    assert_eq!(code, 0, "{err}\n{s}");
    assert_eq!(s["resumed"], true, "{s}");
    s
}

fn emails(prefix: &str) -> Vec<String> {
    (0..ROWS)
        .map(|i| format!("{prefix}{i}@example.com"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suppressions_add_exactly_once_across_kill_9_and_faults() {
    let fx = faulty().await;
    fx.file("in.csv", &format!("email\n{}\n", emails("s").join("\n")));
    let s = kill_then_finish(&fx, &["suppressions", "add"], &[], ROWS / 3, |fx| {
        fx.suppressions().len()
    })
    .await;
    // Each one added once, and labelled so: none taken for "already there".
    assert_eq!(
        (n(&s, "added"), n(&s, "unchanged")),
        (ROWS as u64, 0),
        "{s}"
    );
    assert_eq!(fx.suppressions().len(), ROWS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suppressions_remove_exactly_once_across_kill_9_and_faults() {
    let fx = faulty().await;
    let mut text = String::from("suppression_id,email\n");
    for (i, e) in emails("s").iter().enumerate() {
        let id = fx.suppress(e);
        // Half by id, half by email.
        if i % 2 == 0 {
            text.push_str(&format!("{id},\n"));
        } else {
            text.push_str(&format!(",{e}\n"));
        }
    }
    fx.suppress("stays@example.com");
    fx.file("in.csv", &text);
    let s = kill_then_finish(&fx, &["suppressions", "remove"], &[], ROWS / 3, |fx| {
        ROWS + 1 - fx.suppressions().len()
    })
    .await;
    assert_eq!(
        (n(&s, "removed"), n(&s, "unchanged")),
        (ROWS as u64, 0),
        "{s}"
    );
    let left = fx.suppressions();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["email"], "stays@example.com");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testers_delete_exactly_once_across_kill_9_and_faults() {
    let fx = faulty().await;
    let mut text = String::from("email,id\n");
    for (i, e) in emails("d").iter().enumerate() {
        let id = fx.add_user(e);
        if i % 2 == 0 {
            text.push_str(&format!(",{id}\n"));
        } else {
            text.push_str(&format!("{e},\n"));
        }
    }
    fx.add_user("stays@example.com");
    fx.file("in.csv", &text);
    let backup = fx.path("backup.csv");
    let extra = ["--yes", "--backup", backup.to_str().unwrap()];
    let s = kill_then_finish(&fx, &["testers", "delete"], &extra, ROWS / 3, |fx| {
        ROWS + 1 - common::users(&fx.s, 1).len()
    })
    .await;
    assert_eq!(
        (n(&s, "deleted"), n(&s, "unchanged")),
        (ROWS as u64, 0),
        "{s}"
    );
    let left = common::users(&fx.s, 1);
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["email"], "stays@example.com");
    // The resumed run's backup still holds those the killed run deleted.
    let all = emails("d");
    let mut all: Vec<&str> = all.iter().map(String::as_str).collect();
    all.sort();
    assert_backup(&backup, &all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testers_checkin_exactly_once_across_kill_9_and_faults() {
    let fx = faulty().await;
    let mut text = String::from("email,id\n");
    for (i, e) in emails("c").iter().enumerate() {
        let id = fx.add_user(e);
        if i % 2 == 0 {
            text.push_str(&format!(",{id}\n"));
        } else {
            text.push_str(&format!("{e},\n"));
        }
    }
    fx.file("in.csv", &text);
    let visited = |fx: &Fx| {
        common::users(&fx.s, 1)
            .iter()
            .filter(|u| u["checkins_count"].as_u64().unwrap() > 0)
            .count()
    };
    let s = kill_then_finish(&fx, &["testers", "checkin"], &[], ROWS / 3, visited).await;
    assert_eq!(n(&s, "checked_in"), ROWS as u64, "{s}");
    let counts: Vec<u64> = common::users(&fx.s, 1)
        .iter()
        .map(|u| u["checkins_count"].as_u64().unwrap())
        .collect();
    assert!(
        counts.iter().all(|c| *c == 1),
        "a visit counted twice or never: {counts:?}"
    );
}
