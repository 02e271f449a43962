//! Benchmarks that print figures (not timed tests: these machines are
//! noisy; run each a few times and quote the median). `bench/run.sh` runs
//! them all in release mode.
//!
//! ```sh
//! cargo run --release --example bench -- sandbox-rps [SECS] [CONCURRENCY]
//! cargo run --release --example bench -- import [ROWS] [CONCURRENCY]
//! cargo run --release --example bench -- import-only|bare-only|client-only [ROWS] [CONCURRENCY]
//! cargo run --release --example bench -- checkpoint [ROWS]
//! cargo run --release --example bench -- limiter [PAGES]
//! cargo run --release --example bench -- export-local [USERS]
//! cargo run --release --example bench -- sync [ROWS]
//! cargo run --release --example bench -- order [ROWS] [CONCURRENCY] [LATENCY_MS]
//! cargo run --release --example bench -- listen [SECS] [CHANGES_PER_SEC]
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prefsync::api::{ApiKey, Client, Limiter, RateOverride, RetryPolicy, TesterInput};
use prefsync::checkpoint::{Checkpoint, RowUpdate};
use prefsync::engine::Order;
use prefsync::export::sink::Format;
use prefsync::export::{ExportOptions, Resource, export};
use prefsync::import::input::Source;
use prefsync::import::{ImportOptions, Mode, import};
use prefsync::progress::Silent;
use prefsync::sandbox::{DEFAULT_KEY, Sandbox, SandboxConfig};
use prefsync::stop::Stop;

fn arg(i: usize, default: u64) -> u64 {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn unlimited(base: &str) -> Client {
    let rates: Vec<RateOverride> = [
        "testers-list=1000000/1s",
        "account-list=1000000/1s",
        "rewards-list=1000000/1s",
        "points-list=1000000/1s",
        "betas=1000000/1s",
    ]
    .iter()
    .map(|r| r.parse().unwrap())
    .collect();
    Client::new(
        base.parse().unwrap(),
        ApiKey::new(DEFAULT_KEY),
        Limiter::new(&rates),
        RetryPolicy::default(),
    )
}

/// Simple requests per second the sandbox serves (show one user), limits off.
async fn sandbox_rps(secs: u64, concurrency: u64) {
    let s = Sandbox::start(
        SandboxConfig {
            rate_scale: 0.0,
            seed_testers: 100,
            ..Default::default()
        },
        0,
    )
    .await
    .unwrap();
    let url = format!("{}/betas/1/testers/1.json", s.base_url());
    let http = reqwest::Client::new();
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (http, url, done) = (http.clone(), url.clone(), done.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let r = http
                        .get(&url)
                        .basic_auth(DEFAULT_KEY, Some(""))
                        .send()
                        .await
                        .unwrap();
                    assert!(r.status().is_success());
                    r.bytes().await.unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let n = done.load(Ordering::Relaxed);
    println!(
        "sandbox-rps: {:.0} requests/s ({n} GET show-user in {:.1}s, {concurrency} connections, client in the same process)",
        n as f64 / start.elapsed().as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
}

/// CPU time this process has used (user + system), from /proc (Linux).
fn cpu_secs() -> f64 {
    cpu_secs_of("self")
}

/// CPU time process `pid` has used (user + system), from /proc (Linux).
fn cpu_secs_of(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the
    // 12th, stime the 13th, in clock ticks (100 a second on Linux).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    if f.len() < 13 {
        return 0.0;
    }
    (f[11] + f[12]) / 100.0
}

/// A `prefsync sandbox` in a process of its own, as a real server would be:
/// client and server then share the cores the way the OS schedules them,
/// not one async runtime.
struct SandboxProcess {
    child: std::process::Child,
    base_url: String,
    _dir: tempfile::TempDir,
}

impl SandboxProcess {
    fn start(extra: &[&str]) -> SandboxProcess {
        let bin = std::env::var_os("PREFSYNC_BIN")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                // target/release/examples/bench -> target/release/prefsync
                let exe = std::env::current_exe().unwrap();
                exe.parent().unwrap().parent().unwrap().join("prefsync")
            });
        let dir = tempfile::tempdir().unwrap();
        let port_file = dir.path().join("port");
        let child = std::process::Command::new(&bin)
            .args(["sandbox", "--port", "0", "--port-file"])
            .arg(&port_file)
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e} (build it, or set PREFSYNC_BIN)",
                    bin.display()
                )
            });
        let deadline = Instant::now() + Duration::from_secs(10);
        let port = loop {
            if let Ok(p) = std::fs::read_to_string(&port_file)
                && !p.trim().is_empty()
            {
                break p.trim().to_string();
            }
            assert!(Instant::now() < deadline, "the sandbox did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        SandboxProcess {
            child,
            base_url: format!("http://127.0.0.1:{port}/api/v2"),
            _dir: dir,
        }
    }
}

