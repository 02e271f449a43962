//! What a webhook delivery is about, found without trusting its envelope.
//!
//! Prefinery documents neither the payload's envelope nor the full list of
//! event names (API reference, section 8), so nothing here depends on where
//! a field sits: the body is searched, shallowest first, for an event name
//! (a snake_case word under a key such as `event` or `type`) and for the
//! user it concerns (an id or an email). The applier needs nothing more: it
//! re-reads the user from the API and never uses the body's copy.

use std::collections::VecDeque;

use serde_json::Value;

/// What the applier does with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A change to a user (created, updated, status, deleted, ...): the
    /// user is read again.
    Tester,
    /// A reward earned, delivered or revoked: the user's rewards are read
    /// again (and the user).
    Rewards,
    /// Points earned or revoked: the user's points are read again (and the
    /// user).
    Points,
    /// Anything else, or an event naming no user: kept in the journal and
    /// counted, never applied.
    Unknown,
}

/// What was found in a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interpretation {
    pub event: Option<String>,
    pub kind: Kind,
    pub user_id: Option<u64>,
    pub email: Option<String>,
}

/// Keys that may hold the event's name, by preference.
const EVENT_KEYS: [&str; 9] = [
    "event",
    "event_name",
    "event_type",
    "type",
    "topic",
    "action",
    "trigger",
    "kind",
    "name",
];

/// Keys under which the user's own object may sit.
const USER_OBJECTS: [&str; 6] = ["tester", "user", "subscriber", "referrer", "data", "object"];

/// Reads a body. A body that is not JSON is `Unknown` with no name.
pub fn interpret(body: &[u8]) -> Interpretation {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Interpretation {
            event: None,
            kind: Kind::Unknown,
            user_id: None,
            email: None,
        };
    };
    let event = event_name(&v);
    let (user_id, email) = user_of(&v);
    let kind = match event.as_deref() {
        _ if user_id.is_none() && email.is_none() => Kind::Unknown,
        Some(e) if e.starts_with("reward") => Kind::Rewards,
        Some(e) if e.starts_with("point") => Kind::Points,
        Some(e)
            if e.starts_with("tester")
                || e.starts_with("user")
                || e.starts_with("subscriber")
                || e.starts_with("referral") =>
        {
            Kind::Tester
        }
        _ => Kind::Unknown,
    };
    Interpretation {
        event,
        kind,
        user_id,
        email,
    }
}

/// Every object of the body, shallowest first, with the key it sits under.
fn objects(v: &Value) -> Vec<(Option<&str>, &serde_json::Map<String, Value>)> {
    let mut out = Vec::new();
    let mut queue: VecDeque<(Option<&str>, &Value)> = VecDeque::from([(None, v)]);
    while let Some((key, v)) = queue.pop_front() {
        match v {
            Value::Object(m) => {
                out.push((key, m));
                for (k, c) in m {
                    queue.push_back((Some(k.as_str()), c));
                }
            }
            Value::Array(a) => a.iter().for_each(|c| queue.push_back((key, c))),
            _ => {}
        }
        if out.len() > 10_000 {
            break;
        }
    }
    out
}

/// A name such as `tester_created` (or `tester.created`, taken as
/// `tester_created`): lower case, words joined by `_` or `.`.
fn as_event_name(s: &str) -> Option<String> {
    let s = s.trim();
    let ok = s.len() <= 64
        && s.contains(['_', '.'])
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.');
    ok.then(|| s.replace('.', "_"))
}

fn event_name(v: &Value) -> Option<String> {
    let objs = objects(v);
    for key in EVENT_KEYS {
        for (_, m) in &objs {
            if let Some(name) = m.get(key).and_then(Value::as_str).and_then(as_event_name) {
                return Some(name);
            }
        }
    }
    None
}

fn id_value(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
        .filter(|id| *id > 0)
}

fn email_value(v: &Value) -> Option<String> {
    v.as_str()
        .map(str::trim)
        .filter(|s| s.contains('@') && !s.contains(char::is_whitespace))
        .map(str::to_string)
}

