//! Evidence anyone can reproduce (issue 14, sections 1 and 2): kill -9
//! trials and a fault campaign, each a real `prefsync` process against a
//! real `prefsync sandbox` process, ending with the sandbox's whole state
//! (`GET /__sandbox/state`) compared with the state the input calls for.
//!
//! ```sh
//! cargo build --release --bin prefsync
//! cargo run --release --example proof -- trials [--trials N] [--rows R] [--seed S] [--scenario NAME]
//! cargo run --release --example proof -- faults [--rows R] [--seed S] [--scenario NAME] [--input TRIALS-SCENARIO]
//! ```
//!
//! `--prefsync PATH` picks the binary (default: the `prefsync` of the
//! target directory this example was built in). `--keep` keeps every
//! trial's directory (a trial that is not clean always keeps its own and
//! prints where). `--trial K` runs only trial K of each scenario.
//! Exits 1 when any trial or fault scenario is not clean, except report
//! disagreements in the scenarios named by `--advisory-reports a,b` (name
//! prefixes): known defects, printed all the same.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;

/// The client's own quotas lifted (bench/run.sh's FAST flags): the trials
/// test exactly-once, not the limiter, and the sandbox's limits are off.
const FAST: [&str; 10] = [
    "--rate",
    "testers-list=100000/1s",
    "--rate",
    "account-list=100000/1s",
    "--rate",
    "betas=100000/1s",
    "--rate",
    "rewards-list=100000/1s",
    "--rate",
    "points-list=100000/1s",
];

/// A run that takes longer than this is called hung and killed (the
/// latency case needs about 30 s a step).
const RUN_TIMEOUT: Duration = Duration::from_secs(1800);

/// Reruns after exit 5 (stopped, resumable) before giving up on a trial.
const MAX_RUNS: u32 = 20;

struct Opts {
    cmd: String,
    trials: u64,
    rows: usize,
    seed: u64,
    scenario: Option<String>,
    bin: PathBuf,
    keep: bool,
    work: PathBuf,
    /// Run only this trial of each scenario (to reproduce one).
    only_trial: Option<u64>,
    /// Scenarios (name prefixes) whose report disagreements are printed
    /// but do not fail the run: known defects, until they are fixed.
    advisory: Vec<String>,
    /// `faults`: the trials scenario whose input and command each fault
    /// case runs (default: the first, import-create-heavy).
    input: Option<String>,
}

fn parse_opts() -> Opts {
    let mut args = std::env::args().skip(1);
    let cmd = args.next().unwrap_or_default();
    if cmd != "trials" && cmd != "faults" {
        eprintln!(
            "usage: proof trials [--trials N] [--rows R] [--seed S] [--scenario NAME]\n       proof faults [--rows R] [--seed S] [--scenario NAME] [--input TRIALS-SCENARIO]"
        );
        std::process::exit(2);
    }
    let exe = std::env::current_exe().expect("own path");
    // target/<profile>/examples/proof -> target/<profile>/prefsync
    let default_bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("prefsync"))
        .unwrap_or_else(|| PathBuf::from("prefsync"));
    let mut o = Opts {
        trials: 50,
        rows: if cmd == "trials" { 300 } else { 1000 },
        cmd,
        seed: 1,
        scenario: None,
        bin: default_bin,
        keep: false,
        only_trial: None,
        advisory: vec![],
        input: None,
        work: std::env::temp_dir().join(format!("prefsync-proof-{}", std::process::id())),
    };
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--trials" => o.trials = val().parse().expect("--trials N"),
            "--rows" => o.rows = val().parse().expect("--rows N"),
            "--seed" => o.seed = val().parse().expect("--seed S"),
            "--scenario" => o.scenario = Some(val()),
            "--prefsync" => o.bin = PathBuf::from(val()),
            "--work" => o.work = PathBuf::from(val()),
            "--trial" => o.only_trial = Some(val().parse().expect("--trial K")),
            "--advisory-reports" => {
                o.advisory = val().split(',').map(String::from).collect();
            }
            "--keep" => o.keep = true,
            "--input" => o.input = Some(val()),
            _ => panic!("unknown argument {a}"),
        }
    }
    if !o.bin.exists() {
        eprintln!(
            "no prefsync binary at {}: build it first (cargo build [--release] --bin prefsync) or pass --prefsync PATH",
            o.bin.display()
        );
        std::process::exit(2);
    }
    o
}

fn main() {
    let o = parse_opts();
    fs::create_dir_all(&o.work).expect("work directory");
    eprintln!("prefsync: {}\nwork: {}", o.bin.display(), o.work.display());
    let ok = if o.cmd == "trials" {
        trials(&o)
    } else {
        faults(&o)
    };
    if ok && !o.keep {
        let _ = fs::remove_dir_all(&o.work);
    }
    std::process::exit(if ok { 0 } else { 1 });
}

// ---------------------------------------------------------------- processes

/// A `prefsync sandbox` process, killed when dropped.
struct Sandbox {
    child: Child,
    port: u16,
}