impl SandboxProcess {
    /// CPU time the sandbox has used so far.
    fn cpu_secs(&self) -> f64 {
        cpu_secs_of(&self.child.id().to_string())
    }
}

impl Drop for SandboxProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which half of the import benchmark to run.
#[derive(Clone, Copy, PartialEq)]
enum Half {
    Both,
    Import,
    Bare,
}

/// The import engine against a bare HTTP load of the same creates at the
/// same concurrency, each into a fresh sandbox process with no rate limit.
async fn import_vs_bare(rows: u64, concurrency: u64, half: Half) {
    let mut figures = Vec::new();
    if half != Half::Bare {
        let f = import_rows(rows, concurrency).await;
        println!(
            "import: {:.0} rows/s importing {rows} rows (concurrency {concurrency}, checkpointed); {}",
            rows as f64 / f.secs,
            f.describe(rows)
        );
        figures.push(rows as f64 / f.secs);
    }
    if half != Half::Import {
        let f = bare_creates(rows, concurrency).await;
        println!(
            "bare-http: {:.0} requests/s for the same creates (concurrency {concurrency}, no CSV, no checkpoint); {}",
            rows as f64 / f.secs,
            f.describe(rows)
        );
        figures.push(rows as f64 / f.secs);
    }
    if let [a, b] = figures[..] {
        println!("import/bare ratio: {:.2}", a / b);
    }
}

/// The import (CSV, mapping, checkpoint, workers): (seconds, client CPU).
async fn import_rows(rows: u64, concurrency: u64) -> Figures {
    let dir = match std::env::var("BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d).unwrap(),
        Err(_) => tempfile::tempdir().unwrap(),
    };
    let csv = dir.path().join("in.csv");
    let mut text = String::from("email,first_name,last_name,country\n");
    for i in 0..rows {
        text.push_str(&format!("{},First{i},Last{i},NO\n", bench_email(i)));
    }
    std::fs::write(&csv, text).unwrap();

    let s = SandboxProcess::start(&["--rate-scale", "0"]);
    let mut o = ImportOptions::new("1", Source::File(csv.clone()), dir.path().join("ck.sqlite"));
    o.concurrency = concurrency as usize;
    o.mode = Mode::Create;
    let m = Measure::start(&s);
    let sum = import(
        &unlimited(&s.base_url),
        &o,
        Stop::default(),
        Arc::new(Silent),
    )
    .await
    .unwrap();
    assert_eq!(sum.created, rows);
    m.stop(&s)
}

/// What sending creates oldest signup first costs: the same new rows,
/// their signup dates scrambled, imported in the file's order, sorted
/// (concurrent) and strict (creates one after another), each into a fresh
/// sandbox process answering after `latency_ms` (0: as fast as it can).
async fn order_cost(rows: u64, concurrency: u64, latency_ms: u64) {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("in.csv");
    let mut text = String::from("email,first_name,joined\n");
    for i in 0..rows {
        let minute = (i * 7919) % rows;
        text.push_str(&format!(
            "{},First{i},{}\n",
            bench_email(i),
            1_700_000_000 + minute * 60
        ));
    }
    std::fs::write(&csv, text).unwrap();
    let map = dir.path().join("map.toml");
    std::fs::write(
        &map,
        "order_by = \"profile.signed_up_at\"\n[columns]\n\"joined\" = { to = \"profile.signed_up_at\", date = [\"epoch\"] }\n",
    )
    .unwrap();
    let latency = format!("{latency_ms}:{latency_ms}");
    for order in [Order::File, Order::Sorted, Order::Strict] {
        let mut args = vec!["--rate-scale", "0"];
        if latency_ms > 0 {
            args.extend(["--latency-ms", latency.as_str()]);
        }
        let s = SandboxProcess::start(&args);
        let ck = dir.path().join(format!("{}.sqlite", order.name()));
        let mut o = ImportOptions::new("1", Source::File(csv.clone()), ck);
        o.concurrency = concurrency as usize;
        o.mode = Mode::Create;
        o.map = Some(map.clone());
        o.order = Some(order);
        let m = Measure::start(&s);
        let sum = import(
            &unlimited(&s.base_url),
            &o,
            Stop::default(),
            Arc::new(Silent),
        )
        .await
        .unwrap();
        assert_eq!(sum.created, rows);
        let f = m.stop(&s);
        println!(
            "order {}: {:.0} rows/s creating {rows} rows (concurrency {concurrency}, sandbox latency {latency_ms} ms); {}",
            order.name(),
            rows as f64 / f.secs,
            f.describe(rows)
        );
    }
}

