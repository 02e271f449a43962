//! Import end to end against the in-process sandbox.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use prefsync::import::input::{Encoding, Source};
use prefsync::import::{ImportOptions, ImportSummary, Mode, Resolve, import};
use prefsync::progress::Silent;
use prefsync::sandbox::{Sandbox, SandboxConfig};
use prefsync::stop::Stop;
use serde_json::Value;

struct Fixture {
    dir: tempfile::TempDir,
    sandbox: Sandbox,
}

impl Fixture {
    /// Rate limits off unless the test sets its own scale (the client's
    /// quotas are then far above them).
    async fn new(mut config: SandboxConfig) -> Fixture {
        if config.rate_scale == 1.0 {
            config.rate_scale = 0.0;
        }
        Fixture {
            dir: tempfile::tempdir().unwrap(),
            sandbox: common::sandbox(config).await,
        }
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn opts(&self, file: &Path) -> ImportOptions {
        let mut o = ImportOptions::new(
            "a9b8c7de",
            Source::File(file.to_path_buf()),
            self.dir.path().join("ck.sqlite"),
        );
        o.errors = Some(self.dir.path().join("errors.csv"));
        o.results = Some(self.dir.path().join("results.csv"));
        o
    }

    async fn run(&self, o: &ImportOptions) -> anyhow::Result<ImportSummary> {
        import(
            &common::unlimited_client(&self.sandbox),
            o,
            Stop::default(),
            Arc::new(Silent),
        )
        .await
    }

    fn users(&self) -> Vec<Value> {
        common::users(&self.sandbox, 1)
    }

    fn user(&self, email: &str) -> Value {
        self.users()
            .into_iter()
            .find(|u| u["email"] == email)
            .unwrap_or_else(|| panic!("no user {email}"))
    }

    fn csv(&self, name: &str) -> Vec<Vec<String>> {
        let mut r = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_path(self.dir.path().join(name))
            .unwrap();
        r.records()
            .map(|x| x.unwrap().iter().map(str::to_string).collect())
            .collect()
    }
}

#[tokio::test]
async fn encodings_delimiters_bom_and_multiline_fields() {
    let f = Fixture::new(SandboxConfig::default()).await;
    // Windows-1252 (Excel on Windows), semicolons, CRLF.
    let cp1252 = f.file("excel.csv", b"Email;First Name;Last Name\r\nzoe@x.io;Zo\xEB;M\xFCller\r\nrene@x.io;Ren\xE9;\"Multi\r\nline\"\r\n");
    let s = f.run(&f.opts(&cp1252)).await.unwrap();
    assert_eq!((s.created, s.rejected), (2, 0));
    assert_eq!(f.user("zoe@x.io")["profile"]["first_name"], "Zoë");
    assert_eq!(f.user("zoe@x.io")["profile"]["last_name"], "Müller");
    assert_eq!(f.user("rene@x.io")["profile"]["last_name"], "Multi\r\nline");
    // UTF-8 with a BOM, tabs.
    let tabs = f.file(
        "tabs.tsv",
        "\u{feff}email\tfirst_name\n\"ann@x.io\"\tÅsa \"Q\"\n".as_bytes(),
    );
    let s = f.run(&f.opts(&tabs)).await.unwrap();
    assert_eq!(s.created, 1);
    assert_eq!(f.user("ann@x.io")["profile"]["first_name"], "Åsa \"Q\"");
    // Latin-1 forced on a file that is valid UTF-8 would mangle it: it is
    // detected as UTF-8 instead, and --encoding wins when given.
    let mut o = f.opts(&f.file("latin.csv", b"email,first_name\nlat@x.io,Jos\xE9\n"));
    o.encoding = Some(Encoding::Windows1252);
    f.run(&o).await.unwrap();
    assert_eq!(f.user("lat@x.io")["profile"]["first_name"], "José");
}

#[tokio::test]
async fn mapping_and_unmapped_columns() {
    let f = Fixture::new(SandboxConfig::default()).await;
    let input = f.file(
        "in.csv",
        b"E-Mail,Full Name,Joined,Shoe size,response.77,Notes\na@x.io,Ada King Lovelace,12/31/2024,38,yes,secret\n",
    );
    let map = f.file(
        "map.toml",
        br#"[columns]
"Full Name" = "split_name"
"Joined" = { to = "profile.joined_on", date = "%m/%d/%Y" }
"Notes" = "ignore"
[constants]
"custom_var2" = "wave-1"
"#,
    );
    let mut o = f.opts(&input);
    o.map = Some(map);
    let s = f.run(&o).await.unwrap();
    assert_eq!(s.unmapped_columns, vec!["Shoe size".to_string()]);
    let u = f.user("a@x.io");
    assert_eq!(u["profile"]["first_name"], "Ada King");
    assert_eq!(u["profile"]["last_name"], "Lovelace");
    assert_eq!(u["profile"]["joined_on"], "2024-12-31");
    assert_eq!(u["profile"]["custom_var2"], "wave-1");
    assert!(u["profile"].get("Notes").is_none() && u["profile"].get("Shoe size").is_none());
    assert_eq!(u["responses"][0]["question_id"], "77");
    // --strict refuses the unmapped column before any call.
    let mut o = f.opts(&input);
    o.strict = true;
    o.fresh = true;
    let e = f.run(&o).await.unwrap_err();
    assert!(e.to_string().contains("Shoe size"), "{e}");
    assert_eq!(prefsync::exit::exit_for(&e).code(), 2);
}

#[tokio::test]
async fn every_validation_error_lands_in_the_report_which_feeds_back_in() {
    let f = Fixture::new(SandboxConfig::default()).await;
    let input = f.file(
        "in.csv",
        b"email,status,first_name\n\
good@x.io,applied,Good\n\
,applied,NoEmail\n\
bad email@x.io,applied,Space\n\
nodomain@x,applied,Dom\n\
GOOD@x.io,applied,Dup\n\
odd@x.io,vip,Status\n\
also@x.io,,Fine\n",
    );
    let s = f.run(&f.opts(&input)).await.unwrap();
    assert_eq!((s.created, s.rejected), (2, 5));
    let errors = f.csv("errors.csv");
    assert_eq!(
        errors[0],
        [
            "email",
            "status",
            "first_name",
            "prefsync_line",
            "prefsync_error_class",
            "prefsync_http_status",
            "prefsync_message"
        ]
    );
    let by_line = |l: &str| errors.iter().find(|r| r[3] == l).unwrap().clone();
    assert!(by_line("3")[6].contains("empty"));
    assert!(by_line("4")[6].contains("space"));
    assert!(by_line("5")[6].contains("domain"));
    assert!(
        by_line("6")[6].contains("already on line 2"),
        "{:?}",
        by_line("6")
    );
    assert!(by_line("7")[6].contains("unknown status \"vip\""));
    assert!(errors.iter().skip(1).all(|r| r[4] == "validation"));
    // The original cells are kept as they were.
    assert_eq!(by_line("4")[..3], ["bad email@x.io", "applied", "Space"]);
    // Results: one line per input line, by line number.
    let results = f.csv("results.csv");
    let lines: Vec<&str> = results.iter().skip(1).map(|r| r[0].as_str()).collect();
    assert_eq!(lines, ["2", "3", "4", "5", "6", "7", "8"]);
    assert_eq!(results[1][2], "created");
    assert_eq!(results[7][2], "created");

    // Fix the errors file and feed it straight back in.
    let text = std::fs::read_to_string(f.dir.path().join("errors.csv")).unwrap();
    let fixed = text
        .replace(",applied,NoEmail", "noemail@x.io,applied,NoEmail")
        .replace("bad email@x.io", "bademail@x.io")
        .replace("nodomain@x,", "nodomain@x.io,")
        .replace(",vip,", ",applied,");
    let back = f.file("fixed.csv", fixed.as_bytes());
    let mut o = f.opts(&back);
    o.errors = Some(f.dir.path().join("errors2.csv"));
    let s = f.run(&o).await.unwrap();
    assert!(
        s.unmapped_columns.is_empty(),
        "report columns are recognised"
    );
    // The duplicate is now an update of the existing user.
    assert_eq!((s.created, s.updated, s.rejected), (4, 1, 0));
    assert_eq!(f.user("good@x.io")["profile"]["first_name"], "Dup");
}

/// A file that sets no status is planned and sent in one pass: the same
/// checks, duplicates found across dispatch batches and within one, every
/// row accounted for, and the run recorded as planned in full.
#[tokio::test]
async fn single_pass_checks_every_row_like_the_planning_pass() {
    let f = Fixture::new(SandboxConfig::default()).await;
    let mut text = b"email,first_name\n".to_vec();
    for i in 0..100 {
        text.extend_from_slice(format!("u{i}@x.io,Name{i}\n").as_bytes());
        match i {
            10 => text.extend_from_slice(b",NoEmail\n"),
            20 => text.extend_from_slice(b"bad email@x.io,Space\n"),
            // Far from its first line (another batch), and right after it.
            60 => text.extend_from_slice(b" U5@X.IO ,Again\n"),
            70 => text.extend_from_slice(b"u70@x.io,Twice\n"),
            80 => text.extend_from_slice(b"latin@x.io,Ren\xe9e\n"),
            _ => {}
        }
    }
    let input = f.file("in.csv", &text);
    let s = f.run(&f.opts(&input)).await.unwrap();
    assert_eq!(
        (s.total_rows, s.created, s.rejected, s.pending),
        (105, 101, 4, 0)
    );
    assert!(!s.stopped);
    assert_eq!(f.users().len(), 101);
    // The file is Windows-1252 (one byte gave it away), read as such.
    assert_eq!(f.user("latin@x.io")["profile"]["first_name"], "Renée");

    let errors = f.csv("errors.csv");
    let message = |cell: &str| {
        errors
            .iter()
            .find(|r| r[0] == cell)
            .unwrap_or_else(|| panic!("no error row for {cell:?}: {errors:?}"))[5]
            .clone()
    };
    assert!(message("").contains("empty"));
    assert!(message("bad email@x.io").contains("space"));
    assert!(message(" U5@X.IO ").contains("already on line 7"));
    assert!(message("u70@x.io").contains("already on line 75"));
    assert!(errors.iter().skip(1).all(|r| r[3] == "validation"));

    let results = f.csv("results.csv");
    let lines: Vec<u64> = results
        .iter()
        .skip(1)
        .map(|r| r[0].parse().unwrap())
        .collect();
    assert_eq!(lines, (2..=106).collect::<Vec<_>>());

    let ck = prefsync::checkpoint::Checkpoint::open(&f.dir.path().join("ck.sqlite")).unwrap();
    let run = &ck.runs().unwrap()[0];
    assert!(run.planned, "{run:?}");
    assert_eq!((run.total_rows, run.state.as_str()), (Some(105), "done"));
}

#[tokio::test]
async fn dry_run_writes_nothing() {
    let f = Fixture::new(SandboxConfig {
        seed_testers: 3,
        ..Default::default()
    })
    .await;
    let input = f.file(
        "in.csv",
        b"email,first_name\nuser1@example.com,Changed\nnew@x.io,New\nbroken\n",
    );
    let mut o = f.opts(&input);
    o.dry_run = true;
    let before = f.users();
    let s = f.run(&o).await.unwrap();
    assert_eq!((s.created, s.updated, s.rejected), (1, 1, 1));
    assert_eq!(f.users(), before);
    assert!(!f.dir.path().join("ck.sqlite").exists(), "no checkpoint");
    let plan = f.csv("results.csv");
    assert_eq!(plan[1][2], "updated");
    assert_eq!(plan[2][2], "created");
    let stats = f.sandbox.app.stats_json();
    assert!(
        stats["routes"].get("testers.create").is_none()
            && stats["routes"].get("testers.update").is_none()
    );
}

#[tokio::test]
async fn no_email_is_sent_unless_asked() {
    let f = Fixture::new(SandboxConfig::default()).await;
    let plain = f.file("plain.csv", b"email\na@x.io\nb@x.io\n");
    f.run(&f.opts(&plain)).await.unwrap();
    assert_eq!(f.user("a@x.io")["status"], "imported");
    let invite = f.file(
        "invite.csv",
        b"email,status\nc@x.io,invited\nd@x.io,applied\ne@x.io,rejected\n",
    );
    let e = f.run(&f.opts(&invite)).await.unwrap_err();
    assert!(e.to_string().contains("2 rows set a status"), "{e}");
    assert!(e.to_string().contains("--allow-emails"));
    assert_eq!(f.users().len(), 2, "nothing was sent");
    assert!(f.sandbox.app.with_world(|w| w.outbox.is_empty()));
    let mut o = f.opts(&invite);
    o.allow_emails = true;
    let s = f.run(&o).await.unwrap();
    assert_eq!(s.created, 3);
    assert_eq!(
        f.sandbox.app.with_world(|w| w.outbox.len()),
        1,
        "invited emails; a new user cannot be rejected"
    );
}

#[tokio::test]
async fn upsert_both_ways_by_list_and_by_lookup() {
    for resolve in [Resolve::List, Resolve::Lookup] {
        let f = Fixture::new(SandboxConfig {
            seed_testers: 60,
            ..Default::default()
        })
        .await;
        let before = f.user("user7@example.com");
        let input = f.file(
            "in.csv",
            format!(
                "email,first_name,last_name\nuser7@example.com,Renamed,{}\nUSER8@example.com,{},{}\nfresh@x.io,F,G\n",
                csv_quote(before["profile"]["last_name"].as_str().unwrap()),
                f.user("user8@example.com")["profile"]["first_name"].as_str().unwrap(),
                csv_quote(f.user("user8@example.com")["profile"]["last_name"].as_str().unwrap()),
            )
            .as_bytes(),
        );
        let mut o = f.opts(&input);
        o.resolve = Some(resolve);
        let s = f.run(&o).await.unwrap();
        assert_eq!(
            (s.created, s.updated, s.unchanged, s.rejected),
            (1, 1, 1, 0),
            "{resolve:?}"
        );
        let after = f.user("user7@example.com");
        assert_eq!(after["id"], before["id"]);
        assert_eq!(after["profile"]["first_name"], "Renamed");
        assert_eq!(
            after["status"], before["status"],
            "an update leaves the status alone"
        );
        assert_eq!(f.users().len(), 61);
    }
    // --mode create refuses existing users, --mode update new ones.
    let f = Fixture::new(SandboxConfig {
        seed_testers: 5,
        ..Default::default()
    })
    .await;
    let input = f.file(
        "in.csv",
        b"email,first_name\nuser1@example.com,X\nnew@x.io,Y\n",
    );
    let mut o = f.opts(&input);
    o.mode = Mode::Create;
    let s = f.run(&o).await.unwrap();
    assert_eq!((s.created, s.rejected), (1, 1));
    let mut o = f.opts(&f.file(
        "in2.csv",
        b"email,first_name\nuser1@example.com,X\nnewer@x.io,Y\n",
    ));
    o.mode = Mode::Update;
    let s = f.run(&o).await.unwrap();
    assert_eq!((s.updated, s.rejected), (1, 1));
    assert!(f.users().iter().all(|u| u["email"] != "newer@x.io"));
}

fn csv_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Faults on every side: 5xx before writes, 5xx or dropped connections after
/// writes, dropped connections, and throttling (the client asks for twice the
/// rate the sandbox allows). The project ends with exactly the right users,
/// each created once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_and_throttling_end_with_exactly_the_right_users() {
    let f = Fixture::new(SandboxConfig {
        seed_testers: 50,
        fail_rate: 0.05,
        fail_after_write_rate: 0.05,
        drop_rate: 0.02,
        rate_scale: 60.0,
        seed: 42,
        ..Default::default()
    })
    .await;
    let mut text = String::from("email,first_name\n");
    for i in 1..=400 {
        // The first 50 exist (updates), the rest are new.
        text.push_str(&format!("user{i}@example.com,Name{i}\n"));
    }
    let input = f.file("in.csv", text.as_bytes());
    let mut o = f.opts(&input);
    o.resolve = Some(Resolve::Lookup);
    o.concurrency = 8;
    let client = common::client_for(
        &f.sandbox.base_url(),
        common::KEY,
        &["testers-list=120/1s", "account-list=1000/1s"],
    );
    let s = import(&client, &o, Stop::default(), Arc::new(Silent))
        .await
        .unwrap();
    assert_eq!(s.rejected, 0, "{s}");
    assert_eq!(s.created + s.updated, 400);
    assert!(s.throttled > 0, "the sandbox throttled: {s}");
    let users = f.users();
    assert_eq!(users.len(), 400);
    for i in 1..=400 {
        let u = users
            .iter()
            .find(|u| u["email"] == format!("user{i}@example.com"))
            .unwrap();
        assert_eq!(u["profile"]["first_name"], format!("Name{i}"));
    }
    // Nobody was created twice: a second create of the same email would
    // have been refused as taken.
    let stats = f.sandbox.app.stats_json();
    assert!(
        stats["routes"]["testers.create"].get("422").is_none(),
        "{stats:#}"
    );
}

