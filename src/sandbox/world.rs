//! The sandbox's data: projects, users, rewards, points, suppressions and
//! the outbox of emails Prefinery would have sent. Plain data and the rules
//! of the reference (statuses, transitions, error codes); no HTTP here.

use std::collections::{BTreeMap, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// Statuses a user can have (help article 14).
pub const STATUSES: [&str; 8] = [
    "imported",
    "unconfirmed",
    "applied",
    "rejected",
    "invited",
    "active",
    "idle",
    "suspended",
];

/// Whether `from -> to` is an allowed transition (reference 7.2.2).
pub fn transition_allowed(from: &str, to: &str) -> bool {
    if from == to {
        return true;
    }
    match to {
        "applied" => matches!(from, "imported" | "unconfirmed"),
        "invited" => matches!(from, "imported" | "applied" | "rejected"),
        "rejected" => matches!(from, "imported" | "applied" | "invited"),
        "active" => matches!(
            from,
            "imported" | "applied" | "invited" | "rejected" | "idle"
        ),
        "suspended" => matches!(
            from,
            "imported" | "unconfirmed" | "applied" | "invited" | "rejected" | "active"
        ),
        _ => false,
    }
}

/// An error the sandbox answers with: status, optional documented code, and
/// message, rendered as `{"errors":[{"code","message"}]}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub status: u16,
    pub code: Option<u32>,
    pub message: String,
}

impl Refusal {
    pub fn new(status: u16, code: Option<u32>, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code,
            message: message.into(),
        }
    }
    fn invalid(message: impl Into<String>) -> Refusal {
        Refusal::new(422, None, message)
    }
    pub fn not_found(what: &str) -> Refusal {
        Refusal::new(404, None, format!("{what} not found."))
    }
    pub fn body(&self) -> Value {
        match self.code {
            Some(c) => json!({"errors": [{"code": c, "message": self.message}]}),
            None => json!({"errors": [{"message": self.message}]}),
        }
    }
}

pub type Outcome<T> = Result<T, Refusal>;

pub use crate::time::iso8601;