/// Row `i`'s email. Distinct, in no order (as a real waitlist's are): an
/// index on emails sees inserts all over, not only at its end.
fn bench_email(i: u64) -> String {
    let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    format!("p{h:016x}@example.com")
}

/// Row `i` of the benchmark's input, as the import maps it.
fn bench_input(i: u64) -> TesterInput {
    let mut input = TesterInput {
        email: Some(bench_email(i)),
        status: Some("imported".into()),
        ..Default::default()
    };
    input
        .profile
        .insert("first_name".into(), format!("First{i}").into());
    input
        .profile
        .insert("last_name".into(), format!("Last{i}").into());
    input.profile.insert("country".into(), "NO".into());
    input
}

/// The same creates, bare: N tasks, one reqwest client, nothing else:
/// (seconds, client CPU).
async fn bare_creates(rows: u64, concurrency: u64) -> Figures {
    let s = SandboxProcess::start(&["--rate-scale", "0"]);
    let url = format!("{}/betas/1/testers.json", s.base_url);
    let http = reqwest::Client::new();
    let next = Arc::new(AtomicU64::new(0));
    let m = Measure::start(&s);
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (http, url, next) = (http.clone(), url.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= rows {
                        return;
                    }
                    let input = bench_input(i);
                    let r = http
                        .post(&url)
                        .basic_auth(DEFAULT_KEY, Some(""))
                        .header("content-type", "application/json")
                        .body(input.to_body_bytes())
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 201);
                    r.bytes().await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    m.stop(&s)
}

/// The same creates through prefsync's client (limiter, retries, error
/// classes), without the engine: where the import's overhead is not.
async fn client_creates(rows: u64, concurrency: u64) -> Figures {
    let s = SandboxProcess::start(&["--rate-scale", "0"]);
    let client = unlimited(&s.base_url);
    let next = Arc::new(AtomicU64::new(0));
    let m = Measure::start(&s);
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, next) = (client.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= rows {
                        return;
                    }
                    let input = bench_input(i);
                    client.create_tester_id("1", &input).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    m.stop(&s)
}

/// Wall time and the CPU time of both sides over one measured run.
struct Measure {
    t: Instant,
    client: f64,
    server: f64,
}

struct Figures {
    secs: f64,
    client_cpu: f64,
    server_cpu: f64,
}

impl Measure {
    fn start(s: &SandboxProcess) -> Measure {
        Measure {
            t: Instant::now(),
            client: cpu_secs(),
            server: s.cpu_secs(),
        }
    }

    fn stop(self, s: &SandboxProcess) -> Figures {
        Figures {
            secs: self.t.elapsed().as_secs_f64(),
            client_cpu: cpu_secs() - self.client,
            server_cpu: s.cpu_secs() - self.server,
        }
    }
}

impl Figures {
    /// CPU per row on each side, and how busy the machine's cores were.
    fn describe(&self, rows: u64) -> String {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        format!(
            "client CPU {:.1} µs a row, sandbox CPU {:.1} µs a row, cores busy {:.0}%",
            self.client_cpu * 1e6 / rows as f64,
            self.server_cpu * 1e6 / rows as f64,
            100.0 * (self.client_cpu + self.server_cpu) / (self.secs * cores)
        )
    }
}

