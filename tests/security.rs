//! Security checks (issue 14, section 5): a sentinel key through full runs
//! of every command at `-vv`, `--log-format json` and every crate's trace
//! logs appears in no output and no file, and crosses the wire only
//! base64-encoded in `Authorization`; plain `http://` is refused for hosts
//! that are not loopback, tricks included; the sandbox listens on loopback
//! only. (Files holding people's data being 0600: tests/private_files.rs.)
#![cfg(unix)]

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use assert_cmd::Command;
use base64::Engine as _;
use prefsync::sandbox::{Keys, Sandbox, SandboxConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Unlike any other string in the program's output, so that a hit is a leak.
const SENTINEL: &str = "sk-SENTINEL-4f9c2e7a1b0d4c8e9f3a6b5d";

/// Every form the key could leak in: as is, as the header carries it
/// (base64 of `key:`), and base64 of the key alone.
fn leak_forms(key: &str) -> Vec<Vec<u8>> {
    let b64 = base64::engine::general_purpose::STANDARD;
    vec![
        key.as_bytes().to_vec(),
        b64.encode(format!("{key}:")).into_bytes(),
        b64.encode(key).into_bytes(),
    ]
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A TCP proxy in front of the sandbox that keeps every byte the client
/// sends: request lines, headers and bodies as they crossed the wire.
struct Tap {
    port: u16,
    sent: Arc<Mutex<Vec<u8>>>,
}

impl Tap {
    async fn start(upstream: std::net::SocketAddr) -> Tap {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let log = sent.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n) = cr.read(&mut buf).await {
                            if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            log.lock().unwrap().extend_from_slice(&buf[..n]);
                        }
                        sw.shutdown().await.ok();
                    };
                    let down = async move {
                        tokio::io::copy(&mut sr, &mut cw).await.ok();
                        cw.shutdown().await.ok();
                    };
                    tokio::join!(up, down);
                });
            }
        });
        Tap { port, sent }
    }

    fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/api/v2", self.port)
    }
}

struct Outputs {
    code: i32,
    text: Vec<u8>,
}

/// Runs prefsync in `dir` with the key in the environment.
async fn prefsync(
    base: &str,
    dir: &Path,
    key: &str,
    env: &[(&str, &str)],
    args: &[&str],
) -> Outputs {
    let mut c = Command::cargo_bin("prefsync").unwrap();
    c.current_dir(dir)
        .env_remove("PREFINERY_BETA")
        .env_remove("PREFSYNC_LOG")
        .env("PREFINERY_BASE_URL", base)
        .env("PREFINERY_API_KEY", key)
        // Standard input's spool lands here, where it is scanned.
        .env("TMPDIR", dir)
        .env("RUST_BACKTRACE", "1")
        .timeout(Duration::from_secs(120))
        .args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    if args.contains(&"-") {
        c.write_stdin("email,first_name\nstdin1@sec.test,S\nnot-an-email,T\n");
    }
    let out = tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap();
    let mut text = out.stdout;
    text.extend_from_slice(&out.stderr);
    Outputs {
        code: out.status.code().unwrap_or(-1),
        text,
    }
}

/// Every file under `dir`, SQLite databases and their -wal/-shm included.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The logging set-ups every command runs under: debug and trace text,
/// JSON, and every crate (hyper, reqwest, rustls) at trace.
/// Flags, and environment variables, of one logging set-up.
type Logging = (
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
);

const LOGGING: [Logging; 3] = [
    (&["-vv"], &[]),
    (&["-vv", "--log-format", "json"], &[]),
    (&["-vv"], &[("PREFSYNC_LOG", "trace")]),
];