// Defects found when the import was tried as a new user would (issue 14).
// Each test failed before its fix.

#[tokio::test]
async fn an_unbalanced_quote_refuses_the_file_before_any_call() {
    let f = Fixture::new(SandboxConfig::default()).await;
    let never_closes = f.file(
        "open.csv",
        b"email,first_name\na@x.io,A\nb@x.io,B\nc@x.io,C\nbad@x.org,\"Unclosed,Row\nd@x.io,D\ne@x.io,E\n",
    );
    let e = f.run(&f.opts(&never_closes)).await.unwrap_err();
    assert_eq!(prefsync::exit::exit_for(&e).code(), 2, "{e:#}");
    let msg = e.to_string();
    assert!(msg.contains("open.csv") && msg.contains("line 5"), "{msg}");
    assert!(f.users().is_empty(), "nothing may be sent");
    // Closed lines later, then more text: the records between were swallowed.
    let swallows = f.file(
        "swallow.csv",
        b"email,first_name\nbad@x.org,\"Unclosed,Row\nd@x.io,D\ne@x.io,\"E\"x\n",
    );
    let e = f.run(&f.opts(&swallows)).await.unwrap_err();
    assert!(e.to_string().contains("line 2"), "{e}");
    assert!(f.users().is_empty());
    // A real multi-line cell is still fine.
    let fine = f.file("fine.csv", b"email,first_name\na@x.io,\"Two\nlines\"\n");
    assert_eq!(f.run(&f.opts(&fine)).await.unwrap().created, 1);
}

