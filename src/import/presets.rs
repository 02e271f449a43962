//! Presets: the mapping files a careful person would write for the exports
//! of other waitlist tools, compiled in (`--preset NAME`, `prefsync preset
//! show NAME`), and the recognition of a source from its header row
//! (`--preset auto`).
//!
//! Guarantees, each tested: every preset parses and builds against its own
//! sample; no preset can produce a status that emails people; `auto` picks
//! a preset only when its recognising headers outnumber every other
//! preset's, and otherwise refuses with the candidates.

use crate::import::mapping::{MapFile, parse_map_file};

/// A compiled-in mapping file.
#[derive(Debug)]
pub struct Preset {
    pub name: &'static str,
    /// One line for `prefsync preset list`.
    pub summary: &'static str,
    /// The mapping file, as `prefsync preset show` prints it.
    pub toml: &'static str,
}

pub const MAILCHIMP: &str = "mailchimp";

pub const PRESETS: &[Preset] = &[
    Preset {
        name: MAILCHIMP,
        summary: "Mailchimp audience export (subscribed / unsubscribed / cleaned files)",
        toml: include_str!("presets/mailchimp.toml"),
    },
    Preset {
        name: "getwaitlist",
        summary: "GetWaitlist signups export",
        toml: include_str!("presets/getwaitlist.toml"),
    },
    Preset {
        name: "viral-loops",
        summary: "Viral Loops participants export",
        toml: include_str!("presets/viral-loops.toml"),
    },
    Preset {
        name: "kickofflabs",
        summary: "KickoffLabs leads export",
        toml: include_str!("presets/kickofflabs.toml"),
    },
    Preset {
        name: "referralhero",
        summary: "ReferralHero subscribers export (day-first dates)",
        toml: include_str!("presets/referralhero.toml"),
    },
    Preset {
        name: "launchlist",
        summary: "LaunchList submissions export",
        toml: include_str!("presets/launchlist.toml"),
    },
];

/// The fewest recognising headers `auto` accepts: one header (`email`,
/// `name`) is in every export and tells nothing.
pub const AUTO_MIN_MATCHES: usize = 2;

pub fn names() -> Vec<&'static str> {
    PRESETS.iter().map(|p| p.name).collect()
}

pub fn find(name: &str) -> Option<&'static Preset> {
    let name = name.trim();
    PRESETS.iter().find(|p| p.name.eq_ignore_ascii_case(name))
}

/// A preset's mapping file. Presets are tested to parse: a failure here is
/// a defect of this build, not of the user's input.
pub fn parse(p: &Preset) -> MapFile {
    parse_map_file(p.toml, &format!("(preset {})", p.name))
        .unwrap_or_else(|e| panic!("the compiled-in preset {} does not parse: {e:#}", p.name))
}

/// What `auto` found.
#[derive(Debug)]
pub struct Detection {
    pub preset: &'static Preset,
    /// The recognising headers found, as the file spells them.
    pub matched: Vec<String>,
}

/// Recognises the source from the header row.
pub fn detect(headers: &[String]) -> Result<Detection, String> {
    let norm = |s: &str| s.trim().to_lowercase();
    let mut scored: Vec<Detection> = PRESETS
        .iter()
        .map(|p| {
            let wanted = parse(p).detect.map(|d| d.headers).unwrap_or_default();
            let matched = headers
                .iter()
                .filter(|h| wanted.iter().any(|w| norm(w) == norm(h)))
                .cloned()
                .collect();
            Detection { preset: p, matched }
        })
        .filter(|d| d.matched.len() >= AUTO_MIN_MATCHES)
        .collect();
    // Stable: among equals, the order of PRESETS (ties are refused anyway).
    scored.sort_by_key(|d| std::cmp::Reverse(d.matched.len()));
    let describe = |d: &Detection| format!("{} ({})", d.preset.name, d.matched.join(", "));
    match scored.as_slice() {
        [] => Err(format!(
            "--preset auto recognises no source in these headers: {}; name one with --preset ({})",
            headers.join(", "),
            names().join(", ")
        )),
        [best, second, ..] if second.matched.len() == best.matched.len() => {
            let tied: Vec<String> = scored
                .iter()
                .filter(|d| d.matched.len() == best.matched.len())
                .map(describe)
                .collect();
            Err(format!(
                "--preset auto cannot tell the source: these fit equally: {}; name one with --preset",
                tied.join("; ")
            ))
        }
        _ => Ok(scored.remove(0)),
    }
}

/// Mailchimp's audience export is three files with the same columns and no
/// status column; which one a file is decides whether its people are
/// imported or kept out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum MailchimpList {
    Subscribed,
    Unsubscribed,
    Cleaned,
}

impl std::str::FromStr for MailchimpList {
    type Err = String;
    fn from_str(s: &str) -> Result<MailchimpList, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "subscribed" => Ok(MailchimpList::Subscribed),
            "unsubscribed" => Ok(MailchimpList::Unsubscribed),
            "cleaned" => Ok(MailchimpList::Cleaned),
            _ => Err(format!(
                "unknown Mailchimp list {s:?}; expected subscribed, unsubscribed or cleaned"
            )),
        }
    }
}

