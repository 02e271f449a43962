//! Which CSV column goes to which API field, and the per-row checks.
//!
//! By default a header maps to the field of the same name, matched case- and
//! space-insensitively. A `--map FILE` (TOML) or a `--preset` (the same
//! format, compiled in) renames, ignores, sets constants, maps values,
//! parses dates, cleans lists and skips rows by rule; see `samples/map.toml`
//! and the README.
//!
//! Guarantees: a map that cannot work (an unknown field, a bad date format,
//! two columns writing one field) is refused before any row is read;
//! [`Mapping::apply`] never panics on a row, and says what it did with it:
//! a row to send, a row skipped by rule (with the reason), or an error
//! naming the column.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::format::{Item, StrftimeItems};
use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::api::TesterInput;
use crate::exit::usage;
use crate::import::presets::{self, MailchimpList};

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

/// How many non-empty cells of each date column are tried before the run:
/// when none of them parses, the format is wrong for the whole file, and
/// the run stops before any call instead of rejecting every row. Twenty is
/// enough to see past a few junk cells at the top of a real export, and
/// few enough that the check costs nothing.
pub const DATE_PROBE_CELLS: usize = 20;

/// The most records read to find those cells (a sparse date column).
pub const DATE_PROBE_RECORDS: usize = 5_000;

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

    /// Every name a target may take, for the error that names none.
    pub fn names() -> Vec<&'static str> {
        let mut v = vec![
            "email",
            "status",
            "invitation_code",
            "referrer_id",
            "split_name",
            "ignore",
        ];
        v.extend_from_slice(PROFILE_KEYS);
        v
    }

    /// Why `name` names no field: the closest valid name, if one is near
    /// (a typo), and the list of them all.
    pub fn unknown(name: &str) -> String {
        let norm = name.trim().to_lowercase().replace([' ', '-'], "_");
        let near = Target::names()
            .into_iter()
            .map(|n| (edit_distance(&norm, n), n))
            .filter(|(d, n)| *d <= 2.max(n.len() / 4))
            .min();
        format!(
            "{}the fields are {}, profile.KEY (any profile key) and response.QUESTION (a signup form's answer)",
            near.map(|(_, n)| format!("did you mean {n:?}? "))
                .unwrap_or_default(),
            Target::names().join(", ")
        )
    }

    /// The fields a target writes, to find two columns writing one field.
    fn fields(&self) -> Vec<String> {
        match self {
            Target::Email | Target::Ignore => vec![],
            Target::Status => vec!["status".into()],
            Target::InvitationCode => vec!["invitation_code".into()],
            Target::ReferrerId => vec!["referrer_id".into()],
            Target::Profile(k) => vec![k.clone()],
            Target::Response(q) => vec![format!("response.{q}")],
            Target::SplitName => vec!["first_name".into(), "last_name".into()],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transform {
    Lower,
    Upper,
    /// A source value to ours (keys lower-cased); other non-empty values
    /// become `default` when there is one, else pass through.
    Values {
        map: Vec<(String, String)>,
        default: Option<String>,
    },
    /// A date, tried in each format in order, written as ISO-8601.
    Date(DateFormats),
    /// A list cell (`"beta","vip"`, `beta;vip`) written as `beta,vip`.
    List,
}

/// One way a date column may be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DateFormat {
    /// A chrono strftime format, e.g. `%d/%m/%Y %H:%M`.
    Strftime(String),
    /// Seconds since 1970-01-01 UTC (a fraction is kept).
    Epoch,
    /// Milliseconds since 1970-01-01 UTC.
    EpochMs,
    /// ISO-8601 / RFC 3339 / RFC 2822, month names, and 10- or 13-digit
    /// epochs: only formats that cannot be read two ways (never `01/02/2025`).
    Auto,
}

/// The formats of one date column, tried in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DateFormats(pub Vec<DateFormat>);

impl DateFormats {
    /// Reads a `date = ...` entry; a format chrono cannot use is refused.
    pub fn parse(specs: &[String]) -> Result<DateFormats, String> {
        if specs.is_empty() {
            return Err("`date` lists no format".into());
        }
        let mut v = Vec::new();
        for s in specs {
            v.push(match s.trim() {
                "epoch" => DateFormat::Epoch,
                "epoch_ms" => DateFormat::EpochMs,
                "auto" => DateFormat::Auto,
                f => {
                    if StrftimeItems::new(f).any(|i| matches!(i, Item::Error)) {
                        return Err(format!(
                            "the date format {f:?} is not valid (see chrono's strftime: %Y %m %d %H %M %S %.f %z %b %p ...; or \"epoch\", \"epoch_ms\", \"auto\")"
                        ));
                    }
                    if let Some(at) = f.find("%Z")
                        && f[at + 2..].trim() != ""
                    {
                        return Err(format!(
                            "the date format {f:?} has %Z before its end; a zone name is read only as the last word"
                        ));
                    }
                    DateFormat::Strftime(f.to_string())
                }
            });
        }
        Ok(DateFormats(v))
    }

    /// The value as ISO-8601: `2025-07-21` for a date, `2025-07-21T14:22:10Z`
    /// (UTC, fractional seconds kept) for a time. Times without an offset
    /// are taken as UTC.
    pub fn parse_value(&self, value: &str) -> Option<String> {
        self.0.iter().find_map(|f| parse_one(value.trim(), f))
    }

    /// The formats as the map wrote them, for messages.
    pub fn spelled(&self) -> String {
        let v: Vec<String> = self
            .0
            .iter()
            .map(|f| match f {
                DateFormat::Strftime(s) => format!("{s:?}"),
                DateFormat::Epoch => "\"epoch\"".into(),
                DateFormat::EpochMs => "\"epoch_ms\"".into(),
                DateFormat::Auto => "\"auto\"".into(),
            })
            .collect();
        v.join(", ")
    }
}

fn iso_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn iso_date(d: NaiveDate) -> String {
    d.format("%Y-%m-%d").to_string()
}

fn parse_one(value: &str, f: &DateFormat) -> Option<String> {
    match f {
        DateFormat::Epoch => {
            let (secs, frac) = match value.split_once('.') {
                Some((s, f)) => (s, f),
                None => (value, ""),
            };
            let secs: i64 = secs.parse().ok()?;
            if !frac.chars().all(|c| c.is_ascii_digit()) || frac.len() > 9 {
                return None;
            }
            let nanos: u32 = if frac.is_empty() {
                0
            } else {
                format!("{frac:0<9}").parse().ok()?
            };
            DateTime::from_timestamp(secs, nanos).map(iso_time)
        }
        DateFormat::EpochMs => DateTime::from_timestamp_millis(value.parse().ok()?).map(iso_time),
        DateFormat::Strftime(fmt) => parse_strftime(value, fmt),
        DateFormat::Auto => parse_auto(value),
    }
}

/// Zone names read as UTC. Others (EST, CET...) name different offsets at
/// different times of year; a row with one is rejected rather than guessed.
const UTC_NAMES: &[&str] = &["utc", "gmt", "z", "ut"];

fn parse_strftime(value: &str, fmt: &str) -> Option<String> {
    if let Some(head) = fmt.trim_end().strip_suffix("%Z") {
        let (v, zone) = value.trim_end().rsplit_once(char::is_whitespace)?;
        if !UTC_NAMES.contains(&zone.to_lowercase().as_str()) {
            return None;
        }
        return parse_strftime(v.trim_end(), head.trim_end());
    }
    let try_fmt = |fmt: &str| -> Option<String> {
        if let Ok(t) = DateTime::parse_from_str(value, fmt) {
            return Some(iso_time(t.with_timezone(&Utc)));
        }
        if let Ok(t) = NaiveDateTime::parse_from_str(value, fmt) {
            return Some(iso_time(t.and_utc()));
        }
        NaiveDate::parse_from_str(value, fmt).ok().map(iso_date)
    };
    try_fmt(fmt).or_else(|| {
        // Exports add fractional seconds to some rows and not others: %S
        // takes them too, rather than rejecting those rows.
        (fmt.contains("%S") && !fmt.contains("%S%.f"))
            .then(|| try_fmt(&fmt.replace("%S", "%S%.f")))
            .flatten()
    })
}

/// What `date = "auto"` tries after RFC 3339 and RFC 2822.
const AUTO_FORMATS: &[&str] = &[
    "%Y-%m-%d %H:%M:%S%.f%:z",
    "%Y-%m-%d %H:%M:%S%.f%z",
    "%Y-%m-%d %H:%M:%S%.f %z",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%d",
    "%b %d, %Y %I:%M %p",
    "%B %d, %Y %I:%M %p",
    "%b %d, %Y %H:%M",
    "%b %d, %Y",
    "%B %d, %Y",
    "%d %b %Y %H:%M",
    "%d %b %Y",
    "%d %B %Y",
];

fn parse_auto(value: &str) -> Option<String> {
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Seconds until 2286 have 10 digits, milliseconds 13.
        return match value.len() {
            9 | 10 => parse_one(value, &DateFormat::Epoch),
            12 | 13 => parse_one(value, &DateFormat::EpochMs),
            _ => None,
        };
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(value) {
        return Some(iso_time(t.with_timezone(&Utc)));
    }
    if let Ok(t) = DateTime::parse_from_rfc2822(value) {
        return Some(iso_time(t.with_timezone(&Utc)));
    }
    let lower = value.to_lowercase();
    let v = UTC_NAMES
        .iter()
        .filter(|z| z.len() > 1)
        .find_map(|z| {
            lower
                .strip_suffix(*z)
                .filter(|h| h.ends_with(' '))
                .map(|h| value[..h.len()].trim_end())
        })
        .unwrap_or(value);
    AUTO_FORMATS.iter().find_map(|f| parse_strftime(v, f))
}

/// A list cell's items: split at commas and semicolons outside double
/// quotes, quotes and blanks dropped, duplicates dropped (first kept).
pub fn list_items(cell: &str) -> Vec<String> {
    let mut items: Vec<String> = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut push = |cur: &mut String| {
        let item = cur.trim().to_string();
        cur.clear();
        if !item.is_empty() && !items.contains(&item) {
            items.push(item);
        }
    };
    for c in cell.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' | ';' if !quoted => push(&mut cur),
            c => cur.push(c),
        }
    }
    push(&mut cur);
    items
}