/// The checkpoint alone: rows/s it absorbs for the work a single-pass
/// import gives it per row (planned and marked `sending` with its email
/// checked for duplicates, then marked done), one transaction per batch of
/// 64 as the import commits them.
fn checkpoint_only(rows: u64) {
    let dir = tempfile::tempdir().unwrap();
    let ck = Checkpoint::open(&dir.path().join("ck.sqlite")).unwrap();
    let run = ck
        .new_run("import", "bench", None, None, "1", "{}")
        .unwrap();
    let _background = ck.checkpoint_in_background().unwrap();
    let t = Instant::now();
    let lines: Vec<u64> = (2..rows + 2).collect();
    let mut previous: &[u64] = &[];
    for batch in lines.chunks(64) {
        ck.begin().unwrap();
        let done: Vec<_> = previous
            .iter()
            .map(|line| RowUpdate::Done {
                line: *line,
                action: "created",
                target_id: *line,
            })
            .collect();
        ck.apply_all(run, &done).unwrap();
        let emails: Vec<_> = batch.iter().map(|line| bench_email(*line)).collect();
        let plan: Vec<_> = batch
            .iter()
            .zip(&emails)
            .map(|(line, email)| (*line, email.as_str(), Some("create")))
            .collect();
        let firsts = ck.plan_sending_all(run, &plan).unwrap();
        assert!(firsts.iter().all(Option::is_none));
        ck.commit().unwrap();
        previous = batch;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "checkpoint: {:.0} rows/s alone ({:.1} µs a row: planned and sending, then done; batches of 64)",
        rows as f64 / secs,
        secs / rows as f64 * 1e6,
    );
}

/// The testers-list rate against the sandbox enforcing the documented
/// limit at 60x (60 per second).
async fn limiter(pages: u64) {
    let s = Sandbox::start(
        SandboxConfig {
            rate_scale: 60.0,
            seed_testers: (pages * 25) as usize,
            ..Default::default()
        },
        0,
    )
    .await
    .unwrap();
    let rates: Vec<RateOverride> = ["testers-list=60/1s", "account-list=180/1s", "betas=90/15s"]
        .iter()
        .map(|r| r.parse().unwrap())
        .collect();
    let client = Client::new(
        s.base_url().parse().unwrap(),
        ApiKey::new(DEFAULT_KEY),
        Limiter::new(&rates),
        RetryPolicy::default(),
    );
    let dir = tempfile::tempdir().unwrap();
    let o = ExportOptions::new(
        vec![Resource::Testers],
        vec!["1".into()],
        Format::Jsonl,
        dir.path().join("t.jsonl"),
    );
    let sum = export(&client, &o, Stop::default(), Arc::new(Silent))
        .await
        .unwrap();
    let stats = s.app.stats_json();
    let w = &stats["windows"]["testers-list:1"];
    println!(
        "limiter: testers-list utilisation {:.4} of 60/s (the documented 60/min at --rate-scale 60), max {} requests in any 1 s window, {} throttled, {} pages",
        w["utilisation"].as_f64().unwrap(),
        w["max_in_any_window"],
        stats["throttled"],
        sum.pages
    );
}