/// The commands of a full run: check, import with rejected rows (from a
/// file and from standard input), exports to every format, the runs list.
fn commands(n: usize) -> Vec<(Vec<String>, &'static [i32])> {
    let own = |s: &str| s.replace("{n}", &n.to_string());
    let mut v: Vec<(Vec<String>, &'static [i32])> = vec![
        (vec!["check".into(), "--beta".into(), "1".into()], &[0]),
        (
            [
                "import",
                "testers",
                "--beta",
                "1",
                "--file",
                "in.csv",
                "--checkpoint",
                "ck{n}.sqlite",
                "--errors",
                "errors{n}.csv",
                "--results",
                "results{n}.csv",
                "--summary-json",
                "import{n}.json",
            ]
            .map(own)
            .to_vec(),
            &[4],
        ),
        (
            [
                "import",
                "testers",
                "--beta",
                "1",
                "--file",
                "-",
                "--checkpoint",
                "stdin{n}.sqlite",
                "--errors",
                "stdin-errors{n}.csv",
            ]
            .map(own)
            .to_vec(),
            &[4],
        ),
        (
            [
                "import",
                "testers",
                "--beta",
                "1",
                "--mode",
                "update",
                "--file",
                "in.csv",
                "--checkpoint",
                "update{n}.sqlite",
                "--dry-run",
                "--results",
                "plan{n}.csv",
            ]
            .map(own)
            .to_vec(),
            &[0, 4],
        ),
    ];
    for fmt in ["csv", "jsonl", "sqlite"] {
        v.push((
            [
                "export",
                "testers",
                "--beta",
                "1",
                "--format",
                fmt,
                "--out",
                &format!("users{{n}}.{fmt}"),
                "--summary-json",
                &format!("export-{fmt}{{n}}.json"),
            ]
            .map(own)
            .to_vec(),
            &[0],
        ));
    }
    v.push((
        ["export", "all", "--beta", "1", "--out", "all{n}.sqlite"]
            .map(own)
            .to_vec(),
        &[0],
    ));
    v.push((
        ["runs", "--checkpoint", "ck{n}.sqlite"].map(own).to_vec(),
        &[0],
    ));
    v
}

/// Runs every command under every logging set-up against `base` with
/// `key`; returns what each printed, labelled.
async fn full_run(base: &str, dir: &Path, key: &str) -> Vec<(String, Vec<u8>)> {
    std::fs::write(
        dir.join("in.csv"),
        "email,first_name,status\nnew1@sec.test,N,\nuser1@example.com,Changed,\n\
         bad-email,B,\nnew1@sec.test,Dup,\nnew2@sec.test,X,bogus\n",
    )
    .unwrap();
    let mut printed = vec![];
    for (n, (flags, env)) in LOGGING.iter().enumerate() {
        for (args, codes) in commands(n) {
            let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
            all.extend(flags.iter());
            let out = prefsync(base, dir, key, env, &all).await;
            let label = format!("`prefsync {}` with {env:?}", all.join(" "));
            assert!(
                codes.contains(&out.code),
                "{label}: exit {}\n{}",
                out.code,
                String::from_utf8_lossy(&out.text)
            );
            printed.push((label, out.text));
        }
    }
    printed
}

fn assert_no_leak(key: &str, printed: &[(String, Vec<u8>)], dir: &Path) {
    let forms = leak_forms(key);
    for (label, text) in printed {
        for f in &forms {
            assert!(
                find(text, f).is_none(),
                "the key ({}) is in the output of {label}",
                String::from_utf8_lossy(f)
            );
        }
    }
    let files = files_under(dir);
    for p in &files {
        let bytes = std::fs::read(p).unwrap();
        for f in &forms {
            assert!(
                find(&bytes, f).is_none(),
                "the key ({}) is in {}",
                String::from_utf8_lossy(f),
                p.display()
            );
        }
    }
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    // The scan saw what a full run writes, not an empty folder.
    for want in [
        "ck0.sqlite",
        "errors0.csv",
        "results0.csv",
        "import0.json",
        "stdin-errors0.csv",
        "users0.csv",
        "users0.jsonl",
        "users0.sqlite",
        "export-csv0.json",
        "all0.sqlite",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} not written: {names:?}"
        );
    }
}

