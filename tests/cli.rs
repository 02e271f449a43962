//! What only a process shows: exit codes, stderr wording, and that the key
//! never appears in anything prefsync prints.

mod common;

use assert_cmd::Command;
use prefsync::sandbox::{Keys, Permission, SandboxConfig};

const SECRET: &str = "sk_live_super-secret-0123456789";

fn prefsync(base: &str, key: Option<&str>) -> Command {
    let mut c = Command::cargo_bin("prefsync").unwrap();
    c.env_remove("PREFINERY_API_KEY")
        .env_remove("PREFINERY_BETA")
        .env("PREFINERY_BASE_URL", base)
        .timeout(std::time::Duration::from_secs(60));
    if let Some(k) = key {
        c.env("PREFINERY_API_KEY", k);
    }
    c
}

/// Runs a blocking command while the in-process sandbox serves.
async fn run(cmd: Command) -> std::process::Output {
    let mut cmd = cmd;
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn check_names_a_missing_permission_and_exits_0() {
    let keys = Keys::single_without(SECRET, &[Permission::UsersCreate]);
    let s = common::sandbox(SandboxConfig {
        keys,
        ..Default::default()
    })
    .await;
    let mut c = prefsync(&s.base_url(), Some(SECRET));
    c.args(["check", "--beta", "a9b8c7de", "-vv", "--log-format", "json"]);
    let out = run(c).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("Users > Create"), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.contains("Users > Create"))
        .unwrap();
    assert!(line.ends_with("missing"), "{line}");
    assert!(
        stdout.contains("project: Sandbox Waitlist (id 1"),
        "{stdout}"
    );
    // Debug logging on, and still no key anywhere.
    assert!(!stdout.contains(SECRET) && !stderr.contains(SECRET));
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_codes() {
    let s = common::sandbox(SandboxConfig::default()).await;
    let base = s.base_url();

    // 3: the key is refused; the message says what to do, and hides the key.
    let mut c = prefsync(&base, Some(SECRET));
    c.args(["check", "--beta", "1"]);
    let out = run(c).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("the API key was rejected (HTTP 401)"),
        "{stderr}"
    );
    assert!(!stderr.contains(SECRET) && !String::from_utf8_lossy(&out.stdout).contains(SECRET));

    // 2: no key at all.
    let mut c = prefsync(&base, None);
    c.args(["check", "--beta", "1"]);
    let out = run(c).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PREFINERY_API_KEY"));

    // 2: a project that does not exist.
    let mut c = prefsync(&base, Some("sandbox-key"));
    c.args(["check", "--beta", "nope1234"]);
    let out = run(c).await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("check --beta"));

    // 2: plain http to a non-loopback host.
    let mut c = prefsync("http://example.com/api/v2", Some("sandbox-key"));
    c.args(["check", "--beta", "1"]);
    let out = run(c).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unencrypted"));

    // 2: a bad flag.
    let mut c = prefsync(&base, Some("sandbox-key"));
    c.args(["check", "--rate", "testers-list=fast"]);
    assert_eq!(run(c).await.status.code(), Some(2));

    // 0: the key file and the project's UID.
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "sandbox-key\n").unwrap();
    let mut c = prefsync(&base, None);
    c.args(["betas", "--api-key-file"]).arg(&key_file);
    let out = run(c).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Second Project"));
}

#[test]
fn sandbox_process_writes_its_port_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let port_file = dir.path().join("port");
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("prefsync"))
        .args([
            "sandbox",
            "--port",
            "0",
            "--seed-testers",
            "10",
            "--port-file",
        ])
        .arg(&port_file)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let port = loop {
        if let Ok(p) = std::fs::read_to_string(&port_file) {
            break p;
        }
        assert!(std::time::Instant::now() < deadline, "no port file");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let base = format!("http://127.0.0.1:{port}/api/v2");
    let out = prefsync(&base, Some("sandbox-key"))
        .args(["check", "--beta", "1"])
        .output()
        .unwrap();
    child.kill().ok();
    child.wait().ok();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("users: 10"));
}