impl MailchimpList {
    pub fn name(self) -> &'static str {
        match self {
            MailchimpList::Subscribed => "subscribed",
            MailchimpList::Unsubscribed => "unsubscribed",
            MailchimpList::Cleaned => "cleaned",
        }
    }

    /// Why every row of this list would be suppressed, if it would.
    pub fn suppression_reason(self) -> Option<String> {
        let (who, kind) = match self {
            MailchimpList::Subscribed => return None,
            MailchimpList::Unsubscribed => ("unsubscribed in Mailchimp", "Unsubscribe"),
            MailchimpList::Cleaned => ("cleaned (bounced) in Mailchimp", "Manual"),
        };
        Some(format!(
            "would be suppressed ({kind}): {who}; never imported; --suppress sends it as a suppression"
        ))
    }

    /// The suppression reason its rows become with `--suppress`.
    pub fn suppression_kind(self) -> Option<&'static str> {
        match self {
            MailchimpList::Subscribed => None,
            MailchimpList::Unsubscribed => Some("Unsubscribe"),
            MailchimpList::Cleaned => Some("Manual"),
        }
    }

    /// The list a file name says, from Mailchimp's own names
    /// (`subscribed_members_export_1a2b3c.csv`, `unsubscribed_...`,
    /// `cleaned_...`).
    fn from_file_name(name: &str) -> Option<MailchimpList> {
        let base = name
            .rsplit(['/', '\\'])
            .next()
            .unwrap_or(name)
            .to_lowercase();
        // `unsubscribed` contains `subscribed`: look for it first.
        if base.starts_with("unsubscribed") {
            Some(MailchimpList::Unsubscribed)
        } else if base.starts_with("cleaned") {
            Some(MailchimpList::Cleaned)
        } else if base.starts_with("subscribed") {
            Some(MailchimpList::Subscribed)
        } else {
            None
        }
    }

    /// The list the columns say: only the unsubscribed and cleaned files
    /// have `UNSUB_TIME` and `CLEAN_TIME`.
    fn from_headers(headers: &[String]) -> Option<MailchimpList> {
        let has = |n: &str| headers.iter().any(|h| h.trim().eq_ignore_ascii_case(n));
        if has("UNSUB_TIME") {
            Some(MailchimpList::Unsubscribed)
        } else if has("CLEAN_TIME") {
            Some(MailchimpList::Cleaned)
        } else {
            None
        }
    }
}

