//! Property tests (issue 14, section 4): CSV read → map → errors report →
//! read back loses and alters nothing, for arbitrary unicode, quotes,
//! delimiters and line ends, and an errors report fed back in is accepted;
//! the parsers of what a server sends (`X-Pagination`, error bodies,
//! `Retry-After`) never panic. Case counts are set so the file runs in
//! seconds in a debug build.

mod common;

use std::path::Path;
use std::sync::Arc;

use prefsync::api::client::parse_retry_after;
use prefsync::api::{ApiError, ApiMessages, Pagination};
use prefsync::import::mapping::{EmptyCells, Mapped, Mapping, email_problem};
use prefsync::import::{ImportOptions, import};
use prefsync::input::{CsvInput, Source};
use prefsync::progress::Silent;
use prefsync::sandbox::SandboxConfig;
use prefsync::stop::Stop;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

/// A character of a cell: often one that CSV or a spreadsheet treats
/// specially, else any character but NUL (which is refused by design).
fn cell_char() -> impl Strategy<Value = char> {
    prop_oneof![
        3 => prop::sample::select(vec![
            '"', ',', ';', '\t', '\n', '\r', ' ', '=', '+', '-', '@', '\'', 'é', 'ß', '漢',
            '🙂', '\u{feff}', '\u{2028}', '\u{85}', 'a', 'Z', '0',
        ]),
        2 => any::<char>().prop_filter("NUL is refused by design", |c| *c != '\0'),
    ]
}

fn cell() -> impl Strategy<Value = String> {
    prop::collection::vec(cell_char(), 0..10).prop_map(String::from_iter)
}

/// A row's email: a valid one (by its index, so unique) or one that is
/// rejected on purpose.
#[derive(Debug, Clone)]
enum Email {
    Valid(String),
    Bad(String),
}

fn email(i: usize) -> impl Strategy<Value = Email> {
    prop_oneof![
        3 => "[ ]{0,2}".prop_map(move |pad| Email::Valid(format!("{pad}p{i}@prop.test{pad}"))),
        1 => prop::sample::select(vec!["no-at", "two@@prop.test", "sp ace@prop.test", "a@b", ""])
            .prop_map(move |b| Email::Bad(if b.is_empty() { String::new() } else { format!("{b}{i}") })),
    ]
}

impl Email {
    fn cell(&self) -> &str {
        match self {
            Email::Valid(e) | Email::Bad(e) => e,
        }
    }
}

const HEADERS: [&str; 4] = ["email", "first_name", "last_name", "employer"];

#[derive(Debug, Clone)]
struct File {
    delimiter: u8,
    terminator: &'static str,
    rows: Vec<(Email, Vec<String>)>,
}

fn file(max_rows: usize) -> impl Strategy<Value = File> {
    (
        prop::sample::select(vec![b',', b';', b'\t']),
        prop::sample::select(vec!["\n", "\r\n"]),
        1..=max_rows,
    )
        .prop_flat_map(|(delimiter, terminator, n)| {
            let rows: Vec<_> = (0..n)
                .map(|i| (email(i), prop::collection::vec(cell(), 3)))
                .collect();
            rows.prop_map(move |rows| File {
                delimiter,
                terminator,
                rows,
            })
        })
}