#[tokio::test]
async fn one_bad_utf8_byte_rejects_its_row_and_keeps_the_file_utf8() {
    let f = Fixture::new(SandboxConfig::default()).await;
    let mut bytes = b"email,first_name\n".to_vec();
    for i in 0..5 {
        bytes.extend(format!("zoe{i}@x.io,Zoë\n").as_bytes());
    }
    bytes.extend(b"bad@x.io,X\xC3\x28Y\n");
    let s = f.run(&f.opts(&f.file("mixed.csv", &bytes))).await.unwrap();
    assert_eq!((s.created, s.rejected), (5, 1));
    assert_eq!(f.user("zoe3@x.io")["profile"]["first_name"], "Zoë");
    let errors = f.csv("errors.csv");
    assert_eq!(errors[1][2], "7");
    assert!(
        errors[1][5].contains("\"first_name\" (column 2)") && errors[1][5].contains("UTF-8"),
        "{:?}",
        errors[1]
    );
}

#[tokio::test]
async fn lone_cr_line_ends_are_lines() {
    let f = Fixture::new(SandboxConfig::default()).await;
    let cr = f.file("cr.csv", b"email,first_name\rcr1@x.io,A\rcr2@x.io,B\r");
    let s = f.run(&f.opts(&cr)).await.unwrap();
    assert_eq!((s.created, s.rejected), (2, 0));
    // One stray CR in an LF file.
    let stray = f.file(
        "stray.csv",
        b"email,first_name\ns1@x.io,A\rs2@x.io,B\ns3@x.io,C\n",
    );
    let s = f.run(&f.opts(&stray)).await.unwrap();
    assert_eq!((s.created, s.rejected), (3, 0));
    let lines: Vec<String> = f.csv("results.csv")[1..]
        .iter()
        .map(|r| r[0].clone())
        .collect();
    assert_eq!(lines, ["2", "3", "4"]);
}

