//! The command-line surface a new user meets first (issue 16): `runs` on a
//! file that is not a checkpoint, `check --for` and `--output json`, the
//! messages for a wrong key and an unknown project, completions, man
//! pages, and every subcommand's help (examples, exit codes, defaults).

mod common;

use std::path::Path;

use assert_cmd::Command;
use clap::{CommandFactory as _, Parser as _};
use prefsync::cli::Cli;
use prefsync::sandbox::{Keys, Permission, SandboxConfig};
use serde_json::Value;

const SECRET: &str = "sk_live_surface-secret-0123456789";

fn prefsync(base: &str, key: Option<&str>) -> Command {
    let mut c = Command::cargo_bin("prefsync").unwrap();
    c.env_remove("PREFINERY_API_KEY")
        .env_remove("PREFINERY_API_KEY_FILE")
        .env_remove("PREFINERY_BETA")
        .env("PREFINERY_BASE_URL", base)
        .timeout(std::time::Duration::from_secs(60));
    if let Some(k) = key {
        c.env("PREFINERY_API_KEY", k);
    }
    c
}

/// Runs a blocking command while the in-process sandbox serves.
async fn run(cmd: Command) -> (Option<i32>, String, String) {
    let mut cmd = cmd;
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Regression (issue 16, defect 5): `runs` pointed at an export database
/// added a table to it and failed with "no such table: runs", exit 1. The
/// file must come out byte for byte and time for time as it went in, with
/// nothing created beside it, and its export runs listed.
#[tokio::test(flavor = "multi_thread")]
async fn runs_on_an_export_database_lists_its_export_runs_and_changes_nothing() {
    let s = common::sandbox(SandboxConfig {
        seed_testers: 30,
        rate_scale: 0.0,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("project.sqlite");
    let mut c = prefsync(&s.base_url(), Some(common::KEY));
    c.args(["export", "testers", "--beta", "1", "-q", "--out"])
        .arg(&db);
    let (code, _, err) = run(c).await;
    assert_eq!(code, Some(0), "{err}");
    // The export's lock file is its own business; what `runs` may not do
    // is add to or change what is there.
    let before_files = files_in(dir.path());
    let before_bytes = std::fs::read(&db).unwrap();
    let before_mtime = std::fs::metadata(&db).unwrap().modified().unwrap();

    for output in ["text", "json"] {
        let mut c = prefsync(&s.base_url(), None);
        c.args(["runs", "--output", output, "--checkpoint"])
            .arg(&db);
        let (code, out, err) = run(c).await;
        assert_eq!(code, Some(0), "{out}{err}");
        if output == "json" {
            let v: Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["kind"], "export", "{v}");
            assert_eq!(v["runs"][0]["resource"], "testers", "{v}");
            assert_eq!(v["runs"][0]["rows"], 30, "{v}");
            assert_eq!(v["runs"][0]["state"], "done", "{v}");
        } else {
            assert!(
                out.contains("is not a run checkpoint: it is a SQLite export"),
                "{out}"
            );
            assert!(out.contains("testers") && out.contains("30"), "{out}");
        }
    }
    assert_eq!(
        std::fs::read(&db).unwrap(),
        before_bytes,
        "the file changed"
    );
    assert_eq!(
        std::fs::metadata(&db).unwrap().modified().unwrap(),
        before_mtime
    );
    assert_eq!(files_in(dir.path()), before_files, "files were created");
}

/// `runs` names what a file is when it is not a checkpoint, and exits 2.
#[test]
fn runs_names_a_file_that_is_not_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("users.csv");
    std::fs::write(&csv, "email\nada@example.com\n").unwrap();
    let other = dir.path().join("other.sqlite");
    rusqlite::Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE notes (body TEXT);")
        .unwrap();
    let other_bytes = std::fs::read(&other).unwrap();
    for (file, says) in [
        (&csv, "is not a SQLite database"),
        (
            &other,
            "is a SQLite database but not a prefsync checkpoint (its tables: notes)",
        ),
        (&dir.path().join("missing.sqlite"), "no checkpoint at"),
    ] {
        let out = prefsync("http://127.0.0.1:9/api/v2", None)
            .args(["runs", "--checkpoint"])
            .arg(file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(says), "{err}");
    }
    assert_eq!(std::fs::read(&other).unwrap(), other_bytes);
    assert!(!dir.path().join("missing.sqlite").exists());
}

/// Regression (issue 16, defect 8): `runs` showed `rows 0` for a stopped
/// run that had rows done: a run stopped during its single pass has no
/// total yet, and the rows it recorded are the figure to show.
#[test]
fn runs_shows_the_rows_a_stopped_run_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ck.sqlite");
    {
        let ck = prefsync::checkpoint::Checkpoint::open(&path).unwrap();
        let run = ck
            .new_run("testers.import", "in.csv", Some(1), Some("h"), "1", "")
            .unwrap();
        ck.begin().unwrap();
        for line in 2..=1294 {
            ck.conn()
                .execute(
                    "INSERT INTO rows (run_id, line, key, state, action, target_id) VALUES (?1, ?2, ?3, 'done', 'created', ?2)",
                    rusqlite::params![run, line, format!("u{line}@x.io")],
                )
                .unwrap();
        }
        ck.commit().unwrap();
        ck.set_state(run, "stopped").unwrap();
    }
    let out = prefsync("http://127.0.0.1:9/api/v2", None)
        .args(["runs", "--checkpoint"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let line = text.lines().nth(1).unwrap();
    assert!(line.contains(" 1293+ "), "{line}");
    assert!(line.contains("created 1293"), "{line}");
    let out = prefsync("http://127.0.0.1:9/api/v2", None)
        .args(["runs", "--output", "json", "--checkpoint"])
        .arg(&path)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &v["runs"][0];
    assert_eq!(v["kind"], "checkpoint");
    assert_eq!(r["rows"], 1293, "{r}");
    assert_eq!(r["input_read"], false, "{r}");
    assert_eq!(r["done"]["created"], 1293, "{r}");
    assert_eq!(r["state"], "stopped", "{r}");
}

/// Regression (issue 16, defect 8): the wrong-key error was printed twice,
/// on stdout (in the report) and on stderr. Once, on stderr.
#[tokio::test(flavor = "multi_thread")]
async fn the_wrong_key_error_is_printed_once_on_stderr() {
    let s = common::sandbox(SandboxConfig::default()).await;
    let mut c = prefsync(&s.base_url(), Some(SECRET));
    c.args(["check", "--beta", "1"]);
    let (code, out, err) = run(c).await;
    assert_eq!(code, Some(3), "{out}{err}");
    assert!(!out.contains("rejected (HTTP 401)"), "{out}");
    assert_eq!(err.matches("rejected (HTTP 401)").count(), 1, "{err}");
    assert!(!out.contains(SECRET) && !err.contains(SECRET));
}

/// `check --for JOB` exits 3 naming the permission the job lacks, and 0
/// when the key has what the job needs; `--output json` says the same.
#[tokio::test(flavor = "multi_thread")]
async fn check_for_a_job_names_the_missing_permission_and_exits_3() {
    let s = common::sandbox(SandboxConfig {
        keys: Keys::single_without(SECRET, &[Permission::UsersCreate, Permission::PointsCreate]),
        ..Default::default()
    })
    .await;
    for (job, missing) in [
        ("import", Some("Users > Create")),
        ("points", Some("Points > Create")),
        ("export", None),
        ("delete", None),
    ] {
        let mut c = prefsync(&s.base_url(), Some(SECRET));
        c.args(["check", "--beta", "1", "--for", job]);
        let (code, out, err) = run(c).await;
        match missing {
            Some(p) => {
                assert_eq!(code, Some(3), "{job}: {out}{err}");
                assert!(
                    err.contains(&format!("the API key lacks {p}, which {job} needs")),
                    "{err}"
                );
                assert!(out.contains(&format!("for {job}: missing {p}")), "{out}");
            }
            None => {
                assert_eq!(code, Some(0), "{job}: {out}{err}");
                assert!(out.contains("has every permission it needs"), "{out}");
            }
        }
        let mut c = prefsync(&s.base_url(), Some(SECRET));
        c.args(["check", "--beta", "1", "--output", "json", "--for", job]);
        let (code, out, err) = run(c).await;
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
        assert_eq!(code, Some(if missing.is_some() { 3 } else { 0 }));
        assert_eq!(v["works"], true);
        assert_eq!(v["project"]["id"], 1);
        assert_eq!(v["for"]["job"], job);
        assert_eq!(v["for"]["ok"], missing.is_none());
        let want: Vec<Value> = missing.into_iter().map(Value::from).collect();
        assert_eq!(v["for"]["missing"], Value::Array(want), "{v}");
        let create = v["permissions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "Users > Create")
            .unwrap();
        assert_eq!(create["grant"], "missing");
        assert!(!out.contains(SECRET) && !err.contains(SECRET));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn betas_output_json_lists_the_projects() {
    let s = common::sandbox(SandboxConfig::default()).await;
    let mut c = prefsync(&s.base_url(), Some(common::KEY));
    c.args(["betas", "--output", "json"]);
    let (code, out, err) = run(c).await;
    assert_eq!(code, Some(0), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let projects = v["projects"].as_array().unwrap();
    assert_eq!(projects[0]["id"], 1);
    assert_eq!(projects[0]["name"], "Sandbox Waitlist");
    assert!(projects[0]["users"].is_u64());
    assert_eq!(projects[1]["name"], "Second Project");
}

/// The key from the file PREFINERY_API_KEY_FILE names (systemd
/// credentials, container secrets); --api-key-file wins over it, and it
/// over PREFINERY_API_KEY.
#[tokio::test(flavor = "multi_thread")]
async fn the_key_file_from_the_environment() {
    let s = common::sandbox(SandboxConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    let bad = dir.path().join("bad");
    std::fs::write(&good, "sandbox-key\n").unwrap();
    std::fs::write(&bad, format!("{SECRET}\n")).unwrap();
    // The file wins over a wrong PREFINERY_API_KEY.
    let mut c = prefsync(&s.base_url(), Some(SECRET));
    c.env("PREFINERY_API_KEY_FILE", &good).args(["betas"]);
    let (code, out, err) = run(c).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("Sandbox Waitlist"));
    // --api-key-file wins over it.
    let mut c = prefsync(&s.base_url(), None);
    c.env("PREFINERY_API_KEY_FILE", &bad)
        .args(["betas", "--api-key-file"])
        .arg(&good);
    assert_eq!(run(c).await.0, Some(0));
    // A wrong key from it is refused, and never printed.
    let mut c = prefsync(&s.base_url(), None);
    c.env("PREFINERY_API_KEY_FILE", &bad).args(["betas"]);
    let (code, out, err) = run(c).await;
    assert_eq!(code, Some(3), "{err}");
    assert!(!out.contains(SECRET) && !err.contains(SECRET));
    // A file that is not there: exit 2, naming the variable.
    let mut c = prefsync(&s.base_url(), Some("sandbox-key"));
    c.env("PREFINERY_API_KEY_FILE", dir.path().join("nope"))
        .args(["betas"]);
    let (code, _, err) = run(c).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("PREFINERY_API_KEY_FILE"), "{err}");
}

/// Regression (issue 16, defect 8): an unknown --beta said "the key does
/// not work for this project". An API may answer 404 for a project the key
/// cannot see (the sandbox does), or 401 or 403 as for a bad key: in every
/// case the message names the project, and exits 2, while a key that is
/// wrong for everything is still blamed (exit 3).
#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_project_is_named_whatever_status_the_api_answers() {
    use wiremock::matchers::{method, path, path_regex};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let s = common::sandbox(SandboxConfig::default()).await;
    let mut c = prefsync(&s.base_url(), Some(common::KEY));
    c.args(["check", "--beta", "424242"]);
    let (code, out, err) = run(c).await;
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        err.contains("project \"424242\" was not found, or is not visible to this key"),
        "{err}"
    );
    assert!(!err.contains("key does not work"), "{err}");

    for status in [401u16, 403] {
        let server = MockServer::start().await;
        // Every call about the project is refused, as a bad key would be.
        Mock::given(path_regex("^/api/v2/betas/424242[./]"))
            .respond_with(
                ResponseTemplate::new(status)
                    .set_body_json(serde_json::json!({"errors": [{"message": "Not authorized."}]})),
            )
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/api/v2/betas.json"))
            .respond_with(
                ResponseTemplate::new(200)
                    .insert_header(
                        "X-Pagination",
                        r#"{"current_page":1,"next_page":null,"per_page":25,"total_pages":1}"#,
                    )
                    .set_body_json(serde_json::json!([{"id": 1, "name": "Main waitlist"}])),
            )
            .mount(&server)
            .await;
        let base = format!("{}/api/v2", server.uri());
        for args in [
            vec!["check", "--beta", "424242"],
            vec![
                "export", "testers", "--beta", "424242", "--format", "sqlite", "--out",
            ],
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut c = prefsync(&base, Some(common::KEY));
            c.args(&args);
            if args[0] == "export" {
                c.arg(dir.path().join("out.sqlite"));
            }
            let (code, out, err) = run(c).await;
            assert_eq!(code, Some(2), "HTTP {status} {args:?}: {out}{err}");
            assert!(
                err.contains("project \"424242\" was not found, or is not visible to this key"),
                "{err}"
            );
            assert!(err.contains(&format!("HTTP {status}")), "{err}");
            assert!(err.contains("1 Main waitlist"), "{err}");
        }
    }

    // A key refused for the list of projects too is the key's fault.
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(401))
        .mount(&server)
        .await;
    let mut c = prefsync(&format!("{}/api/v2", server.uri()), Some(SECRET));
    c.args(["check", "--beta", "424242"]);
    let (code, out, err) = run(c).await;
    assert_eq!(code, Some(3), "{out}{err}");
    assert!(err.contains("the API key was rejected (HTTP 401)"), "{err}");
    assert!(!err.contains("not visible"), "{err}");
}

/// Regression (issue 16, defect 8): a key missing a permission during an
/// import printed the run's summary inside the error. The summary is
/// printed apart; the error is one line naming the permission and what to
/// do; with -q only the error.
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_permission_during_an_import_is_one_clean_error() {
    let s = common::sandbox(SandboxConfig {
        keys: Keys::single_without(SECRET, &[Permission::UsersCreate]),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.csv"), "email\nnew1@x.io\nnew2@x.io\n").unwrap();
    for quiet in [false, true] {
        let mut c = prefsync(&s.base_url(), Some(SECRET));
        c.current_dir(dir.path()).args([
            "import", "testers", "--beta", "1", "--file", "in.csv", "--mode", "create",
        ]);
        if quiet {
            c.arg("-q");
        }
        let (code, _, err) = run(c).await;
        assert_eq!(code, Some(3), "{err}");
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
        assert_eq!(errors.len(), 1, "{err}");
        let e = errors[0];
        assert!(
            e.contains("lacks Users > Create; edit it under Company Settings > API Keys"),
            "{e}"
        );
        assert!(!e.contains("created 0") && !e.contains("API calls"), "{e}");
        // The summary is not glued to the error: no line starts with ': '.
        assert!(!err.lines().any(|l| l.starts_with(": ")), "{err}");
        assert_eq!(err.contains("not done yet"), !quiet, "{err}");
    }
}

/// Regression (issue 16, defect 8): `export --format jsonl --out users.csv`
/// wrote JSONL into a .csv name without a word. Refused, exit 2, before
/// any call.
#[test]
fn export_refuses_a_format_that_contradicts_the_extension() {
    let dir = tempfile::tempdir().unwrap();
    let out = prefsync("http://127.0.0.1:9/api/v2", Some("k"))
        .current_dir(dir.path())
        .args([
            "export",
            "testers",
            "--beta",
            "1",
            "--format",
            "jsonl",
            "--out",
            "users.csv",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--format jsonl contradicts the output's extension"),
        "{err}"
    );
    assert!(files_in(dir.path()).is_empty());
}

#[test]
fn completions_for_each_shell_name_the_subcommands_and_flags() {
    for shell in ["bash", "zsh", "fish", "powershell"] {
        let out = prefsync("http://127.0.0.1:9/api/v2", None)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        for word in [
            "import",
            "export",
            "runs",
            "checkpoint",
            "max-duration",
            "log-format",
        ] {
            assert!(text.contains(word), "{shell} lacks {word}");
        }
    }
    let out = prefsync("http://127.0.0.1:9/api/v2", None)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn man_pages_name_the_subcommands_and_flags() {
    let out = prefsync("http://127.0.0.1:9/api/v2", None)
        .args(["man"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH prefsync"),
        "{page}"
    );
    for word in [
        "import",
        "export",
        "runs",
        "check",
        "completions",
        "PREFINERY_API_KEY_FILE",
    ] {
        assert!(page.contains(word), "the page lacks {word}");
    }
    let dir = tempfile::tempdir().unwrap();
    let out = prefsync("http://127.0.0.1:9/api/v2", None)
        .args(["man", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let pages = files_in(dir.path());
    for name in [
        "prefsync.1",
        "prefsync-import-testers.1",
        "prefsync-export.1",
        "prefsync-check.1",
        "prefsync-rewards-issue.1",
    ] {
        assert!(pages.iter().any(|p| p == name), "{name} not in {pages:?}");
    }
    let import = std::fs::read_to_string(dir.path().join("prefsync-import-testers.1")).unwrap();
    for flag in [
        "\\-\\-max\\-duration",
        "\\-\\-checkpoint",
        "\\-\\-beta",
        "Exit codes",
    ] {
        assert!(import.contains(flag), "import testers page lacks {flag}");
    }
}

/// Every leaf subcommand, with its path (`["import", "testers"]`).
fn leaves(cmd: &clap::Command, path: Vec<String>, out: &mut Vec<(Vec<String>, clap::Command)>) {
    let subs: Vec<&clap::Command> = cmd
        .get_subcommands()
        .filter(|c| c.get_name() != "help")
        .collect();
    if subs.is_empty() {
        out.push((path.clone(), cmd.clone()));
    }
    for sub in subs {
        let mut p = path.clone();
        p.push(sub.get_name().to_string());
        leaves(sub, p, out);
    }
}

/// The examples a help text gives: its lines under "Examples:" that start
/// with `prefsync`, continuation lines joined.
fn examples(help: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Some((_, rest)) = help.split_once("Examples:\n") else {
        return out;
    };
    let mut pending = String::new();
    for line in rest.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with("Exit codes") {
            break;
        }
        if !pending.is_empty() {
            pending.push(' ');
            pending.push_str(line.trim_end_matches('\\').trim());
        } else if line.starts_with("prefsync ") || line == "prefsync" {
            pending = line.trim_end_matches('\\').trim().to_string();
        } else {
            continue;
        }
        if !line.ends_with('\\') {
            out.push(std::mem::take(&mut pending));
        }
    }
    out
}

/// Every subcommand's help ends with examples and the exit codes; every
/// example parses with the real definitions (shell redirections and pipes
/// cut off); every option that takes a value shows its default.
#[test]
fn every_subcommand_has_examples_exit_codes_and_defaults_in_its_help() {
    let mut root = Cli::command();
    root.build();
    let mut all = Vec::new();
    leaves(&root, vec![], &mut all);
    assert!(all.len() >= 20, "{}", all.len());
    let mut problems = Vec::new();
    for (path, cmd) in all {
        let name = path.join(" ");
        // As an 80-column terminal shows it: an example must fit.
        let mut cmd = cmd.term_width(80);
        let help = cmd.render_long_help().to_string();
        let ex = examples(&help);
        if ex.len() < 2 {
            problems.push(format!("{name}: fewer than two examples"));
        }
        let Some(codes) = help.split("Exit codes:\n").nth(1) else {
            problems.push(format!("{name}: no exit codes"));
            continue;
        };
        if !codes.trim_start().starts_with("0  ")
            || help.find("Examples:") > help.find("Exit codes:")
        {
            problems.push(format!("{name}: exit codes do not end the help"));
        }
        for e in &ex {
            let cut = e.split(['>', '|']).next().unwrap().trim();
            let argv: Vec<&str> = cut.split_whitespace().collect();
            if let Err(err) = Cli::command().try_get_matches_from(&argv) {
                problems.push(format!("{name}: example {e:?} does not parse: {err}"));
            }
            // Each example belongs to its own subcommand (or a step before it).
            let _ = argv;
        }
        if !ex
            .iter()
            .any(|e| e.starts_with(&format!("prefsync {name}")))
        {
            problems.push(format!("{name}: no example runs prefsync {name}"));
        }
        for arg in cmd.get_arguments() {
            let takes_value = arg.get_num_args().is_some_and(|n| n.takes_values())
                && !matches!(
                    arg.get_action(),
                    clap::ArgAction::SetTrue
                        | clap::ArgAction::Count
                        | clap::ArgAction::Help
                        | clap::ArgAction::Version
                );
            if !takes_value || arg.is_positional() || arg.is_required_set() {
                continue;
            }
            let shown = !arg.get_default_values().is_empty()
                || arg
                    .get_long_help()
                    .or(arg.get_help())
                    .is_some_and(|h| h.to_string().contains("[default: "));
            if !shown {
                problems.push(format!(
                    "{name}: --{} shows no default",
                    arg.get_long().unwrap_or("?")
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Regression (issue 16, defect 8): `runs`, `sandbox` and `demo` listed
/// --beta, --base-url, --api-key-file and --rate, which do nothing there.
#[test]
fn only_the_commands_that_call_the_api_take_the_api_flags() {
    let mut root = Cli::command();
    root.build();
    for (name, takes) in [
        ("runs", false),
        ("sandbox", false),
        ("demo", false),
        ("preset", false),
        ("completions", false),
        ("man", false),
        ("check", true),
        ("betas", true),
        ("export", true),
        ("apply", true),
    ] {
        let mut cmd = root.find_subcommand(name).unwrap().clone();
        let help = cmd.render_long_help().to_string();
        for flag in ["--beta <", "--base-url <", "--api-key-file <", "--rate <"] {
            assert_eq!(help.contains(flag), takes, "{name} {flag}:\n{help}");
        }
    }
    // A group's subcommands take them after their own name.
    assert!(
        Cli::try_parse_from([
            "prefsync", "import", "testers", "--beta", "1", "--file", "x.csv"
        ])
        .is_ok()
    );
    assert!(Cli::try_parse_from(["prefsync", "runs", "--beta", "1"]).is_err());
    // Before the subcommand, as scripts for earlier versions give them.
    let cli = Cli::try_parse_from([
        "prefsync",
        "--beta",
        "7",
        "--rate",
        "betas=1/1s",
        "import",
        "testers",
        "--file",
        "x.csv",
        "--rate",
        "writes=2/1s",
    ])
    .unwrap();
    let api = cli.api().unwrap();
    assert_eq!(api.betas, ["7"]);
    assert_eq!(api.rates.len(), 2);
}