#[derive(Debug, Clone)]
pub struct Column {
    pub index: usize,
    pub header: String,
    pub target: Target,
    pub transforms: Vec<Transform>,
}

impl Column {
    /// The cell after every transform, or what is wrong with it.
    fn value(&self, fields: &csv::StringRecord) -> Result<String, String> {
        let mut value = fields
            .get(self.index)
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        for t in &self.transforms {
            if value.is_empty() {
                break;
            }
            value = match t {
                Transform::Lower => value.to_lowercase(),
                Transform::Upper => value.to_uppercase(),
                Transform::Values { map, default } => {
                    let key = value.to_lowercase();
                    match map.iter().find(|(k, _)| *k == key) {
                        Some((_, v)) => v.clone(),
                        None => default.clone().unwrap_or(value),
                    }
                }
                Transform::Date(f) => f.parse_value(&value).ok_or_else(|| {
                    format!(
                        "column {:?}: {value:?} is not a date in the format {}",
                        self.header,
                        f.spelled()
                    )
                })?,
                Transform::List => list_items(&value).join(","),
            };
        }
        Ok(value)
    }

    fn dates(&self) -> Option<&DateFormats> {
        self.transforms.iter().find_map(|t| match t {
            Transform::Date(f) => Some(f),
            _ => None,
        })
    }
}

/// How a blank cell is treated on update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum EmptyCells {
    /// Leave the field as it is.
    #[default]
    Keep,
    /// Clear the field.
    Clear,
}

impl std::str::FromStr for EmptyCells {
    type Err = String;
    fn from_str(s: &str) -> Result<EmptyCells, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "keep" => Ok(EmptyCells::Keep),
            "clear" => Ok(EmptyCells::Clear),
            _ => Err(format!("unknown --empty {s:?}; expected keep or clear")),
        }
    }
}

/// Why a row is skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipClass {
    /// A `skip_if` rule matched (spam, fraud): not imported, counted.
    Flagged,
    /// A `suppress_if` rule matched, or the whole file is of people who
    /// left (Mailchimp's unsubscribed and cleaned lists). They must never
    /// become active users; until suppressions can be sent, the row is
    /// skipped and counted as "would be suppressed".
    WouldSuppress,
}

impl SkipClass {
    /// The name the checkpoint and the results file use.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipClass::Flagged => "flagged",
            SkipClass::WouldSuppress => "would_suppress",
        }
    }
}