#[tokio::test]
async fn ragged_rows_and_nul_bytes_are_rejected_naming_the_line() {
    let f = Fixture::new(SandboxConfig::default()).await;
    let input = f.file(
        "ragged.csv",
        b"email,first_name,last_name\nok@x.io,O,K\nmore@x.io,M,O,extra cell\nfew@x.io,F\nnul@x.io,N\x00L,L\nok2@x.io,O,K\n",
    );
    let s = f.run(&f.opts(&input)).await.unwrap();
    assert_eq!((s.created, s.rejected), (2, 3));
    let errors = f.csv("errors.csv");
    let by_line = |l: &str| errors.iter().find(|r| r[3] == l).unwrap()[6].clone();
    assert!(
        by_line("3").contains("4 fields and the header has 3"),
        "{}",
        by_line("3")
    );
    assert!(
        by_line("3").contains("\"extra cell\""),
        "the extra cell is kept"
    );
    assert!(by_line("4").contains("2 fields"));
    assert!(by_line("5").contains("NUL") && by_line("5").contains("first_name"));
}

#[tokio::test]
async fn a_resume_with_other_settings_is_refused_naming_them() {
    let f = Fixture::new(SandboxConfig::default()).await;
    let input = f.file("in.csv", b"email,Name\na@x.io,Ann\nb@x.io,Bob\n");
    let m1 = f.file("m1.toml", b"[columns]\n\"Name\" = \"first_name\"\n");
    let m2 = f.file("m2.toml", b"[columns]\n\"Name\" = \"last_name\"\n");
    // A run stopped before its end.
    let mut o = f.opts(&input);
    o.map = Some(m1.clone());
    let stop = Stop::default();
    stop.trigger();
    let s = import(
        &common::unlimited_client(&f.sandbox),
        &o,
        stop,
        Arc::new(Silent),
    )
    .await
    .unwrap();
    assert!(s.stopped);
    // Resumed with another map and another status.
    let mut o2 = f.opts(&input);
    o2.map = Some(m2.clone());
    o2.default_status = Some("applied".into());
    let e = f.run(&o2).await.unwrap_err();
    assert_eq!(prefsync::exit::exit_for(&e).code(), 2, "{e:#}");
    let msg = e.to_string();
    assert!(
        msg.contains("--map was") && msg.contains("m1.toml"),
        "{msg}"
    );
    assert!(msg.contains("--status was imported, now applied"), "{msg}");
    assert!(msg.contains("--fresh"), "{msg}");
    // The same map edited in place differs too.
    std::fs::write(&m1, b"[columns]\n\"Name\" = \"employer\"\n").unwrap();
    let e = f.run(&o).await.unwrap_err();
    assert!(e.to_string().contains("--map was"), "{e}");
    std::fs::write(&m1, b"[columns]\n\"Name\" = \"first_name\"\n").unwrap();
    // The same settings resume; --fresh starts over with the new ones.
    assert_eq!(f.run(&o).await.unwrap().created, 2);
    assert_eq!(f.user("a@x.io")["profile"]["first_name"], "Ann");
}