fn now() -> String {
    iso8601(SystemTime::now())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct User {
    pub id: u64,
    pub email: String,
    pub status: String,
    pub invitation_code: String,
    pub imported_at: Option<String>,
    pub applied_at: Option<String>,
    pub invited_at: Option<String>,
    pub joined_at: Option<String>,
    pub unsubscribed_at: Option<String>,
    pub share_clicks_count: u64,
    pub share_signups_count: u64,
    pub friend_invitations_allowed: u64,
    pub friend_invitations_count: u64,
    pub referral_code: String,
    pub referred_by: Option<String>,
    pub groups: String,
    pub ip_address: Option<String>,
    pub profile: Map<String, Value>,
    pub responses: Vec<Value>,
    pub created_at: String,
    pub updated_at: String,
    /// Check-ins so far and the last one's time. Not in the reference [U]:
    /// it says a check-in tracks visits and retention, so the sandbox keeps
    /// a count each check-in adds to, which tests read to prove none went
    /// twice, and shows both on the user as the most plausible place.
    #[serde(default)]
    pub checkins_count: u64,
    #[serde(default)]
    pub last_checkin_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RewardRecord {
    pub id: u64,
    pub descriptor: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub user_role: String,
    pub user_id: u64,
    pub status: String,
    pub earned_at: Option<String>,
    pub delivered_at: Option<String>,
    pub revoked_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PointRecord {
    pub id: u64,
    pub quantity: i64,
    pub activity: String,
    pub reason: Option<String>,
    pub user_id: u64,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SuppressionRecord {
    pub id: u64,
    pub email: String,
    pub user_id: Option<u64>,
    pub reason: String,
    pub suppressed_at: String,
}

/// An email Prefinery would have sent to a real person.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Email {
    pub kind: String,
    pub to: String,
    pub beta_id: u64,
    pub at: String,
}

/// The reward definitions every sandbox project offers, by descriptor.
const REWARD_DEFS: [(&str, &str, &str); 3] = [
    ("early-access", "Early access", "SingleSided"),
    ("free-month", "One month free", "DoubleSided"),
    ("t-shirt", "A T-shirt at 10 referrals", "Milestone"),
];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Project {
    pub id: u64,
    pub uid: String,
    pub name: String,
    pub homepage_url: String,
    pub decoder_key: String,
    pub created_at: String,
    pub updated_at: String,
    pub impressions_count: u64,
    pub users: BTreeMap<u64, User>,
    pub rewards: BTreeMap<u64, RewardRecord>,
    pub points: BTreeMap<u64, PointRecord>,
    pub suppressions: BTreeMap<u64, SuppressionRecord>,
    #[serde(skip)]
    by_email: HashMap<String, u64>,
    /// Applied users by id, for waitlist positions (a Fenwick tree).
    #[serde(skip)]
    waitlist: Fenwick,
    /// User ids in order, so a page is found by position without walking
    /// the map (a million-user export is 40,000 pages). Rebuilt after a
    /// delete.
    #[serde(skip)]
    order: Vec<u64>,
    #[serde(skip)]
    order_stale: bool,
}

/// Counts applied users with an id at or below a given id in O(log n), so a
/// page of users can show waitlist positions without scanning the project.
#[derive(Debug, Clone, Default)]
struct Fenwick(Vec<i64>);

impl Fenwick {
    fn add(&mut self, id: u64, delta: i64) {
        // Callers grow the tree (by rebuilding it) before adding past its end.
        let mut i = id as usize;
        while i < self.0.len() {
            self.0[i] += delta;
            i += i & i.wrapping_neg();
        }
    }
    fn prefix(&self, id: u64) -> i64 {
        let mut i = (id as usize).min(self.0.len().saturating_sub(1));
        let mut s = 0;
        while i > 0 {
            s += self.0[i];
            i -= i & i.wrapping_neg();
        }
        s
    }
}

impl Project {
    fn new(id: u64, uid: &str, name: &str) -> Project {
        let created = iso8601(UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000 + id));
        Project {
            id,
            uid: uid.to_string(),
            name: name.to_string(),
            homepage_url: format!("https://example.com/{uid}"),
            decoder_key: format!("{:040x}", u128::from(id) * 0x9e37_79b9_7f4a_7c15),
            created_at: created.clone(),
            updated_at: created,
            impressions_count: 0,
            users: BTreeMap::new(),
            rewards: BTreeMap::new(),
            points: BTreeMap::new(),
            suppressions: BTreeMap::new(),
            by_email: HashMap::new(),
            waitlist: Fenwick::default(),
            order: Vec::new(),
            order_stale: true,
        }
    }

    /// One page of users in id order.
    pub fn users_page(&mut self, start: usize, len: usize) -> Vec<&User> {
        if self.order_stale || self.order.len() != self.users.len() {
            self.order = self.users.keys().copied().collect();
            self.order_stale = false;
        }
        let end = (start + len).min(self.order.len());
        let ids = self.order.get(start..end).unwrap_or_default();
        ids.iter().filter_map(|id| self.users.get(id)).collect()
    }

    /// Rebuilds the indexes that are not persisted.
    fn reindex(&mut self) {
        self.by_email = self
            .users
            .values()
            .map(|u| (u.email.to_lowercase(), u.id))
            .collect();
        let max = self.users.keys().next_back().copied().unwrap_or(0);
        self.waitlist = Fenwick(vec![0; (max as usize + 1).next_power_of_two()]);
        let applied: Vec<u64> = self
            .users
            .values()
            .filter(|u| u.status == "applied")
            .map(|u| u.id)
            .collect();
        for id in applied {
            self.waitlist.add(id, 1);
        }
    }

    fn set_waitlisted(&mut self, id: u64, on: bool) {
        if id as usize >= self.waitlist.0.len() {
            // Growing means rebuilding: the partial sums depend on the size.
            // It doubles each time, so rebuilds are rare.
            self.reindex_waitlist_for(id);
        }
        self.waitlist.add(id, if on { 1 } else { -1 });
    }

    fn reindex_waitlist_for(&mut self, id: u64) {
        let size = (id as usize + 1)
            .next_power_of_two()
            .max(self.waitlist.0.len() * 2);
        let mut f = Fenwick(vec![0; size]);
        for u in self.users.values() {
            if u.status == "applied" && u.id != id {
                f.add(u.id, 1);
            }
        }
        self.waitlist = f;
    }

    pub fn user_by_email(&self, email: &str) -> Option<&User> {
        self.by_email
            .get(&email.trim().to_lowercase())
            .and_then(|id| self.users.get(id))
    }

    pub fn beta_json(&self) -> Value {
        let count = |s: &str| self.users.values().filter(|u| u.status == s).count();
        json!({
            "id": self.id,
            "name": self.name,
            "homepage_url": self.homepage_url,
            "testers_count": self.users.len(),
            "impressions_count": self.impressions_count,
            "share_clicks_count": self.users.values().map(|u| u.share_clicks_count).sum::<u64>(),
            "share_signups_count": self.users.values().map(|u| u.share_signups_count).sum::<u64>(),
            "imported_testers_count": count("imported"),
            "applied_testers_count": count("applied"),
            "invited_testers_count": count("invited"),
            "active_testers_count": count("active"),
            "rejected_testers_count": count("rejected"),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        })
    }

    pub fn user_json(&self, u: &User) -> Value {
        let waitlisted = u.status == "applied";
        let length = self.waitlist.prefix(u64::MAX);
        let position = if waitlisted {
            Some(self.waitlist.prefix(u.id))
        } else {
            None
        };
        let link = format!("http://l.aunch.us/{}", u.referral_code);
        json!({
            "id": u.id,
            "email": u.email,
            "status": u.status,
            "invitation_code": u.invitation_code,
            "imported_at": u.imported_at,
            "applied_at": u.applied_at,
            "invited_at": u.invited_at,
            "joined_at": u.joined_at,
            "unsubscribed_at": u.unsubscribed_at,
            "share_clicks_count": u.share_clicks_count,
            "share_signups_count": u.share_signups_count,
            "friend_invitations_allowed": u.friend_invitations_allowed,
            "friend_invitations_count": u.friend_invitations_count,
            "friend_invitations_remaining": u.friend_invitations_allowed.saturating_sub(u.friend_invitations_count),
            "referral_code": u.referral_code,
            "share_link": link,
            "share_status_link": format!("{link}?check={:08x}-0000-4000-8000-{:012x}", u.id, u.id),
            "waitlist_position": position,
            "waitlist_ahead": position.map(|p| p - 1),
            "waitlist_behind": position.map(|p| length - p),
            "waitlist_length": length,
            "referred_by": u.referred_by,
            "groups": u.groups,
            "created_at": u.created_at,
            "updated_at": u.updated_at,
            "ip_address": u.ip_address,
            "checkins_count": u.checkins_count,
            "last_checkin_at": u.last_checkin_at,
            "profile": u.profile,
            "responses": u.responses,
        })
    }

    fn invitation_code(&self, email: &str) -> String {
        let mut h = sha1_smol::Sha1::new();
        h.update(self.decoder_key.as_bytes());
        h.update(email.to_lowercase().as_bytes());
        h.digest().to_string()[..10].to_string()
    }
}

/// Everything the sandbox holds.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct World {
    pub projects: BTreeMap<u64, Project>,
    pub next_id: u64,
    pub outbox: Vec<Email>,
    /// The state changes a webhook would announce, when webhooks are on
    /// (`None`: not recorded). The routes take them after each request.
    #[serde(skip)]
    pub changes: Option<Vec<Change>>,
}

/// One state change, as a webhook announces it.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub event: String,
    pub beta: u64,
    /// The objects the event is about (`tester`, `reward`, `point`).
    pub data: Value,
}