/// A row a rule keeps out of the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Skip {
    pub class: SkipClass,
    /// Why, the same words for every row the same rule skips (the summary
    /// counts by it).
    pub reason: String,
    /// The row's email as compared, when it has a valid one.
    pub email_key: Option<String>,
    /// A row of someone who left: the suppression it becomes with
    /// `--suppress` (`Unsubscribe` or `Manual`, as the API spells them).
    pub suppress_as: Option<&'static str>,
}

/// What [`Mapping::apply`] made of a row.
#[derive(Debug, Clone, PartialEq)]
pub enum Mapped {
    Row(MappedRow),
    Skip(Skip),
}

/// A row rule: the row is skipped when the column's cell is one of
/// `values` (compared case-insensitively).
#[derive(Debug, Clone)]
pub struct Rule {
    pub index: usize,
    pub header: String,
    pub values: Vec<String>,
    pub class: SkipClass,
}

#[derive(Debug, Clone)]
pub struct Mapping {
    pub columns: Vec<Column>,
    pub constants: Vec<(Target, String)>,
    /// Headers that map to nothing (reported before the run).
    pub unmapped: Vec<String>,
    pub email_column: usize,
    pub empty: EmptyCells,
    /// `suppress_if` rules, then `skip_if` rules (a person who opted out
    /// is counted as such even when also flagged).
    pub rules: Vec<Rule>,
    /// Every row would be suppressed, why, and as what (Mailchimp's
    /// unsubscribed and cleaned files: `Unsubscribe`, `Manual`).
    pub suppress_all: Option<(String, &'static str)>,
    /// The status of new users when `--status` is not given.
    pub default_status: Option<String>,
    /// The preset used, if any.
    pub preset: Option<String>,
    /// What was chosen and why (the preset `auto` picked, the Mailchimp
    /// list), for the log.
    pub notes: Vec<String>,
    /// The field whose dates order the rows, when a column writes it.
    pub order_by: Option<Target>,
    /// Creates one after another in that order.
    pub strict_order: bool,
    /// How rows name their referrers, when a column writes both fields
    /// (or the referrer is named by email).
    pub referrals: Option<Referrals>,
}

/// Where a mapping comes from: the flags, as plain values.
#[derive(Debug, Clone, Default)]
pub struct MapSource<'a> {
    pub map: Option<&'a Path>,
    /// A preset's name, or `auto`.
    pub preset: Option<&'a str>,
    /// The input's file name (Mailchimp's lists are told apart by it).
    pub file_name: Option<&'a str>,
    pub mailchimp_list: Option<MailchimpList>,
    /// Keep rows that `skip_if` rules would skip.
    pub include_flagged: bool,
    pub empty: EmptyCells,
}

/// A mapping file as written (also a preset's).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapFile {
    /// The status of new users when `--status` is not given.
    #[serde(default)]
    pub default_status: Option<String>,
    /// Column → value(s): a row with one of them is skipped as flagged.
    #[serde(default)]
    pub skip_if: BTreeMap<String, OneOrMany>,
    /// Column → value(s): a row with one of them would be suppressed.
    #[serde(default)]
    pub suppress_if: BTreeMap<String, OneOrMany>,
    #[serde(default)]
    pub columns: BTreeMap<String, ColumnSpec>,
    #[serde(default)]
    pub constants: BTreeMap<String, String>,
    /// Presets: the headers that recognise the source (`--preset auto`).
    /// Ignored in a `--map` file, so a copied preset still loads.
    #[serde(default)]
    pub detect: Option<Detect>,
    /// The field whose dates order the rows: sent oldest first (e.g.
    /// `profile.signed_up_at`, written by a `date` column).
    #[serde(default)]
    pub order_by: Option<String>,
    /// With `order_by`: creates one after another, so Prefinery receives
    /// them in exactly that order (updates stay concurrent).
    #[serde(default)]
    pub strict_order: Option<bool>,
    /// How a row names its referrer, for `--link-referrers`.
    #[serde(default)]
    pub referrals: Option<ReferralsSpec>,
}

/// `[referrals]`: the field that names a row's referrer, and which field
/// of the referrer's row that name is.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferralsSpec {
    /// E.g. `profile.source_referrer`.
    pub referrer: String,
    /// `email`, or a field such as `profile.source_referral_code`.
    pub matches: String,
}

/// How rows name their referrers (a mapping's `[referrals]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Referrals {
    pub referrer: Target,
    pub matches: Target,
}

impl Referrals {
    /// The referrer a row names, as compared.
    pub fn named<'a>(&self, input: &'a TesterInput) -> Option<std::borrow::Cow<'a, str>> {
        self.norm(field_value(input, &self.referrer)?)
    }

    /// How other rows name this one, as compared.
    pub fn own<'a>(&self, input: &'a TesterInput) -> Option<std::borrow::Cow<'a, str>> {
        self.norm(field_value(input, &self.matches)?)
    }

    /// Emails compare lower-cased; codes and ids as written.
    fn norm<'a>(&self, v: &'a str) -> Option<std::borrow::Cow<'a, str>> {
        let v = v.trim();
        if v.is_empty() {
            None
        } else if self.matches == Target::Email {
            Some(email_key(v).into())
        } else {
            Some(v.into())
        }
    }
}

/// The value a row's mapped input holds for `target`, if it is text.
pub fn field_value<'a>(input: &'a TesterInput, target: &Target) -> Option<&'a str> {
    match target {
        Target::Email => input.email.as_deref(),
        Target::Status => input.status.as_deref(),
        Target::InvitationCode => input.invitation_code.as_deref(),
        Target::ReferrerId => input.referrer_id.as_deref(),
        Target::Profile(k) => input.profile.get(k).and_then(Value::as_str),
        Target::Response(q) => input
            .responses
            .iter()
            .find(|(k, _)| k == q)
            .map(|(_, a)| a.as_str()),
        Target::SplitName | Target::Ignore => None,
    }
}

/// A date as the mapping writes it (`2025-07-21`, `2025-07-21T14:22:10Z`),
/// as microseconds since 1970 for sorting; `None` for anything else.
pub fn date_order_key(value: &str) -> Option<i64> {
    let v = value.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(v) {
        return Some(t.timestamp_micros());
    }
    NaiveDate::parse_from_str(v, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_micros())
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Detect {
    pub headers: Vec<String>,
}

/// One string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub enum ColumnSpec {
    To(String),
    Full(FullSpec),
}

