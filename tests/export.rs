//! Export end to end against the in-process sandbox.

mod common;

use std::path::Path;
use std::sync::Arc;

use prefsync::export::sink::{CsvOptions, Format};
use prefsync::export::{ExportOptions, ExportSummary, Resource, export};
use prefsync::progress::{Progress, Silent, Snapshot};
use prefsync::sandbox::{Sandbox, SandboxConfig};
use prefsync::stop::Stop;
use serde_json::Value;

fn opts(resource: Resource, format: Format, out: &Path) -> ExportOptions {
    ExportOptions::new(
        vec![resource],
        if resource == Resource::Betas {
            vec![]
        } else {
            vec!["1".into()]
        },
        format,
        out.to_path_buf(),
    )
}

async fn run(s: &Sandbox, o: &ExportOptions) -> ExportSummary {
    export(
        &common::unlimited_client(s),
        o,
        Stop::default(),
        Arc::new(Silent),
    )
    .await
    .unwrap()
}

/// What the sandbox holds for a resource, as the API renders it.
fn truth(s: &Sandbox, r: Resource) -> Vec<Value> {
    let state: Value = s.app.with_world(|w| {
        let p = w.project(1);
        match r {
            Resource::Testers => Value::Array(p.users.values().map(|u| p.user_json(u)).collect()),
            Resource::Rewards => {
                serde_json::to_value(p.rewards.values().collect::<Vec<_>>()).unwrap()
            }
            Resource::Points => {
                serde_json::to_value(p.points.values().collect::<Vec<_>>()).unwrap()
            }
            Resource::Suppressions => {
                serde_json::to_value(p.suppressions.values().collect::<Vec<_>>()).unwrap()
            }
            Resource::Betas => Value::Array(w.projects.values().map(|p| p.beta_json()).collect()),
        }
    });
    state.as_array().unwrap().clone()
}

fn csv_cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

const RESOURCES: [Resource; 5] = [
    Resource::Testers,
    Resource::Rewards,
    Resource::Suppressions,
    Resource::Points,
    Resource::Betas,
];

#[tokio::test]
async fn every_resource_and_format_holds_exactly_what_the_sandbox_holds() {
    let s = common::sandbox(SandboxConfig {
        seed_testers: 230,
        rate_scale: 0.0,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    for r in RESOURCES {
        let want = truth(&s, r);
        assert!(!want.is_empty(), "{r:?}");

        let jsonl = dir.path().join(format!("{}.jsonl", r.name()));
        let sum = run(&s, &opts(r, Format::Jsonl, &jsonl)).await;
        assert!(sum.complete && sum.consistent);
        let got: Vec<Value> = std::fs::read_to_string(&jsonl)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(got, want, "{r:?} jsonl");

        let csv_path = dir.path().join(format!("{}.csv", r.name()));
        run(&s, &opts(r, Format::Csv, &csv_path)).await;
        let mut rd = csv::Reader::from_path(&csv_path).unwrap();
        let headers: Vec<String> = rd.headers().unwrap().iter().map(str::to_string).collect();
        let rows: Vec<csv::StringRecord> = rd.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), want.len(), "{r:?} csv");
        for (row, w) in rows.iter().zip(&want) {
            for (h, cell) in headers.iter().zip(row.iter()) {
                let expected = match h.strip_prefix("profile.") {
                    Some(k) => w["profile"].get(k).map(csv_cell).unwrap_or_default(),
                    None => csv_cell(&w[h.as_str()]),
                };
                assert_eq!(cell, expected, "{r:?} csv column {h}");
            }
            // Every field of the record has a column.
            for k in w.as_object().unwrap().keys() {
                assert!(
                    k == "profile" || headers.contains(k),
                    "{r:?}: no column for {k}"
                );
            }
        }

        let db = dir.path().join("all.sqlite");
        run(&s, &opts(r, Format::Sqlite, &db)).await;
        let conn = rusqlite::Connection::open(&db).unwrap();
        let mut st = conn
            .prepare(&format!(
                "SELECT record FROM {} WHERE deleted_at IS NULL ORDER BY id",
                r.name()
            ))
            .unwrap();
        let got: Vec<Value> = st
            .query_map([], |row| row.get::<_, String>(0))
            .unwrap()
            .map(|x| serde_json::from_str(&x.unwrap()).unwrap())
            .collect();
        assert_eq!(got, want, "{r:?} sqlite");
    }
    // The seeded data has unicode, commas, quotes and newlines.
    let csv = std::fs::read_to_string(dir.path().join("testers.csv")).unwrap();
    assert!(
        csv.contains("Zoë")
            && csv.contains("\"Smith, Jr.\"")
            && csv.contains("\"\"\"The\"\" Chen\"")
            && csv.contains("Nøgård\nSecond line")
    );
}

