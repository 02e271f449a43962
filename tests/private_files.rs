//! Every file prefsync writes that holds people's data is `0600`, whatever
//! the umask: checkpoints, their `-wal` and `-shm`, spools, exports, reports
//! and lock files. Real processes run under `umask 000`, the umask that
//! shows a file created without an explicit mode; some are killed with
//! kill -9 mid-run, so the SQLite files they leave (`-wal`, `-shm`) can be
//! looked at.
#![cfg(unix)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prefsync::sandbox::SandboxConfig;

/// prefsync under `umask 000`, in `dir`.
fn prefsync(base: &str, dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(r#"umask 000 && exec "$0" "$@""#)
        .arg(assert_cmd::cargo::cargo_bin("prefsync"))
        .args(args)
        .current_dir(dir)
        .env_remove("PREFINERY_BETA")
        .env("PREFINERY_BASE_URL", base)
        .env("PREFINERY_API_KEY", common::KEY)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Runs to the end; returns the exit code.
async fn finish(mut c: Command) -> i32 {
    let out = tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap();
    let code = out.status.code().unwrap();
    assert!(
        code == 0 || code == 4,
        "exit {code}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    code
}

/// Starts `c`, waits until every one of `files` exists, then kill -9.
async fn kill_once_written(mut c: Command, files: &[PathBuf]) {
    let mut child: Child = c.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !files.iter().all(|f| f.exists()) {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("prefsync ended ({status}) before writing all of {files:?}");
        }
        assert!(Instant::now() < deadline, "{files:?} never all written");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Every path given, and the `-wal` and `-shm` of those that have them,
/// has mode 0600.
fn assert_private(paths: &[PathBuf]) {
    let mut checked = Vec::new();
    for p in paths {
        let mut all = vec![p.clone()];
        for suffix in ["-wal", "-shm"] {
            let mut side = p.clone().into_os_string();
            side.push(suffix);
            let side = PathBuf::from(side);
            if side.exists() {
                all.push(side);
            }
        }
        for f in all {
            let mode = std::fs::metadata(&f)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600, "{} is {mode:o}", f.display());
            checked.push(f);
        }
    }
    eprintln!("0600: {checked:?}");
}

fn side(dir: &Path, name: &str, suffix: &str) -> PathBuf {
    dir.join(format!("{name}{suffix}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_with_personal_data_are_0600_under_umask_000() {
    let s = common::sandbox(SandboxConfig {
        seed_testers: 300,
        rate_scale: 0.0,
        ..Default::default()
    })
    .await;
    let base = s.base_url();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Import: killed while it writes (its checkpoint's -wal and -shm are
    // left behind), then resumed to the end for the reports.
    let mut input = String::from("email,first_name\nbad,row\n");
    for i in 0..150 {
        input.push_str(&format!("new{i}@x.io,N{i}\n"));
    }
    std::fs::write(d.join("in.csv"), input).unwrap();
    let import: &[&str] = &[
        "import",
        "testers",
        "--beta",
        "1",
        "--file",
        "in.csv",
        "--results",
        "results.csv",
        "--errors",
        "errors.csv",
        "--concurrency",
        "1",
        "--rate",
        "writes=200/1s",
        "--rate",
        "account-list=1000/1s",
        "--rate",
        "testers-list=1000/1s",
        "-q",
    ];
    let ck = d.join("prefsync-checkpoint.sqlite");
    kill_once_written(
        prefsync(&base, d, import),
        &[side(d, "prefsync-checkpoint.sqlite", "-wal")],
    )
    .await;
    assert_private(&[ck.clone(), side(d, "prefsync-checkpoint.sqlite", ".lock")]);
    assert_eq!(
        finish(prefsync(&base, d, import)).await,
        4,
        "a row rejected"
    );
    assert_private(&[ck, d.join("results.csv"), d.join("errors.csv")]);

    // Exports: killed after a few pages, then resumed to the end.
    for format in ["csv", "jsonl", "sqlite"] {
        let name = format!("users.{format}");
        let export: &[&str] = &[
            "export",
            "testers",
            "--beta",
            "1",
            "--format",
            format,
            "--out",
            &name,
            "--rate",
            "testers-list=20/1s",
            "--rate",
            "account-list=20/1s",
            "-q",
        ];
        let lock = side(d, &name, ".lock");
        let written: Vec<PathBuf> = if format == "sqlite" {
            vec![d.join(&name), side(d, &name, "-wal"), lock.clone()]
        } else {
            vec![
                d.join(format!(".{name}.partial.jsonl")),
                side(d, &name, ".prefsync.sqlite-wal"),
                lock.clone(),
            ]
        };
        kill_once_written(prefsync(&base, d, export), &written).await;
        let mut left = written.clone();
        if format != "sqlite" {
            left.push(side(d, &name, ".prefsync.sqlite"));
        }
        assert_private(&left);
        assert_eq!(finish(prefsync(&base, d, export)).await, 0);
        assert_private(&[d.join(&name)]);
        // Finished: no lock, and a CSV or JSONL export's checkpoint is gone
        // (only a resume needed it).
        assert!(!lock.exists(), "{}", lock.display());
        assert!(!side(d, &name, ".prefsync.sqlite").exists());
    }
}