/// A column's entry written as a table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullSpec {
    pub to: String,
    #[serde(default)]
    pub transform: Vec<String>,
    #[serde(default)]
    pub date: Option<OneOrMany>,
    #[serde(default)]
    pub values: BTreeMap<String, String>,
    #[serde(default)]
    pub default: Option<String>,
    #[serde(default)]
    pub list: bool,
}

// By hand rather than `untagged`: an untagged enum's error is "data did not
// match any variant", where a user needs "unknown field `lst`" at its line.
impl<'de> Deserialize<'de> for ColumnSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = toml::Value::deserialize(d)?;
        match v {
            toml::Value::String(s) => Ok(ColumnSpec::To(s)),
            toml::Value::Table(_) => FullSpec::deserialize(v)
                .map(ColumnSpec::Full)
                .map_err(serde::de::Error::custom),
            other => Err(serde::de::Error::custom(format!(
                "expected a field name or a table like {{ to = \"...\" }}, found {}",
                other.type_str()
            ))),
        }
    }
}

impl ColumnSpec {
    fn to(&self) -> &str {
        match self {
            ColumnSpec::To(t) => t,
            ColumnSpec::Full(f) => &f.to,
        }
    }
}

/// Reads a mapping file's text; `origin` names it in errors.
pub fn parse_map_file(text: &str, origin: &str) -> anyhow::Result<MapFile> {
    toml::from_str(text).map_err(|e| usage(format!("invalid map file {origin}: {e}")))
}

/// Columns prefsync itself adds to its reports: fed back in, they are
/// recognised and skipped.
pub fn is_report_column(h: &str) -> bool {
    h.starts_with("prefsync_")
}

fn norm(s: &str) -> String {
    s.trim().to_lowercase()
}

/// One source of entries: a preset (whose columns may be absent from a
/// given export) or a `--map` file (whose columns must all be there).
struct Layer {
    file: MapFile,
    origin: String,
    optional_columns: bool,
}

impl Mapping {
    /// A mapping from the headers and, optionally, a map file.
    pub fn build(
        headers: &[String],
        map_file: Option<&Path>,
        empty: EmptyCells,
    ) -> anyhow::Result<Mapping> {
        Mapping::from_source(
            headers,
            &MapSource {
                map: map_file,
                empty,
                ..MapSource::default()
            },
        )
    }

    /// A mapping from the headers, a preset and a map file (whose entries
    /// override the preset's).
    pub fn from_source(headers: &[String], src: &MapSource) -> anyhow::Result<Mapping> {
        let mut layers = Vec::new();
        let mut notes = Vec::new();
        let mut preset_name = None;
        if let Some(name) = src.preset {
            let preset = if name.eq_ignore_ascii_case("auto") {
                let d = presets::detect(headers).map_err(usage)?;
                notes.push(format!(
                    "--preset auto picked {}: its headers {} are in the file",
                    d.preset.name,
                    d.matched.join(", ")
                ));
                d.preset
            } else {
                presets::find(name).ok_or_else(|| {
                    usage(format!(
                        "no preset {name:?}; the presets are {} (or auto)",
                        presets::names().join(", ")
                    ))
                })?
            };
            preset_name = Some(preset.name.to_string());
            layers.push(Layer {
                file: presets::parse(preset),
                origin: format!("preset {}", preset.name),
                optional_columns: true,
            });
        }
        if let Some(p) = src.map {
            let text = std::fs::read_to_string(p)
                .map_err(|e| usage(format!("failed to read the map file {}: {e}", p.display())))?;
            layers.push(Layer {
                file: parse_map_file(&text, &p.display().to_string())?,
                origin: format!("the map file {}", p.display()),
                optional_columns: false,
            });
        }
        let mut m = Mapping::from_layers(headers, &layers, src)?;
        if preset_name.as_deref() == Some(presets::MAILCHIMP) {
            let (list, why) = presets::mailchimp_list(src.file_name, headers, src.mailchimp_list)
                .map_err(usage)?;
            notes.push(format!("Mailchimp {} list: {why}", list.name()));
            m.suppress_all = list.suppression_reason().zip(list.suppression_kind());
        }
        m.preset = preset_name;
        notes.append(&mut m.notes);
        m.notes = notes;
        Ok(m)
    }