/// Which Mailchimp list the input is, and how that was decided: the flag,
/// else the file name; the columns confirm or contradict. Never guessed:
/// with neither a flag nor a telling name, the run is refused.
pub fn mailchimp_list(
    file_name: Option<&str>,
    headers: &[String],
    flag: Option<MailchimpList>,
) -> Result<(MailchimpList, String), String> {
    let by_name = file_name.and_then(MailchimpList::from_file_name);
    let by_headers = MailchimpList::from_headers(headers);
    let (list, why) = match (flag, by_name) {
        (Some(f), Some(n)) if f != n => {
            return Err(format!(
                "--mailchimp-list {} contradicts the file name {:?}, which Mailchimp gives its {} list; check which file this is",
                f.name(),
                file_name.unwrap_or_default(),
                n.name()
            ));
        }
        (Some(f), _) => (f, "--mailchimp-list".to_string()),
        (None, Some(n)) => (
            n,
            format!("the file name {:?}", file_name.unwrap_or_default()),
        ),
        (None, None) => {
            return Err(format!(
                "cannot tell which Mailchimp list {} is (subscribed, unsubscribed or cleaned: \
                 Mailchimp's files have no status column); keep Mailchimp's file name \
                 (subscribed_members_export_*.csv, ...) or add --mailchimp-list subscribed|unsubscribed|cleaned",
                file_name.unwrap_or("the input")
            ));
        }
    };
    match by_headers {
        Some(h) if h != list => Err(format!(
            "the file has the columns of Mailchimp's {} list, but {why} says {}; check which file this is",
            h.name(),
            list.name()
        )),
        None if list != MailchimpList::Subscribed => Err(format!(
            "{why} says Mailchimp's {} list, but the file lacks its {} column; check which file this is",
            list.name(),
            if list == MailchimpList::Unsubscribed {
                "UNSUB_TIME"
            } else {
                "CLEAN_TIME"
            }
        )),
        _ => Ok((list, format!("from {why}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::mapping::{EMAILING_STATUSES, Transform};

    fn h(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// The header row of a preset's sample in `samples/presets/`.
    fn sample_headers(name: &str) -> Vec<String> {
        let text = match name {
            "mailchimp" => {
                include_str!("../../samples/presets/mailchimp/subscribed_members_export_4f2a9c.csv")
            }
            "getwaitlist" => include_str!("../../samples/presets/getwaitlist.csv"),
            "viral-loops" => include_str!("../../samples/presets/viral-loops.csv"),
            "kickofflabs" => include_str!("../../samples/presets/kickofflabs.csv"),
            "referralhero" => include_str!("../../samples/presets/referralhero.csv"),
            "launchlist" => include_str!("../../samples/presets/launchlist.csv"),
            other => panic!("no sample for {other}"),
        };
        let mut r = csv::Reader::from_reader(text.as_bytes());
        r.headers().unwrap().iter().map(str::to_string).collect()
    }

    #[test]
    fn every_preset_parses_recognises_and_never_emails() {
        for p in PRESETS {
            let f = parse(p);
            let d = f.detect.as_ref().expect("a preset has recognising headers");
            assert!(d.headers.len() >= AUTO_MIN_MATCHES, "{}", p.name);
            assert_eq!(f.default_status.as_deref(), Some("applied"), "{}", p.name);
            // Nothing in a preset may set an emailing status: no status
            // constant, no status column, whatever the source says.
            for (k, v) in &f.constants {
                assert!(
                    !(k.eq_ignore_ascii_case("status") || EMAILING_STATUSES.contains(&v.as_str())),
                    "{}: constant {k} = {v}",
                    p.name
                );
            }
            // A source's own status column, whatever it holds, is ignored.
            let mut headers = sample_headers(p.name);
            headers.push("Status".into());
            let m = crate::import::mapping::Mapping::from_source(
                &headers,
                &crate::import::mapping::MapSource {
                    preset: Some(p.name),
                    mailchimp_list: Some(MailchimpList::Subscribed),
                    ..Default::default()
                },
            );
            let m = m.unwrap_or_else(|e| panic!("{}: {e:#}", p.name));
            for c in &m.columns {
                assert_ne!(
                    c.target,
                    crate::import::mapping::Target::Status,
                    "{}: {} sets a status",
                    p.name,
                    c.header
                );
                for t in &c.transforms {
                    if let Transform::Values { map, default } = t {
                        for v in map.iter().map(|(_, v)| v).chain(default.iter()) {
                            assert!(!EMAILING_STATUSES.contains(&v.as_str()), "{}", p.name);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn auto_refuses_a_tie_and_too_little() {
        let e = detect(&h(&[
            "email",
            "amount_referred",
            "referral_token",
            "family_name",
            "fraudulent",
        ]))
        .unwrap_err();
        assert!(e.contains("fit equally"), "{e}");
        assert!(
            e.contains("getwaitlist") && e.contains("kickofflabs"),
            "{e}"
        );
        let e = detect(&h(&["email", "name"])).unwrap_err();
        assert!(e.contains("recognises no source"), "{e}");
        let d = detect(&h(&[
            "Email Address",
            "First Name",
            "MEMBER_RATING",
            "OPTIN_TIME",
        ]))
        .unwrap();
        assert_eq!(d.preset.name, "mailchimp");
        assert_eq!(
            d.matched,
            h(&["Email Address", "MEMBER_RATING", "OPTIN_TIME"])
        );
    }

    #[test]
    fn mailchimp_lists_are_told_never_guessed() {
        let sub = h(&["Email Address", "OPTIN_TIME"]);
        let unsub = h(&["Email Address", "OPTIN_TIME", "UNSUB_TIME"]);
        let ok = |n: Option<&str>, hs: &[String], f| mailchimp_list(n, hs, f).map(|x| x.0);
        assert_eq!(
            ok(Some("dir/subscribed_members_export_9f1.csv"), &sub, None),
            Ok(MailchimpList::Subscribed)
        );
        assert_eq!(
            ok(Some("unsubscribed_members_export_9f1.csv"), &unsub, None),
            Ok(MailchimpList::Unsubscribed)
        );
        assert_eq!(
            ok(
                Some("people.csv"),
                &unsub,
                Some(MailchimpList::Unsubscribed)
            ),
            Ok(MailchimpList::Unsubscribed)
        );
        // No telling name, no flag: refused, even though the columns look
        // like the subscribed file's.
        assert!(
            ok(Some("people.csv"), &sub, None)
                .unwrap_err()
                .contains("--mailchimp-list")
        );
        // A flag or a name that contradicts the columns or each other.
        assert!(ok(Some("people.csv"), &unsub, Some(MailchimpList::Subscribed)).is_err());
        assert!(
            ok(Some("cleaned_x.csv"), &sub, None)
                .unwrap_err()
                .contains("CLEAN_TIME")
        );
        assert!(
            ok(Some("subscribed_x.csv"), &sub, Some(MailchimpList::Cleaned))
                .unwrap_err()
                .contains("contradicts")
        );
        assert!(MailchimpList::Subscribed.suppression_reason().is_none());
        assert!(
            MailchimpList::Cleaned
                .suppression_reason()
                .unwrap()
                .contains("Manual")
        );
    }
}