#[tokio::test]
async fn outputs_that_are_the_input_or_each_other_are_refused_up_front() {
    let f = Fixture::new(SandboxConfig::default()).await;
    let input = f.file("in.csv", b"email\na@x.io\n");
    let before = std::fs::read(&input).unwrap();
    let mut o = f.opts(&input);
    o.errors = Some(input.clone());
    let e = f.run(&o).await.unwrap_err();
    assert_eq!(prefsync::exit::exit_for(&e).code(), 2);
    assert!(e.to_string().contains("--errors"), "{e}");
    let mut o = f.opts(&input);
    o.checkpoint = input.clone();
    assert_eq!(
        prefsync::exit::exit_for(&f.run(&o).await.unwrap_err()).code(),
        2
    );
    let mut o = f.opts(&input);
    o.results = Some(f.dir.path().to_path_buf());
    assert_eq!(
        prefsync::exit::exit_for(&f.run(&o).await.unwrap_err()).code(),
        2
    );
    let mut o = f.opts(&input);
    o.checkpoint = f.dir.path().join("missing/ck.sqlite");
    assert_eq!(
        prefsync::exit::exit_for(&f.run(&o).await.unwrap_err()).code(),
        2
    );
    // A directory as the input.
    let o = f.opts(f.dir.path());
    assert_eq!(
        prefsync::exit::exit_for(&f.run(&o).await.unwrap_err()).code(),
        2
    );
    assert_eq!(std::fs::read(&input).unwrap(), before);
    assert!(f.users().is_empty());
}