fn valid_email(e: &str) -> bool {
    let Some((local, domain)) = e.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !e.chars().any(|c| c.is_whitespace() || c == ',' || c == ';')
        && !domain.contains('@')
}

fn str_field<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

impl World {
    /// A world with two projects: 1 (`a9b8c7de`) and 2 (`b7c6d5e4`).
    pub fn new() -> World {
        let mut w = World {
            next_id: 1,
            ..Default::default()
        };
        for (id, uid, name) in [
            (1, "a9b8c7de", "Sandbox Waitlist"),
            (2, "b7c6d5e4", "Second Project"),
        ] {
            w.projects.insert(id, Project::new(id, uid, name));
        }
        w
    }

    pub fn reindex(&mut self) {
        for p in self.projects.values_mut() {
            p.reindex();
        }
    }

    fn next(&mut self) -> u64 {
        let id = self.next_id.max(1);
        self.next_id = id + 1;
        id
    }

    /// The project by numeric id or UID.
    pub fn project_id(&self, beta: &str) -> Option<u64> {
        if let Ok(id) = beta.parse::<u64>() {
            return self.projects.contains_key(&id).then_some(id);
        }
        self.projects.values().find(|p| p.uid == beta).map(|p| p.id)
    }

    pub fn project(&self, id: u64) -> &Project {
        &self.projects[&id]
    }

