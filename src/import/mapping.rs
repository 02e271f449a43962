//! Which CSV column goes to which API field, and the per-row checks.
//!
//! By default a header maps to the field of the same name, matched case- and
//! space-insensitively. A `--map FILE` (TOML) renames, ignores, sets
//! constants and applies simple transforms; see `samples/map.toml`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::api::TesterInput;
use crate::exit::usage;

/// Profile keys seen in the API (reference 7.2.1).
pub const PROFILE_KEYS: &[&str] = &[
    "first_name",
    "last_name",
    "full_name",
    "employer",
    "jobtitle",
    "country",
    "telephone",
    "address_line1",
    "address_line2",
    "city",
    "state",
    "postal_code",
    "http_referrer",
    "utm_source",
    "utm_medium",
    "utm_campaign",
    "custom_var1",
    "custom_var2",
    "custom_var3",
    "ip",
    "user_agent",
];

/// Statuses a row may set.
pub const STATUSES: &[&str] = &[
    "imported",
    "unconfirmed",
    "applied",
    "rejected",
    "invited",
    "active",
    "suspended",
];

/// Statuses that make Prefinery email a real person.
pub const EMAILING_STATUSES: &[&str] = &["invited", "rejected", "unconfirmed"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Email,
    Status,
    InvitationCode,
    ReferrerId,
    Profile(String),
    Response(String),
    /// A full name split at the last space into first and last name.
    SplitName,
    Ignore,
}

