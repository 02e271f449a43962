//! Sync against the local mirror, end to end against the in-process
//! sandbox: a fresh mirror costs only the calls for rows that changed; a
//! stale one costs its listing first; nobody who left is brought back;
//! delete-missing is bounded and backed up.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prefsync::export::sink::Format;
use prefsync::export::{ExportOptions, Resource, export};
use prefsync::import::ImportOptions;
use prefsync::import::input::Source;
use prefsync::progress::Silent;
use prefsync::sandbox::{Sandbox, SandboxConfig};
use prefsync::stop::Stop;
use prefsync::sync::{DeleteBound, SyncOptions, SyncSummary, sync};
use serde_json::Value;

struct Fixture {
    dir: tempfile::TempDir,
    sandbox: Sandbox,
}

impl Fixture {
    async fn new(users: usize) -> Fixture {
        let sandbox = common::sandbox(SandboxConfig {
            rate_scale: 0.0,
            seed_testers: users,
            ..SandboxConfig::default()
        })
        .await;
        Fixture {
            dir: tempfile::tempdir().unwrap(),
            sandbox,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn users(&self) -> Vec<Value> {
        common::users(&self.sandbox, 1)
    }

    /// The project as a file: one row a user, email and first name.
    fn rows(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .users()
            .iter()
            .map(|u| {
                (
                    u["email"].as_str().unwrap().to_string(),
                    u["profile"]["first_name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect();
        v.sort();
        v
    }

    fn write(&self, name: &str, rows: &[(String, String)]) -> PathBuf {
        let p = self.path(name);
        let mut w = csv::Writer::from_path(&p).unwrap();
        w.write_record(["email", "first_name"]).unwrap();
        for (e, n) in rows {
            w.write_record([e, n]).unwrap();
        }
        w.flush().unwrap();
        p
    }

    async fn export_mirror(&self) {
        let o = ExportOptions::new(
            vec![Resource::Testers, Resource::Suppressions],
            vec!["1".into()],
            Format::Sqlite,
            self.path("mirror.sqlite"),
        );
        let s = export(
            &common::unlimited_client(&self.sandbox),
            &o,
            Stop::default(),
            Arc::new(Silent),
        )
        .await
        .unwrap();
        assert!(s.complete);
    }

    fn opts(&self, file: &Path) -> SyncOptions {
        let mut import = ImportOptions::new(
            "1",
            Source::File(file.to_path_buf()),
            self.path("ck.sqlite"),
        );
        import.results = Some(self.path("results.csv"));
        SyncOptions {
            import,
            mirror: self.path("mirror.sqlite"),
            max_age: Duration::from_secs(3600),
            refresh: false,
            delete_missing: false,
            max_delete: None,
            backup: Some(self.path("backup.csv")),
        }
    }

    async fn sync(&self, o: &SyncOptions) -> anyhow::Result<SyncSummary> {
        sync(
            &common::unlimited_client(&self.sandbox),
            o,
            Stop::default(),
            Arc::new(Silent),
        )
        .await
    }
}

/// 10,000 rows of which 10% changed: 800 users renamed, 200 new people.
fn changed(rows: &[(String, String)]) -> Vec<(String, String)> {
    rows.iter()
        .enumerate()
        .map(|(i, (e, n))| match i % 10 {
            0 if i % 50 == 0 => (format!("new{i}@sync.test"), format!("New{i}")),
            0 => (e.clone(), format!("Changed{i}")),
            _ => (e.clone(), n.clone()),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_mirror_costs_exactly_the_changed_rows_and_no_list_call() {
    let f = Fixture::new(10_000).await;
    f.export_mirror().await;
    let rows = changed(&f.rows());
    let file = f.write("in.csv", &rows);
    let before = f.sandbox.app.with_world(|w| w.project(1).users.len());
    let s = f.sync(&f.opts(&file)).await.unwrap();
    assert!(!s.refreshed, "{s}");
    assert_eq!(s.refresh_calls, 0);
    let i = &s.import;
    // Suppressed or unsubscribed seeded users may not be brought back, so
    // count what the rows asked for against what was sent.
    assert_eq!(i.created + i.updated, 1000, "{s}");
    assert_eq!(i.api_calls, 1000, "exactly one call per changed row: {s}");
    assert_eq!(i.unchanged, 9000);
    assert_eq!(
        f.sandbox.app.with_world(|w| w.project(1).users.len()),
        before + 200
    );
    // The sandbox holds what the file says.
    let now = f.rows();
    let want: std::collections::BTreeMap<_, _> = rows.iter().cloned().collect();
    for (e, n) in &now {
        if let Some(w) = want.get(e) {
            assert_eq!(w, n, "{e}");
        }
    }
    // Written back: a second sync right after finds nothing to do and
    // makes no call.
    let mut o = f.opts(&file);
    o.import.fresh = true;
    let again = f.sync(&o).await.unwrap();
    assert_eq!(
        (again.import.api_calls, again.import.unchanged),
        (0, 10_000),
        "{again}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_mirror_costs_its_listing_then_the_changed_rows() {
    let f = Fixture::new(2_000).await;
    f.export_mirror().await;
    let rows = changed(&f.rows());
    let file = f.write("in.csv", &rows);
    let (users, suppressions) = f
        .sandbox
        .app
        .with_world(|w| (w.project(1).users.len(), w.project(1).suppressions.len()));
    let mut o = f.opts(&file);
    o.max_age = Duration::ZERO;
    let s = f.sync(&o).await.unwrap();
    assert!(s.refreshed);
    // The project shown once, then every page of users and suppressions.
    let pages = |n: usize| n.div_ceil(25).max(1) as u64;
    assert_eq!(
        s.refresh_calls,
        1 + pages(users) + pages(suppressions),
        "{s}"
    );
    assert_eq!(s.import.api_calls, 200, "{s}");
}

#[tokio::test]
async fn sync_never_brings_back_who_left() {
    let f = Fixture::new(0).await;
    let client = common::unlimited_client(&f.sandbox);
    // One user unsubscribed, one email suppressed with no user.
    let mut t = prefsync::api::TesterInput {
        email: Some("gone@x.io".into()),
        status: Some("applied".into()),
        ..Default::default()
    };
    t.profile.insert("first_name".into(), "Gone".into());
    client.create_tester_id("1", &t).await.unwrap();
    f.sandbox.app.with_world(|w| {
        let p = w.projects.get_mut(&1).unwrap();
        for u in p.users.values_mut() {
            u.unsubscribed_at = Some("2026-01-01T00:00:00Z".into());
        }
    });
    client
        .call(
            prefsync::api::Op::SuppressionCreate,
            Some("1"),
            "betas/1/suppressions.json",
            &[],
            Some(&serde_json::json!({"email": "banned@x.io", "reason": "Manual"})),
        )
        .await
        .unwrap();
    f.export_mirror().await;
    let file = f.path("in.csv");
    std::fs::write(
        &file,
        "email,first_name,status\ngone@x.io,Back,active\nbanned@x.io,B,applied\nnew@x.io,N,applied\n",
    )
    .unwrap();
    let s = f.sync(&f.opts(&file)).await.unwrap();
    let users = f.users();
    let gone = users.iter().find(|u| u["email"] == "gone@x.io").unwrap();
    assert_eq!(gone["status"], "applied", "never set back to active: {s}");
    assert_eq!(gone["profile"]["first_name"], "Back", "its other fields go");
    assert!(users.iter().all(|u| u["email"] != "banned@x.io"), "{s}");
    assert!(users.iter().any(|u| u["email"] == "new@x.io"));
    assert_eq!(s.import.created, 1);
    let results = std::fs::read_to_string(f.path("results.csv")).unwrap();
    assert!(results.contains("banned@x.io,skipped"), "{results}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_missing_is_bounded_backed_up_and_needs_a_full_listing() {
    let f = Fixture::new(200).await;
    f.export_mirror().await;
    let rows = f.rows();
    // 20 users are not in the file.
    let file = f.write("in.csv", &rows[20..]);
    let missing: Vec<String> = rows[..20].iter().map(|r| r.0.clone()).collect();
    // No bound: refused before anything.
    let mut o = f.opts(&file);
    o.delete_missing = true;
    let e = f.sync(&o).await.unwrap_err();
    assert_eq!(prefsync::exit::exit_for(&e).code(), 2, "{e:#}");
    // Over the bound: refused, naming the count, nobody deleted.
    o.max_delete = Some(DeleteBound::Count(19));
    let e = f.sync(&o).await.unwrap_err();
    assert!(e.to_string().contains("would delete 20 users"), "{e:#}");
    assert_eq!(f.users().len(), 200);
    assert!(!f.path("backup.csv").exists());
    // Within it (10% of 200): backed up, then deleted.
    o.max_delete = Some("10%".parse().unwrap());
    o.import.fresh = true;
    let s = f.sync(&o).await.unwrap();
    assert_eq!(s.deleted.as_ref().unwrap().count("deleted"), 20, "{s}");
    assert_eq!(f.users().len(), 180);
    let backup = std::fs::read_to_string(f.path("backup.csv")).unwrap();
    for e in &missing {
        assert!(backup.contains(e.as_str()), "{e} backed up");
    }
    // A filtered listing is not enough.
    let f2 = Fixture::new(30).await;
    let mut e = ExportOptions::new(
        vec![Resource::Testers],
        vec!["1".into()],
        Format::Sqlite,
        f2.path("mirror.sqlite"),
    );
    e.filters = vec![("email_contains".into(), "user1".into())];
    export(
        &common::unlimited_client(&f2.sandbox),
        &e,
        Stop::default(),
        Arc::new(Silent),
    )
    .await
    .unwrap();
    let rows = f2.rows();
    let file = f2.write("in.csv", &rows[5..]);
    let mut o = f2.opts(&file);
    o.delete_missing = true;
    o.max_delete = Some(DeleteBound::Count(100));
    let err = f2.sync(&o).await;
    // The filtered listing is stale for sync, so it lists the project
    // whole first; then the deletion stands on a complete listing.
    let s = err.unwrap();
    assert!(s.refreshed);
    assert_eq!(s.deleted.unwrap().count("deleted"), 5);
}

fn apply_opts(f: &Fixture, plan: &Path) -> prefsync::sync::ApplyOptions {
    prefsync::sync::ApplyOptions {
        plan: plan.to_path_buf(),
        mirror: None,
        stop_on_drift: false,
        concurrency: 4,
        dry_run: false,
        checkpoint: f.path("apply-ck.sqlite"),
        errors: Some(f.path("apply-errors.csv")),
        results: Some(f.path("apply-results.csv")),
        summary_json: None,
        max_duration: None,
        fresh: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_then_apply_does_exactly_the_plan_and_never_overwrites_drift() {
    let f = Fixture::new(300).await;
    f.export_mirror().await;
    let rows = changed(&f.rows());
    let file = f.write("in.csv", &rows);
    let plan_path = f.path("plan.csv");
    let client = common::unlimited_client(&f.sandbox);
    let before = f.sandbox.app.stats_json()["requests"].clone();
    let p = prefsync::sync::plan(
        &client,
        &f.opts(&file),
        &plan_path,
        Stop::default(),
        Arc::new(Silent),
    )
    .await
    .unwrap();
    assert_eq!(
        f.sandbox.app.stats_json()["requests"],
        before,
        "a plan sends nothing"
    );
    assert_eq!(p.actions.get("update"), Some(&24), "{p}");
    assert_eq!(p.actions.get("create"), Some(&6), "{p}");
    assert_eq!(p.actions.get("unchanged"), Some(&270), "{p}");
    // One line per field change: an update of first_name is one line with
    // the old and the new value.
    let mut r = csv::Reader::from_path(&plan_path).unwrap();
    let lines: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
    let update = lines.iter().find(|l| &l[2] == "update").unwrap();
    assert_eq!(&update[3], "profile.first_name");
    assert!(update[5].starts_with("Changed"));
    assert!(!update[8].is_empty(), "the base updated_at is kept");
    // Someone changes one planned user, and one user the plan leaves alone.
    let drifted = update[1].to_string();
    let untouched = lines.iter().find(|l| &l[2] == "unchanged").unwrap()[1].to_string();
    f.sandbox.app.with_world(|w| {
        let p = w.projects.get_mut(&1).unwrap();
        for u in p.users.values_mut() {
            if u.email == drifted || u.email == untouched {
                u.profile.insert("first_name".into(), "ByHand".into());
                u.updated_at = "2030-01-01T00:00:00Z".into();
            }
        }
    });
    // An edited plan is refused.
    let copy = f.path("edited.csv");
    std::fs::write(
        &copy,
        std::fs::read_to_string(&plan_path)
            .unwrap()
            .replace("Changed", "Edited"),
    )
    .unwrap();
    std::fs::copy(
        prefsync::sync::identity_path(&plan_path),
        prefsync::sync::identity_path(&copy),
    )
    .unwrap();
    let e = prefsync::sync::apply(
        &client,
        &apply_opts(&f, &copy),
        Stop::default(),
        Arc::new(Silent),
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string().contains("changed since it was written"),
        "{e:#}"
    );

    let s = prefsync::sync::apply(
        &client,
        &apply_opts(&f, &plan_path),
        Stop::default(),
        Arc::new(Silent),
    )
    .await
    .unwrap();
    assert_eq!(
        (s.count("updated"), s.count("created"), s.rejected),
        (23, 6, 1),
        "{s}"
    );
    let user = |e: &str| f.users().into_iter().find(|u| u["email"] == e).unwrap();
    assert_eq!(
        user(&drifted)["profile"]["first_name"],
        "ByHand",
        "drift is never overwritten"
    );
    assert_eq!(
        user(&untouched)["profile"]["first_name"],
        "ByHand",
        "nothing outside the plan"
    );
    let errors = std::fs::read_to_string(f.path("apply-errors.csv")).unwrap();
    assert!(
        errors.contains("drift") && errors.contains(&drifted),
        "{errors}"
    );
    assert!(
        errors.contains("was \"\"Mary-Jane\"\"") || errors.contains("ByHand"),
        "the drift says what changed: {errors}"
    );
    // Every other planned row holds what the plan says.
    for (e, n) in &rows {
        if *e != drifted && *e != untouched {
            assert_eq!(user(e)["profile"]["first_name"], n.as_str(), "{e}");
        }
    }
    // Applied again: nothing to do.
    let again = prefsync::sync::apply(
        &client,
        &apply_opts(&f, &plan_path),
        Stop::default(),
        Arc::new(Silent),
    )
    .await
    .unwrap();
    assert_eq!(again.already_done_by, Some(s.run_id), "{again}");
}

/// Runs the real binary against the sandbox.
fn prefsync(s: &Sandbox, args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(assert_cmd::cargo::cargo_bin("prefsync"));
    c.args([
        "-q",
        "--rate",
        "testers-list=1000/1s",
        "--rate",
        "account-list=1000/1s",
        "--rate",
        "betas=1000/1s",
    ])
    .args(args)
    .env("PREFINERY_BASE_URL", s.base_url())
    .env("PREFINERY_API_KEY", common::KEY)
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped());
    c
}

/// Starts `cmd`, kills it with SIGKILL once `ready` holds (or it ends),
/// then runs it again to its end; returns the last exit code.
async fn kill_then_finish(
    f: &Fixture,
    mut cmd: impl FnMut() -> std::process::Command,
    ready: impl Fn(&Fixture) -> bool,
) -> i32 {
    let mut child = cmd().spawn().unwrap();
    let t0 = std::time::Instant::now();
    while !ready(f) && t0.elapsed() < Duration::from_secs(60) {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let mut again = cmd();
    let out = tokio::task::spawn_blocking(move || again.output().unwrap())
        .await
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let code = out.status.code().unwrap_or(-1);
    if code != 0 {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    }
    code
}

fn assert_holds(f: &Fixture, rows: &[(String, String)], users: usize) {
    let all = f.users();
    let mut emails: Vec<&str> = all.iter().map(|u| u["email"].as_str().unwrap()).collect();
    emails.sort();
    let n = emails.len();
    emails.dedup();
    assert_eq!(emails.len(), n, "nobody created twice");
    assert_eq!(n, users, "nobody skipped, nobody extra");
    let by: std::collections::HashMap<_, _> = all
        .iter()
        .map(|u| (u["email"].as_str().unwrap().to_string(), u.clone()))
        .collect();
    for (e, name) in rows {
        assert_eq!(by[e]["profile"]["first_name"], name.as_str(), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_sync_and_during_apply_then_again_does_nothing_twice() {
    let f = Fixture {
        dir: tempfile::tempdir().unwrap(),
        sandbox: common::sandbox(SandboxConfig {
            rate_scale: 0.0,
            seed_testers: 500,
            latency_ms: Some((20, 40)),
            fail_after_write_rate: 0.05,
            seed: 11,
            ..SandboxConfig::default()
        })
        .await,
    };
    f.export_mirror().await;
    let rows = changed(&f.rows());
    let file = f.write("in.csv", &rows);
    let (file_s, mirror) = (
        file.display().to_string(),
        f.path("mirror.sqlite").display().to_string(),
    );
    let ck = f.path("sync.ck.sqlite").display().to_string();
    let summary = f.path("sync.summary.json").display().to_string();
    let changed_now = |f: &Fixture| {
        f.users()
            .iter()
            .filter(|u| {
                u["profile"]["first_name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("Changed") || n.starts_with("New"))
            })
            .count()
            >= 15
    };
    let code = kill_then_finish(
        &f,
        || {
            prefsync(
                &f.sandbox,
                &[
                    "sync",
                    "testers",
                    "--beta",
                    "1",
                    "--file",
                    &file_s,
                    "--mirror",
                    &mirror,
                    "--checkpoint",
                    &ck,
                    "--concurrency",
                    "2",
                    "--summary-json",
                    &summary,
                ],
            )
        },
        changed_now,
    )
    .await;
    assert_eq!(code, 0);
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(s["resumed"], true, "killed mid-run, then resumed: {s}");
    assert_holds(&f, &rows, 510);

    // The same for an apply: a plan of 50 more renames, killed mid-way.
    let rows2: Vec<(String, String)> = rows
        .iter()
        .enumerate()
        .map(|(i, (e, n))| {
            if i % 10 == 5 {
                (e.clone(), format!("Again{i}"))
            } else {
                (e.clone(), n.clone())
            }
        })
        .collect();
    let file2 = f.write("in2.csv", &rows2);
    let plan_path = f.path("plan.csv");
    let mut o = f.opts(&file2);
    o.import.checkpoint = f.path("plan.ck.sqlite");
    prefsync::sync::plan(
        &common::unlimited_client(&f.sandbox),
        &o,
        &plan_path,
        Stop::default(),
        Arc::new(Silent),
    )
    .await
    .unwrap();
    let (plan_s, ck2) = (
        plan_path.display().to_string(),
        f.path("apply.ck.sqlite").display().to_string(),
    );
    let summary2 = f.path("apply.summary.json").display().to_string();
    let errors2 = f.path("apply.errors.csv").display().to_string();
    let again_now = |f: &Fixture| {
        f.users()
            .iter()
            .filter(|u| {
                u["profile"]["first_name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("Again"))
            })
            .count()
            >= 10
    };
    let code = kill_then_finish(
        &f,
        || {
            prefsync(
                &f.sandbox,
                &[
                    "apply",
                    &plan_s,
                    "--checkpoint",
                    &ck2,
                    "--concurrency",
                    "2",
                    "--summary-json",
                    &summary2,
                    "--errors",
                    &errors2,
                ],
            )
        },
        again_now,
    )
    .await;
    assert_eq!(
        code,
        0,
        "{}",
        std::fs::read_to_string(&errors2).unwrap_or_default()
    );
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&summary2).unwrap()).unwrap();
    assert_eq!(s["resumed"], true, "killed mid-run, then resumed: {s}");
    assert_holds(&f, &rows2, 510);
}

#[tokio::test]
async fn a_plan_with_delete_missing_is_bounded_and_its_apply_backs_up_first() {
    let f = Fixture::new(60).await;
    f.export_mirror().await;
    let rows = f.rows();
    let file = f.write("in.csv", &rows[6..]);
    let plan_path = f.path("plan.csv");
    let client = common::unlimited_client(&f.sandbox);
    let mut o = f.opts(&file);
    o.delete_missing = true;
    o.max_delete = Some(DeleteBound::Count(5));
    // Over the bound: no plan at all, and the count is named.
    let e = prefsync::sync::plan(&client, &o, &plan_path, Stop::default(), Arc::new(Silent))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("would delete 6 users"), "{e:#}");
    assert!(!plan_path.exists());
    o.max_delete = Some(DeleteBound::Percent(10.0));
    let p = prefsync::sync::plan(&client, &o, &plan_path, Stop::default(), Arc::new(Silent))
        .await
        .unwrap();
    assert_eq!(p.actions.get("delete"), Some(&6), "{p}");
    assert_eq!(f.users().len(), 60, "a plan deletes nothing");
    let s = prefsync::sync::apply(
        &client,
        &apply_opts(&f, &plan_path),
        Stop::default(),
        Arc::new(Silent),
    )
    .await
    .unwrap();
    assert_eq!(s.count("deleted"), 6, "{s}");
    assert_eq!(f.users().len(), 54);
    let backup = std::fs::read_to_string(f.path("plan.csv.deleted-users.backup.csv")).unwrap();
    for (e, _) in &rows[..6] {
        assert!(backup.contains(e.as_str()), "{e} backed up: {backup}");
    }
}

/// A project named by its UID (as Prefinery's settings show it): the
/// mirror the sync lists it into is found again by that UID, by sync and
/// by plan, though a project's record carries no `uid` (the sandbox's, as
/// the reference shows it, has none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_named_by_its_uid_is_found_in_its_mirror() {
    let f = Fixture::new(30).await;
    let mut rows = f.rows();
    rows[0].1 = "Renamed".into();
    let file = f.write("in.csv", &rows);
    let mut o = f.opts(&file);
    o.import.beta = "a9b8c7de".into();
    let s = f.sync(&o).await.unwrap();
    assert!(s.refreshed);
    assert_eq!(s.import.updated, 1, "{s:?}");
    // Again: the mirror is fresh and known by the UID, no listing.
    let again = f.sync(&o).await.unwrap();
    assert!(!again.refreshed, "{again:?}");
    let out = prefsync(
        &f.sandbox,
        &[
            "plan",
            "testers",
            "--beta",
            "a9b8c7de",
            "--file",
            file.to_str().unwrap(),
            "--mirror",
            f.path("mirror.sqlite").to_str().unwrap(),
            "--out",
            f.path("plan.csv").to_str().unwrap(),
        ],
    )
    .output()
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