#[tokio::test]
async fn re_export_marks_deleted_users_and_keeps_history() {
    let s = common::sandbox(SandboxConfig {
        seed_testers: 60,
        rate_scale: 0.0,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("nightly.sqlite");
    let o = opts(Resource::Testers, Format::Sqlite, &db);
    run(&s, &o).await;
    s.app.with_world(|w| {
        for id in [3, 10, 44] {
            w.delete_user(1, id).expect("a seeded user");
        }
    });
    let sum = run(&s, &o).await;
    assert_eq!(sum.parts[0].deleted, 3);
    let conn = rusqlite::Connection::open(&db).unwrap();
    let deleted: Vec<i64> = conn
        .prepare("SELECT id FROM testers WHERE deleted_at IS NOT NULL ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(deleted, [3, 10, 44]);
    let runs: i64 = conn
        .query_row(
            "SELECT count(*) FROM export_runs WHERE complete = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(runs, 2);
    let email: String = conn
        .query_row("SELECT email FROM testers WHERE id = 5", [], |r| r.get(0))
        .unwrap();
    assert_eq!(email, "user5@example.com");
}

#[tokio::test]
async fn excel_safe_neutralises_formula_cells() {
    let s = common::sandbox(SandboxConfig {
        rate_scale: 0.0,
        ..Default::default()
    })
    .await;
    s.app.with_world(|w| {
        w.create_user(1, &serde_json::json!({"email": "evil@x.io", "profile": {"first_name": "=HYPERLINK(\"http://x\")", "last_name": "@SUM(1)", "city": "-2+3"}}))
            .unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw.csv");
    run(&s, &opts(Resource::Testers, Format::Csv, &raw)).await;
    let safe = dir.path().join("safe.csv");
    let mut o = opts(Resource::Testers, Format::Csv, &safe);
    o.csv = CsvOptions {
        excel_safe: true,
        bom: true,
    };
    run(&s, &o).await;
    let raw = std::fs::read_to_string(raw).unwrap();
    assert!(
        raw.contains(",\"=HYPERLINK(\"\"http://x\"\")\","),
        "canonical data stays exact: {raw}"
    );
    let safe_text = std::fs::read_to_string(&safe).unwrap();
    assert!(safe_text.starts_with('\u{feff}'));
    assert!(
        safe_text.contains("'=HYPERLINK")
            && safe_text.contains("'@SUM(1)")
            && safe_text.contains("'-2+3"),
        "{safe_text}"
    );
    // Numbers stay numbers.
    assert!(safe_text.contains(",5,0,5,"));
}

#[tokio::test]
async fn the_lock_refuses_a_second_run_on_the_same_output() {
    let s = common::sandbox(SandboxConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.csv");
    let _held = prefsync::lock::RunLock::acquire(&out).unwrap();
    let e = export(
        &common::client(&s),
        &opts(Resource::Testers, Format::Csv, &out),
        Stop::default(),
        Arc::new(Silent),
    )
    .await
    .unwrap_err();
    assert_eq!(prefsync::exit::exit_for(&e).code(), 6, "{e}");
    assert!(!out.exists());
}

/// Deletes users from the start of the list after the second page, so every
/// later record shifts back across page boundaries.
struct ShiftPages(Arc<prefsync::sandbox::App>);

impl Progress for ShiftPages {
    fn update(&self, s: &Snapshot) {
        if s.done == 2 {
            self.0.with_world(|w| {
                let first: Vec<u64> = w.project(1).users.keys().take(7).copied().collect();
                for id in first {
                    w.delete_user(1, id).unwrap();
                }
            });
        }
    }
}

#[tokio::test]
async fn shifting_pages_are_reread_and_reported() {
    // The total comes in X-Pagination (its real key name is unknown; any
    // key starting with "tot" is read).
    let s = common::sandbox(SandboxConfig {
        seed_testers: 200,
        rate_scale: 0.0,
        total_key: true,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.jsonl");
    let sum = export(
        &common::unlimited_client(&s),
        &opts(Resource::Testers, Format::Jsonl, &out),
        Stop::default(),
        Arc::new(ShiftPages(s.app.clone())),
    )
    .await
    .unwrap();
    assert!(sum.parts[0].reread && !sum.consistent, "{sum}");
    let got: Vec<u64> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let mut unique = got.clone();
    unique.dedup();
    assert_eq!(unique.len(), got.len(), "no duplicates");
    for u in common::users(&s, 1) {
        assert!(
            got.contains(&u["id"].as_u64().unwrap()),
            "user {} missing",
            u["id"]
        );
    }
}

/// kill -9 of a real export process, then the same command again: the same
/// file as an uninterrupted export.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_export_resumes_to_the_same_result() {
    let s = common::sandbox(SandboxConfig {
        seed_testers: 2500,
        rate_scale: 60.0,
        latency_ms: Some((1, 3)),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("reference.csv");
    let client = common::client_for(
        &s.base_url(),
        common::KEY,
        &["testers-list=60/1s", "account-list=180/1s"],
    );
    export(
        &client,
        &opts(Resource::Testers, Format::Csv, &reference),
        Stop::default(),
        Arc::new(Silent),
    )
    .await
    .unwrap();

    let out = dir.path().join("nightly.csv");
    let base = s.base_url();
    let out_c = out.clone();
    let spawn = move || {
        std::process::Command::new(assert_cmd::cargo::cargo_bin("prefsync"))
            .args([
                "export",
                "testers",
                "--beta",
                "1",
                "-q",
                "--rate",
                "testers-list=60/1s",
                "--rate",
                "account-list=180/1s",
                "--summary-json",
            ])
            .arg(out_c.with_extension("json"))
            .arg("--out")
            .arg(&out_c)
            .env("PREFINERY_BASE_URL", &base)
            .env("PREFINERY_API_KEY", common::KEY)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let spool = dir.path().join(".nightly.csv.partial.jsonl");
    let spawn = std::sync::Arc::new(spawn);
    let mut child = spawn();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::metadata(&spool).map(|m| m.len()).unwrap_or(0) < 200_000 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out.exists(), "never a half-written file at the final path");
    let again = spawn.clone();
    let out2 = tokio::task::spawn_blocking(move || again().wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(
        out2.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out2.stderr)
    );
    // Quiet: no summary printed (issue 16); the summary JSON has it.
    assert_eq!(String::from_utf8_lossy(&out2.stderr), "");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.with_extension("json")).unwrap()).unwrap();
    assert_eq!(summary["rows"], 2500);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&reference).unwrap()
    );
    assert!(!spool.exists());
}

/// Records every progress snapshot.
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<Snapshot>>);

impl Progress for Recorder {
    fn update(&self, s: &Snapshot) {
        self.0.lock().unwrap().push(s.clone());
    }
}

/// Progress counts pages and users, each of its total as `X-Pagination`
/// tells it; without a record count, pages × 25 bounds the users.
#[tokio::test]
async fn progress_counts_pages_and_users_of_their_totals() {
    for total_key in [true, false] {
        let s = common::sandbox(SandboxConfig {
            seed_testers: 230,
            rate_scale: 0.0,
            total_key,
            ..Default::default()
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let rec = Arc::new(Recorder::default());
        let o = opts(
            Resource::Testers,
            Format::Jsonl,
            &dir.path().join("users.jsonl"),
        );
        export(
            &common::unlimited_client(&s),
            &o,
            Stop::default(),
            rec.clone(),
        )
        .await
        .unwrap();
        let seen = rec.0.lock().unwrap();
        let (first, last) = (&seen[0], seen.last().unwrap());
        let total = if total_key { 230 } else { 250 };
        assert_eq!((first.unit, first.done, first.total), ("pages", 1, 10));
        let items = first.items.unwrap();
        assert_eq!(
            (items.unit, items.done, items.total, items.approximate),
            ("users", 25, Some(total), !total_key)
        );
        assert_eq!((last.done, last.total), (10, 10));
        let items = last.items.unwrap();
        assert_eq!((items.done, items.total), (230, Some(total)));
    }
}

/// Stops the export once `after` pages are written, as a kill between two
/// pages would, and records the snapshots.
struct StopAfter {
    after: u64,
    stop: Stop,
}

impl Progress for StopAfter {
    fn update(&self, s: &Snapshot) {
        if s.done >= self.after {
            self.stop.trigger();
        }
    }
}

/// The ids in a CSV or JSONL export, in file order.
fn ids_in(path: &Path, format: Format) -> Vec<u64> {
    match format {
        Format::Csv => {
            let mut rd = csv::Reader::from_path(path).unwrap();
            let col = rd
                .headers()
                .unwrap()
                .iter()
                .position(|h| h == "id")
                .unwrap();
            rd.records()
                .map(|r| r.unwrap()[col].parse().unwrap())
                .collect()
        }
        _ => std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["id"]
                    .as_u64()
                    .unwrap()
            })
            .collect(),
    }
}

/// Regression: an export stopped mid-list, then users deleted from pages it
/// had already read, then resumed. The list's size seen before the stop must
/// survive in the checkpoint: the resumed run sees that the list changed,
/// reads it once more from the start (users shifted onto pages already
/// read), says it is not a consistent snapshot, and a SQLite export marks
/// the deleted users deleted.
#[tokio::test]
async fn a_resumed_export_sees_the_list_changed_while_it_was_stopped() {
    for format in [Format::Sqlite, Format::Csv, Format::Jsonl] {
        let s = common::sandbox(SandboxConfig {
            seed_testers: 230,
            rate_scale: 0.0,
            total_key: true,
            ..Default::default()
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join(format!("users.{format:?}"));
        let o = opts(Resource::Testers, format, &out);
        let stop = Stop::default();
        let first = export(
            &common::unlimited_client(&s),
            &o,
            stop.clone(),
            Arc::new(StopAfter {
                after: 4,
                stop: stop.clone(),
            }),
        )
        .await
        .unwrap();
        assert!(!first.complete, "{format:?}: {first}");
        assert_eq!(first.pages, 4, "{format:?}");

        // Ten users from the pages already read leave: ten others shift
        // back onto page 4, which will not be read again by a plain resume.
        let gone: Vec<u64> = s.app.with_world(|w| {
            let ids: Vec<u64> = w.project(1).users.keys().take(10).copied().collect();
            for id in &ids {
                w.delete_user(1, *id).unwrap();
            }
            ids
        });

        let sum = run(&s, &o).await;
        let part = &sum.parts[0];
        assert_eq!(part.resumed_from_page, 5, "{format:?}");
        assert!(
            sum.complete && part.reread && !part.consistent && !sum.consistent,
            "{format:?}: {sum}"
        );
        let now: Vec<u64> = common::users(&s, 1)
            .iter()
            .map(|u| u["id"].as_u64().unwrap())
            .collect();
        assert_eq!(now.len(), 220);
        match format {
            Format::Sqlite => {
                let conn = rusqlite::Connection::open(&out).unwrap();
                let rows: Vec<(u64, Option<String>)> = conn
                    .prepare("SELECT id, deleted_at FROM testers ORDER BY id")
                    .unwrap()
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect();
                let present: Vec<u64> = rows
                    .iter()
                    .filter(|(_, d)| d.is_none())
                    .map(|(id, _)| *id)
                    .collect();
                let deleted: Vec<u64> = rows
                    .iter()
                    .filter(|(_, d)| d.is_some())
                    .map(|(id, _)| *id)
                    .collect();
                assert_eq!(present, now, "no gap");
                assert_eq!(deleted, gone, "the users who left are marked deleted");
                assert_eq!(part.deleted, 10);
            }
            _ => {
                let got = ids_in(&out, format);
                let mut unique = got.clone();
                unique.sort_unstable();
                unique.dedup();
                assert_eq!(unique.len(), got.len(), "{format:?}: no duplicate");
                for id in &now {
                    assert!(got.contains(id), "{format:?}: user {id} missing");
                }
            }
        }
    }
}

/// Deletes the first `n` users once `at` pages are written, and stops the
/// export once `stop_at` pages are written.
struct DeleteThenStop {
    app: Arc<prefsync::sandbox::App>,
    at: u64,
    n: usize,
    stop_at: u64,
    stop: Stop,
}

impl Progress for DeleteThenStop {
    fn update(&self, s: &Snapshot) {
        if s.done == self.at {
            self.app.with_world(|w| {
                let first: Vec<u64> = w.project(1).users.keys().take(self.n).copied().collect();
                for id in first {
                    w.delete_user(1, id).unwrap();
                }
            });
        }
        if s.done >= self.stop_at {
            self.stop.trigger();
        }
    }
}

/// An export stopped while it re-reads a list that changed: resumed, it
/// goes on with the re-read (not a third pass), still says the export is
/// not a consistent snapshot, and marks the users who left deleted.
#[tokio::test]
async fn an_export_stopped_during_its_reread_resumes_it() {
    let s = common::sandbox(SandboxConfig {
        seed_testers: 200,
        rate_scale: 0.0,
        total_key: true,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("users.sqlite");
    let o = opts(Resource::Testers, Format::Sqlite, &out);
    let stop = Stop::default();
    // 8 pages, then the first two of the re-read.
    let first = export(
        &common::unlimited_client(&s),
        &o,
        stop.clone(),
        Arc::new(DeleteThenStop {
            app: s.app.clone(),
            at: 2,
            n: 7,
            stop_at: 10,
            stop: stop.clone(),
        }),
    )
    .await
    .unwrap();
    assert!(!first.complete && first.parts[0].reread, "{first}");

    let sum = run(&s, &o).await;
    let part = &sum.parts[0];
    assert_eq!(part.resumed_from_page, 3);
    assert!(sum.complete && part.reread && !sum.consistent, "{sum}");
    assert_eq!((part.rows, part.deleted), (200, 7), "{sum}");
    let conn = rusqlite::Connection::open(&out).unwrap();
    let (present, deleted, runs): (u64, u64, u64) = conn
        .query_row(
            "SELECT (SELECT count(*) FROM testers WHERE deleted_at IS NULL),
                    (SELECT count(*) FROM testers WHERE deleted_at IS NOT NULL),
                    (SELECT count(*) FROM export_runs WHERE complete = 1 AND consistent = 0)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((present, deleted, runs), (193, 7, 1));
    let stray: u64 = conn
        .query_row(
            "SELECT count(*) FROM testers WHERE last_seen_run < 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stray, 0, "every record is given its run back");
}