/// The key, accepted by the sandbox, through every command: in no output,
/// no file, and on the wire only as the Authorization header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_appears_nowhere_but_in_the_authorization_header() {
    let s = common::sandbox(SandboxConfig {
        keys: Keys::single_without(SENTINEL, &[]),
        rate_scale: 0.0,
        seed_testers: 30,
        ..Default::default()
    })
    .await;
    let tap = Tap::start(s.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let printed = full_run(&tap.base_url(), dir.path(), SENTINEL).await;
    assert_no_leak(SENTINEL, &printed, dir.path());

    let wire = tap.sent.lock().unwrap().clone();
    assert!(
        wire.len() > 10_000,
        "the tap saw the runs ({} bytes)",
        wire.len()
    );
    assert!(
        find(&wire, SENTINEL.as_bytes()).is_none(),
        "the key crossed the wire in clear"
    );
    let header = leak_forms(SENTINEL).remove(1);
    let text = String::from_utf8_lossy(&wire);
    // A request line ends with the version; a body runs into the next
    // request line without a line end, so the lines are not split on.
    let requests = text.matches(" HTTP/1.1\r\n").count();
    for line in text.split("\r\n") {
        if line.to_ascii_lowercase().starts_with("authorization:") {
            assert_eq!(
                line[14..].trim().as_bytes(),
                [b"Basic ".as_slice(), &header].concat(),
                "the header is HTTP Basic with the key as user name"
            );
            continue;
        }
        // base64 of the key alone is a prefix of the header's when the
        // key's length is a multiple of 3: both are looked for elsewhere.
        for f in leak_forms(SENTINEL).iter().skip(1) {
            assert!(
                find(line.as_bytes(), f).is_none(),
                "the key outside the Authorization header: {line}"
            );
        }
    }
    let with_auth = text
        .split("\r\n")
        .filter(|l| l.to_ascii_lowercase().starts_with("authorization: basic "))
        .count();
    assert!(requests > 50, "{requests} requests seen");
    assert_eq!(with_auth, requests, "every request carries the header");
}

/// A refused key (401 on every call) is not echoed by the messages that
/// say so, nor written anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_key_is_not_echoed() {
    let s = common::sandbox(SandboxConfig {
        rate_scale: 0.0,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.csv"), "email\na@sec.test\n").unwrap();
    let mut printed = vec![];
    for args in [
        &["check", "--beta", "1", "-vv"][..],
        &[
            "import",
            "testers",
            "--beta",
            "1",
            "--file",
            "in.csv",
            "-vv",
            "--log-format",
            "json",
        ],
        &[
            "export", "testers", "--beta", "1", "--format", "sqlite", "--out", "u.sqlite", "-vv",
        ],
    ] {
        let out = prefsync(&s.base_url(), dir.path(), SENTINEL, &[], args).await;
        assert_eq!(out.code, 3, "{}", String::from_utf8_lossy(&out.text));
        assert!(String::from_utf8_lossy(&out.text).contains("HTTP 401"));
        printed.push((args.join(" "), out.text));
    }
    let forms = leak_forms(SENTINEL);
    for (label, text) in &printed {
        assert!(
            forms.iter().all(|f| find(text, f).is_none()),
            "key in the output of {label}"
        );
    }
    for p in files_under(dir.path()) {
        let bytes = std::fs::read(&p).unwrap();
        assert!(
            forms.iter().all(|f| find(&bytes, f).is_none()),
            "key in {}",
            p.display()
        );
    }
}

/// Plain http:// only to loopback: lookalike hosts, credentials in the
/// URL and other schemes are refused, by the library and by the binary.
#[test]
fn plain_http_is_refused_for_every_host_that_is_not_loopback() {
    use prefsync::config::parse_base_url;
    for ok in [
        "http://127.0.0.1:8787/api/v2",
        "http://127.9.9.9/api/v2",
        "http://localhost:1/api/v2",
        "http://LOCALHOST/api/v2",
        "http://[::1]:8787/api/v2",
        // The URL standard reads these as 127.0.0.1.
        "http://0x7f000001/api/v2",
        "http://2130706433/api/v2",
        "http://127.1/api/v2",
        "https://api.prefinery.com/api/v2",
    ] {
        assert!(parse_base_url(ok).is_ok(), "{ok} refused");
    }
    for bad in [
        "http://example.com/api/v2",
        "http://127.0.0.1.example.com/api/v2",
        "http://localhost.evil/api/v2",
        "http://localhost./api/v2",
        "http://localhost.localdomain/api/v2",
        "http://127.0.0.1%2eexample.com/api/v2",
        "http://10.0.0.1/api/v2",
        "http://0.0.0.0:8787/api/v2",
        "http://[::]/api/v2",
        "http://[::ffff:8.8.8.8]/api/v2",
        "http://127.0.0.1@evil.test/api/v2",
        "http://localhost:80@evil.test/api/v2",
        "http://evil.test#@127.0.0.1/api/v2",
        "http://evil.test\\@127.0.0.1/api/v2",
        "HTTP://EXAMPLE.COM/api/v2",
        "ftp://127.0.0.1/api/v2",
        "file:///etc/passwd",
        "ws://127.0.0.1/api/v2",
        "https://user:pass@api.prefinery.com/api/v2",
    ] {
        assert!(parse_base_url(bad).is_err(), "{bad} accepted");
    }
}

#[test]
fn the_binary_refuses_plain_http_to_a_lookalike_host_before_any_call() {
    for base in [
        "http://127.0.0.1.example.com/api/v2",
        "http://localhost.evil/api/v2",
    ] {
        let out = Command::cargo_bin("prefsync")
            .unwrap()
            .env("PREFINERY_API_KEY", SENTINEL)
            .args(["check", "--beta", "1", "--base-url", base])
            .timeout(Duration::from_secs(30))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{base}: {stderr}");
        assert!(stderr.contains("refusing plain http://"), "{stderr}");
        assert!(!stderr.contains(SENTINEL));
    }
}

/// TLS certificates are verified: nothing in the source turns it off.
#[test]
fn no_code_turns_certificate_checks_off() {
    fn scan(dir: &Path) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                scan(&p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                for needle in [
                    "danger_accept_invalid",
                    "dangerous_configuration",
                    "NoCertificateVerification",
                ] {
                    assert!(!text.contains(needle), "{} has {needle}", p.display());
                }
            }
        }
    }
    scan(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
}