impl Sandbox {
    fn start(bin: &Path, dir: &Path, port: u16, args: &[String]) -> Sandbox {
        let port_file = dir.join("sandbox.port");
        let _ = fs::remove_file(&port_file);
        let log = File::options()
            .create(true)
            .append(true)
            .open(dir.join("sandbox.log"))
            .expect("sandbox log");
        let mut child = Command::new(bin)
            .arg("sandbox")
            .args(["--port", &port.to_string()])
            .arg("--port-file")
            .arg(&port_file)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the sandbox");
        // The sandbox writes the port file whole, once it listens.
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            if let Some(p) = fs::read_to_string(&port_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break p;
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "the sandbox exited ({st}) before listening: {}",
                    fs::read_to_string(dir.join("sandbox.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "the sandbox did not start");
            std::thread::sleep(Duration::from_millis(5));
        };
        Sandbox { child, port }
    }

    /// SIGINT: the sandbox finishes its requests and saves `--state`.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }

    fn state(&self) -> State {
        let (status, body) = http(self.port, "GET", "/__sandbox/state?beta=1", None);
        assert_eq!(status, 200, "GET /__sandbox/state: {body}");
        State::parse(&serde_json::from_str(&body).expect("state JSON"))
    }

    fn requests(&self) -> u64 {
        let (_, body) = http(self.port, "GET", "/__sandbox/stats", None);
        let v: Value = serde_json::from_str(&body).expect("stats JSON");
        v["requests"].as_u64().unwrap_or(0)
    }

    fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/api/v2", self.port)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request on a fresh connection (the admin routes answer
/// with a Content-Length body, and `Connection: close` ends it).
fn http(port: u16, method: &str, path: &str, key: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the sandbox");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    if let Some(k) = key {
        let b = base64::engine::general_purpose::STANDARD.encode(format!("{k}:"));
        req.push_str(&format!("Authorization: Basic {b}\r\n"));
    }
    req.push_str("Content-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "chunked answer from {path}"
    );
    (status, body.to_string())
}

/// What a sequence of runs of one command did.
#[derive(Default)]
struct Runs {
    kills: u32,
    runs: u32,
    codes: Vec<i32>,
    /// 0 or 4, or the code that ended it otherwise; None when hung.
    final_code: Option<i32>,
    elapsed: Duration,
    retries: u64,
    throttled: u64,
}

/// Runs `args` until it exits 0 or 4 (or another code that is not 5),
/// killing it with SIGKILL at each of `kill_at` (from its own start), and
/// running the same command again after each kill and each exit 5.
fn run_until_final(
    bin: &Path,
    dir: &Path,
    base_url: &str,
    args: &[String],
    kill_at: &[Duration],
    summary: Option<&Path>,
) -> Runs {
    let mut r = Runs::default();
    let start = Instant::now();
    let mut kills = kill_at.iter();
    while r.runs < MAX_RUNS {
        r.runs += 1;
        if let Some(s) = summary {
            let _ = fs::remove_file(s);
        }
        let mut child = spawn_client(bin, dir, base_url, args);
        let t0 = Instant::now();
        let kill = kills.next();
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait") {
                break Some(st);
            }
            let waited = t0.elapsed();
            if kill.is_some_and(|k| waited >= *k) {
                child.kill().expect("SIGKILL");
                child.wait().expect("reap");
                r.kills += 1;
                break None;
            }
            if waited > RUN_TIMEOUT {
                child.kill().expect("SIGKILL");
                child.wait().expect("reap");
                r.elapsed = start.elapsed();
                return r;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        if let Some(s) = summary
            && let Ok(text) = fs::read_to_string(s)
            && let Ok(v) = serde_json::from_str::<Value>(&text)
        {
            r.retries += v["retries"].as_u64().unwrap_or(0);
            r.throttled += v["throttled"].as_u64().unwrap_or(0);
        }
        let Some(st) = status else {
            r.codes.push(-9);
            continue;
        };
        let code = st.code().unwrap_or(-1);
        r.codes.push(code);
        if code != 5 {
            r.final_code = Some(code);
            break;
        }
    }
    r.elapsed = start.elapsed();
    r
}

fn spawn_client(bin: &Path, dir: &Path, base_url: &str, args: &[String]) -> Child {
    let log = File::options()
        .create(true)
        .append(true)
        .open(dir.join("client.log"))
        .expect("client log");
    Command::new(bin)
        .args(args)
        .current_dir(dir)
        .env("PREFINERY_BASE_URL", base_url)
        .env("PREFINERY_API_KEY", "sandbox-key")
        .env_remove("PREFINERY_BETA")
        .env_remove("PREFSYNC_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start prefsync")
}

// -------------------------------------------------------------------- state

#[derive(Clone, Debug)]
struct User {
    id: u64,
    email: String,
    status: String,
    profile: serde_json::Map<String, Value>,
    checkins: u64,
}

#[derive(Clone, Debug)]
struct Reward {
    id: u64,
    user_id: u64,
    descriptor: String,
    status: String,
}

#[derive(Clone, Debug)]
struct Point {
    id: u64,
    user_id: u64,
    quantity: i64,
    reason: String,
}

#[derive(Clone, Debug)]
struct Suppression {
    id: u64,
    email: String,
    reason: String,
}

#[derive(Clone, Debug, Default)]
struct State {
    exists: bool,
    users: Vec<User>,
    rewards: Vec<Reward>,
    points: Vec<Point>,
    suppressions: Vec<Suppression>,
}

impl State {
    fn parse(v: &Value) -> State {
        let Some(p) = v["projects"].as_array().and_then(|a| a.first()) else {
            return State::default();
        };
        let arr = |k: &str| p[k].as_array().cloned().unwrap_or_default();
        let s = |v: &Value| v.as_str().unwrap_or("").to_string();
        State {
            exists: true,
            users: arr("users")
                .iter()
                .map(|u| User {
                    id: u["id"].as_u64().unwrap(),
                    email: s(&u["email"]),
                    status: s(&u["status"]),
                    profile: u["profile"].as_object().cloned().unwrap_or_default(),
                    checkins: u["checkins_count"].as_u64().unwrap_or(0),
                })
                .collect(),
            rewards: arr("rewards")
                .iter()
                .map(|r| Reward {
                    id: r["id"].as_u64().unwrap(),
                    user_id: r["user_id"].as_u64().unwrap_or(0),
                    descriptor: s(&r["descriptor"]),
                    status: s(&r["status"]),
                })
                .collect(),
            points: arr("points")
                .iter()
                .map(|r| Point {
                    id: r["id"].as_u64().unwrap(),
                    user_id: r["user_id"].as_u64().unwrap_or(0),
                    quantity: r["quantity"].as_i64().unwrap_or(0),
                    reason: s(&r["reason"]),
                })
                .collect(),
            suppressions: arr("suppressions")
                .iter()
                .map(|r| Suppression {
                    id: r["id"].as_u64().unwrap(),
                    email: s(&r["email"]),
                    reason: s(&r["reason"]),
                })
                .collect(),
        }
    }

    fn user_by_email(&self) -> HashMap<String, Vec<&User>> {
        let mut m: HashMap<String, Vec<&User>> = HashMap::new();
        for u in &self.users {
            m.entry(u.email.to_lowercase()).or_default().push(u);
        }
        m
    }
}

// --------------------------------------------------------------- scenarios

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// `seed` users seeded (a fraction of rows), `existing` of the rows
    /// are seeded users (of which `unchanged` repeat them exactly).
    Import {
        seed_pct: usize,
        existing_pct: usize,
        unchanged_pct: usize,
        resolve: Option<&'static str>,
        /// Each row has a signup time (`joined`, scrambled) and the run
        /// sends creates oldest first, one after another (`--order
        /// strict`): the check also wants the creates in that order.
        sorted: bool,
    },
    Export(&'static str),
    Points,
    Rewards,
    Suppressions,
    Delete,
    Checkin,
}

struct Scenario {
    name: &'static str,
    kind: Kind,
}

const SCENARIOS: [Scenario; 14] = [
    Scenario {
        name: "import-create-heavy",
        kind: Kind::Import {
            seed_pct: 10,
            existing_pct: 10,
            unchanged_pct: 0,
            resolve: None,
            sorted: false,
        },
    },
    Scenario {
        name: "import-update-heavy",
        kind: Kind::Import {
            seed_pct: 100,
            existing_pct: 90,
            unchanged_pct: 10,
            resolve: None,
            sorted: false,
        },
    },
    Scenario {
        name: "import-mixed-upsert",
        kind: Kind::Import {
            seed_pct: 50,
            existing_pct: 50,
            unchanged_pct: 10,
            resolve: None,
            sorted: false,
        },
    },
    Scenario {
        name: "import-sorted-strict",
        kind: Kind::Import {
            seed_pct: 50,
            existing_pct: 20,
            unchanged_pct: 0,
            resolve: None,
            sorted: true,
        },
    },
    Scenario {
        name: "import-resolve-list",
        kind: Kind::Import {
            seed_pct: 50,
            existing_pct: 50,
            unchanged_pct: 10,
            resolve: Some("list"),
            sorted: false,
        },
    },
    Scenario {
        name: "import-resolve-lookup",
        kind: Kind::Import {
            seed_pct: 50,
            existing_pct: 50,
            unchanged_pct: 10,
            resolve: Some("lookup"),
            sorted: false,
        },
    },
    Scenario {
        name: "export-csv",
        kind: Kind::Export("csv"),
    },
    Scenario {
        name: "export-jsonl",
        kind: Kind::Export("jsonl"),
    },
    Scenario {
        name: "export-sqlite",
        kind: Kind::Export("sqlite"),
    },
    Scenario {
        name: "points-add",
        kind: Kind::Points,
    },
    Scenario {
        name: "rewards-issue",
        kind: Kind::Rewards,
    },
    Scenario {
        name: "suppressions-add",
        kind: Kind::Suppressions,
    },
    Scenario {
        name: "testers-delete",
        kind: Kind::Delete,
    },
    Scenario {
        name: "testers-checkin",
        kind: Kind::Checkin,
    },
];

/// The seeded users' names (`World::seed_testers`), to write rows that
/// leave a user unchanged.
const SEED_FIRST: [&str; 6] = ["Ada", "Zoë", "José", "Li", "Mary-Jane", "Ólafur"];
const SEED_LAST: [&str; 5] = [
    "Lovelace",
    "O'Brien",
    "Smith, Jr.",
    "\"The\" Chen",
    "Nøgård\nSecond line",
];

/// One input row and what it should do.
#[derive(Clone, Debug)]
struct Row {
    /// The CSV's cells, in the scenario's header order.
    cells: Vec<String>,
    /// The key that finds its effect on the server (an email).
    email: String,
    /// The results file's expected action.
    action: &'static str,
    /// The file's line where the row starts (cells may hold newlines).
    line: u64,
}

/// A scenario's input file and the command that sends it.
struct Plan {
    seed_testers: usize,
    header: Vec<&'static str>,
    rows: Vec<Row>,
    args: Vec<String>,
    /// The final path of an export (polled for half-written files).
    out: Option<PathBuf>,
}

fn plan(kind: Kind, rows: usize, rng: &mut fastrand::Rng, tag: u64) -> Plan {
    let s = |x: &str| x.to_string();
    let common = |op: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["-q"].iter().chain(op).map(|x| x.to_string()).collect();
        v.extend(
            [
                "--beta",
                "1",
                "--file",
                "in.csv",
                "--checkpoint",
                "ck.sqlite",
                "--results",
                "results.csv",
                "--errors",
                "errors.csv",
                "--summary-json",
                "summary.json",
            ]
            .map(String::from),
        );
        v.extend(FAST.map(String::from));
        v
    };
    match kind {
        Kind::Import {
            seed_pct,
            existing_pct,
            unchanged_pct,
            resolve,
            sorted,
        } => {
            let seed = rows * seed_pct / 100;
            let existing = (rows * existing_pct / 100).min(seed);
            let unchanged = rows * unchanged_pct / 100;
            // Which seeded users the file touches, in no order.
            let mut ids: Vec<usize> = (1..=seed).collect();
            rng.shuffle(&mut ids);
            let mut out = Vec::new();
            for (k, &i) in ids.iter().take(existing).enumerate() {
                let email = format!("user{i}@example.com");
                out.push(if k < unchanged {
                    Row {
                        cells: vec![
                            email.clone(),
                            s(SEED_FIRST[i % 6]),
                            s(SEED_LAST[i % 5]),
                            String::new(),
                        ],
                        email,
                        action: "unchanged",
                        line: 0,
                    }
                } else {
                    Row {
                        cells: vec![
                            email.clone(),
                            format!("F{i}-{tag}"),
                            format!("Last, {i} \"q\""),
                            format!("v{i}"),
                        ],
                        email,
                        action: "updated",
                        line: 0,
                    }
                });
            }
            for i in 0..rows - existing {
                let email = format!("new{i}.{tag}@proof.example.org");
                out.push(Row {
                    cells: vec![
                        email.clone(),
                        format!("Nü{i}"),
                        format!("M{i}"),
                        format!("c{i}"),
                    ],
                    email,
                    action: "created",
                    line: 0,
                });
            }
            rng.shuffle(&mut out);
            let mut args = common(&["import", "testers"]);
            if let Some(r) = resolve {
                args.extend([s("--resolve"), s(r)]);
            }
            let mut header = vec!["email", "first_name", "last_name", "custom_var1"];
            if sorted {
                // Distinct signup times, in no order.
                let mut minutes: Vec<i64> = (0..out.len() as i64).collect();
                rng.shuffle(&mut minutes);
                for (r, m) in out.iter_mut().zip(minutes) {
                    r.cells.push((JOINED_EPOCH + m * 60).to_string());
                }
                header.push("joined");
                args.extend([s("--map"), s(ORDER_MAP_FILE), s("--order"), s("strict")]);
            }
            Plan {
                seed_testers: seed,
                header,
                rows: out,
                args,
                out: None,
            }
        }
        Kind::Export(fmt) => {
            let out = format!("users.{fmt}");
            let mut args: Vec<String> = [
                "-q",
                "export",
                "testers",
                "--beta",
                "1",
                "--format",
                fmt,
                "--out",
                &out,
                "--summary-json",
                "summary.json",
            ]
            .map(String::from)
            .to_vec();
            args.extend(FAST.map(String::from));
            Plan {
                seed_testers: rows,
                header: vec![],
                rows: vec![],
                args,
                out: Some(PathBuf::from(out)),
            }
        }
        Kind::Points => Plan {
            seed_testers: rows,
            header: vec!["email", "quantity", "reason"],
            rows: (1..=rows)
                .map(|i| {
                    let email = format!("user{i}@example.com");
                    let q = if i % 7 == 0 {
                        -(i as i64 % 5 + 1)
                    } else {
                        i as i64 % 9 + 1
                    };
                    Row {
                        cells: vec![email.clone(), q.to_string(), format!("proof {i}")],
                        email,
                        action: "added",
                        line: 0,
                    }
                })
                .collect(),
            args: common(&["points", "add"]),
            out: None,
        },
        Kind::Rewards => Plan {
            seed_testers: rows,
            header: vec!["email", "descriptor"],
            rows: (1..=rows)
                .map(|i| {
                    let email = format!("user{i}@example.com");
                    Row {
                        cells: vec![email.clone(), s("free-month")],
                        email,
                        // Decided against the baseline in the check.
                        action: "issued",
                        line: 0,
                    }
                })
                .collect(),
            args: common(&["rewards", "issue"]),
            out: None,
        },
        Kind::Suppressions => Plan {
            seed_testers: rows,
            header: vec!["email", "reason"],
            rows: (1..=rows)
                .map(|i| {
                    // Half the project's users (Unsubscribe for every
                    // fourth), half emails nobody has.
                    let (email, reason, action) = if i % 2 == 0 {
                        let u = format!("user{i}@example.com");
                        if i % 4 == 0 {
                            (u, "Unsubscribe", "unsubscribed")
                        } else {
                            (u, "Manual", "added")
                        }
                    } else {
                        (format!("gone{i}.{tag}@proof.example.org"), "", "added")
                    };
                    Row {
                        cells: vec![email.clone(), s(reason)],
                        email,
                        action,
                        line: 0,
                    }
                })
                .collect(),
            args: common(&["suppressions", "add"]),
            out: None,
        },
        Kind::Delete => {
            let mut args = common(&["testers", "delete"]);
            args.push(s("--yes"));
            Plan {
                seed_testers: rows,
                header: vec!["email"],
                rows: (1..=rows)
                    .filter(|i| i % 3 != 0)
                    .map(|i| {
                        let email = format!("user{i}@example.com");
                        Row {
                            cells: vec![email.clone()],
                            email,
                            action: "deleted",
                            line: 0,
                        }
                    })
                    .collect(),
                args,
                out: None,
            }
        }
        Kind::Checkin => Plan {
            seed_testers: rows,
            header: vec!["email"],
            rows: (1..=rows)
                .filter(|i| i % 2 == 1)
                .map(|i| {
                    let email = format!("user{i}@example.com");
                    Row {
                        cells: vec![email.clone()],
                        email,
                        action: "checked_in",
                        line: 0,
                    }
                })
                .collect(),
            args: common(&["testers", "checkin"]),
            out: None,
        },
    }
}

/// The sorted import's map, written beside its input.
const ORDER_MAP_FILE: &str = "order.toml";
const ORDER_MAP: &str = "order_by = \"profile.signed_up_at\"\n\
                         [columns]\n\
                         \"joined\" = { to = \"profile.signed_up_at\", date = [\"epoch\"] }\n";
/// The sorted import's earliest signup time.
const JOINED_EPOCH: i64 = 1_700_000_000;

/// A `joined` cell as the map writes it into `signed_up_at`.
fn joined_iso(cell: &str) -> Option<String> {
    let t = chrono::DateTime::from_timestamp(cell.parse().ok()?, 0)?;
    Some(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
}

fn write_input(dir: &Path, p: &mut Plan) {
    if p.header.is_empty() {
        return;
    }
    if p.header.contains(&"joined") {
        std::fs::write(dir.join(ORDER_MAP_FILE), ORDER_MAP).expect("map file");
    }
    let mut w = csv::Writer::from_path(dir.join("in.csv")).expect("input file");
    w.write_record(&p.header).unwrap();
    let mut line = 2;
    for r in &mut p.rows {
        w.write_record(&r.cells).unwrap();
        r.line = line;
        line += 1 + r
            .cells
            .iter()
            .map(|c| c.matches('\n').count() as u64)
            .sum::<u64>();
    }
    w.flush().unwrap();
}

// ------------------------------------------------------------------ checks

/// What one trial found wrong; all zero is a clean trial.
#[derive(Default, Clone)]
struct Tally {
    duplicates: u64,
    missing: u64,
    wrong: u64,
    report: u64,
    half_written: u64,
    /// A final exit other than the expected 0, or a hang.
    bad_exit: u64,
    notes: Vec<String>,
}

impl Tally {
    fn clean(&self) -> bool {
        self.duplicates
            + self.missing
            + self.wrong
            + self.report
            + self.half_written
            + self.bad_exit
            == 0
    }
    fn note(&mut self, s: String) {
        if self.notes.len() < 8 {
            self.notes.push(s);
        }
    }
    fn add(&mut self, o: &Tally) {
        self.duplicates += o.duplicates;
        self.missing += o.missing;
        self.wrong += o.wrong;
        self.report += o.report;
        self.half_written += o.half_written;
        self.bad_exit += o.bad_exit;
    }
}

/// The results file: line -> (action, prefinery id).
fn read_results(dir: &Path) -> Option<HashMap<u64, (String, String)>> {
    let mut r = csv::Reader::from_path(dir.join("results.csv")).ok()?;
    let mut m = HashMap::new();
    for rec in r.records() {
        let rec = rec.ok()?;
        let line: u64 = rec.get(0)?.parse().ok()?;
        m.insert(
            line,
            (
                rec.get(2).unwrap_or("").to_string(),
                rec.get(3).unwrap_or("").to_string(),
            ),
        );
    }
    Some(m)
}

/// The errors file's lines (`prefsync_line`).
fn read_errors(dir: &Path) -> Vec<u64> {
    let Ok(mut r) = csv::Reader::from_path(dir.join("errors.csv")) else {
        return vec![];
    };
    let Ok(h) = r.headers().cloned() else {
        return vec![];
    };
    let col = h.iter().position(|c| c == "prefsync_line");
    r.records()
        .filter_map(|rec| {
            let rec = rec.ok()?;
            col.and_then(|c| rec.get(c)?.parse().ok()).or(Some(0))
        })
        .collect()
}

/// What the server shows for one row: the action the results file should
/// give, the id it should name (when one is known), and whether the row's
/// effect is there at all.
struct Truth {
    action: &'static str,
    id: Option<u64>,
    applied: bool,
}

fn truth_of(action: &'static str, id: Option<u64>, applied: bool) -> Truth {
    Truth {
        action,
        id,
        applied,
    }
}

/// Compares the results and errors files with what the server holds. A
/// row reported `rejected` (and listed in the errors file) agrees when
/// the server shows no effect of it: that is "missing", counted apart.
fn check_reports(t: &mut Tally, dir: &Path, p: &Plan, truth: &[Truth]) {
    let Some(results) = read_results(dir) else {
        t.report += truth.len() as u64;
        t.note("no readable results file".into());
        return;
    };
    let errors: HashSet<u64> = read_errors(dir).into_iter().collect();
    let lines: HashSet<u64> = p.rows.iter().map(|r| r.line).collect();
    for (r, w) in p.rows.iter().zip(truth) {
        let line = r.line;
        let agrees = match results.get(&line) {
            None => false,
            Some((a, _)) if a == "rejected" => !w.applied && errors.contains(&line),
            Some((a, i)) => {
                a == w.action && w.applied && w.id.is_none_or(|id| i == &id.to_string())
            }
        };
        if !agrees {
            t.report += 1;
            let said = results.get(&line).map(|(a, i)| format!("{a} {i}"));
            t.note(format!(
                "line {line}: results say {said:?}, the server shows {} {:?} (applied: {})",
                w.action, w.id, w.applied
            ));
        }
    }
    for line in errors {
        if !lines.contains(&line) || results.get(&line).is_none_or(|(a, _)| a != "rejected") {
            t.report += 1;
            t.note(format!(
                "line {line}: in the errors file, not rejected in the results"
            ));
        }
    }
}

fn check(kind: Kind, p: &Plan, before: &State, after: &State, dir: &Path, t: &mut Tally) {
    match kind {
        Kind::Import { .. } => check_import(p, before, after, dir, t),
        Kind::Export(fmt) => check_export(fmt, before, after, dir, t),
        Kind::Points => {
            let users = after.user_by_email();
            let mut truth = Vec::new();
            let mut ours = 0;
            for (k, r) in p.rows.iter().enumerate() {
                let uid = users[&r.email][0].id;
                let prefix = format!("{} [ps:", r.cells[2]);
                let found: Vec<&Point> = after
                    .points
                    .iter()
                    .filter(|x| x.user_id == uid && x.reason.starts_with(&prefix))
                    .collect();
                ours += found.len();
                match found.len() {
                    0 => {
                        t.missing += 1;
                        t.note(format!("line {}: no point", k + 2));
                    }
                    1 => {}
                    n => {
                        t.duplicates += n as u64 - 1;
                        t.note(format!("line {}: {n} points", k + 2));
                    }
                }
                if let Some(x) = found.first()
                    && x.quantity.to_string() != r.cells[1]
                {
                    t.wrong += 1;
                }
                truth.push(truth_of(
                    "added",
                    found.first().map(|x| x.id),
                    !found.is_empty(),
                ));
            }
            let extra = after.points.len() as i64 - before.points.len() as i64 - ours as i64;
            if extra != 0 {
                t.duplicates += extra.unsigned_abs();
                t.note(format!("{extra} points outside the file's rows"));
            }
            check_reports(t, dir, p, &truth);
        }
        Kind::Rewards => {
            let users = after.user_by_email();
            let held = |s: &State, uid: u64| -> Vec<u64> {
                s.rewards
                    .iter()
                    .filter(|r| r.user_id == uid && r.descriptor == "free-month")
                    .filter(|r| r.status != "revoked")
                    .map(|r| r.id)
                    .collect()
            };
            let mut truth = Vec::new();
            for (k, r) in p.rows.iter().enumerate() {
                let uid = users[&r.email][0].id;
                let had = held(before, uid);
                let has = held(after, uid);
                let new: Vec<u64> = has.iter().filter(|i| !had.contains(i)).copied().collect();
                let (want, action) = if had.is_empty() {
                    (1, "issued")
                } else {
                    (0, "unchanged")
                };
                match new.len().cmp(&want) {
                    std::cmp::Ordering::Less => {
                        t.missing += 1;
                        t.note(format!("line {}: no reward issued", k + 2));
                    }
                    std::cmp::Ordering::Greater => {
                        t.duplicates += (new.len() - want) as u64;
                        t.note(format!("line {}: {} rewards issued", k + 2, new.len()));
                    }
                    std::cmp::Ordering::Equal => {}
                }
                truth.push(truth_of(
                    action,
                    if want == 1 {
                        new.first().copied()
                    } else {
                        None
                    },
                    new.len() >= want,
                ));
            }
            check_reports(t, dir, p, &truth);
        }
        Kind::Suppressions => {
            let mut count: HashMap<String, Vec<&Suppression>> = HashMap::new();
            for s in &after.suppressions {
                count.entry(s.email.to_lowercase()).or_default().push(s);
            }
            let had: HashSet<String> = before
                .suppressions
                .iter()
                .map(|s| s.email.to_lowercase())
                .collect();
            let mut truth = Vec::new();
            for (k, r) in p.rows.iter().enumerate() {
                let found = count.get(&r.email).cloned().unwrap_or_default();
                match found.len() {
                    0 => {
                        t.missing += 1;
                        t.note(format!("line {}: not suppressed", k + 2));
                    }
                    1 => {}
                    n => {
                        t.duplicates += n as u64 - 1;
                    }
                }
                let want_reason = if r.cells[1].is_empty() {
                    "Manual"
                } else {
                    &r.cells[1]
                };
                if found.first().is_some_and(|s| s.reason != want_reason) {
                    t.wrong += 1;
                    t.note(format!("line {}: reason {}", k + 2, found[0].reason));
                }
                let action = if had.contains(&r.email) {
                    "unchanged"
                } else {
                    r.action
                };
                truth.push(truth_of(
                    action,
                    found.first().map(|s| s.id),
                    found.first().is_some_and(|s| s.reason == want_reason),
                ));
            }
            let in_file: HashSet<&str> = p.rows.iter().map(|r| r.email.as_str()).collect();
            let extra = after
                .suppressions
                .iter()
                .filter(|s| !in_file.contains(s.email.as_str()) && !had.contains(&s.email))
                .count();
            t.duplicates += extra as u64;
            check_reports(t, dir, p, &truth);
        }
        Kind::Delete => {
            let now = after.user_by_email();
            let in_file: HashSet<&str> = p.rows.iter().map(|r| r.email.as_str()).collect();
            let mut truth = Vec::new();
            for r in &p.rows {
                if now.contains_key(&r.email) {
                    t.missing += 1;
                    t.note(format!("{} not deleted", r.email));
                }
                let id = before.user_by_email()[&r.email][0].id;
                truth.push(truth_of("deleted", Some(id), !now.contains_key(&r.email)));
            }
            for u in &before.users {
                if !in_file.contains(u.email.as_str()) && !now.contains_key(&u.email) {
                    // Deleted without being asked: a delete too many.
                    t.duplicates += 1;
                    t.note(format!("{} deleted, not in the file", u.email));
                }
            }
            check_reports(t, dir, p, &truth);
        }
        Kind::Checkin => {
            let was: HashMap<u64, u64> = before.users.iter().map(|u| (u.id, u.checkins)).collect();
            let in_file: HashSet<&str> = p.rows.iter().map(|r| r.email.as_str()).collect();
            let mut truth = Vec::new();
            for u in &after.users {
                let want = was[&u.id] + u64::from(in_file.contains(u.email.as_str()));
                match u.checkins.cmp(&want) {
                    std::cmp::Ordering::Less => {
                        t.missing += 1;
                        t.note(format!(
                            "{}: {} check-ins, {want} expected",
                            u.email, u.checkins
                        ));
                    }
                    std::cmp::Ordering::Greater => {
                        t.duplicates += u.checkins - want;
                        t.note(format!(
                            "{}: {} check-ins, {want} expected",
                            u.email, u.checkins
                        ));
                    }
                    std::cmp::Ordering::Equal => {}
                }
            }
            let now = after.user_by_email();
            for r in &p.rows {
                let u = now[&r.email][0];
                truth.push(truth_of("checked_in", Some(u.id), u.checkins > was[&u.id]));
            }
            check_reports(t, dir, p, &truth);
        }
    }
}

fn check_import(p: &Plan, before: &State, after: &State, dir: &Path, t: &mut Tally) {
    let now = after.user_by_email();
    let was = before.user_by_email();
    let mut expected: BTreeMap<String, serde_json::Map<String, Value>> = before
        .users
        .iter()
        .map(|u| (u.email.clone(), u.profile.clone()))
        .collect();
    for r in &p.rows {
        let prof = expected.entry(r.email.clone()).or_default();
        for (k, field) in ["first_name", "last_name", "custom_var1"]
            .iter()
            .enumerate()
        {
            let v = r.cells[k + 1].trim();
            if !v.is_empty() {
                prof.insert(field.to_string(), Value::String(v.to_string()));
            }
        }
        if let Some(iso) = r.cells.get(4).and_then(|c| joined_iso(c)) {
            prof.insert("signed_up_at".into(), Value::String(iso));
        }
    }
    // A sorted run creates oldest signup first: by the ids the sandbox
    // gave, in order of creation.
    if p.header.contains(&"joined") {
        let mut created: Vec<(u64, i64, &str)> = p
            .rows
            .iter()
            .filter(|r| r.action == "created")
            .filter_map(|r| {
                let u = now.get(&r.email)?[0];
                Some((u.id, r.cells[4].parse().ok()?, r.email.as_str()))
            })
            .collect();
        created.sort();
        for w in created.windows(2) {
            if w[0].1 > w[1].1 {
                t.wrong += 1;
                t.note(format!(
                    "{} (signed up later) was created before {}",
                    w[0].2, w[1].2
                ));
            }
        }
    }
    for (email, users) in &now {
        if users.len() > 1 {
            t.duplicates += users.len() as u64 - 1;
            t.note(format!("{email}: {} users", users.len()));
        }
        if !expected.contains_key(email) {
            t.duplicates += 1;
            t.note(format!("{email}: a user nobody asked for"));
        }
    }
    for (email, prof) in &expected {
        match now.get(email) {
            None => {
                t.missing += 1;
                t.note(format!("{email}: missing"));
            }
            Some(us) => {
                let u = us[0];
                let status_ok = was.contains_key(email) || u.status == "imported";
                if &u.profile != prof || !status_ok {
                    t.wrong += 1;
                    t.note(format!(
                        "{email}: {:?} {}, expected {:?}",
                        u.profile, u.status, prof
                    ));
                }
            }
        }
    }
    let truth: Vec<Truth> = p
        .rows
        .iter()
        .map(|r| {
            let u = now.get(&r.email).map(|u| u[0]);
            let applied = u.is_some_and(|u| {
                Some(&u.profile) == expected.get(&r.email)
                    && (was.contains_key(&r.email) || u.status == "imported")
            });
            truth_of(r.action, u.map(|u| u.id), applied)
        })
        .collect();
    check_reports(t, dir, p, &truth);
}

fn check_export(fmt: &str, before: &State, after: &State, dir: &Path, t: &mut Tally) {
    let path = dir.join(format!("users.{fmt}"));
    let got = match read_export(fmt, &path) {
        Ok(v) => v,
        Err(e) => {
            t.missing += before.users.len() as u64;
            t.note(format!("final export unreadable: {e}"));
            return;
        }
    };
    let server: HashMap<u64, &str> = after
        .users
        .iter()
        .map(|u| (u.id, u.email.as_str()))
        .collect();
    if before.users.len() != after.users.len() {
        t.wrong += 1;
        t.note("an export changed the server's users".into());
    }
    let mut seen = HashSet::new();
    for (id, email) in &got {
        if !seen.insert(*id) {
            t.duplicates += 1;
            continue;
        }
        match server.get(id) {
            None => {
                t.wrong += 1;
                t.note(format!("id {id} exported, not on the server"));
            }
            Some(e) if e != email => {
                t.wrong += 1;
                t.note(format!("id {id}: {email} exported, {e} on the server"));
            }
            _ => {}
        }
    }
    for id in server.keys() {
        if !seen.contains(id) {
            t.missing += 1;
        }
    }
    match fs::read_to_string(dir.join("summary.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
    {
        Some(v) => {
            let rows = v["rows"].as_u64().unwrap_or(u64::MAX);
            let complete = v["complete"].as_bool() == Some(true);
            if rows != server.len() as u64 || !complete {
                t.report += 1;
                t.note(format!(
                    "summary says rows {rows} complete {complete}; the server has {}",
                    server.len()
                ));
            }
        }
        None => {
            t.report += 1;
            t.note("no summary".into());
        }
    }
}

/// (id, email) of each exported record.
fn read_export(fmt: &str, path: &Path) -> Result<Vec<(u64, String)>, String> {
    match fmt {
        "csv" => {
            let mut r = csv::Reader::from_path(path).map_err(|e| e.to_string())?;
            let h = r.headers().map_err(|e| e.to_string())?.clone();
            let id = h.iter().position(|c| c == "id").ok_or("no id column")?;
            let em = h
                .iter()
                .position(|c| c == "email")
                .ok_or("no email column")?;
            r.records()
                .map(|rec| {
                    let rec = rec.map_err(|e| e.to_string())?;
                    let i = rec.get(id).and_then(|x| x.parse().ok()).ok_or("bad id")?;
                    Ok((i, rec.get(em).unwrap_or("").to_string()))
                })
                .collect()
        }
        "jsonl" => {
            let text = fs::read_to_string(path).map_err(|e| e.to_string())?;
            if !text.is_empty() && !text.ends_with('\n') {
                return Err("the last line is not ended".into());
            }
            text.lines()
                .map(|l| {
                    let v: Value = serde_json::from_str(l).map_err(|e| e.to_string())?;
                    Ok((
                        v["id"].as_u64().ok_or("no id")?,
                        v["email"].as_str().unwrap_or("").to_string(),
                    ))
                })
                .collect()
        }
        _ => {
            let c = rusqlite::Connection::open_with_flags(
                path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE,
            )
            .map_err(|e| e.to_string())?;
            c.busy_timeout(Duration::from_secs(5)).ok();
            let mut st = c
                .prepare("SELECT id, email FROM testers WHERE beta_id = 1 AND deleted_at IS NULL")
                .map_err(|e| e.to_string())?;
            st.query_map([], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
            })
            .map_err(|e| e.to_string())?
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())
        }
    }
}

/// Watches an export's final path while the runs go on: a CSV or JSONL
/// file there must hold the whole list (it is renamed into place whole);
/// a SQLite file must always be a sound database (pages commit whole).
struct Watcher {
    stop: Arc<AtomicBool>,
    bad: Arc<AtomicU64>,
    looks: Arc<AtomicU64>,
    note: Arc<std::sync::Mutex<Option<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    fn start(fmt: &'static str, path: PathBuf, expected: usize) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let bad = Arc::new(AtomicU64::new(0));
        let looks = Arc::new(AtomicU64::new(0));
        let note = Arc::new(std::sync::Mutex::new(None));
        let (s, b, l, n) = (stop.clone(), bad.clone(), looks.clone(), note.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if path.exists() {
                    l.fetch_add(1, Ordering::Relaxed);
                    let verdict = if fmt == "sqlite" {
                        sqlite_sound(&path)
                    } else {
                        match read_export(fmt, &path) {
                            Ok(v) if v.len() == expected => Ok(()),
                            Ok(v) => Err(format!("{} of {expected} records", v.len())),
                            Err(e) if e.contains("No such file") => Ok(()),
                            Err(e) => Err(e),
                        }
                    };
                    if let Err(e) = verdict {
                        b.fetch_add(1, Ordering::Relaxed);
                        n.lock().unwrap().get_or_insert(e);
                    }
                }
                // SQLite is looked at less often: a reader holds the WAL back.
                std::thread::sleep(Duration::from_millis(if fmt == "sqlite" { 20 } else { 2 }));
            }
        });
        Watcher {
            stop,
            bad,
            looks,
            note,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (u64, u64, Option<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        (
            self.bad.load(Ordering::Relaxed),
            self.looks.load(Ordering::Relaxed),
            self.note.lock().unwrap().take(),
        )
    }
}

fn sqlite_sound(path: &Path) -> Result<(), String> {
    let c = match rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE,
    ) {
        Ok(c) => c,
        Err(_) if !path.exists() => return Ok(()),
        Err(e) => return Err(format!("open: {e}")),
    };
    c.busy_timeout(Duration::from_millis(50)).ok();
    let r: Result<String, _> = c.query_row("PRAGMA quick_check", [], |r| r.get(0));
    match r {
        Ok(s) if s == "ok" => Ok(()),
        Ok(s) => Err(format!("quick_check: {s}")),
        Err(e) if e.to_string().contains("locked") || e.to_string().contains("busy") => Ok(()),
        Err(e) => Err(format!("quick_check: {e}")),
    }
}

// ------------------------------------------------------------------ trials

struct TrialOut {
    tally: Tally,
    runs: Runs,
    dir: PathBuf,
}

fn one_trial(o: &Opts, sc: &Scenario, trial: u64, kill_at: &[Duration]) -> TrialOut {
    let dir = o.work.join(format!("{}-{trial}", sc.name));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let seed = o.seed.wrapping_mul(1_000_003).wrapping_add(trial);
    let mut rng = fastrand::Rng::with_seed(seed ^ name_hash(sc.name));
    let mut p = plan(sc.kind, o.rows, &mut rng, seed);
    write_input(&dir, &mut p);
    let sb_args: Vec<String> = [
        "--rate-scale",
        "0",
        "--fail-after-write-rate",
        "0.05",
        "--latency-ms",
        "2:20",
        "--seed",
        &seed.to_string(),
        "--seed-testers",
        &p.seed_testers.to_string(),
    ]
    .map(String::from)
    .to_vec();
    let sb = Sandbox::start(&o.bin, &dir, 0, &sb_args);
    let before = sb.state();
    let watcher = match (sc.kind, &p.out) {
        (Kind::Export(fmt), Some(out)) => {
            Some(Watcher::start(fmt, dir.join(out), before.users.len()))
        }
        _ => None,
    };
    let runs = run_until_final(&o.bin, &dir, &sb.base_url(), &p.args, kill_at, None);
    let mut tally = Tally::default();
    if let Some(w) = watcher {
        let (bad, _looks, note) = w.finish();
        tally.half_written = bad;
        if let Some(n) = note {
            tally.note(format!("half-written output seen: {n}"));
        }
    }
    if runs.final_code != Some(0) {
        tally.bad_exit = 1;
        tally.note(format!("exit codes {:?}", runs.codes));
    }
    let after = sb.state();
    drop(sb);
    check(sc.kind, &p, &before, &after, &dir, &mut tally);
    TrialOut { tally, runs, dir }
}

fn name_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn trials(o: &Opts) -> bool {
    let chosen: Vec<&Scenario> = SCENARIOS
        .iter()
        .filter(|s| o.scenario.as_deref().is_none_or(|n| s.name.starts_with(n)))
        .collect();
    assert!(!chosen.is_empty(), "no scenario matches");
    println!(
        "kill -9 trials: {} trials a scenario, {} rows, seed {}; sandbox --rate-scale 0 --fail-after-write-rate 0.05 --latency-ms 2:20",
        o.trials, o.rows, o.seed
    );
    println!(
        "\n| scenario | trials | clean | duplicates | missing | wrong fields | report disagreements | half-written outputs | kills | runs | time |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut all_clean = true;
    let mut strictly_clean = true;
    let start_all = Instant::now();
    for sc in chosen {
        let start = Instant::now();
        // An unkilled run first: a clean baseline, and how long a run
        // lasts, so that kill moments fall across the whole of it.
        let cal = one_trial(o, sc, 0, &[]);
        let span = cal.runs.elapsed.max(Duration::from_millis(20));
        let mut sum = Tally::default();
        let (mut clean, mut kills, mut runs) = (0, 0, 0);
        if !cal.tally.clean() {
            all_clean = false;
            eprintln!(
                "{} unkilled run not clean ({}): {:?}",
                sc.name,
                cal.dir.display(),
                cal.tally.notes
            );
        } else if !o.keep {
            let _ = fs::remove_dir_all(&cal.dir);
        }
        let mut shown = 0;
        for trial in 1..=o.trials {
            if o.only_trial.is_some_and(|k| k != trial) {
                continue;
            }
            let mut rng = fastrand::Rng::with_seed(
                o.seed ^ name_hash(sc.name) ^ trial.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            // Most trials killed once, some twice or three times.
            let n = match rng.u32(0..20) {
                0..=11 => 1,
                12..=16 => 2,
                _ => 3,
            };
            let kill_at: Vec<Duration> = (0..n).map(|_| span.mul_f64(rng.f64())).collect();
            let out = one_trial(o, sc, trial, &kill_at);
            kills += out.runs.kills;
            runs += out.runs.runs;
            sum.add(&out.tally);
            let mut judged = out.tally.clone();
            if o.advisory.iter().any(|a| sc.name.starts_with(a.as_str())) {
                judged.report = 0;
            }
            if out.tally.clean() {
                clean += 1;
                if !o.keep {
                    let _ = fs::remove_dir_all(&out.dir);
                }
            } else {
                all_clean &= judged.clean();
                strictly_clean = false;
                shown += 1;
                if shown <= 3 {
                    eprintln!(
                        "{} trial {trial} (kills at {:?}, exit codes {:?}) not clean, kept in {}: {:?}",
                        sc.name,
                        kill_at,
                        out.runs.codes,
                        out.dir.display(),
                        &out.tally.notes[..out.tally.notes.len().min(3)]
                    );
                } else {
                    eprintln!(
                        "{} trial {trial} not clean, kept in {}",
                        sc.name,
                        out.dir.display()
                    );
                }
            }
        }
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0}s |",
            sc.name,
            o.only_trial.map_or(o.trials, |_| 1),
            clean,
            sum.duplicates,
            sum.missing,
            sum.wrong,
            sum.report,
            if matches!(sc.kind, Kind::Export(_)) {
                sum.half_written.to_string()
            } else {
                "n/a".into()
            },
            kills,
            runs,
            start.elapsed().as_secs_f64()
        );
    }
    println!(
        "\n{} in {:.0}s",
        if strictly_clean {
            "every trial clean"
        } else if all_clean {
            "not every trial clean, but only by report disagreements in --advisory-reports scenarios"
        } else {
            "NOT every trial clean (details above, on stderr)"
        },
        start_all.elapsed().as_secs_f64()
    );
    all_clean
}

// ------------------------------------------------------------------ faults

enum Special {
    None,
    KeyRevoked,
    ProjectDeleted,
}

struct FaultCase {
    name: String,
    args: Vec<String>,
    rows: usize,
    special: Special,
}

fn fault_cases(rows: usize) -> Vec<FaultCase> {
    let mut v = Vec::new();
    let case = |name: String, args: &[&str], rows: usize| FaultCase {
        name,
        args: args.iter().map(|s| s.to_string()).collect(),
        rows,
        special: Special::None,
    };
    v.push(case("none".into(), &[], rows));
    for p in ["0.01", "0.05", "0.2"] {
        let pct = (p.parse::<f64>().unwrap() * 100.0).round();
        v.push(case(
            format!("5xx before the write {pct}%"),
            &["--fail-rate", p],
            rows,
        ));
        v.push(case(
            format!("5xx or drop after the write {pct}%"),
            &["--fail-after-write-rate", p],
            rows,
        ));
        v.push(case(
            format!("dropped connection {pct}%"),
            &["--drop-rate", p],
            rows,
        ));
        v.push(case(
            format!("all three {pct}% each"),
            &[
                "--fail-rate",
                p,
                "--fail-after-write-rate",
                p,
                "--drop-rate",
                p,
            ],
            rows,
        ));
    }
    // The client's timeout is 30 s and has no flag; the sandbox's latency is
    // uniform in MIN:MAX, so half of these requests outlast the timeout.
    // Every step of a row then costs about 30 s: one wave of 8 rows.
    v.push(case(
        "latency 25-35 s (client timeout 30 s)".into(),
        &["--latency-ms", "25000:35000"],
        8,
    ));
    for status in ["503", "429"] {
        for (ra, label) in [
            (None, "no Retry-After"),
            (Some("1"), "Retry-After: 1"),
            (Some("0"), "Retry-After: 0"),
        ] {
            let mut a = vec!["--write-limit", "200/1s", "--throttle-status", status];
            if let Some(r) = ra {
                a.extend(["--retry-after", r]);
            }
            v.push(case(
                format!("throttled {status}, {label}, writes 200/s"),
                &a,
                rows,
            ));
        }
    }
    v.push(FaultCase {
        name: "key revoked mid-run".into(),
        args: vec![],
        rows,
        special: Special::KeyRevoked,
    });
    v.push(FaultCase {
        name: "project deleted mid-run".into(),
        args: vec!["--latency-ms".into(), "2:20".into()],
        rows,
        special: Special::ProjectDeleted,
    });
    v
}

fn faults(o: &Opts) -> bool {
    let input = match &o.input {
        None => &SCENARIOS[0],
        Some(name) => SCENARIOS
            .iter()
            .find(|s| s.name == name && matches!(s.kind, Kind::Import { .. }))
            .unwrap_or_else(|| panic!("--input {name}: no import scenario of that name")),
    };
    println!(
        "fault campaign: the {} import (its file and command) into a sandbox with --rate-scale 0, seed {}; client at its defaults (concurrency 8) with its list quotas lifted",
        input.name, o.seed
    );
    println!(
        "\n| scenario | rows | final state exact | API calls a row | retries | throttled | exit codes | time |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut all = true;
    for (n, c) in fault_cases(o.rows).into_iter().enumerate() {
        if o.scenario
            .as_deref()
            .is_some_and(|s| !c.name.starts_with(s))
        {
            continue;
        }
        let dir = o.work.join(format!("fault-{n}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let mut rng = fastrand::Rng::with_seed(o.seed ^ n as u64);
        let kind = input.kind;
        let mut p = plan(kind, c.rows, &mut rng, o.seed);
        write_input(&dir, &mut p);
        let mut args: Vec<String> = [
            "--rate-scale",
            "0",
            "--seed",
            &o.seed.to_string(),
            "--seed-testers",
            &p.seed_testers.to_string(),
        ]
        .map(String::from)
        .to_vec();
        args.extend(c.args.iter().cloned());
        let summary = dir.join("summary.json");
        let (verdict, runs, calls, ok) = match c.special {
            Special::None => {
                let sb = Sandbox::start(&o.bin, &dir, 0, &args);
                let before = sb.state();
                let mut t = Tally::default();
                let mut runs =
                    run_until_final(&o.bin, &dir, &sb.base_url(), &p.args, &[], Some(&summary));
                // Exit 4 with rows given up as unclear ("run again to
                // retry"): their reports must match the server, then the
                // same command is run again, as the message says.
                let mut again = 0;
                while runs.final_code == Some(4) && again < 3 {
                    again += 1;
                    let mut r = Tally::default();
                    check(kind, &p, &before, &sb.state(), &dir, &mut r);
                    t.report += r.report;
                    t.notes
                        .extend(r.notes.into_iter().filter(|n| n.contains("results")));
                    let more =
                        run_until_final(&o.bin, &dir, &sb.base_url(), &p.args, &[], Some(&summary));
                    runs.codes.extend(more.codes);
                    runs.runs += more.runs;
                    runs.retries += more.retries;
                    runs.throttled += more.throttled;
                    runs.elapsed += more.elapsed;
                    runs.final_code = more.final_code;
                }
                let calls = sb.requests();
                let after = sb.state();
                // The last run's reports describe only what it did.
                let mut end = Tally::default();
                check(kind, &p, &before, &after, &dir, &mut end);
                if again == 0 {
                    t.report += end.report;
                }
                t.duplicates += end.duplicates;
                t.missing += end.missing;
                t.wrong += end.wrong;
                t.notes.extend(end.notes);
                if runs.final_code != Some(0) {
                    t.bad_exit = 1;
                }
                let ok = t.clean();
                if !ok {
                    eprintln!(
                        "{}: not exact, kept in {}: {:?}",
                        c.name,
                        dir.display(),
                        t.notes
                    );
                }
                (verdict_of(&t), runs, calls, ok)
            }
            Special::KeyRevoked => key_revoked(o, &dir, &args, &p, &summary),
            Special::ProjectDeleted => project_deleted(o, &dir, &args, &p, &summary),
        };
        all &= ok;
        println!(
            "| {} | {} | {} | {:.3} | {} | {} | {} | {:.1}s |",
            c.name,
            c.rows,
            verdict,
            calls as f64 / c.rows as f64,
            runs.retries,
            runs.throttled,
            runs.codes
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(" "),
            runs.elapsed.as_secs_f64()
        );
        if ok && !o.keep {
            let _ = fs::remove_dir_all(&dir);
        }
    }
    println!(
        "\n{}",
        if all {
            "every state exact"
        } else {
            "NOT every state exact (details on stderr)"
        }
    );
    all
}

fn verdict_of(t: &Tally) -> String {
    if t.clean() {
        return "yes".into();
    }
    format!(
        "NO: dup {} missing {} wrong {} report {} exit {}",
        t.duplicates, t.missing, t.wrong, t.report, t.bad_exit
    )
}

/// Keys are read once when the sandbox starts (`--keys`), so a key revoked
/// mid-run is a restart on the same port and the same `--state` with a
/// keys file where the key has expired; then the key is "fixed" (restart
/// with the first keys file) and the same command run again.
fn key_revoked(
    o: &Opts,
    dir: &Path,
    args: &[String],
    p: &Plan,
    summary: &Path,
) -> (String, Runs, u64, bool) {
    fs::write(dir.join("good.toml"), "[keys]\nsandbox-key = [\"all\"]\n").unwrap();
    fs::write(
        dir.join("revoked.toml"),
        "[keys]\nsandbox-key = { permissions = [\"all\"], expired = true }\n",
    )
    .unwrap();
    let with = |keys: &str| -> Vec<String> {
        let mut a = args.to_vec();
        a.extend([
            "--state".into(),
            dir.join("world.sqlite").display().to_string(),
        ]);
        a.extend(["--keys".into(), dir.join(keys).display().to_string()]);
        // Slow enough to stop it part way.
        a.extend(["--latency-ms".into(), "2:20".into()]);
        a
    };
    let sb = Sandbox::start(&o.bin, dir, 0, &with("good.toml"));
    let port = sb.port;
    let base = sb.base_url();
    let before = sb.state();
    let mut calls = 0;
    let start = Instant::now();
    let mut child = spawn_client(&o.bin, dir, &base, &p.args);
    // Revoke once about a third of the file is on the server.
    let target = before.users.len() + p.rows.len() / 3;
    while sb.state().users.len() < target {
        std::thread::sleep(Duration::from_millis(20));
        if child.try_wait().unwrap().is_some() {
            break;
        }
    }
    calls += sb.requests();
    sb.stop();
    let sb = Sandbox::start(&o.bin, dir, port, &with("revoked.toml"));
    let st = child.wait().unwrap();
    let mut runs = Runs {
        runs: 1,
        codes: vec![st.code().unwrap_or(-1)],
        ..Default::default()
    };
    let log = fs::read_to_string(dir.join("client.log")).unwrap_or_default();
    let msg = log
        .lines()
        .find(|l| l.contains("rror"))
        .unwrap_or("")
        .to_string();
    calls += sb.requests();
    let mid = sb.state().users.len();
    sb.stop();
    let sb = Sandbox::start(&o.bin, dir, port, &with("good.toml"));
    let rest = run_until_final(&o.bin, dir, &base, &p.args, &[], Some(summary));
    runs.runs += rest.runs;
    runs.codes.extend(rest.codes);
    runs.retries = rest.retries;
    runs.throttled = rest.throttled;
    runs.elapsed = start.elapsed();
    calls += sb.requests();
    let after = sb.state();
    let mut t = Tally::default();
    check(SCENARIOS[0].kind, p, &before, &after, dir, &mut t);
    if runs.codes.first() != Some(&3) || rest.final_code != Some(0) {
        t.bad_exit = 1;
    }
    eprintln!("key revoked: {mid} users when the key was revoked; the client said: {msg}");
    let ok = t.clean();
    if !ok {
        eprintln!(
            "key revoked: not exact, kept in {}: {:?}",
            dir.display(),
            t.notes
        );
    }
    (verdict_of(&t), runs, calls, ok)
}

/// The project is deleted (with a key holding projects:delete) while the
/// import runs: the run must stop with a clear error and a documented
/// exit code, not retry for long nor report rows as rejected one by one.
fn project_deleted(
    o: &Opts,
    dir: &Path,
    args: &[String],
    p: &Plan,
    _summary: &Path,
) -> (String, Runs, u64, bool) {
    let sb = Sandbox::start(&o.bin, dir, 0, args);
    let before = sb.state();
    let start = Instant::now();
    let mut child = spawn_client(&o.bin, dir, &sb.base_url(), &p.args);
    let target = before.users.len() + p.rows.len() / 3;
    while sb.state().users.len() < target && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let deleted_at = Instant::now();
    let calls_before = sb.requests();
    loop {
        let (status, body) = http(sb.port, "DELETE", "/api/v2/betas/1", Some("sandbox-key"));
        if (200..300).contains(&status) || status == 404 {
            break;
        }
        assert!(
            deleted_at.elapsed() < Duration::from_secs(30),
            "DELETE betas/1: {status} {body}"
        );
    }
    let st = child.wait().unwrap();
    let stop_after = deleted_at.elapsed();
    let calls = sb.requests();
    let code = st.code().unwrap_or(-1);
    let log = fs::read_to_string(dir.join("client.log")).unwrap_or_default();
    let msg = log
        .lines()
        .find(|l| l.to_lowercase().contains("error"))
        .unwrap_or("(no error line)")
        .to_string();
    let gone = !sb.state().exists;
    let ok = gone && code == 2 && stop_after < Duration::from_secs(30);
    eprintln!(
        "project deleted: exit {code} {:.1}s after the delete, {} calls after it; stderr: {msg}",
        stop_after.as_secs_f64(),
        calls - calls_before
    );
    let runs = Runs {
        runs: 1,
        codes: vec![code],
        elapsed: start.elapsed(),
        ..Default::default()
    };
    let verdict = format!(
        "{}: exit {code} {:.1}s after the delete; \"{}\"",
        if ok { "yes" } else { "NO" },
        stop_after.as_secs_f64(),
        msg.trim()
    );
    (verdict, runs, calls, ok)
}