    /// Deterministic users `user{i}@example.com`, with names that exercise
    /// CSV quoting and unicode, plus some rewards, points and suppressions.
    pub fn seed_testers(&mut self, beta: u64, n: usize) {
        const FIRST: [&str; 6] = ["Ada", "Zoë", "José", "Li", "Mary-Jane", "Ólafur"];
        const LAST: [&str; 5] = [
            "Lovelace",
            "O'Brien",
            "Smith, Jr.",
            "\"The\" Chen",
            "Nøgård\nSecond line",
        ];
        const STATUS: [&str; 4] = ["applied", "imported", "active", "applied"];
        let base = 1_700_000_000u64;
        for i in 1..=n {
            let id = self.next();
            let at = iso8601(UNIX_EPOCH + std::time::Duration::from_secs(base + i as u64 * 60));
            let status = STATUS[i % STATUS.len()].to_string();
            let email = format!("user{i}@example.com");
            let p = self.projects.get_mut(&beta).expect("seeded project exists");
            let mut profile = Map::new();
            profile.insert("first_name".into(), FIRST[i % FIRST.len()].into());
            profile.insert("last_name".into(), LAST[i % LAST.len()].into());
            if i % 3 == 0 {
                profile.insert("country".into(), "NO".into());
                profile.insert("custom_var1".into(), format!("cohort-{}", i % 7).into());
            }
            let responses = if i % 4 == 0 {
                vec![
                    json!({"question_id": "101", "answer": format!("Heard of you from \"a friend\", {i}")}),
                ]
            } else {
                vec![]
            };
            let user = User {
                id,
                email: email.clone(),
                invitation_code: p.invitation_code(&email),
                imported_at: (status == "imported").then(|| at.clone()),
                applied_at: (status != "imported").then(|| at.clone()),
                invited_at: None,
                joined_at: (status == "active").then(|| at.clone()),
                unsubscribed_at: None,
                status,
                share_clicks_count: (i % 11) as u64,
                share_signups_count: (i % 5) as u64,
                friend_invitations_allowed: 5,
                friend_invitations_count: 0,
                referral_code: format!("R{id:07X}"),
                referred_by: None,
                groups: if i % 10 == 0 {
                    "Investors,Friends".into()
                } else {
                    String::new()
                },
                ip_address: Some(format!("192.0.2.{}", i % 250 + 1)),
                profile,
                responses,
                created_at: at.clone(),
                updated_at: at.clone(),
                checkins_count: 0,
                last_checkin_at: None,
            };
            p.by_email.insert(email.clone(), id);
            p.users.insert(id, user);
            if i % 10 == 0 {
                let rid = self.next();
                let (descriptor, name, kind) = REWARD_DEFS[i % REWARD_DEFS.len()];
                let p = self.projects.get_mut(&beta).unwrap();
                p.rewards.insert(
                    rid,
                    RewardRecord {
                        id: rid,
                        descriptor: descriptor.into(),
                        name: name.into(),
                        kind: kind.into(),
                        user_role: "referrer".into(),
                        user_id: id,
                        status: if i % 20 == 0 { "delivered" } else { "earned" }.into(),
                        earned_at: Some(at.clone()),
                        delivered_at: (i % 20 == 0).then(|| at.clone()),
                        revoked_at: None,
                    },
                );
            }
            if i % 5 == 0 {
                let pid = self.next();
                let p = self.projects.get_mut(&beta).unwrap();
                p.points.insert(
                    pid,
                    PointRecord {
                        id: pid,
                        quantity: (i % 9) as i64 + 1,
                        activity: if i % 10 == 0 { "bonus" } else { "share" }.into(),
                        reason: (i % 10 == 0).then(|| "VIP, \"early\"".into()),
                        user_id: id,
                        created_at: at.clone(),
                    },
                );
            }
            if i % 20 == 0 {
                let sid = self.next();
                let p = self.projects.get_mut(&beta).unwrap();
                p.suppressions.insert(
                    sid,
                    SuppressionRecord {
                        id: sid,
                        email: email.clone(),
                        user_id: Some(id),
                        reason: "Unsubscribe".into(),
                        suppressed_at: at.clone(),
                    },
                );
            }
        }
        self.projects.get_mut(&beta).unwrap().reindex();
    }