/// The user: an object under a user-ish key (its `id`, `email`), else a
/// `tester_id`/`user_id` anywhere, else any object with both `id` and
/// `email`; the email, else the first `email` anywhere.
fn user_of(v: &Value) -> (Option<u64>, Option<String>) {
    let objs = objects(v);
    let mut id = None;
    let mut email = None;
    for (key, m) in &objs {
        if key.is_some_and(|k| USER_OBJECTS[..4].contains(&k)) {
            id = id.or_else(|| m.get("id").and_then(id_value));
            email = email.or_else(|| m.get("email").and_then(email_value));
        }
    }
    for k in ["tester_id", "user_id", "subscriber_id"] {
        if id.is_none() {
            id = objs.iter().find_map(|(_, m)| m.get(k).and_then(id_value));
        }
    }
    if id.is_none() {
        id = objs.iter().find_map(|(key, m)| {
            let userish = m.contains_key("email")
                || key.is_some_and(|k| USER_OBJECTS.contains(&k) && m.contains_key("status"));
            userish.then(|| m.get("id").and_then(id_value)).flatten()
        });
    }
    for k in ["email", "tester_email", "user_email"] {
        if email.is_none() {
            email = objs
                .iter()
                .find_map(|(_, m)| m.get(k).and_then(email_value));
        }
    }
    (id, email)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn it(v: Value) -> Interpretation {
        interpret(v.to_string().as_bytes())
    }

    #[test]
    fn the_sandbox_envelope() {
        let i = it(
            json!({"id": "evt_1", "event": "tester_updated", "beta": {"id": 1},
            "data": {"tester": {"id": 42, "email": "a@x.io", "status": "applied"}}}),
        );
        assert_eq!(i.event.as_deref(), Some("tester_updated"));
        assert_eq!(
            (i.kind, i.user_id, i.email.as_deref()),
            (Kind::Tester, Some(42), Some("a@x.io"))
        );
    }

    #[test]
    fn other_shapes_are_read_too() {
        // Flat, with a dotted name.
        let i = it(json!({"type": "tester.created", "tester_id": "7"}));
        assert_eq!(
            (i.event.as_deref(), i.kind, i.user_id),
            (Some("tester_created"), Kind::Tester, Some(7))
        );
        // The record at the top, an email only.
        let i = it(json!({"event_name": "tester_applied", "payload": {"email": "b@x.io"}}));
        assert_eq!(
            (i.kind, i.user_id, i.email.as_deref()),
            (Kind::Tester, None, Some("b@x.io"))
        );
        // A reward: its own id is not the user's.
        let i = it(
            json!({"event": "reward_delivered", "reward": {"id": 900, "user_id": 12, "name": "Early access", "type": "SingleSided"}}),
        );
        assert_eq!((i.kind, i.user_id), (Kind::Rewards, Some(12)));
        let i = it(
            json!({"event": "points_earned", "data": {"point": {"id": 5, "quantity": 3, "user_id": 9}}}),
        );
        assert_eq!((i.kind, i.user_id), (Kind::Points, Some(9)));
    }

    #[test]
    fn what_cannot_be_read_is_unknown() {
        assert_eq!(
            it(json!({"event": "project_updated", "beta": {"id": 1}})).kind,
            Kind::Unknown
        );
        let i = it(json!({"event": "survey_answered", "tester": {"id": 3}}));
        assert_eq!(
            (i.kind, i.event.as_deref()),
            (Kind::Unknown, Some("survey_answered"))
        );
        // A tester event that names no user.
        assert_eq!(it(json!({"event": "tester_updated"})).kind, Kind::Unknown);
        assert_eq!(interpret(b"not json").kind, Kind::Unknown);
        // A reward's display name is not an event name.
        assert_eq!(
            it(json!({"name": "Early access", "user_id": 1})).event,
            None
        );
    }
}