#[tokio::test]
async fn the_errors_report_can_neutralise_formulas_and_leaves_no_partial_file() {
    let f = Fixture::new(SandboxConfig::default()).await;
    let input = f.file(
        "in.csv",
        b"email,first_name\nnot-an-email,=HYPERLINK(\"x\")\n",
    );
    let mut o = f.opts(&input);
    o.excel_safe = true;
    f.run(&o).await.unwrap();
    assert_eq!(f.csv("errors.csv")[1][1], "'=HYPERLINK(\"x\")");
    let leftovers: Vec<_> = std::fs::read_dir(f.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A checkpoint written by a prefsync of schema version 3 (before the
/// engine), holding an import stopped by kill -9: one row done, one in
/// flight whose create reached the server, one never sent. The engine
/// migrates it to version 4 on open and resumes it: nobody is created
/// twice, nobody is skipped.
#[tokio::test]
async fn an_unfinished_version_3_import_migrates_and_resumes() {
    let f = Fixture::new(SandboxConfig::default()).await;
    let input = f.file(
        "in.csv",
        b"email,first_name\na@x.io,A\nb@x.io,B\nc@x.io,C\n",
    );
    let client = common::unlimited_client(&f.sandbox);
    let mut ids = vec![];
    for (email, name) in [("a@x.io", "A"), ("b@x.io", "B")] {
        let mut t = prefsync::api::TesterInput {
            email: Some(email.into()),
            status: Some("imported".into()),
            ..Default::default()
        };
        t.profile.insert("first_name".into(), name.into());
        ids.push(client.create_tester_id("a9b8c7de", &t).await.unwrap());
    }
    let bytes = std::fs::read(&input).unwrap();
    let hash = sha1_smol::Sha1::from(&bytes).digest().to_string();
    let key = std::fs::canonicalize(&input).unwrap().display().to_string();
    {
        let conn = rusqlite::Connection::open(f.dir.path().join("ck.sqlite")).unwrap();
        conn.execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE runs (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, input_path TEXT NOT NULL,
               input_size INTEGER, input_hash TEXT, beta TEXT NOT NULL, options TEXT NOT NULL,
               state TEXT NOT NULL, planned INTEGER NOT NULL DEFAULT 0, total_rows INTEGER,
               started_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, finished_at INTEGER);
             CREATE TABLE rows (run_id INTEGER NOT NULL REFERENCES runs(id), line INTEGER NOT NULL,
               email TEXT, state TEXT NOT NULL, intent TEXT, action TEXT, tester_id INTEGER,
               attempts INTEGER NOT NULL DEFAULT 0, error_class TEXT, http_status INTEGER,
               message TEXT, raw TEXT, PRIMARY KEY (run_id, line)) WITHOUT ROWID;
             CREATE TABLE known_testers (run_id INTEGER NOT NULL, email TEXT NOT NULL,
               tester_id INTEGER NOT NULL, record TEXT NOT NULL, PRIMARY KEY (run_id, email)) WITHOUT ROWID;
             CREATE TABLE outcomes (run_id INTEGER NOT NULL, line INTEGER NOT NULL, action TEXT NOT NULL,
               tester_id INTEGER NOT NULL, PRIMARY KEY (run_id, line)) WITHOUT ROWID;
             PRAGMA user_version = 3;",
        )
        .unwrap();
        conn.execute(
            "INSERT INTO runs (id, kind, input_path, input_size, input_hash, beta, options, state, planned, total_rows, started_at, updated_at)
             VALUES (1, 'import', ?1, ?2, ?3, 'a9b8c7de', ?4, 'running', 1, 3, 0, 0)",
            rusqlite::params![
                key,
                bytes.len() as i64,
                hash,
                r#"{"mode":"Create","default_status":"imported","allow_emails":false,"empty":"Keep"}"#
            ],
        )
        .unwrap();
        conn.execute_batch(&format!(
            "INSERT INTO rows (run_id, line, email, state, intent, attempts) VALUES
               (1, 2, 'a@x.io', 'sending', 'create', 1),
               (1, 3, 'b@x.io', 'sending', 'create', 1),
               (1, 4, 'c@x.io', 'pending', NULL, 0);
             INSERT INTO outcomes (run_id, line, action, tester_id) VALUES (1, 2, 'created', {});",
            ids[0]
        ))
        .unwrap();
    }
    let mut o = f.opts(&input);
    o.mode = Mode::Create;
    let s = f.run(&o).await.unwrap();
    assert!(s.resumed, "the version 3 run is resumed, not started over");
    assert_eq!((s.created, s.rejected, s.pending), (3, 0, 0));
    let users = f.users();
    assert_eq!(users.len(), 3, "nobody created twice, nobody skipped");
    let results = f.csv("results.csv");
    assert_eq!(
        results[2][3],
        ids[1].to_string(),
        "b's id found by its lookup"
    );
    let conn = rusqlite::Connection::open(f.dir.path().join("ck.sqlite")).unwrap();
    let (version, kind): (i64, String) = conn
        .query_row(
            "SELECT (SELECT value FROM meta WHERE key = 'schema_version'), kind FROM runs WHERE id = 1",
            [],
            |r| Ok((r.get::<_, String>(0)?.parse().unwrap(), r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (version, kind.as_str()),
        (prefsync::checkpoint::SCHEMA_VERSION, "testers.import")
    );
}

/// Regression (defect 5): a server that throttles writes with 503 and a
/// rate-limit body. Every row is created once, none is given up as an
/// unknown outcome, and the throttled answers are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_throttled_by_503_are_all_created_and_counted() {
    let f = Fixture::new(SandboxConfig {
        throttle_status: 503,
        write_limit: Some((100, std::time::Duration::from_secs(1))),
        ..Default::default()
    })
    .await;
    let mut text = String::from("email\n");
    for i in 1..=300 {
        text.push_str(&format!("new{i}@example.com\n"));
    }
    let input = f.file("in.csv", text.as_bytes());
    let mut o = f.opts(&input);
    o.mode = Mode::Create;
    let s = f.run(&o).await.unwrap();
    assert_eq!((s.created, s.rejected), (300, 0), "{s}");
    assert!(s.throttled > 0, "the sandbox throttled writes: {s}");
    assert_eq!(f.users().len(), 300);
    let stats = f.sandbox.app.stats_json();
    assert!(
        stats["routes"]["testers.create"].get("422").is_none(),
        "nobody was created twice: {stats:#}"
    );
}

/// Regression (defect 5): a create answered by a plain 503 (no sign of
/// throttling) whose lookup shows nothing was written is sent again, more
/// than the 4 times an unknown outcome gets, instead of rejecting the row.
#[tokio::test]
async fn a_create_refused_by_plain_503s_is_sent_until_it_goes_through() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, Respond, ResponseTemplate};

    /// Six plain 503s, then the created tester.
    struct Unavailable(std::sync::atomic::AtomicUsize);
    impl Respond for Unavailable {
        fn respond(&self, _: &wiremock::Request) -> ResponseTemplate {
            let i = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if i < 6 {
                ResponseTemplate::new(503).set_body_json(
                    serde_json::json!({"errors": [{"message": "Service Unavailable"}]}),
                )
            } else {
                ResponseTemplate::new(201)
                    .set_body_json(serde_json::json!({"id": 9, "email": "solo@x.io"}))
            }
        }
    }
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v2/betas/a9b8c7de/testers.json"))
        .respond_with(Unavailable(Default::default()))
        .expect(7)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v2/betas/a9b8c7de/testers.json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!([])))
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.csv");
    std::fs::write(&file, "email\nsolo@x.io\n").unwrap();
    let mut o = ImportOptions::new("a9b8c7de", Source::File(file), dir.path().join("ck.sqlite"));
    o.mode = Mode::Create;
    let client = common::client_for(&format!("{}/api/v2", server.uri()), common::KEY, &[]);
    let s = import(&client, &o, Stop::default(), Arc::new(Silent))
        .await
        .unwrap();
    assert_eq!((s.created, s.rejected), (1, 0), "{s}");
}