/// The key appears in no file prefsync writes: checkpoint, reports,
/// exports, summaries; and `runs` lists the run.
#[tokio::test(flavor = "multi_thread")]
async fn the_key_is_in_no_file_written() {
    let keys = Keys::single_without(SECRET, &[]);
    let s = common::sandbox(SandboxConfig {
        keys,
        seed_testers: 40,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("in.csv"),
        "email,first_name\nnew@x.io,N\nuser1@example.com,Changed\nbad,row\n",
    )
    .unwrap();
    let mut c = prefsync(&s.base_url(), Some(SECRET));
    c.current_dir(d).args([
        "import",
        "testers",
        "--beta",
        "1",
        "--file",
        "in.csv",
        "--results",
        "results.csv",
        "--summary-json",
        "import.json",
        "-vv",
    ]);
    let out = run(c).await;
    assert_eq!(
        out.status.code(),
        Some(4),
        "rows rejected: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for fmt in ["csv", "jsonl", "sqlite"] {
        let mut c = prefsync(&s.base_url(), Some(SECRET));
        c.current_dir(d).args([
            "export",
            "testers",
            "--beta",
            "1",
            "--format",
            fmt,
            "--out",
            &format!("users.{fmt}"),
            "--summary-json",
            "export.json",
        ]);
        let out = run(c).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!String::from_utf8_lossy(&out.stderr).contains(SECRET));
    }
    let mut c = prefsync(&s.base_url(), None);
    c.current_dir(d).args(["runs"]);
    let out = run(c).await;
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("import") && listing.contains("done"),
        "{listing}"
    );
    let mut files = 0;
    for entry in std::fs::read_dir(d).unwrap() {
        let p = entry.unwrap().path();
        let bytes = std::fs::read(&p).unwrap();
        files += 1;
        assert!(
            !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "the key is in {}",
            p.display()
        );
    }
    assert!(
        files >= 8,
        "checkpoint, reports, exports and summaries were written ({files})"
    );
}

/// Regression (defect 9): an API nobody answers at fails within seconds,
/// says what failed, does not blame the key, and exits 7, for `check` as
/// for an import and an export.
#[test]
fn an_api_that_cannot_be_reached_exits_7_within_seconds() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}/api/v2");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    std::fs::write(&input, "email\na@x.io\n").unwrap();
    let runs: [Vec<std::ffi::OsString>; 3] = [
        vec!["check".into(), "--beta".into(), "1".into()],
        vec![
            "import".into(),
            "testers".into(),
            "--beta".into(),
            "1".into(),
            "--file".into(),
            input.into(),
            "--checkpoint".into(),
            dir.path().join("ck.sqlite").into(),
        ],
        vec![
            "export".into(),
            "testers".into(),
            "--beta".into(),
            "1".into(),
            "--out".into(),
            dir.path().join("out.csv").into(),
        ],
    ];
    for args in runs {
        let start = std::time::Instant::now();
        let out = prefsync(&base, Some(SECRET)).args(&args).output().unwrap();
        let took = start.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(7), "{args:?}: {stderr}");
        assert!(
            took < std::time::Duration::from_secs(5),
            "{args:?} took {took:?}"
        );
        assert!(
            stderr.contains(&format!("network: connection refused to 127.0.0.1:{port}")),
            "{args:?}: {stderr}"
        );
        assert!(
            !stderr.contains("key does not work") && !stdout.contains("with this key"),
            "{args:?}: {stdout}{stderr}"
        );
        assert!(!stderr.contains(SECRET) && !stdout.contains(SECRET));
    }
}

// Cron output (issue 16, defect 6). Each test failed before its fix.

