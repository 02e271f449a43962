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