/// Found by the kill -9 trials: an import killed after its run finished
/// was run again, and the new run (every row unchanged) overwrote the
/// results of the one that did the work. A file a run finished, run again
/// with the same settings, is not sent again and keeps its reports.
#[tokio::test]
async fn a_finished_import_run_again_sends_nothing_and_keeps_its_reports() {
    let f = Fixture::new(SandboxConfig::default()).await;
    let input = f.file("in.csv", b"email,first_name\na@x.io,A\nb@x.io,B\n");
    let first = f.run(&f.opts(&input)).await.unwrap();
    assert_eq!(first.created, 2);
    let again = f.run(&f.opts(&input)).await.unwrap();
    assert_eq!(again.run.already_done_by, Some(first.run_id), "{again}");
    assert_eq!(again.api_calls, 0);
    let results = f.csv("results.csv");
    assert_eq!(results[1][2], "created", "the first run's report stands");
    // Other settings: other work, a new run.
    let mut o = f.opts(&input);
    o.default_status = Some("applied".into());
    let other = f.run(&o).await.unwrap();
    assert_ne!(other.run_id, first.run_id);
    assert_eq!(other.run.already_done_by, None);
    // --fresh sends it again.
    let mut o = f.opts(&input);
    o.fresh = true;
    assert_eq!(f.run(&o).await.unwrap().unchanged, 2);
}

/// Sums a sandbox route's requests over every status.
fn calls(s: &Sandbox, route: &str) -> u64 {
    s.app.stats_json()["routes"]
        .get(route)
        .and_then(Value::as_object)
        .map_or(0, |m| m.values().filter_map(Value::as_u64).sum())
}

/// Regression (issue 16, defect 2): `--mode create` on people who already
/// exist cost one testers-list lookup (60 a minute) per row only to reject
/// it. A row never in doubt that is answered "taken" is rejected at once.
#[tokio::test]
async fn create_mode_rejects_existing_people_without_a_lookup() {
    let f = Fixture::new(SandboxConfig {
        seed_testers: 100,
        ..Default::default()
    })
    .await;
    let mut text = String::from("email,first_name\n");
    for i in 1..=100 {
        text.push_str(&format!("User{i}@Example.com,N{i}\n"));
    }
    let input = f.file("in.csv", text.as_bytes());
    let mut o = f.opts(&input);
    o.mode = Mode::Create;
    let s = f.run(&o).await.unwrap();
    assert_eq!((s.created, s.rejected), (0, 100), "{s}");
    assert_eq!(calls(&f.sandbox, "testers.list"), 0, "no lookup");
    assert_eq!(calls(&f.sandbox, "testers.create"), 100);
    let errors = f.csv("errors.csv");
    assert_eq!(errors.len(), 101);
    for (i, row) in errors[1..].iter().enumerate() {
        assert_eq!(row[0], format!("User{}@Example.com", i + 1));
        let message = &row[5];
        assert!(
            message.contains(&format!("user{}@example.com already exists", i + 1)),
            "{message}"
        );
        assert_eq!(row[4], "422");
    }
    let results = f.csv("results.csv");
    assert_eq!(results[1][1], "user1@example.com");
    assert_eq!(results[1][2], "rejected");
}

/// The other side of defect 2: a create whose outcome was unknown (the
/// sandbox applied it, then answered 5xx or dropped the connection) is
/// still looked up, and found: created, not rejected.
#[tokio::test]
async fn create_mode_still_looks_up_a_create_with_an_unknown_outcome() {
    let f = Fixture::new(SandboxConfig {
        fail_after_write_rate: 1.0,
        ..Default::default()
    })
    .await;
    let input = f.file("in.csv", b"email\nfresh@x.io\n");
    let mut o = f.opts(&input);
    o.mode = Mode::Create;
    let s = f.run(&o).await.unwrap();
    assert_eq!((s.created, s.rejected), (1, 0), "{s}");
    assert_eq!(calls(&f.sandbox, "testers.list"), 1, "one lookup");
    assert_eq!(f.users().len(), 1);
}

/// Defect 2, the case the lookup is kept for: a create answered 500, whose
/// first lookup comes too early to see it, is sent again and answered
/// "taken". The row was in doubt, so the email is looked up again, and the
/// user found is the first create's effect: created, not rejected.
#[tokio::test]
async fn create_mode_a_taken_email_after_an_unknown_outcome_is_the_rows_own_create() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, Respond, ResponseTemplate};

    /// 500 (applied unseen), then 422 taken.
    struct Creates(AtomicUsize);
    impl Respond for Creates {
        fn respond(&self, _: &wiremock::Request) -> ResponseTemplate {
            if self.0.fetch_add(1, SeqCst) == 0 {
                ResponseTemplate::new(500).set_body_json(
                    serde_json::json!({"errors": [{"message": "A general error has occurred."}]}),
                )
            } else {
                ResponseTemplate::new(422).set_body_json(
                    serde_json::json!({"errors": [{"message": "Email has already been taken"}]}),
                )
            }
        }
    }
    /// Nothing the first time (the listing lags), then the user.
    struct Lookups(AtomicUsize);
    impl Respond for Lookups {
        fn respond(&self, _: &wiremock::Request) -> ResponseTemplate {
            if self.0.fetch_add(1, SeqCst) == 0 {
                ResponseTemplate::new(200).set_body_json(serde_json::json!([]))
            } else {
                ResponseTemplate::new(200)
                    .set_body_json(serde_json::json!([{"id": 77, "email": "solo@x.io"}]))
            }
        }
    }
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v2/betas/a9b8c7de/testers.json"))
        .respond_with(Creates(Default::default()))
        .expect(2)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v2/betas/a9b8c7de/testers.json"))
        .respond_with(Lookups(Default::default()))
        .expect(2)
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.csv");
    std::fs::write(&file, "email\nsolo@x.io\n").unwrap();
    let mut o = ImportOptions::new("a9b8c7de", Source::File(file), dir.path().join("ck.sqlite"));
    o.mode = Mode::Create;
    o.results = Some(dir.path().join("results.csv"));
    let client = common::client_for(&format!("{}/api/v2", server.uri()), common::KEY, &[]);
    let s = import(&client, &o, Stop::default(), Arc::new(Silent))
        .await
        .unwrap();
    assert_eq!((s.created, s.rejected), (1, 0), "{s}");
    let results = std::fs::read_to_string(dir.path().join("results.csv")).unwrap();
    assert!(results.contains("solo@x.io,created,77"), "{results}");
}

