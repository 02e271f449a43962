//! Typed Prefinery records.
//!
//! Every record keeps the fields the API returned that this version of
//! prefsync does not know in `extra`, so an export never loses data and a
//! record read and written back is unchanged.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A project ("beta" in the API's words).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Beta {
    pub id: u64,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub testers_count: Option<u64>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A user ("tester" in the API's words).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tester {
    pub id: u64,
    pub email: String,
    #[serde(default)]
    pub status: Option<String>,
    /// Open map: the set of profile keys is not documented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<Map<String, Value>>,
    /// Answers to signup-form questions, as the API returned them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub responses: Option<Value>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reward {
    pub id: u64,
    #[serde(default)]
    pub user_id: Option<u64>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Suppression {
    pub id: u64,
    pub email: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub id: u64,
    #[serde(default)]
    pub user_id: Option<u64>,
    #[serde(default)]
    pub quantity: Option<i64>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// What prefsync sends to create or update a tester. Only the fields that are
/// set are sent, so an update leaves every other field as it was.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TesterInput {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invitation_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub referrer_id: Option<String>,
    #[serde(skip_serializing_if = "Map::is_empty", default)]
    pub profile: Map<String, Value>,
    /// Sent as `{"response":[{"question_id","answer"}]}`, the shape clients
    /// of the real API send.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub responses: Vec<(String, String)>,
}

impl TesterInput {
    /// The request body, wrapped as the API expects: `{"tester": {...}}`,
    /// serialised straight from the fields (no intermediate `Value`).
    pub fn to_body_bytes(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Answer<'a> {
            question_id: &'a str,
            answer: &'a str,
        }
        #[derive(Serialize)]
        struct Responses<'a> {
            response: Vec<Answer<'a>>,
        }
        #[derive(Serialize)]
        struct Fields<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            email: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            status: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            invitation_code: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            referrer_id: Option<&'a str>,
            #[serde(skip_serializing_if = "Map::is_empty")]
            profile: &'a Map<String, Value>,
            #[serde(skip_serializing_if = "Option::is_none")]
            responses: Option<Responses<'a>>,
        }
        #[derive(Serialize)]
        struct Wrapped<'a> {
            tester: Fields<'a>,
        }
        let responses = (!self.responses.is_empty()).then(|| Responses {
            response: self
                .responses
                .iter()
                .map(|(q, a)| Answer {
                    question_id: q,
                    answer: a,
                })
                .collect(),
        });
        let body = Wrapped {
            tester: Fields {
                email: self.email.as_deref(),
                status: self.status.as_deref(),
                invitation_code: self.invitation_code.as_deref(),
                referrer_id: self.referrer_id.as_deref(),
                profile: &self.profile,
                responses,
            },
        };
        serde_json::to_vec(&body).expect("a tester body serialises")
    }
}

/// Paging metadata from the `X-Pagination` header. Every key is optional and
/// unknown keys are ignored; the last documented key's name was never seen,
/// so any key starting with `tot` is read as the total record count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pagination {
    /// Whether the header had a `next_page` key at all (null or not).
    pub has_next_key: bool,
    pub next_page: Option<u64>,
    pub current_page: Option<u64>,
    pub per_page: Option<u64>,
    pub pages: Option<u64>,
    pub total: Option<u64>,
}

impl Pagination {
    pub fn parse(header: &str) -> Option<Pagination> {
        let v: Value = serde_json::from_str(header).ok()?;
        let obj = v.as_object()?;
        let num = |k: &str| obj.get(k).and_then(Value::as_u64);
        let total = obj
            .iter()
            .find(|(k, _)| k.starts_with("tot"))
            .and_then(|(_, v)| v.as_u64());
        Some(Pagination {
            has_next_key: obj.contains_key("next_page"),
            next_page: num("next_page"),
            current_page: num("current_page"),
            per_page: num("per_page"),
            pages: num("pages"),
            total,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tester_keeps_unknown_fields() {
        let raw = r#"{"id":1,"email":"a@b.c","status":"applied","profile":{"first_name":"A","shoe":"42"},"waitlist_position":3,"brand_new":{"x":1}}"#;
        let t: Tester = serde_json::from_str(raw).unwrap();
        assert_eq!(t.extra["waitlist_position"], 3);
        let back: Value = serde_json::to_value(&t).unwrap();
        let orig: Value = serde_json::from_str(raw).unwrap();
        assert_eq!(back, orig);
    }

    #[test]
    fn pagination_reads_documented_example_and_ignores_unknown_keys() {
        let p = Pagination::parse(r#"{"previous_page":null,"next_page":2,"current_page":1,"per_page":25,"count":25,"pages":2,"total_entries":40,"weird":[1]}"#).unwrap();
        assert_eq!(p.next_page, Some(2));
        assert_eq!(p.pages, Some(2));
        assert_eq!(p.total, Some(40));
        let last = Pagination::parse(r#"{"next_page":null,"pages":2}"#).unwrap();
        assert_eq!(last.next_page, None);
        assert!(Pagination::parse("not json").is_none());
    }

    #[test]
    fn tester_body_is_wrapped() {
        let input = TesterInput {
            email: Some("a@b.c".into()),
            responses: vec![("23874".into(), "yes".into())],
            ..Default::default()
        };
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&input.to_body_bytes()).unwrap(),
            serde_json::json!({"tester":{"email":"a@b.c","responses":{"response":[{"question_id":"23874","answer":"yes"}]}}})
        );
        let mut input = input;
        input.status = Some("imported".into());
        input
            .profile
            .insert("first_name".into(), "Åse \"Q\"".into());
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&input.to_body_bytes()).unwrap(),
            serde_json::json!({"tester":{"email":"a@b.c","status":"imported","profile":{"first_name":"Åse \"Q\""},"responses":{"response":[{"question_id":"23874","answer":"yes"}]}}})
        );
    }
}