/// Local cost per exported page: time writing pages, outside the network
/// and the limiter, for each format.
async fn export_local(users: u64) {
    let s = Sandbox::start(
        SandboxConfig {
            rate_scale: 0.0,
            seed_testers: users as usize,
            ..Default::default()
        },
        0,
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for format in [Format::Csv, Format::Jsonl, Format::Sqlite] {
        let o = ExportOptions::new(
            vec![Resource::Testers],
            vec!["1".into()],
            format,
            dir.path().join(format!("t.{format:?}")),
        );
        let t = Instant::now();
        let sum = export(
            &unlimited(&s.base_url()),
            &o,
            Stop::default(),
            Arc::new(Silent),
        )
        .await
        .unwrap();
        let secs = t.elapsed().as_secs_f64();
        println!(
            "export-local {format:?}: {:.2} ms a page writing ({} pages, {} users, {:.1}s in all, {:.0} users/s with no rate limit)",
            sum.local_secs / sum.pages as f64 * 1e3,
            sum.pages,
            sum.rows,
            secs,
            sum.rows as f64 / secs
        );
    }
}

/// API calls per input row to bring a project in line with a file of
/// `rows` rows of which 10% changed (8% renamed, 2% new): sync with a
/// fresh mirror, sync with a stale one (listed first), and the import's
/// upsert listing the project (`--resolve list`), each on a project of its
/// own with the same users.
async fn sync_calls(rows: u64) {
    async fn project(rows: u64) -> (Sandbox, tempfile::TempDir, std::path::PathBuf) {
        let s = Sandbox::start(
            SandboxConfig {
                rate_scale: 0.0,
                seed_testers: rows as usize,
                ..SandboxConfig::default()
            },
            0,
        )
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut users: Vec<(String, String)> = s.app.with_world(|w| {
            w.project(1)
                .users
                .values()
                .map(|u| {
                    let v = w.project(1).user_json(u);
                    (
                        v["email"].as_str().unwrap().to_string(),
                        v["profile"]["first_name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    )
                })
                .collect()
        });
        users.sort();
        let file = dir.path().join("in.csv");
        let mut w = csv::Writer::from_path(&file).unwrap();
        w.write_record(["email", "first_name"]).unwrap();
        for (i, (e, n)) in users.iter().enumerate() {
            match i % 10 {
                0 if i % 50 == 0 => {
                    w.write_record([format!("new{i}@bench.test"), format!("New{i}")])
                }
                0 => w.write_record([e.clone(), format!("Changed{i}")]),
                _ => w.write_record([e, n]),
            }
            .unwrap();
        }
        w.flush().unwrap();
        (s, dir, file)
    }
    let sync_opts = |dir: &std::path::Path, file: &std::path::Path, max_age: Duration| {
        let mut import =
            ImportOptions::new("1", Source::File(file.to_path_buf()), dir.join("ck.sqlite"));
        import.concurrency = 8;
        prefsync::sync::SyncOptions {
            import,
            mirror: dir.join("mirror.sqlite"),
            max_age,
            refresh: false,
            delete_missing: false,
            max_delete: None,
            backup: None,
        }
    };
    // Fresh: the mirror listed just before (not counted).
    let (s, dir, file) = project(rows).await;
    let client = unlimited(&s.base_url());
    let e = ExportOptions::new(
        vec![Resource::Testers, Resource::Suppressions],
        vec!["1".into()],
        Format::Sqlite,
        dir.path().join("mirror.sqlite"),
    );
    export(&client, &e, Stop::default(), Arc::new(Silent))
        .await
        .unwrap();
    let r = prefsync::sync::sync(
        &client,
        &sync_opts(dir.path(), &file, Duration::from_secs(3600)),
        Stop::default(),
        Arc::new(Silent),
    )
    .await
    .unwrap();
    let fresh = r.refresh_calls + r.import.api_calls;
    println!(
        "sync, fresh mirror: {fresh} calls for {rows} rows ({:.3} a row; {} changed rows, 0 listing)",
        fresh as f64 / rows as f64,
        r.import.created + r.import.updated
    );
    // Stale: listed first.
    let (s, dir, file) = project(rows).await;
    let client = unlimited(&s.base_url());
    let r = prefsync::sync::sync(
        &client,
        &sync_opts(dir.path(), &file, Duration::ZERO),
        Stop::default(),
        Arc::new(Silent),
    )
    .await
    .unwrap();
    let stale = r.refresh_calls + r.import.api_calls;
    println!(
        "sync, stale mirror: {stale} calls for {rows} rows ({:.3} a row; {} listing users and suppressions, {} changed rows)",
        stale as f64 / rows as f64,
        r.refresh_calls,
        r.import.api_calls
    );
    // The import's upsert, listing the project.
    let (s, dir, file) = project(rows).await;
    let client = unlimited(&s.base_url());
    let mut o = ImportOptions::new("1", Source::File(file), dir.path().join("ck.sqlite"));
    o.resolve = Some(prefsync::import::Resolve::List);
    let r = import(&client, &o, Stop::default(), Arc::new(Silent))
        .await
        .unwrap();
    println!(
        "import --resolve list: {} calls for {rows} rows ({:.3} a row)",
        r.api_calls,
        r.api_calls as f64 / rows as f64
    );
}

#[tokio::main]
async fn main() {
    let which = std::env::args().nth(1).unwrap_or_default();
    match which.as_str() {
        "sandbox-rps" => sandbox_rps(arg(2, 5), arg(3, 32)).await,
        "import" => import_vs_bare(arg(2, 100_000), arg(3, 8), Half::Both).await,
        // One half alone (for a profiler).
        "import-only" => import_vs_bare(arg(2, 100_000), arg(3, 8), Half::Import).await,
        "bare-only" => import_vs_bare(arg(2, 100_000), arg(3, 8), Half::Bare).await,
        "client-only" => {
            let (rows, concurrency) = (arg(2, 100_000), arg(3, 8));
            let f = client_creates(rows, concurrency).await;
            println!(
                "client: {:.0} requests/s through prefsync's client; {}",
                rows as f64 / f.secs,
                f.describe(rows)
            );
        }
        "checkpoint" => checkpoint_only(arg(2, 100_000)),
        "limiter" => limiter(arg(2, 300)).await,
        "export-local" => export_local(arg(2, 100_000)).await,
        "sync" => sync_calls(arg(2, 10_000)).await,
        "order" => order_cost(arg(2, 20_000), arg(3, 8), arg(4, 0)).await,
        "listen" => listen(arg(2, 20), arg(3, 50)).await,
        _ => {
            eprintln!("usage: bench sandbox-rps|import|checkpoint|limiter|export-local [ARGS]");
            std::process::exit(2);
        }
    }
}

/// `prefsync listen`: deliveries accepted per second (signature checked and
/// journalled with fsync), then the mirror's lag behind a sandbox changing
/// `rate` users a second for `secs` seconds, and the API calls per change.
async fn listen(secs: u64, rate: u64) {
    use prefsync::listen::signature::sign;
    use prefsync::listen::{ListenConfig, Listener, Secrets};
    const SECRET: &str = "bench-secret";
    let config = |mirror: std::path::PathBuf| ListenConfig {
        mirror,
        beta: "1".into(),
        secrets: Secrets::from_text(SECRET).unwrap(),
        path: "/prefinery".into(),
        tolerance: Duration::from_secs(300),
        max_pending: u64::MAX,
        drain: Duration::from_secs(30),
    };

    // 1. Accepted deliveries per second: 32 senders, distinct bodies of an
    // event kind the applier keeps as unknown (no API call).
    let s = Sandbox::start(
        SandboxConfig {
            rate_scale: 0.0,
            ..Default::default()
        },
        0,
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let l = Listener::start(
        config(dir.path().join("accept.sqlite")),
        unlimited(&s.base_url()),
        tcp,
    )
    .await
    .unwrap();
    let url = format!("http://{}/prefinery", l.addr);
    let http = reqwest::Client::new();
    let done = Arc::new(AtomicU64::new(0));
    let n = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(5);
    let start = Instant::now();
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (http, url, done, n) = (http.clone(), url.clone(), done.clone(), n.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let i = n.fetch_add(1, Ordering::Relaxed);
                    let body = format!(
                        r#"{{"id":"evt_{i}","event":"bench_ping","created_at":"2026-01-01T00:00:00Z","data":{{"n":{i},"pad":"{}"}}}}"#,
                        "x".repeat(600)
                    );
                    let t = prefsync::listen::now_unix();
                    let r = http
                        .post(&url)
                        .header("x-prefinery-signature", sign(SECRET, t, body.as_bytes()))
                        .body(body)
                        .send()
                        .await;
                    if r.is_ok_and(|r| r.status() == 200) {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let accepted = done.load(Ordering::Relaxed);
    println!(
        "listen: {:.0} deliveries/s accepted (signature checked, journalled with fsync; 32 senders, ~700-byte bodies, {accepted} in {:.1}s)",
        accepted as f64 / start.elapsed().as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
    l.shutdown().await.unwrap();
    s.shutdown().await;

    // 2. Lag under a steady load: `rate` updates a second, round-robin over
    // 200 users, each setting the user's first name to its sequence number.
    let dir = tempfile::tempdir().unwrap();
    let mirror = dir.path().join("mirror.sqlite");
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let s = Sandbox::start(
        SandboxConfig {
            rate_scale: 0.0,
            seed_testers: 200,
            webhook: Some(prefsync::sandbox::WebhookConfig {
                url: format!("http://{addr}/prefinery"),
                secret: SECRET.into(),
                duplicate_rate: 0.0,
                reorder: false,
                delay_ms: None,
                retry_scale: 60.0,
                timeout: Duration::from_secs(15),
            }),
            ..Default::default()
        },
        0,
    )
    .await
    .unwrap();
    let listener_client = unlimited(&s.base_url());
    let l = Listener::start(config(mirror.clone()), listener_client.clone(), tcp)
        .await
        .unwrap();
    let total = secs * rate;
    let sent_at: Arc<std::sync::Mutex<Vec<Option<Instant>>>> =
        Arc::new(std::sync::Mutex::new(vec![None; total as usize]));
    let lag: Arc<std::sync::Mutex<Vec<Option<Duration>>>> =
        Arc::new(std::sync::Mutex::new(vec![None; total as usize]));
    // The poller: reads every user's first name from the mirror.
    let poll_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (mirror, sent_at, lag, poll_done) = (
            mirror.clone(),
            sent_at.clone(),
            lag.clone(),
            poll_done.clone(),
        );
        std::thread::spawn(move || {
            let c = rusqlite::Connection::open(&mirror).unwrap();
            let mut last_seen = std::collections::HashMap::<i64, i64>::new();
            while !poll_done.load(Ordering::Relaxed) {
                let now = Instant::now();
                let mut st = c
                    .prepare_cached(
                        "SELECT id, json_extract(record, '$.profile.first_name') FROM testers",
                    )
                    .unwrap();
                let rows: Vec<(i64, Option<String>)> = st
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect();
                let sent = sent_at.lock().unwrap();
                let mut lag = lag.lock().unwrap();
                for (id, name) in rows {
                    let Some(seq) = name.and_then(|n| n.strip_prefix('v')?.parse::<i64>().ok())
                    else {
                        continue;
                    };
                    let from = last_seen.get(&id).copied().unwrap_or(-1);
                    // Every change of this user up to `seq` is in the mirror.
                    let mut k = seq;
                    while k > from {
                        if let Some(at) = sent[k as usize]
                            && lag[k as usize].is_none()
                        {
                            lag[k as usize] = Some(now.saturating_duration_since(at));
                        }
                        k -= 200;
                    }
                    last_seen.insert(id, seq);
                }
                drop((sent, lag));
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let client = unlimited(&s.base_url());
    let ids: Arc<Vec<u64>> = Arc::new(
        s.app
            .with_world(|w| w.project(1).users.keys().copied().collect()),
    );
    assert_eq!(ids.len(), 200);
    let every = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now();
    let mut inflight = Vec::new();
    for seq in 0..total {
        tokio::time::sleep_until(start + every * seq as u32).await;
        let (client, sent_at, ids) = (client.clone(), sent_at.clone(), ids.clone());
        inflight.push(tokio::spawn(async move {
            let id = ids[(seq % 200) as usize];
            let body =
                serde_json::json!({"tester": {"profile": {"first_name": format!("v{seq}")}}});
            // Taken before the call: the change exists from some moment
            // during it, so the lag counts the call's time too.
            sent_at.lock().unwrap()[seq as usize] = Some(Instant::now());
            client
                .call(
                    prefsync::api::Op::TesterUpdate,
                    Some("1"),
                    &format!("betas/1/testers/{id}.json"),
                    &[],
                    Some(&body),
                )
                .await
                .unwrap();
        }));
    }
    for t in inflight {
        t.await.unwrap();
    }
    let last = Instant::now();
    while lag.lock().unwrap().iter().any(Option::is_none) {
        assert!(
            last.elapsed() < Duration::from_secs(120),
            "the mirror did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let caught_up = last.elapsed();
    poll_done.store(true, Ordering::Relaxed);
    poller.join().unwrap();
    let st = l.shutdown().await.unwrap();
    let mut lags: Vec<Duration> = lag.lock().unwrap().iter().map(|l| l.unwrap()).collect();
    lags.sort();
    let pct = |p: f64| lags[((lags.len() - 1) as f64 * p) as usize].as_secs_f64() * 1000.0;
    let calls = listener_client.stats().requests.load(Ordering::Relaxed);
    println!(
        "listen: {total} changes at {rate}/s: lag change -> mirror p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms; caught up {:.0} ms after the last change; {calls} API calls ({:.2} a change; {} events applied)",
        pct(0.5),
        pct(0.95),
        pct(1.0),
        caught_up.as_secs_f64() * 1000.0,
        calls as f64 / total as f64,
        st.applied
    );
    s.shutdown().await;
}