/// A prefsync in `dir`, against a sandbox with limits off.
fn cron(base: &str, dir: &std::path::Path, args: &[&str]) -> Command {
    let mut c = prefsync(base, Some("sandbox-key"));
    c.current_dir(dir).args(args).args([
        "--rate",
        "testers-list=1000/1s",
        "--rate",
        "account-list=1000/1s",
        "--rate",
        "betas=1000/1s",
    ]);
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn cron_sandbox() -> prefsync::sandbox::Sandbox {
    common::sandbox(SandboxConfig {
        rate_scale: 0.0,
        seed_testers: 30,
        ..Default::default()
    })
    .await
}

/// With `-q` a run that went well prints nothing (cron mails any output);
/// its summary JSON is still written; rejected rows are one error line.
#[tokio::test(flavor = "multi_thread")]
async fn quiet_prints_nothing_but_errors_and_still_writes_the_summary_json() {
    let s = cron_sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("in.csv"),
        "email,first_name\nnew1@x.io,A\nnew2@x.io,B\n",
    )
    .unwrap();
    let args = [
        "import",
        "testers",
        "--beta",
        "1",
        "--file",
        "in.csv",
        "-q",
        "--summary-json",
        "s.json",
    ];
    let out = run(cron(&s.base_url(), d, &args)).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "", "nothing on stderr");
    assert_eq!(text(&out.stdout), "", "nothing on stdout");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("s.json")).unwrap()).unwrap();
    assert_eq!(summary["created"], 2);

    // Rows rejected: one line, naming the report.
    std::fs::write(d.join("bad.csv"), "email\nnot-an-email\nnew3@x.io\n").unwrap();
    let args = [
        "import", "testers", "--beta", "1", "--file", "bad.csv", "-q",
    ];
    let out = run(cron(&s.base_url(), d, &args)).await;
    assert_eq!(out.status.code(), Some(4));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("1 rows rejected; see prefsync-checkpoint.run2.errors.csv"),
        "{stderr}"
    );

    // A bulk operation and an export, quiet too.
    std::fs::write(d.join("sup.csv"), "email\nnew1@x.io\n").unwrap();
    let args = [
        "suppressions",
        "add",
        "--beta",
        "1",
        "--file",
        "sup.csv",
        "-q",
    ];
    let out = run(cron(&s.base_url(), d, &args)).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "");
    let args = ["export", "testers", "--beta", "1", "--out", "u.csv", "-q"];
    let out = run(cron(&s.base_url(), d, &args)).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "");
}

/// With `--log-format json` every line on stderr is JSON, the last one the
/// summary as an event with its counts as fields (not the text summary):
/// import, a bulk operation, export, sync, plan and apply.
#[tokio::test(flavor = "multi_thread")]
async fn json_logs_end_with_the_summary_as_one_json_event() {
    let s = cron_sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("in.csv"),
        "email,first_name\nnew1@x.io,A\nnot-an-email,B\n",
    )
    .unwrap();
    std::fs::write(d.join("sup.csv"), "email\nnew1@x.io\n").unwrap();
    std::fs::write(
        d.join("sync.csv"),
        "email,first_name\nuser1@example.com,Renamed\n",
    )
    .unwrap();
    let json = ["--log-format", "json"];
    let cases: Vec<(Vec<&str>, &str, &str, serde_json::Value)> = vec![
        (
            vec!["import", "testers", "--beta", "1", "--file", "in.csv"],
            "import finished",
            "created",
            1.into(),
        ),
        (
            vec!["suppressions", "add", "--beta", "1", "--file", "sup.csv"],
            "suppressions.add finished",
            "total_rows",
            1.into(),
        ),
        (
            vec!["export", "testers", "--beta", "1", "--out", "m.sqlite"],
            "export finished",
            "format",
            "sqlite".into(),
        ),
        (
            vec![
                "sync", "testers", "--beta", "1", "--file", "sync.csv", "--mirror", "m.sqlite",
            ],
            "sync finished",
            "refreshed",
            false.into(),
        ),
        (
            vec![
                "plan", "testers", "--beta", "1", "--file", "sync.csv", "--mirror", "m.sqlite",
                "--out", "plan.csv",
            ],
            "plan finished",
            "plan",
            "plan.csv".into(),
        ),
        (
            vec![
                "apply",
                "plan.csv",
                "--mirror",
                "m.sqlite",
                "--checkpoint",
                "apply.sqlite",
            ],
            "apply finished",
            "kind",
            "testers.apply".into(),
        ),
    ];
    for (args, message, field, value) in cases {
        let mut all = args.clone();
        all.extend(json);
        let out = run(cron(&s.base_url(), d, &all)).await;
        let stderr = text(&out.stderr);
        assert!(
            matches!(out.status.code(), Some(0 | 4)),
            "{args:?}: {stderr}"
        );
        for line in stderr.lines() {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {line}"));
        }
        let last: serde_json::Value =
            serde_json::from_str(stderr.lines().last().expect("a summary")).unwrap();
        assert_eq!(last["fields"]["message"], message, "{args:?}: {last}");
        assert_eq!(last["fields"]["summary"][field], value, "{args:?}: {last}");
    }
}