impl Target {
    /// Reads a target name, case- and space-insensitively.
    pub fn parse(name: &str) -> Option<Target> {
        let raw = name.trim();
        let lower = raw.to_lowercase();
        if let Some(k) = lower.strip_prefix("profile.") {
            return (!k.is_empty()).then(|| Target::Profile(raw[8..].trim().to_string()));
        }
        if let Some(q) = lower.strip_prefix("response.") {
            return (!q.is_empty()).then(|| Target::Response(raw[9..].trim().to_string()));
        }
        let norm: String = lower
            .chars()
            .map(|c| if c == ' ' || c == '-' { '_' } else { c })
            .collect();
        let norm = norm.trim_matches('_');
        Some(match norm {
            "email" | "e_mail" | "email_address" => Target::Email,
            "status" => Target::Status,
            "invitation_code" => Target::InvitationCode,
            "referrer_id" => Target::ReferrerId,
            "ignore" => Target::Ignore,
            "split_name" => Target::SplitName,
            k if PROFILE_KEYS.contains(&k) => Target::Profile(k.to_string()),
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transform {
    Lower,
    Upper,
    /// Parse a date with a strftime-like format (`%Y %m %d %y %H %M %S`),
    /// written as ISO-8601.
    Date(String),
}

#[derive(Debug, Clone)]
pub struct Column {
    pub index: usize,
    pub header: String,
    pub target: Target,
    pub transforms: Vec<Transform>,
}

/// How a blank cell is treated on update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
pub enum EmptyCells {
    /// Leave the field as it is.
    #[default]
    Keep,
    /// Clear the field.
    Clear,
}

#[derive(Debug, Clone)]
pub struct Mapping {
    pub columns: Vec<Column>,
    pub constants: Vec<(Target, String)>,
    /// Headers that map to nothing (reported before the run).
    pub unmapped: Vec<String>,
    pub email_column: usize,
    pub empty: EmptyCells,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MapFile {
    #[serde(default)]
    columns: BTreeMap<String, ColumnSpec>,
    #[serde(default)]
    constants: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ColumnSpec {
    To(String),
    Full {
        to: String,
        #[serde(default)]
        transform: Vec<String>,
        #[serde(default)]
        date: Option<String>,
    },
}

/// Columns prefsync itself adds to its reports: fed back in, they are
/// recognised and skipped.
pub fn is_report_column(h: &str) -> bool {
    h.starts_with("prefsync_")
}

impl Mapping {
    pub fn build(
        headers: &[String],
        map_file: Option<&Path>,
        empty: EmptyCells,
    ) -> anyhow::Result<Mapping> {
        let spec = match map_file {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    usage(format!("failed to read the map file {}: {e}", p.display()))
                })?;
                let m: MapFile = toml::from_str(&text)
                    .map_err(|e| usage(format!("invalid map file {}: {e}", p.display())))?;
                Some(m)
            }
            None => None,
        };
        let norm = |s: &str| s.trim().to_lowercase();
        let mut columns = Vec::new();
        let mut unmapped = Vec::new();
        let mut constants = Vec::new();
        if let Some(spec) = &spec {
            for name in spec.columns.keys() {
                if !headers.iter().any(|h| norm(h) == norm(name)) {
                    return Err(usage(format!(
                        "the map file names column {name:?}, which the input does not have (its columns: {})",
                        headers.join(", ")
                    )));
                }
            }
            for (k, v) in &spec.constants {
                let t = Target::parse(k).ok_or_else(|| {
                    usage(format!("the map file's constant {k:?} names no field"))
                })?;
                constants.push((t, v.clone()));
            }
        }
        for (index, header) in headers.iter().enumerate() {
            let from_map = spec
                .as_ref()
                .and_then(|s| s.columns.iter().find(|(k, _)| norm(k) == norm(header)));
            let (target, transforms) = match from_map {
                Some((_, ColumnSpec::To(to))) => (
                    Target::parse(to).ok_or_else(|| {
                        usage(format!(
                            "the map file maps {header:?} to {to:?}, which names no field"
                        ))
                    })?,
                    vec![],
                ),
                Some((
                    _,
                    ColumnSpec::Full {
                        to,
                        transform,
                        date,
                    },
                )) => {
                    let t = Target::parse(to).ok_or_else(|| {
                        usage(format!(
                            "the map file maps {header:?} to {to:?}, which names no field"
                        ))
                    })?;
                    let mut tr = Vec::new();
                    for name in transform {
                        tr.push(match name.as_str() {
                            "lower" => Transform::Lower,
                            "upper" => Transform::Upper,
                            "trim" => continue, // every cell is trimmed anyway
                            other => {
                                return Err(usage(format!(
                                    "the map file's transform {other:?} for {header:?} is unknown; expected trim, lower or upper"
                                )));
                            }
                        });
                    }
                    if let Some(f) = date {
                        tr.push(Transform::Date(f.clone()));
                    }
                    (t, tr)
                }
                None if is_report_column(header) => (Target::Ignore, vec![]),
                None => match Target::parse(header) {
                    Some(t) => (t, vec![]),
                    None => {
                        unmapped.push(header.clone());
                        (Target::Ignore, vec![])
                    }
                },
            };
            columns.push(Column {
                index,
                header: header.clone(),
                target,
                transforms,
            });
        }
        let emails: Vec<&Column> = columns
            .iter()
            .filter(|c| c.target == Target::Email)
            .collect();
        let email_column = match emails.as_slice() {
            [one] => one.index,
            [] => {
                return Err(usage(format!(
                    "no email column: the input's columns are {}; name one \"email\" or map it with --map",
                    headers.join(", ")
                )));
            }
            many => {
                let names: Vec<&str> = many.iter().map(|c| c.header.as_str()).collect();
                return Err(usage(format!(
                    "several columns map to email ({}); keep one, or ignore the others with --map",
                    names.join(", ")
                )));
            }
        };
        Ok(Mapping {
            columns,
            constants,
            unmapped,
            email_column,
            empty,
        })
    }

    /// Whether any row can set a status (a column or a constant).
    pub fn sets_status(&self) -> bool {
        self.columns.iter().any(|c| c.target == Target::Status)
            || self.constants.iter().any(|(t, _)| *t == Target::Status)
    }

    /// Maps and checks one row. The error names the column and says what to
    /// do.
    pub fn apply(&self, fields: &csv::StringRecord) -> Result<MappedRow, String> {
        let mut input = TesterInput::default();
        let raw_email = fields
            .get(self.email_column)
            .map(|s| s.trim())
            .unwrap_or("");
        if raw_email.is_empty() {
            return Err("the email is empty; every row needs one".into());
        }
        if let Some(why) = email_problem(raw_email) {
            return Err(format!("the email {raw_email:?} is not valid: {why}"));
        }
        let email_key = email_key(raw_email);
        input.email = Some(raw_email.to_string());
        let mut set = |target: &Target, header: &str, value: String| -> Result<(), String> {
            if value.is_empty() && self.empty == EmptyCells::Keep {
                return Ok(());
            }
            match target {
                Target::Email | Target::Ignore => {}
                Target::Status => {
                    if value.is_empty() {
                        return Ok(());
                    }
                    let s = value.to_lowercase();
                    if !STATUSES.contains(&s.as_str()) {
                        return Err(format!(
                            "column {header:?}: unknown status {value:?}; expected one of {}",
                            STATUSES.join(", ")
                        ));
                    }
                    input.status = Some(s);
                }
                Target::InvitationCode => {
                    input.invitation_code = Some(value).filter(|v| !v.is_empty())
                }
                Target::ReferrerId => input.referrer_id = Some(value).filter(|v| !v.is_empty()),
                Target::Profile(k) => {
                    input.profile.insert(k.clone(), Value::String(value));
                }
                Target::Response(q) => {
                    if !value.is_empty() {
                        input.responses.push((q.clone(), value));
                    }
                }
                Target::SplitName => {
                    let (first, last) = match value.rsplit_once(' ') {
                        Some((f, l)) => (f.trim().to_string(), l.trim().to_string()),
                        None => (value.clone(), String::new()),
                    };
                    input
                        .profile
                        .insert("first_name".into(), Value::String(first));
                    if !last.is_empty() || self.empty == EmptyCells::Clear {
                        input
                            .profile
                            .insert("last_name".into(), Value::String(last));
                    }
                }
            }
            Ok(())
        };
        for (t, v) in &self.constants {
            set(t, "constant", v.trim().to_string())?;
        }
        for c in &self.columns {
            if c.target == Target::Ignore || c.target == Target::Email {
                continue;
            }
            let mut value = fields
                .get(c.index)
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
            for t in &c.transforms {
                value = match t {
                    Transform::Lower => value.to_lowercase(),
                    Transform::Upper => value.to_uppercase(),
                    Transform::Date(f) if !value.is_empty() => {
                        parse_date(&value, f).ok_or_else(|| {
                            format!(
                                "column {:?}: {value:?} is not a date in the format {f:?}",
                                c.header
                            )
                        })?
                    }
                    Transform::Date(_) => value,
                };
            }
            set(&c.target, &c.header, value)?;
        }
        Ok(MappedRow { email_key, input })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct MappedRow {
    /// The email as compared: trimmed and lower-cased.
    pub email_key: String,
    pub input: TesterInput,
}

/// The email as the run compares it: lower-cased (an ASCII email, nearly
/// every one, the cheap way; the result is the same).
pub fn email_key(email: &str) -> String {
    if email.is_ascii() {
        email.to_ascii_lowercase()
    } else {
        email.to_lowercase()
    }
}

/// Why an email is not well formed, if it is not.
pub fn email_problem(e: &str) -> Option<&'static str> {
    if e.chars().any(char::is_whitespace) {
        return Some("it contains a space");
    }
    if e.contains(',') || e.contains(';') {
        return Some("it contains a comma or semicolon (two addresses in one cell?)");
    }
    let Some((local, domain)) = e.rsplit_once('@') else {
        return Some("it has no @");
    };
    if local.is_empty() {
        return Some("nothing before the @");
    }
    if local.contains('@') {
        return Some("it has more than one @");
    }
    if !domain.contains('.')
        || domain.starts_with('.')
        || domain.ends_with('.')
        || domain.contains("..")
    {
        return Some("the domain after the @ is not complete");
    }
    if e.len() > 254 {
        return Some("it is longer than 254 characters");
    }
    None
}

/// A small strftime subset: `%Y %y %m %d %H %M %S` and literal characters.
pub fn parse_date(value: &str, format: &str) -> Option<String> {
    let (mut y, mut mo, mut d, mut h, mut mi, mut s) = (None, None, None, None, None, None);
    let mut timed = false;
    let v = value.as_bytes();
    let mut i = 0;
    let mut f = format.chars().peekable();
    let num = |i: &mut usize, max: usize| -> Option<u32> {
        let start = *i;
        while *i < v.len() && *i - start < max && v[*i].is_ascii_digit() {
            *i += 1;
        }
        (start < *i).then(|| std::str::from_utf8(&v[start..*i]).ok()?.parse().ok())?
    };
    while let Some(c) = f.next() {
        if c == '%' {
            match f.next()? {
                'Y' => y = Some(num(&mut i, 4)?),
                'y' => y = Some(2000 + num(&mut i, 2)?),
                'm' => mo = Some(num(&mut i, 2)?),
                'd' => d = Some(num(&mut i, 2)?),
                'H' => {
                    h = Some(num(&mut i, 2)?);
                    timed = true;
                }
                'M' => mi = Some(num(&mut i, 2)?),
                'S' => s = Some(num(&mut i, 2)?),
                _ => return None,
            }
        } else {
            let mut buf = [0u8; 4];
            let lit = c.encode_utf8(&mut buf).as_bytes();
            if !v[i..].starts_with(lit) {
                return None;
            }
            i += lit.len();
        }
    }
    if i != v.len() {
        return None;
    }
    let (y, mo, d) = (y?, mo?, d?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    Some(if timed {
        format!(
            "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
            h.unwrap_or(0),
            mi.unwrap_or(0),
            s.unwrap_or(0)
        )
    } else {
        format!("{y:04}-{mo:02}-{d:02}")
    })
}

/// What to send to bring `current` (a tester as the API returned it) to
/// what the row asks, or `None` when nothing differs.
pub fn diff(current: &Value, wanted: &TesterInput) -> Option<TesterInput> {
    let mut out = TesterInput::default();
    let mut changed = false;
    if let Some(s) = &wanted.status
        && current.get("status").and_then(Value::as_str) != Some(s)
    {
        out.status = Some(s.clone());
        changed = true;
    }
    if let Some(c) = &wanted.invitation_code
        && current.get("invitation_code").and_then(Value::as_str) != Some(c)
    {
        out.invitation_code = Some(c.clone());
        changed = true;
    }
    let empty = Map::new();
    let profile = current
        .get("profile")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    for (k, v) in &wanted.profile {
        let now = profile.get(k);
        let same = match (now, v.as_str()) {
            (None | Some(Value::Null), Some("")) => true,
            (Some(n), _) => n == v,
            (None, _) => false,
        };
        if !same {
            out.profile.insert(k.clone(), v.clone());
            changed = true;
        }
    }
    let answers: Vec<(String, String)> = current
        .get("responses")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|r| {
                    let q = match r.get("question_id")? {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    let a = match r.get("answer")? {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    Some((q, a))
                })
                .collect()
        })
        .unwrap_or_default();
    for (q, a) in &wanted.responses {
        if !answers.iter().any(|(q2, a2)| q2 == q && a2 == a) {
            out.responses.push((q.clone(), a.clone()));
            changed = true;
        }
    }
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn rec(v: &[&str]) -> csv::StringRecord {
        csv::StringRecord::from(v.to_vec())
    }

    #[test]
    fn headers_match_loosely_and_unmapped_are_listed() {
        let m = Mapping::build(
            &h(&[
                " E-Mail ",
                "First Name",
                "profile.Shoe Size",
                "response.101",
                "Favourite colour",
                "prefsync_line",
            ]),
            None,
            EmptyCells::Keep,
        )
        .unwrap();
        assert_eq!(m.email_column, 0);
        assert_eq!(m.columns[1].target, Target::Profile("first_name".into()));
        assert_eq!(m.columns[2].target, Target::Profile("Shoe Size".into()));
        assert_eq!(m.columns[3].target, Target::Response("101".into()));
        assert_eq!(m.unmapped, vec!["Favourite colour".to_string()]);
        let row = m
            .apply(&rec(&[" Ada@Example.com ", "Ada", "", "yes", "red", "7"]))
            .unwrap();
        assert_eq!(row.email_key, "ada@example.com");
        // Non-ASCII emails are lower-cased in full, as before.
        assert_eq!(email_key("ÅSA.Öberg@Example.COM"), "åsa.öberg@example.com");
        assert_eq!(email_key("İ@x.io"), "İ@x.io".to_lowercase());
        assert_eq!(row.input.email.as_deref(), Some("Ada@Example.com"));
        assert!(
            !row.input.profile.contains_key("Shoe Size"),
            "empty cells are left alone"
        );
        assert_eq!(
            row.input.responses,
            vec![("101".to_string(), "yes".to_string())]
        );
    }

    #[test]
    fn validation_messages_name_the_problem() {
        let m = Mapping::build(&h(&["email", "status"]), None, EmptyCells::Keep).unwrap();
        assert!(
            m.apply(&rec(&["", "applied"]))
                .unwrap_err()
                .contains("empty")
        );
        assert!(
            m.apply(&rec(&["a b@x.io", ""]))
                .unwrap_err()
                .contains("space")
        );
        assert!(m.apply(&rec(&["ax.io", ""])).unwrap_err().contains("no @"));
        assert!(m.apply(&rec(&["a@x", ""])).unwrap_err().contains("domain"));
        assert!(
            m.apply(&rec(&["a@x.io", "waiting"]))
                .unwrap_err()
                .contains("unknown status \"waiting\"")
        );
        assert!(
            Mapping::build(&h(&["name"]), None, EmptyCells::Keep)
                .unwrap_err()
                .to_string()
                .contains("no email column")
        );
    }

    #[test]
    fn dates_and_diffs() {
        assert_eq!(
            parse_date("31/12/2023", "%d/%m/%Y").as_deref(),
            Some("2023-12-31")
        );
        assert_eq!(
            parse_date("2023-01-02 03:04:05", "%Y-%m-%d %H:%M:%S").as_deref(),
            Some("2023-01-02T03:04:05Z")
        );
        assert_eq!(parse_date("13/13/2023", "%d/%m/%Y"), None);
        let current = serde_json::json!({"status": "applied", "profile": {"first_name": "Ada"}, "responses": [{"question_id": "1", "answer": "x"}]});
        let mut w = TesterInput {
            status: Some("applied".into()),
            ..Default::default()
        };
        w.profile.insert("first_name".into(), "Ada".into());
        w.responses.push(("1".into(), "x".into()));
        assert_eq!(diff(&current, &w), None);
        w.profile.insert("last_name".into(), "L".into());
        let d = diff(&current, &w).unwrap();
        assert_eq!(d.profile.len(), 1);
        assert_eq!(d.status, None);
    }
}