    fn from_layers(
        headers: &[String],
        layers: &[Layer],
        src: &MapSource,
    ) -> anyhow::Result<Mapping> {
        let find = |name: &str| headers.iter().position(|h| norm(h) == norm(name));
        // Per header: the entry that wins (the last layer's) and its origin.
        let mut entries: BTreeMap<usize, (&str, &ColumnSpec, &str)> = BTreeMap::new();
        let mut constants: BTreeMap<String, (Target, String)> = BTreeMap::new();
        let mut rules: BTreeMap<(u8, usize), Rule> = BTreeMap::new();
        let mut default_status = None;
        let mut order_by: Option<(String, &str)> = None;
        let mut strict_order = false;
        let mut referrals: Option<(&ReferralsSpec, &str)> = None;
        for layer in layers {
            if let Some(o) = &layer.file.order_by {
                order_by = Some((o.clone(), layer.origin.as_str()));
            }
            if let Some(st) = layer.file.strict_order {
                strict_order = st;
            }
            if let Some(r) = &layer.file.referrals {
                referrals = Some((r, layer.origin.as_str()));
            }
            let mut seen: BTreeMap<usize, &str> = BTreeMap::new();
            for (name, spec) in &layer.file.columns {
                let Some(i) = find(name) else {
                    if layer.optional_columns {
                        continue;
                    }
                    return Err(usage(format!(
                        "{} names column {name:?}, which the input does not have (its columns: {})",
                        layer.origin,
                        headers.join(", ")
                    )));
                };
                if let Some(other) = seen.insert(i, name) {
                    return Err(usage(format!(
                        "{} names column {:?} twice ({other:?} and {name:?}: headers match whatever their case)",
                        layer.origin, headers[i]
                    )));
                }
                entries.insert(i, (name.as_str(), spec, layer.origin.as_str()));
            }
            for (k, v) in &layer.file.constants {
                let t = Target::parse(k).ok_or_else(|| {
                    usage(format!(
                        "{}: the constant {k:?} names no field; {}",
                        layer.origin,
                        Target::unknown(k)
                    ))
                })?;
                constants.insert(norm(k), (t, v.clone()));
            }
            for (kind, class, table) in [
                (0u8, SkipClass::WouldSuppress, &layer.file.suppress_if),
                (1u8, SkipClass::Flagged, &layer.file.skip_if),
            ] {
                for (name, values) in table {
                    let Some(i) = find(name) else {
                        if layer.optional_columns {
                            continue;
                        }
                        return Err(usage(format!(
                            "{}: the rule on column {name:?} names a column the input does not have (its columns: {})",
                            layer.origin,
                            headers.join(", ")
                        )));
                    };
                    let values: Vec<String> = values.to_vec().iter().map(|v| norm(v)).collect();
                    rules.insert(
                        (kind, i),
                        Rule {
                            index: i,
                            header: headers[i].clone(),
                            values,
                            class,
                        },
                    );
                }
            }
            if let Some(s) = &layer.file.default_status {
                let s = norm(s);
                if !STATUSES.contains(&s.as_str()) {
                    return Err(usage(format!(
                        "{}: default_status {s:?} is not a status; expected one of {}",
                        layer.origin,
                        STATUSES.join(", ")
                    )));
                }
                default_status = Some(s);
            }
        }
        // A rule with no values would never match: an override that means
        // "drop the preset's rule" (`skip_if = { is_spam = [] }`).
        let mut rules: Vec<Rule> = rules
            .into_values()
            .filter(|r| !r.values.is_empty())
            .collect();
        if src.include_flagged {
            rules.retain(|r| r.class != SkipClass::Flagged);
        }

        let mut columns = Vec::new();
        let mut unmapped = Vec::new();
        for (index, header) in headers.iter().enumerate() {
            let (target, transforms) = match entries.get(&index) {
                Some((_, spec, origin)) => column_spec(header, spec, origin)?,
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
        // Two columns writing one field would let the last one win,
        // silently, row by row.
        let mut writers: BTreeMap<String, &Column> = BTreeMap::new();
        for c in &columns {
            for field in c.target.fields() {
                if let Some(first) = writers.insert(field.clone(), c) {
                    return Err(usage(format!(
                        "columns {:?} and {:?} both map to {field}: the last would silently win; \
                         map one of them to \"ignore\" (or to another field) with --map",
                        first.header, c.header
                    )));
                }
            }
        }
        // A field some column (or constant) writes, or the email.
        let written = |t: &Target, columns: &[Column]| {
            *t == Target::Email
                || columns.iter().any(|c| c.target.fields() == t.fields())
                || constants.values().any(|(c, _)| c.fields() == t.fields())
        };
        let mut notes = Vec::new();
        let order_by = match order_by {
            None => None,
            Some((name, origin)) => {
                let t = Target::parse(&name).ok_or_else(|| {
                    usage(format!(
                        "{origin}: order_by {name:?} names no field (e.g. \"profile.signed_up_at\")"
                    ))
                })?;
                if written(&t, &columns) {
                    Some(t)
                } else if layers
                    .iter()
                    .any(|l| l.optional_columns && l.origin == origin)
                {
                    notes.push(format!(
                        "no column of this file writes {name} ({origin} orders by it): rows are sent in the file's order"
                    ));
                    None
                } else {
                    return Err(usage(format!(
                        "{origin}: order_by {name:?} is a field no column writes; map the signup date column to it"
                    )));
                }
            }
        };
        let referrals = match referrals {
            None => None,
            Some((spec, origin)) => {
                let parse = |name: &str| {
                    Target::parse(name).ok_or_else(|| {
                        usage(format!("{origin}: [referrals] names no field {name:?}"))
                    })
                };
                let r = Referrals {
                    referrer: parse(&spec.referrer)?,
                    matches: parse(&spec.matches)?,
                };
                if written(&r.referrer, &columns) && written(&r.matches, &columns) {
                    Some(r)
                } else {
                    notes.push(format!(
                        "this file has no column for {} or {} ([referrals] of {origin}): no referrer can be linked",
                        spec.referrer, spec.matches
                    ));
                    None
                }
            }
        };
        Ok(Mapping {
            columns,
            constants: constants.into_values().collect(),
            unmapped,
            email_column,
            empty: src.empty,
            rules,
            suppress_all: None,
            default_status,
            preset: None,
            notes,
            strict_order: strict_order && order_by.is_some(),
            order_by,
            referrals,
        })
    }

    /// Whether any row can set a status (a column or a constant).
    pub fn sets_status(&self) -> bool {
        self.columns.iter().any(|c| c.target == Target::Status)
            || self.constants.iter().any(|(t, _)| *t == Target::Status)
    }

    /// The check of the date columns before the run; feed it records.
    pub fn date_probe(&self) -> DateProbe<'_> {
        DateProbe {
            cols: self
                .columns
                .iter()
                .filter(|c| c.target != Target::Ignore && c.dates().is_some())
                .map(|c| ProbeColumn {
                    column: c,
                    tried: 0,
                    parsed: 0,
                    first: None,
                })
                .collect(),
            records: 0,
        }
    }

    /// The rule that keeps this row out of the run, if one does.
    fn skip(&self, fields: &csv::StringRecord) -> Option<(SkipClass, String)> {
        if let Some((why, _)) = &self.suppress_all {
            return Some((SkipClass::WouldSuppress, why.clone()));
        }
        self.rules.iter().find_map(|r| {
            let cell = norm(fields.get(r.index).unwrap_or(""));
            r.values.contains(&cell).then(|| {
                (
                    r.class,
                    match r.class {
                        SkipClass::Flagged => format!(
                            "flagged: {} is {cell:?} (skip_if; --include-flagged imports such rows)",
                            r.header
                        ),
                        SkipClass::WouldSuppress => format!(
                            "would be suppressed (Unsubscribe): {} is {cell:?} (suppress_if); never imported; --suppress sends it as a suppression",
                            r.header
                        ),
                    },
                )
            })
        })
    }

    /// Maps and checks one row. The error names the column and says what to
    /// do.
    pub fn apply(&self, fields: &csv::StringRecord) -> Result<Mapped, String> {
        let raw_email = fields
            .get(self.email_column)
            .map(|s| s.trim())
            .unwrap_or("");
        // Rules first: a spam row is skipped whatever its email looks like.
        if let Some((class, reason)) = self.skip(fields) {
            let email_key = (!raw_email.is_empty() && email_problem(raw_email).is_none())
                .then(|| email_key(raw_email));
            let suppress_as = (class == SkipClass::WouldSuppress).then(|| {
                self.suppress_all
                    .as_ref()
                    .map_or("Unsubscribe", |(_, kind)| *kind)
            });
            return Ok(Mapped::Skip(Skip {
                class,
                reason,
                email_key,
                suppress_as,
            }));
        }
        let mut input = TesterInput::default();
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
                            "column {header:?}: unknown status {value:?}; expected one of {} (map the source's statuses with `values`)",
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
            set(&c.target, &c.header, c.value(fields)?)?;
        }
        Ok(Mapped::Row(MappedRow { email_key, input }))
    }
}