/// Regression (issue 16, defect 7): a dry run without --results printed
/// "rejected N" and wrote nothing; a rejected row had an empty email in
/// the results; an update did not say which fields would change. A dry
/// run always writes its plan (beside the checkpoint by default), 0600,
/// with every row's email and an update's changed fields; it sends no
/// write.
#[tokio::test]
async fn a_dry_run_writes_its_plan_with_emails_and_changed_fields() {
    let f = Fixture::new(SandboxConfig {
        seed_testers: 3,
        ..Default::default()
    })
    .await;
    let old_name = f.user("user1@example.com")["profile"]["first_name"]
        .as_str()
        .unwrap()
        .to_string();
    let input = f.file(
        "in.csv",
        b"first_name,E-mail\nChanged,user1@example.com\nNew,new@x.io\nBad,not-an-email\nDup,new@x.io\nRagged,ragged@x.io,extra\n",
    );
    let mut o = f.opts(&input);
    o.dry_run = true;
    o.results = None;
    o.errors = None;
    let s = f.run(&o).await.unwrap();
    assert_eq!((s.created, s.updated, s.rejected), (1, 1, 3), "{s}");
    let plan_path = f.dir.path().join("ck.dry-run.csv");
    assert_eq!(
        s.results_file.as_deref(),
        Some(plan_path.display().to_string().as_str())
    );
    assert!(
        s.to_string()
            .contains(&format!("plan: {}", plan_path.display())),
        "the summary names the plan: {s}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&plan_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let plan = f.csv("ck.dry-run.csv");
    assert_eq!(plan[0][..3], ["line", "email", "action"]);
    assert_eq!(plan[1][1..3], ["user1@example.com", "updated"]);
    assert!(
        plan[1][5].contains(&format!("profile.first_name \"{old_name}\" -> \"Changed\"")),
        "{:?}",
        plan[1]
    );
    assert_eq!(plan[2][1..3], ["new@x.io", "created"]);
    assert_eq!(plan[3][1..3], ["not-an-email", "rejected"], "{:?}", plan[3]);
    assert_eq!(plan[4][1..3], ["new@x.io", "rejected"], "{:?}", plan[4]);
    assert_eq!(plan[5][1..3], ["ragged@x.io", "rejected"], "{:?}", plan[5]);
    assert!(!f.dir.path().join("ck.sqlite").exists(), "no checkpoint");
    assert!(!f.dir.path().join("errors.csv").exists());
    let stats = f.sandbox.app.stats_json();
    for write in ["testers.create", "testers.update", "testers.delete"] {
        assert!(stats["routes"].get(write).is_none(), "{stats:#}");
    }
    // An explicit --results still wins.
    let mut o = f.opts(&input);
    o.dry_run = true;
    let s = f.run(&o).await.unwrap();
    assert!(s.results_file.unwrap().ends_with("results.csv"));
    assert_eq!(f.csv("results.csv")[3][1], "not-an-email");
}

/// Rows given up as unclear ("retries exhausted ... run again to retry")
/// are done by running the same command again, as their message says: the
/// run is resumed and only they are sent, nobody twice. (A finished file
/// is otherwise not sent again, and these rows were lost.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_given_up_as_unclear_are_done_by_running_again() {
    let f = Fixture::new(SandboxConfig {
        fail_rate: 0.3,
        seed: 7,
        ..Default::default()
    })
    .await;
    let mut text = String::from("email,first_name\n");
    for i in 0..200 {
        text.push_str(&format!("p{i}@example.org,P{i}\n"));
    }
    let input = f.dir.path().join("in.csv");
    std::fs::write(&input, text).unwrap();
    let mut o = ImportOptions::new("1", Source::File(input), f.dir.path().join("ck.sqlite"));
    o.mode = Mode::Create;
    // One attempt a call: a refused lookup gives its row up at once.
    let client = prefsync::api::Client::new(
        f.sandbox.base_url().parse().unwrap(),
        prefsync::api::ApiKey::new(common::KEY),
        prefsync::api::Limiter::new(&[
            "testers-list=100000/1s".parse().unwrap(),
            "betas=100000/1s".parse().unwrap(),
        ]),
        prefsync::api::RetryPolicy {
            max_attempts: 1,
            ..common::fast_retry()
        },
    );
    let first = import(&client, &o, Stop::default(), Arc::new(Silent))
        .await
        .unwrap();
    assert!(first.rejected > 0, "the faults gave rows up: {first:?}");
    // Again, as a user would, with the client's usual retries.
    let client = common::unlimited_client(&f.sandbox);
    let mut last = first.clone();
    for _ in 0..10 {
        if last.rejected == 0 {
            break;
        }
        last = import(&client, &o, Stop::default(), Arc::new(Silent))
            .await
            .unwrap();
        assert_eq!(last.run_id, first.run_id, "the same run, resumed");
        assert!(last.resumed);
    }
    assert_eq!(last.rejected, 0, "{last:?}");
    let users = common::users(&f.sandbox, 1);
    assert_eq!(users.len(), 200, "everyone, once");
    let mut emails: Vec<_> = users.iter().map(|u| u["email"].clone()).collect();
    emails.sort_by_key(|e| e.to_string());
    emails.dedup();
    assert_eq!(emails.len(), 200);
}