    /// Records a change for the webhooks, if they are on. `data` is built
    /// only then.
    fn changed(&mut self, event: &str, beta: u64, data: impl FnOnce(&World) -> Value) {
        if self.changes.is_some() {
            let data = data(self);
            if let Some(c) = self.changes.as_mut() {
                c.push(Change {
                    event: event.to_string(),
                    beta,
                    data,
                });
            }
        }
    }

    /// A user's record as a webhook carries it.
    fn tester_data(&self, beta: u64, id: u64) -> Value {
        let p = self.project(beta);
        json!({ "tester": p.users.get(&id).map(|u| p.user_json(u)) })
    }

    fn send_email(&mut self, kind: &str, to: &str, beta: u64) {
        self.outbox.push(Email {
            kind: kind.into(),
            to: to.into(),
            beta_id: beta,
            at: now(),
        });
    }

    /// Creates a user from the body of `POST /testers` (already unwrapped).
    pub fn create_user(&mut self, beta: u64, t: &Value) -> Outcome<Value> {
        let email = str_field(t, "email").unwrap_or("").trim().to_string();
        if email.is_empty() {
            return Err(Refusal::invalid("Email can't be blank"));
        }
        if !valid_email(&email) {
            return Err(Refusal::invalid("Email is invalid"));
        }
        let status = str_field(t, "status").unwrap_or("imported").to_string();
        if !STATUSES.contains(&status.as_str()) || status == "idle" {
            return Err(Refusal::invalid(format!(
                "Status {status:?} is not included in the list"
            )));
        }
        {
            let p = self.project(beta);
            if p.user_by_email(&email).is_some() {
                return Err(Refusal::invalid("Email has already been taken"));
            }
        }
        let (profile, responses) = profile_and_responses(t)?;
        let id = self.next();
        let at = now();
        let p = self.projects.get_mut(&beta).unwrap();
        let code = match str_field(t, "invitation_code") {
            Some(c) if !c.is_empty() => c.to_string(),
            _ => p.invitation_code(&email),
        };
        let user = User {
            id,
            email: email.clone(),
            status: status.clone(),
            invitation_code: code,
            imported_at: (status == "imported").then(|| at.clone()),
            applied_at: matches!(status.as_str(), "applied" | "unconfirmed").then(|| at.clone()),
            invited_at: (status == "invited").then(|| at.clone()),
            joined_at: (status == "active").then(|| at.clone()),
            unsubscribed_at: None,
            share_clicks_count: 0,
            share_signups_count: 0,
            friend_invitations_allowed: 5,
            friend_invitations_count: 0,
            referral_code: format!("R{id:07X}"),
            referred_by: str_field(t, "referrer_id").map(str::to_string),
            groups: String::new(),
            ip_address: profile
                .get("ip")
                .and_then(Value::as_str)
                .map(str::to_string),
            profile,
            responses,
            created_at: at.clone(),
            updated_at: at,
            checkins_count: 0,
            last_checkin_at: None,
        };
        p.by_email.insert(email.to_lowercase(), id);
        p.users.insert(id, user);
        if !p.order_stale
            && p.order.len() + 1 == p.users.len()
            && p.order.last().is_none_or(|l| *l < id)
        {
            p.order.push(id);
        } else {
            p.order_stale = true;
        }
        if status == "applied" {
            p.set_waitlisted(id, true);
        }
        match status.as_str() {
            "invited" => self.send_email("invitation", &email, beta),
            "unconfirmed" => self.send_email("double_opt_in", &email, beta),
            _ => {}
        }
        self.changed("tester_created", beta, |w| w.tester_data(beta, id));
        self.changed(&format!("tester_{status}"), beta, |w| {
            w.tester_data(beta, id)
        });
        let p = self.project(beta);
        Ok(p.user_json(&p.users[&id]))
    }