/// Levenshtein distance, for the "did you mean" of an unknown field.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A column's target and transforms from its entry.
fn column_spec(
    header: &str,
    spec: &ColumnSpec,
    origin: &str,
) -> anyhow::Result<(Target, Vec<Transform>)> {
    let to = spec.to();
    let target = Target::parse(to).ok_or_else(|| {
        usage(format!(
            "{origin} maps {header:?} to {to:?}, which names no field; {}",
            Target::unknown(to)
        ))
    })?;
    let ColumnSpec::Full(f) = spec else {
        return Ok((target, vec![]));
    };
    let mut tr = Vec::new();
    for name in &f.transform {
        tr.push(match name.as_str() {
            "lower" => Transform::Lower,
            "upper" => Transform::Upper,
            "trim" => continue, // every cell is trimmed anyway
            other => {
                return Err(usage(format!(
                    "{origin}: the transform {other:?} for {header:?} is unknown; expected trim, lower or upper"
                )));
            }
        });
    }
    if !f.values.is_empty() || f.default.is_some() {
        let map: Vec<(String, String)> = f
            .values
            .iter()
            .map(|(k, v)| (norm(k), v.trim().to_string()))
            .collect();
        if target == Target::Status {
            // A typo here would reject every row with that value: refuse it
            // once, now.
            for v in map.iter().map(|(_, v)| v).chain(f.default.iter()) {
                if !STATUSES.contains(&norm(v).as_str()) {
                    return Err(usage(format!(
                        "{origin}: {header:?} maps a value to {v:?}, which is not a status; expected one of {}",
                        STATUSES.join(", ")
                    )));
                }
            }
        }
        tr.push(Transform::Values {
            map,
            default: f.default.as_ref().map(|d| d.trim().to_string()),
        });
    }
    if let Some(d) = &f.date {
        let formats = DateFormats::parse(&d.to_vec())
            .map_err(|e| usage(format!("{origin}, column {header:?}: {e}")))?;
        tr.push(Transform::Date(formats));
    }
    if f.list {
        tr.push(Transform::List);
    }
    Ok((target, tr))
}

/// Checks each date column's first non-empty cells before the run.
pub struct DateProbe<'a> {
    cols: Vec<ProbeColumn<'a>>,
    records: usize,
}

struct ProbeColumn<'a> {
    column: &'a Column,
    tried: usize,
    parsed: usize,
    first: Option<(u64, String)>,
}

