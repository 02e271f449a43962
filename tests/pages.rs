//! Property test (issue 14, section 4): an export reassembles a list read
//! page by page with no id lost or duplicated, whatever the page size, an
//! `X-Pagination` header missing or carrying keys nobody documented, and
//! users joining or leaving between pages; and when the list changed while
//! it was read, the export says it is not a consistent snapshot.
//!
//! The server is a wiremock whose answers come from a list that changes
//! when a chosen page is first served.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use prefsync::export::sink::Format;
use prefsync::export::{ExportOptions, Resource, export};
use prefsync::progress::Silent;
use prefsync::stop::Stop;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate, matchers::method};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Header {
    /// Every documented key, `total_count` included.
    Full,
    /// No header at all (pages of the documented 25 then).
    Missing,
    /// Documented keys and more, and no `total_count`.
    Extended,
}

#[derive(Debug, Clone)]
struct Case {
    users: u64,
    per_page: usize,
    header: Header,
    /// When this page is first served, these ids leave and these join.
    change_at: Option<u64>,
    leave: Vec<usize>,
    join: u64,
}

struct Server {
    case: Case,
    ids: Mutex<(Vec<u64>, bool)>,
}

impl Respond for Server {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let page: u64 = req
            .url
            .query_pairs()
            .find(|(k, _)| k == "page")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(1);
        let mut g = self.ids.lock().unwrap();
        let (ids, changed) = &mut *g;
        if self.case.change_at == Some(page) && !*changed {
            *changed = true;
            for i in &self.case.leave {
                if !ids.is_empty() {
                    let at = i % ids.len();
                    ids.remove(at);
                }
            }
            for j in 0..self.case.join {
                // Newcomers sign up at the front (newest first), shifting
                // everyone down a page.
                ids.insert(0, 1_000_000 + j);
            }
        }
        let per = self.case.per_page;
        let start = ((page - 1) as usize) * per;
        let items: Vec<Value> = ids
            .iter()
            .skip(start)
            .take(per)
            .map(|id| json!({"id": id, "email": format!("u{id}@pages.test")}))
            .collect();
        let pages = ids.len().div_ceil(per).max(1) as u64;
        let count = items.len();
        let mut r = ResponseTemplate::new(200).set_body_json(Value::Array(items));
        let next = if page < pages {
            json!(page + 1)
        } else {
            Value::Null
        };
        match self.case.header {
            Header::Full => {
                r = r.insert_header(
                    "x-pagination",
                    json!({"next_page": next, "current_page": page, "per_page": per, "pages": pages,
                           "count": count, "total_count": ids.len()})
                    .to_string(),
                );
            }
            Header::Extended => {
                r = r.insert_header(
                    "x-pagination",
                    json!({"next_page": next, "current_page": page, "per_page": per, "pages": pages,
                           "count": count, "cursor": "opaque", "links": {"next": null}})
                    .to_string(),
                );
            }
            Header::Missing => {}
        }
        r
    }
}

fn case() -> impl Strategy<Value = Case> {
    (
        0u64..120,
        1usize..40,
        prop_oneof![
            Just(Header::Full),
            Just(Header::Missing),
            Just(Header::Extended)
        ],
        // Between two pages: a change before the first is just the list.
        prop::option::of(2u64..7),
        prop::collection::vec(0usize..200, 0..4),
        0u64..4,
    )
        .prop_map(|(users, per_page, header, change_at, leave, join)| Case {
            users,
            // Without the header the client takes the documented 25 a page.
            per_page: if header == Header::Missing {
                25
            } else {
                per_page
            },
            header,
            change_at,
            leave,
            join,
        })
}

async fn run_case(c: Case) -> Result<(), TestCaseError> {
    let start: Vec<u64> = (1..=c.users).collect();
    let server = MockServer::start().await;
    let state = Arc::new(Server {
        case: c.clone(),
        ids: Mutex::new((start.clone(), false)),
    });
    // The export names its project as the API shows it.
    Mock::given(method("GET"))
        .and(wiremock::matchers::path("/api/v2/betas/1.json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": 1, "name": "Pages"})))
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(SharedServer(state.clone()))
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("users.jsonl");
    let o = ExportOptions::new(
        vec![Resource::Testers],
        vec!["1".into()],
        Format::Jsonl,
        out.clone(),
    );
    let client = common::client_for(
        &format!("{}/api/v2", server.uri()),
        common::KEY,
        &[
            "testers-list=100000/1s",
            "account-list=100000/1s",
            "betas=100000/1s",
        ],
    );
    let s = export(&client, &o, Stop::default(), Arc::new(Silent))
        .await
        .map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
    prop_assert!(s.complete, "{s}");
    let text = std::fs::read_to_string(&out).unwrap();
    let got: Vec<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let set: BTreeSet<u64> = got.iter().copied().collect();
    prop_assert_eq!(set.len(), got.len(), "no id twice: {:?}", got);
    let (end, changed) = state.ids.lock().unwrap().clone();
    let end: BTreeSet<u64> = end.into_iter().collect();
    let before: BTreeSet<u64> = start.into_iter().collect();
    // Nobody that never existed is invented.
    for id in &set {
        prop_assert!(
            before.contains(id) || end.contains(id),
            "user {} invented",
            id
        );
    }
    // The export tells a list that changed by its size as `X-Pagination`
    // gives it: `total_count` when the header has it, else the number of
    // pages; with no header, not at all. A change it can see is flagged
    // and the list read again: nobody who stayed is lost. A change that
    // keeps that size (as many leave as join between two pages; one user
    // fewer on a page count that stays) cannot be seen: users who shifted
    // onto a page already read can be missed, and the export still calls
    // itself consistent. The README says so (Export, "consistent").
    let pages = |n: usize| n.div_ceil(c.per_page).max(1);
    let seen_change = match c.header {
        Header::Full => before.len() != end.len(),
        Header::Extended => pages(before.len()) != pages(end.len()),
        Header::Missing => false,
    };
    if !changed || seen_change {
        for id in before.intersection(&end) {
            prop_assert!(set.contains(id), "user {} lost: {:?} ({})", id, got, s);
        }
    }
    if seen_change {
        prop_assert!(!s.consistent, "a change it could see is flagged: {}", s);
    }
    if s.consistent && (!changed || seen_change) {
        let reference = if changed { &end } else { &before };
        prop_assert_eq!(&set, reference, "consistent, yet not the list: {}", s);
    }
    if !s.consistent {
        prop_assert!(changed, "flagged inconsistent with no change: {}", s);
    }
    Ok(())
}

/// wiremock wants its responder by value; the test keeps the state.
struct SharedServer(Arc<Server>);

impl Respond for SharedServer {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        self.0.respond(req)
    }
}

#[test]
fn pages_reassemble_with_no_id_lost_or_twice() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 64,
        ..Config::default()
    });
    runner.run(&case(), |c| rt.block_on(run_case(c))).unwrap();
}

/// The case the property found: a list that shrinks so that the next page
/// is empty. The empty page's header must still be read, or the users who
/// shifted onto the page already read are lost and the export says it is
/// consistent.
#[test]
fn a_list_that_shrinks_past_the_next_page_is_read_again() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    for header in [Header::Full, Header::Extended] {
        rt.block_on(run_case(Case {
            users: 12,
            per_page: 9,
            header,
            change_at: Some(2),
            leave: vec![0, 0, 0],
            join: 0,
        }))
        .unwrap();
    }
}