/// RFC 4180 as spreadsheets write it: a field is quoted when it holds the
/// delimiter, a quote or a line end.
fn field(s: &str, delimiter: u8) -> String {
    if s.bytes()
        .any(|b| b == delimiter || b == b'"' || b == b'\n' || b == b'\r')
    {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Line ends in `s` as the reader counts them: LF, CRLF and a lone CR.
fn line_ends(s: &str) -> u64 {
    let b = s.as_bytes();
    (0..b.len())
        .filter(|&i| b[i] == b'\n' && (i == 0 || b[i - 1] != b'\r') || b[i] == b'\r')
        .count() as u64
}

impl File {
    /// The text, and each row's cells with the line it starts on.
    fn render(&self) -> (String, Vec<(u64, Vec<String>)>) {
        let d = self.delimiter as char;
        let mut text = HEADERS.join(&d.to_string());
        text.push_str(self.terminator);
        let mut rows = vec![];
        for (email, rest) in &self.rows {
            let line = 1 + line_ends(&text);
            let mut cells = vec![email.cell().to_string()];
            cells.extend(rest.iter().cloned());
            let rendered: Vec<String> = cells.iter().map(|c| field(c, self.delimiter)).collect();
            text.push_str(&rendered.join(&d.to_string()));
            text.push_str(self.terminator);
            rows.push((line, cells));
        }
        (text, rows)
    }
}

/// Every record of a CSV file as `CsvInput` reads it: line and cells.
fn read_back(path: &Path) -> (Vec<String>, Vec<(u64, Vec<String>)>) {
    let mut input = CsvInput::open(&Source::File(path.to_path_buf()), None, None).unwrap();
    let mut out = vec![];
    while let Some(r) = input.next_record().unwrap() {
        let r = r.unwrap_or_else(|bad| panic!("line {} refused: {}", bad.line, bad.message));
        out.push((r.line, r.fields.iter().map(str::to_string).collect()));
    }
    (input.headers.clone(), out)
}

/// Read: every cell comes back as written, on the line it was written on.
/// Map: the email is checked as `email_problem` says, and every other
/// cell becomes its field, trimmed, or nothing when it is blank.
#[test]
fn csv_read_and_map_lose_and_alter_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.csv");
    let headers: Vec<String> = HEADERS.iter().map(|h| h.to_string()).collect();
    let mapping = Mapping::build(&headers, None, EmptyCells::Keep).unwrap();
    let mut runner = TestRunner::new(ProptestConfig::with_cases(300));
    runner
        .run(&file(12), |f| {
            let (text, want) = f.render();
            std::fs::write(&path, &text).unwrap();
            let (head, got) = read_back(&path);
            prop_assert_eq!(&head, &headers);
            prop_assert_eq!(&got, &want, "text: {:?}", text);
            for (line, cells) in &got {
                let record: csv::StringRecord = cells.iter().collect();
                let email = cells[0].trim();
                match mapping.apply(&record) {
                    Ok(Mapped::Row(row)) => {
                        prop_assert!(email_problem(email).is_none() && !email.is_empty());
                        prop_assert_eq!(row.input.email.as_deref(), Some(email));
                        for (h, c) in HEADERS[1..].iter().zip(&cells[1..]) {
                            let sent = row.input.profile.get(*h).and_then(|v| v.as_str());
                            let want = Some(c.trim()).filter(|c| !c.is_empty());
                            prop_assert_eq!(sent, want, "line {} column {}", line, h);
                        }
                    }
                    Ok(Mapped::Skip(s)) => prop_assert!(false, "no rule, yet skipped: {:?}", s),
                    Err(why) => prop_assert!(
                        email.is_empty() || email_problem(email).is_some(),
                        "line {line}: {why}"
                    ),
                }
            }
            Ok(())
        })
        .unwrap();
}

/// An import of arbitrary rows, some rejected on purpose, against the
/// sandbox: the good rows' fields arrive trimmed and otherwise unaltered;
/// the errors report holds each rejected row's cells exactly, with its
/// line; fed back in as it is, it is accepted and rejects the same rows
/// the same way; fixed and fed back in, every row is created as written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_report_round_trip_through_an_import() {
    let mut runner = TestRunner::new(ProptestConfig::with_cases(12));
    let rt = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        runner
            .run(&file(6), |f| {
                rt.block_on(round_trip(f));
                Ok(())
            })
            .unwrap();
    })
    .await
    .unwrap();
}

async fn run_import(
    s: &prefsync::sandbox::Sandbox,
    dir: &Path,
    input: &str,
    errors: &str,
) -> prefsync::import::ImportSummary {
    let mut o = ImportOptions::new(
        "1",
        Source::File(dir.join(input)),
        dir.join(format!("{input}.ck.sqlite")),
    );
    o.errors = Some(dir.join(errors));
    import(
        &common::unlimited_client(s),
        &o,
        Stop::default(),
        Arc::new(Silent),
    )
    .await
    .unwrap()
}

/// Checks the sandbox's user `email` holds `cells` (trimmed) as its fields.
fn assert_user(users: &[serde_json::Value], email: &str, cells: &[String]) {
    let u = users
        .iter()
        .find(|u| u["email"].as_str() == Some(email))
        .unwrap_or_else(|| panic!("{email} was not created"));
    for (h, c) in HEADERS[1..].iter().zip(cells) {
        let got = u["profile"][*h].as_str().unwrap_or_default();
        assert_eq!(got, c.trim(), "{email}: {h}");
    }
}