impl DateProbe<'_> {
    /// Takes one record (and its line).
    pub fn feed(&mut self, line: u64, fields: &csv::StringRecord) {
        self.records += 1;
        for p in &mut self.cols {
            if p.tried >= DATE_PROBE_CELLS {
                continue;
            }
            let raw = fields.get(p.column.index).unwrap_or("").trim();
            if raw.is_empty() {
                continue;
            }
            p.tried += 1;
            p.first.get_or_insert_with(|| (line, raw.to_string()));
            if p.column.value(fields).is_ok() {
                p.parsed += 1;
            }
        }
    }

    /// Whether it has seen enough.
    pub fn satisfied(&self) -> bool {
        self.records >= DATE_PROBE_RECORDS || self.cols.iter().all(|p| p.tried >= DATE_PROBE_CELLS)
    }

    /// Refuses a date column none of whose cells tried parses.
    pub fn finish(self) -> Result<(), String> {
        for p in &self.cols {
            if p.tried > 0 && p.parsed == 0 {
                let (line, example) = p.first.clone().unwrap_or_default();
                return Err(format!(
                    "column {:?}: none of its first {} dates matches the format {} (line {line}: {example:?}); \
                     fix its `date` in the map (several formats may be listed, tried in order)",
                    p.column.header,
                    p.tried,
                    p.column
                        .dates()
                        .map(DateFormats::spelled)
                        .unwrap_or_default()
                ));
            }
        }
        Ok(())
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

    /// A mapping from a map file's text.
    fn with_map(headers: &[&str], toml: &str) -> anyhow::Result<Mapping> {
        let file = parse_map_file(toml, "(test)")?;
        Mapping::from_layers(
            &h(headers),
            &[Layer {
                file,
                origin: "the map file (test)".into(),
                optional_columns: false,
            }],
            &MapSource::default(),
        )
    }

    fn row(m: &Mapping, cells: &[&str]) -> MappedRow {
        match m.apply(&rec(cells)).unwrap() {
            Mapped::Row(r) => r,
            other => panic!("expected a row, got {other:?}"),
        }
    }

    fn skip(m: &Mapping, cells: &[&str]) -> Skip {
        match m.apply(&rec(cells)).unwrap() {
            Mapped::Skip(s) => s,
            other => panic!("expected a skip, got {other:?}"),
        }
    }

    /// Regression (issue 16, defect 8): a map target typo said only that
    /// it "names no field", without the fields there are.
    #[test]
    fn a_target_typo_lists_the_fields_and_the_closest() {
        let err = with_map(&["Email", "Phone"], "[columns]\n\"Phone\" = \"telephon\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"telephon\", which names no field"), "{err}");
        assert!(err.contains("did you mean \"telephone\"?"), "{err}");
        for field in [
            "email",
            "status",
            "first_name",
            "custom_var3",
            "profile.KEY",
        ] {
            assert!(err.contains(field), "{field}: {err}");
        }
        // A name near nothing gets the list without a guess.
        let err = with_map(&["Email", "X"], "[columns]\n\"X\" = \"zzzzzzzzzzzz\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            !err.contains("did you mean") && err.contains("telephone"),
            "{err}"
        );
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
        let row = row(&m, &[" Ada@Example.com ", "Ada", "", "yes", "red", "7"]);
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
    fn values_map_a_sources_statuses_with_a_default() {
        let m = with_map(
            &["email", "State"],
            r#"
[columns]
"State" = { to = "status", values = { Confirmed = "applied", unconfirmed = "imported" }, default = "applied" }
"#,
        )
        .unwrap();
        let status = |v: &str| row(&m, &["a@x.io", v]).input.status;
        assert_eq!(status("CONFIRMED").as_deref(), Some("applied"));
        assert_eq!(status("unconfirmed").as_deref(), Some("imported"));
        // A value the map does not name takes the default: a source's own
        // "invited" never reaches the API as an emailing status.
        assert_eq!(status("invited").as_deref(), Some("applied"));
        assert_eq!(status("waiting").as_deref(), Some("applied"));
        assert_eq!(status(""), None);
        // Without a default, other values pass through (and are checked).
        let m = with_map(
            &["email", "kind"],
            r#"[columns]
"kind" = { to = "custom_var1", values = { a = "alpha" } }"#,
        )
        .unwrap();
        assert_eq!(
            row(&m, &["a@x.io", "A"]).input.profile["custom_var1"],
            "alpha"
        );
        assert_eq!(row(&m, &["a@x.io", "b"]).input.profile["custom_var1"], "b");
        // A status typo in the map is refused once, not on every row.
        let e = with_map(
            &["email", "s"],
            r#"[columns]
"s" = { to = "status", values = { ok = "aplied" } }"#,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("\"aplied\", which is not a status"),
            "{e}"
        );
    }

    #[test]
    fn rules_skip_and_would_suppress_case_insensitively() {
        let toml = r#"
skip_if = { is_spam = "true", fraud = ["yes", "1"] }
suppress_if = { opted_out = "TRUE" }
"#;
        let headers = ["email", "is_spam", "fraud", "opted_out"];
        let m = with_map(&headers, toml).unwrap();
        let s = skip(&m, &["A@x.io", "True", "", ""]);
        assert_eq!(s.class, SkipClass::Flagged);
        assert_eq!(s.email_key.as_deref(), Some("a@x.io"));
        assert!(s.reason.contains("is_spam is \"true\""), "{}", s.reason);
        assert_eq!(
            skip(&m, &["b@x.io", "", " 1 ", ""]).class,
            SkipClass::Flagged
        );
        // Opted out and flagged: counted as would-be-suppressed, the
        // stronger of the two.
        let s = skip(&m, &["c@x.io", "true", "", "true"]);
        assert_eq!(s.class, SkipClass::WouldSuppress);
        assert!(s.reason.contains("--suppress sends it"), "{}", s.reason);
        assert_eq!(s.suppress_as, Some("Unsubscribe"));
        // A spam row is skipped even when its email is broken.
        assert_eq!(skip(&m, &["not an email", "true", "", ""]).email_key, None);
        assert!(matches!(
            m.apply(&rec(&["d@x.io", "false", "no", "false"])),
            Ok(Mapped::Row(_))
        ));
        // --include-flagged keeps the flagged, never the opted out.
        let file = parse_map_file(toml, "(test)").unwrap();
        let m = Mapping::from_layers(
            &h(&headers),
            &[Layer {
                file,
                origin: "(test)".into(),
                optional_columns: false,
            }],
            &MapSource {
                include_flagged: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(matches!(
            m.apply(&rec(&["a@x.io", "true", "yes", ""])),
            Ok(Mapped::Row(_))
        ));
        assert_eq!(
            skip(&m, &["c@x.io", "true", "", "true"]).class,
            SkipClass::WouldSuppress
        );
        // A rule on a column the file lacks is refused in a --map file.
        let e = with_map(&["email"], "skip_if = { is_spam = \"true\" }").unwrap_err();
        assert!(e.to_string().contains("\"is_spam\""), "{e}");
    }

    #[test]
    fn dates_in_many_formats_tried_in_order() {
        let f = |specs: &[&str]| {
            DateFormats::parse(&specs.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
        };
        let day_first = f(&["%d/%m/%Y %H:%M", "%d/%m/%Y"]);
        assert_eq!(
            day_first.parse_value("03/04/2025").as_deref(),
            Some("2025-04-03")
        );
        assert_eq!(
            day_first.parse_value("31/12/2024 23:59").as_deref(),
            Some("2024-12-31T23:59:00Z")
        );
        // Month-first input never slips through a day-first format.
        assert_eq!(day_first.parse_value("12/31/2024"), None);
        // An impossible date is rejected, never written as 2025-02-30.
        assert_eq!(f(&["%m/%d/%Y"]).parse_value("02/30/2025"), None);
        assert_eq!(
            f(&["%m/%d/%Y"]).parse_value("2/3/2025").as_deref(),
            Some("2025-02-03")
        );
        // Fractional seconds and offsets, converted to UTC.
        let iso = f(&["%Y-%m-%d %H:%M:%S%.f%:z"]);
        assert_eq!(
            iso.parse_value("2024-03-02 14:22:10.123456+00:00")
                .as_deref(),
            Some("2024-03-02T14:22:10.123456Z")
        );
        assert_eq!(
            iso.parse_value("2024-03-02 14:22:10+02:00").as_deref(),
            Some("2024-03-02T12:22:10Z")
        );
        // %S takes fractional seconds in the rows that have them.
        assert_eq!(
            f(&["%Y-%m-%d %H:%M:%S"])
                .parse_value("2024-03-02 14:22:10.5")
                .as_deref(),
            Some("2024-03-02T14:22:10.500Z")
        );
        // Zone names: UTC and GMT; others are not guessed.
        let zoned = f(&["%Y-%m-%d %H:%M:%S %Z"]);
        assert_eq!(
            zoned.parse_value("2024-03-02 14:22:10 UTC").as_deref(),
            Some("2024-03-02T14:22:10Z")
        );
        assert_eq!(zoned.parse_value("2024-03-02 14:22:10 EST"), None);
        // Month names and 12-hour times.
        assert_eq!(
            f(&["%b %d, %Y %I:%M %p"])
                .parse_value("Jul 1, 2025 3:04 PM")
                .as_deref(),
            Some("2025-07-01T15:04:00Z")
        );
        // Epochs.
        assert_eq!(
            f(&["epoch"]).parse_value("1719846240").as_deref(),
            Some("2024-07-01T15:04:00Z")
        );
        assert_eq!(
            f(&["epoch_ms"]).parse_value("1719846240250").as_deref(),
            Some("2024-07-01T15:04:00.250Z")
        );
        assert_eq!(f(&["epoch"]).parse_value("17 July"), None);
        // auto: unambiguous forms only.
        let auto = f(&["auto"]);
        for (v, want) in [
            ("2025-07-15T14:29:23-04:00", "2025-07-15T18:29:23Z"),
            (
                "2024-03-02 14:22:10.123456+00:00",
                "2024-03-02T14:22:10.123456Z",
            ),
            ("2024-03-02 14:22:10 UTC", "2024-03-02T14:22:10Z"),
            ("2024-03-02", "2024-03-02"),
            ("Jul 1, 2025 3:04 PM", "2025-07-01T15:04:00Z"),
            ("July 1, 2025", "2025-07-01"),
            ("1719846240", "2024-07-01T15:04:00Z"),
            ("1719846240250", "2024-07-01T15:04:00.250Z"),
            ("Tue, 1 Jul 2025 15:04:00 +0000", "2025-07-01T15:04:00Z"),
        ] {
            assert_eq!(auto.parse_value(v).as_deref(), Some(want), "{v}");
        }
        assert_eq!(
            auto.parse_value("01/02/2025"),
            None,
            "ambiguous: never guessed"
        );
        // A format chrono cannot use is refused with the map, not per row.
        let e = DateFormats::parse(&["%Y-%Q".to_string()]).unwrap_err();
        assert!(e.contains("\"%Y-%Q\" is not valid"), "{e}");
        let e = with_map(
            &["email", "d"],
            r#"[columns]
"d" = { to = "profile.d", date = ["%d/%m/%Y", "%Q"] }"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("column \"d\""), "{e}");
        assert_eq!(crate::exit::exit_for(&e), crate::exit::Exit::Usage);
    }

    #[test]
    fn a_date_column_none_of_whose_first_cells_parse_is_refused() {
        let m = with_map(
            &["email", "Joined"],
            r#"[columns]
"Joined" = { to = "profile.joined", date = "%m/%d/%Y" }"#,
        )
        .unwrap();
        let mut p = m.date_probe();
        for i in 0..30u64 {
            p.feed(i + 2, &rec(&["a@x.io", ""]));
            p.feed(i + 2, &rec(&["a@x.io", "31/12/2024"]));
        }
        assert!(p.satisfied());
        let e = p.finish().unwrap_err();
        assert!(e.contains("column \"Joined\""), "{e}");
        assert!(e.contains("\"%m/%d/%Y\""), "{e}");
        assert!(e.contains("line 2: \"31/12/2024\""), "{e}");
        // One good cell among the first twenty: the run goes on, and the
        // bad rows are rejected one by one.
        let mut p = m.date_probe();
        p.feed(2, &rec(&["a@x.io", "31/12/2024"]));
        p.feed(3, &rec(&["a@x.io", "12/31/2024"]));
        assert!(!p.satisfied());
        p.finish().unwrap();
        let e = m.apply(&rec(&["a@x.io", "31/12/2024"])).unwrap_err();
        assert!(
            e.contains("column \"Joined\"") && e.contains("%m/%d/%Y"),
            "{e}"
        );
    }

    #[test]
    fn lists_become_clean_comma_separated_strings() {
        assert_eq!(list_items(r#""beta","vip""#), ["beta", "vip"]);
        assert_eq!(list_items("beta; vip ;;beta"), ["beta", "vip"]);
        assert_eq!(list_items(r#""a, with comma",b"#), ["a, with comma", "b"]);
        assert!(list_items(" ; ").is_empty());
        let m = with_map(
            &["email", "TAGS"],
            r#"[columns]
"TAGS" = { to = "profile.tags", list = true }"#,
        )
        .unwrap();
        assert_eq!(
            row(&m, &["a@x.io", r#""beta","vip""#]).input.profile["tags"],
            "beta,vip"
        );
    }

    #[test]
    fn two_columns_writing_one_field_are_refused_unless_one_is_ignored() {
        let e = Mapping::build(
            &h(&["email", "first_name", "First Name"]),
            None,
            EmptyCells::Keep,
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("\"first_name\" and \"First Name\" both map to first_name"),
            "{msg}"
        );
        assert_eq!(crate::exit::exit_for(&e), crate::exit::Exit::Usage);
        // A full name split into first and last collides with either.
        let e = with_map(
            &["email", "Name", "last_name"],
            "[columns]\n\"Name\" = \"split_name\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("both map to last_name"), "{e}");
        with_map(
            &["email", "first_name", "First Name"],
            "[columns]\n\"First Name\" = \"ignore\"\n",
        )
        .unwrap();
    }

    #[test]
    fn a_map_overrides_a_presets_entries() {
        let preset = parse_map_file(
            r#"
default_status = "applied"
skip_if = { is_spam = "true" }
[columns]
"name" = "split_name"
"absent" = "custom_var1"
[constants]
"profile.imported_from" = "x"
"#,
            "(preset)",
        )
        .unwrap();
        let map = parse_map_file(
            r#"
default_status = "imported"
skip_if = { is_spam = [] }
[columns]
"Name" = "profile.full"
[constants]
"profile.imported_from" = "y"
"#,
            "(map)",
        )
        .unwrap();
        let layers = [
            Layer {
                file: preset,
                origin: "preset".into(),
                optional_columns: true,
            },
            Layer {
                file: map,
                origin: "map".into(),
                optional_columns: false,
            },
        ];
        let m = Mapping::from_layers(
            &h(&["email", "name", "is_spam"]),
            &layers,
            &MapSource::default(),
        )
        .unwrap();
        assert_eq!(m.default_status.as_deref(), Some("imported"));
        assert!(m.rules.is_empty(), "an empty list drops the preset's rule");
        let r = row(&m, &["a@x.io", "Ada Lovelace", "true"]);
        assert_eq!(r.input.profile["full"], "Ada Lovelace");
        assert_eq!(r.input.profile["imported_from"], "y");
        assert!(!r.input.profile.contains_key("first_name"));
    }

    #[test]
    fn map_file_errors_name_the_place() {
        let e = parse_map_file(
            "[columns]\n\"a\" = { to = \"email\", lst = true }\n",
            "m.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("m.toml") && e.contains("lst") && e.contains("line 2"),
            "{e}"
        );
    }

    #[test]
    fn diffs() {
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