    pub fn update_user(&mut self, beta: u64, id: u64, t: &Value) -> Outcome<Value> {
        let p = self.projects.get_mut(&beta).unwrap();
        let Some(current) = p.users.get(&id).cloned() else {
            return Err(Refusal::not_found("Tester"));
        };
        let mut u = current.clone();
        if let Some(email) = str_field(t, "email") {
            let email = email.trim();
            if !valid_email(email) {
                return Err(Refusal::invalid("Email is invalid"));
            }
            if let Some(other) = p.by_email.get(&email.to_lowercase())
                && *other != id
            {
                return Err(Refusal::invalid("Email has already been taken"));
            }
            u.email = email.to_string();
        }
        let mut email_kind = None;
        if let Some(status) = str_field(t, "status") {
            if !STATUSES.contains(&status) {
                return Err(Refusal::invalid(format!(
                    "Status {status:?} is not included in the list"
                )));
            }
            if !transition_allowed(&u.status, status) {
                return Err(Refusal::invalid(format!(
                    "Status cannot change from {} to {status}",
                    u.status
                )));
            }
            if status != u.status {
                let at = now();
                match status {
                    "applied" => u.applied_at = Some(at),
                    "invited" => {
                        u.invited_at = Some(at);
                        email_kind = Some("invitation");
                    }
                    "rejected" => email_kind = Some("rejection"),
                    "active" => u.joined_at = Some(at),
                    _ => {}
                }
                u.status = status.to_string();
            }
        }
        if let Some(code) = str_field(t, "invitation_code") {
            u.invitation_code = code.to_string();
        }
        let (profile, responses) = profile_and_responses(t)?;
        for (k, v) in profile {
            if v.is_null() || v.as_str() == Some("") {
                u.profile.remove(&k);
            } else {
                u.profile.insert(k, v);
            }
        }
        if !responses.is_empty() {
            for r in responses {
                let q = r.get("question_id").cloned();
                u.responses
                    .retain(|old| old.get("question_id") != q.as_ref());
                u.responses.push(r);
            }
        }
        let changed = serde_json::to_value(&u).ok() != serde_json::to_value(&current).ok();
        if changed {
            u.updated_at = now();
        }
        let was = current.status == "applied";
        let is = u.status == "applied";
        if current.email.to_lowercase() != u.email.to_lowercase() {
            p.by_email.remove(&current.email.to_lowercase());
            p.by_email.insert(u.email.to_lowercase(), id);
        }
        let email = u.email.clone();
        let new_status = (u.status != current.status).then(|| u.status.clone());
        p.users.insert(id, u);
        if was != is {
            p.set_waitlisted(id, is);
        }
        if let Some(kind) = email_kind {
            self.send_email(kind, &email, beta);
        }
        if changed {
            self.changed("tester_updated", beta, |w| w.tester_data(beta, id));
        }
        if let Some(st) = new_status {
            self.changed(&format!("tester_{st}"), beta, |w| w.tester_data(beta, id));
        }
        let p = self.project(beta);
        Ok(p.user_json(&p.users[&id]))
    }

    pub fn delete_user(&mut self, beta: u64, id: u64) -> Outcome<()> {
        let p = self.projects.get_mut(&beta).unwrap();
        let Some(u) = p.users.remove(&id) else {
            return Err(Refusal::not_found("Tester"));
        };
        p.by_email.remove(&u.email.to_lowercase());
        p.order_stale = true;
        if u.status == "applied" {
            p.waitlist.add(id, -1);
        }
        self.changed(
            "tester_deleted",
            beta,
            |_| json!({ "tester": { "id": u.id, "email": u.email } }),
        );
        Ok(())
    }

    /// Check-in: the user becomes `active`, and the visit is counted.
    pub fn checkin(&mut self, beta: u64, who: Result<u64, &str>) -> Outcome<()> {
        let p = self.project(beta);
        let id = match who {
            Ok(id) => id,
            Err(email) => p
                .user_by_email(email)
                .map(|u| u.id)
                .ok_or_else(|| Refusal::not_found("Tester"))?,
        };
        let status = p
            .users
            .get(&id)
            .map(|u| u.status.clone())
            .ok_or_else(|| Refusal::not_found("Tester"))?;
        if status != "active" {
            if !transition_allowed(&status, "active") {
                return Err(Refusal::invalid(format!(
                    "Status cannot change from {status} to active"
                )));
            }
            self.update_user(beta, id, &json!({"status": "active"}))?;
        }
        // Every check-in is a visit, active or not: counted.
        let at = now();
        let u = self
            .projects
            .get_mut(&beta)
            .and_then(|p| p.users.get_mut(&id))
            .expect("found above");
        u.checkins_count += 1;
        u.last_checkin_at = Some(at.clone());
        u.updated_at = at;
        self.changed("tester_checked_in", beta, |w| w.tester_data(beta, id));
        Ok(())
    }