/// The sandbox listens on loopback only, and has no flag to listen
/// elsewhere (one that is added must say so loudly, and this test changes
/// with it).
#[tokio::test]
async fn the_sandbox_listens_on_loopback_only() {
    let s: Sandbox = common::sandbox(SandboxConfig::default()).await;
    assert!(s.addr.ip().is_loopback(), "{}", s.addr);
    for flag in ["--host", "--bind", "--listen", "--address"] {
        let out = Command::cargo_bin("prefsync")
            .unwrap()
            .args(["sandbox", "--port", "0", flag, "0.0.0.0"])
            // A flag that exists would start a server: the timeout ends it.
            .timeout(Duration::from_secs(10))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "sandbox {flag} was accepted");
    }
}

/// A loopback server that redirects elsewhere must not be followed: the
/// next hop could be plain http:// to any host. The key itself is safe
/// (reqwest drops Authorization on a redirect to another host or port),
/// but the request is still sent there.
#[tokio::test]
async fn a_redirect_from_loopback_is_not_followed() {
    use wiremock::matchers::any;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let elsewhere = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200).set_body_string("[]"))
        .mount(&elsewhere)
        .await;
    let loopback = MockServer::start().await;
    Mock::given(any())
        .respond_with(
            ResponseTemplate::new(307)
                .insert_header("Location", format!("{}/api/v2/betas", elsewhere.uri())),
        )
        .mount(&loopback)
        .await;
    let base = format!("{}/api/v2", loopback.uri());
    let out = tokio::task::spawn_blocking(move || {
        Command::cargo_bin("prefsync")
            .unwrap()
            .env("PREFINERY_API_KEY", SENTINEL)
            .env("PREFINERY_BASE_URL", base)
            .args(["betas"])
            .timeout(Duration::from_secs(60))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let seen = elsewhere.received_requests().await.unwrap_or_default();
    for r in &seen {
        assert!(
            !r.headers.contains_key("authorization"),
            "the key followed the redirect"
        );
    }
    assert!(
        seen.is_empty(),
        "the redirect was followed ({} requests elsewhere); exit {:?}",
        seen.len(),
        out.status.code()
    );
}

/// `prefsync check | head -1`: a reader that goes away is not a panic
/// (STYLE.md: exit 0 on a broken pipe).
#[tokio::test(flavor = "multi_thread")]
async fn check_into_a_closed_pipe_does_not_panic() {
    let s = common::sandbox(SandboxConfig::default()).await;
    let base = s.base_url();
    let (code, stderr) = tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("prefsync"))
            .env("PREFINERY_API_KEY", common::KEY)
            .env("PREFINERY_BASE_URL", base)
            .args(["check", "--beta", "1"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before anything is printed.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(code, Some(0), "{stderr}");
}