async fn round_trip(f: File) {
    let s = common::sandbox(SandboxConfig {
        rate_scale: 0.0,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (text, rows) = f.render();
    std::fs::write(d.join("in.csv"), &text).unwrap();
    let bad: Vec<&(u64, Vec<String>)> = rows
        .iter()
        .filter(|(_, c)| {
            let e = c[0].trim();
            e.is_empty() || email_problem(e).is_some()
        })
        .collect();

    let first = run_import(&s, d, "in.csv", "errors.csv").await;
    assert_eq!(first.rejected as usize, bad.len(), "text: {text:?}");
    assert_eq!(first.created as usize, rows.len() - bad.len());
    let users = common::users(&s, 1);
    for (_, cells) in rows.iter().filter(|r| !bad.contains(r)) {
        assert_user(&users, cells[0].trim(), &cells[1..]);
    }
    if bad.is_empty() {
        return;
    }

    // The report: the original columns and cells, unchanged, then ours.
    let (head, report) = read_back(&d.join("errors.csv"));
    assert_eq!(&head[..4], &HEADERS);
    assert_eq!(head[4], "prefsync_line");
    assert_eq!(report.len(), bad.len());
    for ((_, got), (line, cells)) in report.iter().zip(&bad) {
        assert_eq!(&got[..4], &cells[..], "text: {text:?}");
        assert_eq!(got[4], line.to_string());
    }

    // Fed back in as it is: accepted, the same rows rejected the same way.
    let again = run_import(&s, d, "errors.csv", "errors2.csv").await;
    assert_eq!(again.rejected as usize, bad.len());
    assert_eq!(again.created, 0);
    let (_, report2) = read_back(&d.join("errors2.csv"));
    for ((_, a), (_, b)) in report.iter().zip(&report2) {
        assert_eq!(&a[..4], &b[..4]);
        assert_eq!(a[6..], b[6..], "class, status and message");
    }

    // Fixed (the emails only) and fed back in: every row created as written.
    let mut w = csv::Writer::from_path(d.join("fixed.csv")).unwrap();
    w.write_record(&head).unwrap();
    for (i, (_, cells)) in report.iter().enumerate() {
        let mut cells = cells.clone();
        cells[0] = format!("fixed{i}@prop.test");
        w.write_record(&cells).unwrap();
    }
    w.flush().unwrap();
    drop(w);
    let fixed = run_import(&s, d, "fixed.csv", "errors3.csv").await;
    assert_eq!((fixed.created as usize, fixed.rejected), (bad.len(), 0));
    let users = common::users(&s, 1);
    for (i, (_, cells)) in bad.iter().enumerate() {
        assert_user(&users, &format!("fixed{i}@prop.test"), &cells[1..]);
    }
}

/// JSON of any shape, nested deeper than a parser's recursion limit now
/// and then.
fn json() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| format!("{n:?}")),
        Just("18446744073709551616".to_string()),
        Just("-1".to_string()),
        cell().prop_map(|s| serde_json::to_string(&s).unwrap()),
    ];
    leaf.prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec(
                (
                    prop::sample::select(vec![
                        "errors",
                        "error",
                        "code",
                        "message",
                        "next_page",
                        "current_page",
                        "per_page",
                        "pages",
                        "total",
                        "total_count",
                        "x",
                    ]),
                    inner
                ),
                0..6
            )
            .prop_map(|kv| {
                let body: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                format!("{{{}}}", body.join(","))
            }),
        ]
    })
}

fn header_text() -> impl Strategy<Value = String> {
    prop_oneof![
        json(),
        cell(),
        any::<Vec<u8>>().prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        (1usize..2000).prop_map(|n| format!("{}{}", "[".repeat(n), "]".repeat(n))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn x_pagination_never_panics(h in header_text()) {
        if let Some(p) = Pagination::parse(&h) {
            prop_assert!(p.has_next_key || p.next_page.is_none());
        }
    }

    #[test]
    fn error_bodies_never_panic(body in prop_oneof![
        header_text().prop_map(String::into_bytes),
        any::<Vec<u8>>(),
    ], status in 400u16..600) {
        let messages = ApiMessages::parse(&body);
        let _ = messages.has_code(1) || messages.mentions("rate limit");
        let e = ApiError::Rejected { op: "create a user", status, messages };
        let shown = e.to_string();
        prop_assert!(shown.starts_with("failed to create a user"));
        let _ = (e.is_retryable(), e.status(), e.is_access_denied());
    }

    #[test]
    fn retry_after_never_panics(v in prop_oneof![
        header_text(),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| format!(" {n} ")),
        (0u64..=u32::MAX as u64).prop_map(|n| {
            httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(n * 4))
        }),
        Just("Fri, 31 Dec 9999 23:59:59 GMT".to_string()),
        Just("Thu, 01 Jan 1970 00:00:00 GMT".to_string()),
    ]) {
        let _ = parse_retry_after(&v);
    }
}