    pub fn create_point(&mut self, beta: u64, b: &Value) -> Outcome<Value> {
        let email = str_field(b, "email").unwrap_or("").trim();
        if email.is_empty() {
            return Err(Refusal::new(422, Some(2802), "Email is required."));
        }
        let quantity = b.get("quantity").and_then(|q| {
            q.as_i64()
                .or_else(|| q.as_str().and_then(|s| s.trim().parse().ok()))
        });
        let Some(quantity) = quantity else {
            return Err(Refusal::new(422, Some(2804), "Quantity is required."));
        };
        let Some(user_id) = self.project(beta).user_by_email(email).map(|u| u.id) else {
            return Err(Refusal::new(422, Some(2803), "Email not found."));
        };
        let id = self.next();
        let rec = PointRecord {
            id,
            quantity,
            activity: "bonus".into(),
            reason: str_field(b, "reason").map(str::to_string),
            user_id,
            created_at: now(),
        };
        let v = serde_json::to_value(&rec).unwrap();
        self.projects.get_mut(&beta).unwrap().points.insert(id, rec);
        let event = if quantity < 0 {
            "points_revoked"
        } else {
            "points_earned"
        };
        self.changed(event, beta, |w| {
            let mut d = w.tester_data(beta, user_id);
            d["point"] = v.clone();
            d
        });
        Ok(v)
    }

    pub fn create_suppression(&mut self, beta: u64, b: &Value) -> Outcome<Value> {
        let email = str_field(b, "email").unwrap_or("").trim().to_string();
        if email.is_empty() {
            return Err(Refusal::new(422, Some(2703), "Email is required."));
        }
        let reason = str_field(b, "reason").unwrap_or("Manual").to_string();
        if !matches!(reason.as_str(), "Manual" | "Unsubscribe") {
            return Err(Refusal::new(
                422,
                Some(2701),
                "A general error has occurred.",
            ));
        }
        let p = self.project(beta);
        if p.suppressions
            .values()
            .any(|s| s.email.eq_ignore_ascii_case(&email))
        {
            return Err(Refusal::new(422, Some(2702), "Email already exists."));
        }
        let user_id = p.user_by_email(&email).map(|u| u.id);
        let id = self.next();
        let at = now();
        let rec = SuppressionRecord {
            id,
            email,
            user_id,
            reason: reason.clone(),
            suppressed_at: at.clone(),
        };
        let v = serde_json::to_value(&rec).unwrap();
        let p = self.projects.get_mut(&beta).unwrap();
        p.suppressions.insert(id, rec);
        if reason == "Unsubscribe"
            && let Some(u) = user_id.and_then(|uid| p.users.get_mut(&uid))
        {
            u.unsubscribed_at = Some(at);
            let uid = u.id;
            self.changed("tester_unsubscribed", beta, |w| w.tester_data(beta, uid));
        }
        Ok(v)
    }

    pub fn delete_suppression(&mut self, beta: u64, id: u64) -> Outcome<()> {
        let p = self.projects.get_mut(&beta).unwrap();
        p.suppressions
            .remove(&id)
            .map(|_| ())
            .ok_or_else(|| Refusal::not_found("Suppression"))
    }

    /// Issues a reward by descriptor to a user by email.
    pub fn create_reward(&mut self, beta: u64, b: &Value) -> Outcome<Value> {
        let email = str_field(b, "email").unwrap_or("").trim();
        let descriptor = str_field(b, "descriptor").unwrap_or("").trim();
        if email.is_empty() {
            return Err(Refusal::invalid("Email is required."));
        }
        let Some(def) = REWARD_DEFS.iter().find(|d| d.0 == descriptor) else {
            return Err(Refusal::invalid(format!(
                "Reward {descriptor:?} not found."
            )));
        };
        let Some(user_id) = self.project(beta).user_by_email(email).map(|u| u.id) else {
            return Err(Refusal::invalid("Email not found."));
        };
        let id = self.next();
        let rec = RewardRecord {
            id,
            descriptor: def.0.into(),
            name: def.1.into(),
            kind: def.2.into(),
            user_role: "referrer".into(),
            user_id,
            status: "earned".into(),
            earned_at: Some(now()),
            delivered_at: None,
            revoked_at: None,
        };
        let v = serde_json::to_value(&rec).unwrap();
        self.projects
            .get_mut(&beta)
            .unwrap()
            .rewards
            .insert(id, rec);
        self.changed("reward_earned", beta, |w| {
            let mut d = w.tester_data(beta, user_id);
            d["reward"] = v.clone();
            d
        });
        Ok(v)
    }