/// With `--log-format json` a run that fails ends with its error as one
/// JSON event too (level ERROR, the exit code), not a plain `error:` line.
#[tokio::test(flavor = "multi_thread")]
async fn json_logs_end_with_the_error_as_one_json_event() {
    let s = cron_sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("in.csv"), "email\nnew1@x.io\n").unwrap();
    let args = [
        "import",
        "testers",
        "--beta",
        "1",
        "--file",
        "in.csv",
        "--map",
        "missing.toml",
        "--log-format",
        "json",
    ];
    let out = run(cron(&s.base_url(), d, &args)).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    for line in stderr.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
    let last: serde_json::Value =
        serde_json::from_str(stderr.lines().last().expect("the error")).unwrap();
    assert_eq!(last["level"], "ERROR", "{last}");
    assert_eq!(last["fields"]["exit_code"], 2, "{last}");
    assert!(
        last["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("missing.toml"),
        "{last}"
    );
}

/// The lock's holder is named by pid, host and a readable local time,
/// from a lock file of today's format and of the old one.
#[tokio::test(flavor = "multi_thread")]
async fn a_held_lock_names_its_holder_in_local_time() {
    let s = cron_sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lock = prefsync::lock::RunLock::acquire(&d.join("u.csv")).unwrap();
    let args = ["export", "testers", "--beta", "1", "--out", "u.csv"];
    let out = run(cron(&s.base_url(), d, &args)).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    let year = chrono::Local::now().format("%Y-").to_string();
    assert!(
        stderr.contains(&format!("pid {} on ", std::process::id())),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("started {year}")), "{stderr}");
    assert!(!stderr.contains("unix time"), "{stderr}");
    drop(lock);
    assert!(!d.join("u.csv.lock").exists(), "released, removed");

    // A lock file an older prefsync wrote, held.
    let old = d.join("v.csv.lock");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    std::fs::write(
        &old,
        format!("pid 4242 on old-host, started at unix time {now}"),
    )
    .unwrap();
    let f = std::fs::File::open(&old).unwrap();
    f.try_lock().unwrap();
    let args = ["export", "testers", "--beta", "1", "--out", "v.csv"];
    let out = run(cron(&s.base_url(), d, &args)).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(
        stderr.contains(&format!("pid 4242 on old-host, started {year}")),
        "{stderr}"
    );
    drop(f);
}

/// A CSV or JSONL export names the real project and its format, in words
/// and in the summary JSON, and leaves only its output once finished (no
/// lock, no checkpoint); a SQLite export leaves its file, the history.
#[tokio::test(flavor = "multi_thread")]
async fn a_finished_export_names_its_project_and_leaves_only_its_output() {
    let s = cron_sandbox().await;
    for (format, out) in [
        ("csv", "u.csv"),
        ("jsonl", "u.jsonl"),
        ("sqlite", "u.sqlite"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let args = [
            "export",
            "testers",
            "--beta",
            "a9b8c7de",
            "--out",
            out,
            "--summary-json",
            "s.json",
        ];
        let res = run(cron(&s.base_url(), d, &args)).await;
        let stderr = text(&res.stderr);
        assert_eq!(res.status.code(), Some(0), "{stderr}");
        assert!(
            stderr.contains(&format!("export to {out} ({format}): 30 records")),
            "{stderr}"
        );
        assert!(
            stderr.contains("project 1 (a9b8c7de, Sandbox Waitlist) testers: 30 records"),
            "{stderr}"
        );
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("s.json")).unwrap()).unwrap();
        assert_eq!(summary["format"], format);
        assert_eq!(summary["parts"][0]["beta_id"], 1);
        assert_eq!(summary["parts"][0]["beta_uid"], "a9b8c7de");
        assert_eq!(summary["parts"][0]["beta_name"], "Sandbox Waitlist");
        let mut left: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec!["s.json".to_string(), out.to_string()],
            "{format}"
        );
    }
}