    pub fn update_reward(&mut self, beta: u64, id: u64, b: &Value) -> Outcome<Value> {
        let p = self.projects.get_mut(&beta).unwrap();
        let Some(r) = p.rewards.get_mut(&id) else {
            return Err(Refusal::not_found("Reward"));
        };
        let status = str_field(b, "status").unwrap_or("");
        let ok = matches!(
            (r.status.as_str(), status),
            ("earned", "delivered") | ("earned", "revoked") | ("delivered", "revoked")
        ) || r.status == status;
        if !ok {
            return Err(Refusal::invalid(format!(
                "Status cannot change from {} to {status:?}",
                r.status
            )));
        }
        let moved = r.status != status;
        if moved {
            match status {
                "delivered" => r.delivered_at = Some(now()),
                _ => r.revoked_at = Some(now()),
            }
            r.status = status.to_string();
        }
        let v = serde_json::to_value(&*r).unwrap();
        let user_id = r.user_id;
        if moved {
            self.changed(&format!("reward_{status}"), beta, |w| {
                let mut d = w.tester_data(beta, user_id);
                d["reward"] = v.clone();
                d
            });
        }
        Ok(v)
    }
}

/// Reads `profile` and `responses` from a create or update body. Responses
/// come as `{"response":[...]}` (what clients send) or as a bare array.
fn profile_and_responses(t: &Value) -> Outcome<(Map<String, Value>, Vec<Value>)> {
    let profile = match t.get("profile") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(Refusal::invalid("Profile must be an object")),
    };
    let list = match t.get("responses") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a.clone(),
        Some(Value::Object(o)) => match o.get("response") {
            Some(Value::Array(a)) => a.clone(),
            Some(v @ Value::Object(_)) => vec![v.clone()],
            _ => return Err(Refusal::invalid("Responses are malformed")),
        },
        Some(_) => return Err(Refusal::invalid("Responses are malformed")),
    };
    for r in &list {
        if r.get("question_id").is_none() {
            return Err(Refusal::invalid("Response question_id is required"));
        }
    }
    Ok((profile, list))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_is_utc() {
        assert_eq!(
            iso8601(UNIX_EPOCH + std::time::Duration::from_secs(1_350_837_910)),
            "2012-10-21T16:45:10Z"
        );
    }

    #[test]
    fn invitation_code_follows_the_documented_rule() {
        let mut p = Project::new(1, "x", "x");
        p.decoder_key = "d1696aeb245fa90380a192a41730f07464c906ea".into();
        assert_eq!(p.invitation_code("Joe@gmail.com"), "6210ede5e4");
    }

    #[test]
    fn waitlist_positions_follow_applied_users() {
        let mut w = World::new();
        w.seed_testers(1, 40);
        let p = w.project(1);
        let applied: Vec<&User> = p.users.values().filter(|u| u.status == "applied").collect();
        let first = p.user_json(applied[0]);
        assert_eq!(first["waitlist_position"], 1);
        assert_eq!(first["waitlist_length"], applied.len());
        let n_applied = applied.len();
        let id = w
            .create_user(1, &json!({"email": "new@x.io", "status": "applied"}))
            .unwrap()["id"]
            .as_u64()
            .unwrap();
        let p = w.project(1);
        assert_eq!(
            p.user_json(&p.users[&id])["waitlist_position"],
            n_applied + 1
        );
    }

    #[test]
    fn statuses_that_email_people_fill_the_outbox() {
        let mut w = World::new();
        let u = w.create_user(1, &json!({"email": "a@x.io"})).unwrap();
        assert_eq!(u["status"], "imported");
        assert!(w.outbox.is_empty());
        let id = u["id"].as_u64().unwrap();
        w.update_user(1, id, &json!({"status": "invited"})).unwrap();
        assert_eq!(w.outbox.len(), 1);
        let err = w
            .update_user(1, id, &json!({"status": "applied"}))
            .unwrap_err();
        assert_eq!(err.status, 422);
        assert_eq!(
            w.create_user(1, &json!({"email": "A@x.io"}))
                .unwrap_err()
                .status,
            422
        );
    }
}
