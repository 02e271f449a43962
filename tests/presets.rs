//! Presets end to end: each sample in `samples/presets/` imported into the
//! in-process sandbox with its preset, with the expected counts and the
//! expected fields on three named people; `--preset auto` on every sample;
//! and what only a process shows (`preset show`, exit 2 on a bad map).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use prefsync::import::input::Source;
use prefsync::import::presets::{self, MailchimpList};
use prefsync::import::{ImportOptions, ImportSummary, import};
use prefsync::progress::Silent;
use prefsync::sandbox::{Sandbox, SandboxConfig};
use prefsync::stop::Stop;
use serde_json::Value;

struct Fixture {
    dir: tempfile::TempDir,
    sandbox: Sandbox,
}

fn sample(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("samples/presets")
        .join(rel)
}

/// What a sample's import is expected to count.
#[derive(Debug, PartialEq)]
struct Counts {
    created: u64,
    flagged: u64,
    would_suppress: u64,
    rejected: u64,
}

impl Fixture {
    async fn new() -> Fixture {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
            sandbox: common::sandbox(SandboxConfig {
                rate_scale: 0.0,
                ..Default::default()
            })
            .await,
        }
    }

    fn opts(&self, file: &Path, preset: &str) -> ImportOptions {
        let mut o = ImportOptions::new(
            "a9b8c7de",
            Source::File(file.to_path_buf()),
            self.dir.path().join("ck.sqlite"),
        );
        o.preset = Some(preset.to_string());
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

    async fn import(&self, file: &Path, preset: &str) -> ImportSummary {
        self.run(&self.opts(file, preset)).await.unwrap()
    }

    fn user(&self, email: &str) -> Value {
        common::users(&self.sandbox, 1)
            .into_iter()
            .find(|u| u["email"].as_str().unwrap().eq_ignore_ascii_case(email))
            .unwrap_or_else(|| panic!("no user {email}"))
    }

    fn has_user(&self, email: &str) -> bool {
        common::users(&self.sandbox, 1)
            .iter()
            .any(|u| u["email"].as_str().unwrap().eq_ignore_ascii_case(email))
    }

    /// The results file's rows (line, email, action, id, class, message).
    fn results(&self) -> Vec<Vec<String>> {
        let mut r = csv::Reader::from_path(self.dir.path().join("results.csv")).unwrap();
        r.records()
            .map(|x| x.unwrap().iter().map(str::to_string).collect())
            .collect()
    }
}

fn counts(s: &ImportSummary) -> Counts {
    Counts {
        created: s.created,
        flagged: s.skipped_flagged,
        would_suppress: s.would_suppress,
        rejected: s.rejected,
    }
}

/// Every user a preset creates is `applied`, and says where it came from.
fn assert_waitlisted(u: &Value, from: &str) {
    assert_eq!(u["status"], "applied", "{u}");
    assert_eq!(u["profile"]["imported_from"], from, "{u}");
}

#[tokio::test]
async fn mailchimp_subscribed_imported_unsubscribed_and_cleaned_kept_out() {
    let f = Fixture::new().await;
    let s = f
        .import(
            &sample("mailchimp/subscribed_members_export_4f2a9c.csv"),
            "mailchimp",
        )
        .await;
    assert_eq!(
        counts(&s),
        Counts {
            created: 55,
            flagged: 0,
            would_suppress: 0,
            rejected: 0
        }
    );
    let zoe = f.user("zoe.muller@example.com");
    assert_waitlisted(&zoe, "mailchimp");
    assert_eq!(zoe["profile"]["first_name"], "Zoë");
    assert_eq!(zoe["profile"]["last_name"], "Müller");
    assert_eq!(zoe["profile"]["tags"], "beta,vip");
    assert_eq!(zoe["profile"]["signed_up_at"], "2024-11-03T09:15:00Z");
    assert_eq!(zoe["profile"]["country"], "DE");
    assert_eq!(zoe["profile"]["source_id"], "100000");
    let soren = f.user("soren.k@example.dk");
    assert_eq!(soren["profile"]["first_name"], "Søren");
    assert_eq!(soren["profile"]["signed_up_at"], "2024-11-03T16:28:00Z");
    assert!(
        soren["profile"].get("tags").is_none(),
        "an empty list cell sets nothing"
    );
    assert!(soren["profile"].get("confirmed_at").is_none());
    let priya = f.user("priya.obrien@example.com");
    assert_eq!(priya["profile"]["last_name"], "O'Brien");
    assert_eq!(priya["profile"]["tags"], "newsletter,beta");
    assert_eq!(
        priya["profile"]["address"],
        "12 Main St  Springfield IL 62701 US"
    );

    // The unsubscribed file, told by its name: nobody imported.
    let s = f
        .import(
            &sample("mailchimp/unsubscribed_members_export_4f2a9c.csv"),
            "mailchimp",
        )
        .await;
    assert_eq!(
        counts(&s),
        Counts {
            created: 0,
            flagged: 0,
            would_suppress: 12,
            rejected: 0
        }
    );
    assert!(!f.has_user("left.early@example.com"));
    assert!(s.to_string().contains("would be suppressed 12"), "{s}");
    assert!(
        s.skip_reasons[0].0.contains("Unsubscribe") && s.skip_reasons[0].1 == 12,
        "{:?}",
        s.skip_reasons
    );
    let results = f.results();
    assert_eq!(results.len(), 12);
    assert!(
        results
            .iter()
            .all(|r| r[2] == "skipped" && r[4] == "would_suppress")
    );
    assert_eq!(results[0][1], "left.early@example.com");

    let s = f
        .import(
            &sample("mailchimp/cleaned_members_export_4f2a9c.csv"),
            "mailchimp",
        )
        .await;
    assert_eq!((s.created, s.would_suppress), (0, 6));
    assert!(
        s.skip_reasons[0].0.contains("Manual"),
        "{:?}",
        s.skip_reasons
    );

    // The same file under a name that says nothing: refused, never guessed;
    // the flag settles it.
    let copy = f.dir.path().join("audience.csv");
    std::fs::copy(
        sample("mailchimp/subscribed_members_export_4f2a9c.csv"),
        &copy,
    )
    .unwrap();
    let e = f.run(&f.opts(&copy, "mailchimp")).await.unwrap_err();
    assert!(format!("{e:#}").contains("--mailchimp-list"), "{e:#}");
    assert_eq!(prefsync::exit::exit_for(&e), prefsync::Exit::Usage);
    let mut o = f.opts(&copy, "mailchimp");
    o.mailchimp_list = Some(MailchimpList::Unsubscribed);
    let e = f.run(&o).await.unwrap_err();
    assert!(format!("{e:#}").contains("UNSUB_TIME"), "{e:#}");
}

#[tokio::test]
async fn getwaitlist_keeps_referrals_and_signup_times() {
    let f = Fixture::new().await;
    let s = f.import(&sample("getwaitlist.csv"), "getwaitlist").await;
    assert_eq!(
        counts(&s),
        Counts {
            created: 53,
            flagged: 0,
            would_suppress: 0,
            rejected: 2
        }
    );
    assert_eq!(s.unmapped_columns, ["verified", "What's your role?"]);
    let ada = f.user("ada.lovelace@example.com");
    assert_waitlisted(&ada, "getwaitlist");
    assert_eq!(
        ada["profile"]["signed_up_at"],
        "2024-03-02T14:22:10.123456Z"
    );
    assert_eq!(ada["profile"]["referral_count"], "7");
    assert_eq!(ada["profile"]["source_referral_code"], "a1d4l0v3la");
    assert_eq!(ada["profile"]["source_priority"], "0");
    let hiroshi = f.user("hiroshi.tanaka@example.jp");
    assert_eq!(hiroshi["profile"]["last_name"], "田中");
    assert_eq!(hiroshi["profile"]["source_referrer"], "a1d4l0v3la");
    // +09:00 converted to UTC.
    assert_eq!(hiroshi["profile"]["signed_up_at"], "2024-03-03T23:00:00Z");
    let renee = f.user("renee.dubois@example.fr");
    assert_eq!(renee["profile"]["first_name"], "Renée");
    assert!(renee["profile"].get("last_name").is_none());
    let results = f.results();
    let rejected: Vec<_> = results.iter().filter(|r| r[2] == "rejected").collect();
    assert_eq!(rejected.len(), 2);
    assert!(rejected[0][5].contains("domain"), "{:?}", rejected[0]);
    assert!(
        rejected[1][5].contains("already on line 2"),
        "{:?}",
        rejected[1]
    );
}

#[tokio::test]
async fn viral_loops_headers_in_any_case_and_epoch_milliseconds() {
    let f = Fixture::new().await;
    let s = f.import(&sample("viral-loops.csv"), "viral-loops").await;
    assert_eq!(
        counts(&s),
        Counts {
            created: 51,
            flagged: 0,
            would_suppress: 0,
            rejected: 1
        }
    );
    assert_eq!(s.unmapped_columns, ["Company"]);
    let grace = f.user("grace.hopper@example.com");
    assert_waitlisted(&grace, "viral-loops");
    assert_eq!(grace["profile"]["first_name"], "Grace");
    assert_eq!(grace["profile"]["referral_count"], "12");
    assert_eq!(grace["profile"]["signed_up_at"], "2024-11-03T09:15:00Z");
    let mei = f.user("Mei.Chen@Example.COM");
    assert_eq!(mei["profile"]["last_name"], "Chen");
    let graces_id = grace["profile"]["source_id"].as_str().unwrap();
    assert_eq!(mei["profile"]["source_referrer"], graces_id);
    let aoife = f.user("aoife.osullivan@example.ie");
    assert_eq!(aoife["profile"]["last_name"], "Ó Súilleabháin");
    assert!(aoife["profile"].get("referral_count").is_none());
}

#[tokio::test]
async fn kickofflabs_skips_fraud_and_keeps_opted_out_people_out() {
    let f = Fixture::new().await;
    let s = f.import(&sample("kickofflabs.csv"), "kickofflabs").await;
    assert_eq!(
        counts(&s),
        Counts {
            created: 50,
            flagged: 4,
            would_suppress: 5,
            rejected: 1
        }
    );
    let text = s.to_string();
    assert!(
        text.contains("skipped as flagged 4, would be suppressed 5"),
        "{text}"
    );
    let amara = f.user("amara.okafor@example.ng");
    assert_waitlisted(&amara, "kickofflabs");
    assert_eq!(amara["profile"]["signed_up_at"], "2025-07-15T18:29:23Z");
    assert_eq!(amara["profile"]["tags"], "beta,vip");
    assert_eq!(amara["profile"]["source_referral_code"], "36N38P");
    assert_eq!(amara["profile"]["referral_count"], "4");
    assert_eq!(amara["profile"]["telephone"], "+234 803 000 0000");
    let chidi = f.user("chidi.anagonye@example.com");
    assert_eq!(chidi["profile"]["source_referrer"], "107646000");
    assert_eq!(chidi["profile"]["last_name"], "Anagonye");
    let bjorn = f.user("bjorn.stale@example.se");
    assert_eq!(bjorn["profile"]["first_name"], "Björn");
    assert_eq!(bjorn["profile"]["tags"], "vip,beta");
    // The skipped rows are in the results, with their reasons, and nobody
    // flagged or opted out is a user.
    let results = f.results();
    let skipped: Vec<_> = results.iter().filter(|r| r[2] == "skipped").collect();
    assert_eq!(skipped.len(), 9);
    for r in &skipped {
        assert!(!f.has_user(&r[1]), "{r:?}");
        match r[4].as_str() {
            "flagged" => assert!(r[5].contains("fraudulent is \"true\""), "{r:?}"),
            "would_suppress" => assert!(r[5].contains("opted_out"), "{r:?}"),
            other => panic!("class {other}"),
        }
    }

    // --include-flagged imports the fraudulent, never the opted out.
    let f = Fixture::new().await;
    let mut o = f.opts(&sample("kickofflabs.csv"), "kickofflabs");
    o.include_flagged = true;
    let s = f.run(&o).await.unwrap();
    assert_eq!(
        counts(&s),
        Counts {
            created: 54,
            flagged: 0,
            would_suppress: 5,
            rejected: 1
        }
    );
    // --status overrides the preset's `applied`.
    let f = Fixture::new().await;
    let mut o = f.opts(&sample("kickofflabs.csv"), "kickofflabs");
    o.default_status = Some("imported".into());
    f.run(&o).await.unwrap();
    assert_eq!(f.user("amara.okafor@example.ng")["status"], "imported");
}

#[tokio::test]
async fn referralhero_reads_dates_day_first() {
    let f = Fixture::new().await;
    let s = f.import(&sample("referralhero.csv"), "referralhero").await;
    assert_eq!(
        counts(&s),
        Counts {
            created: 55,
            flagged: 0,
            would_suppress: 0,
            rejected: 1
        }
    );
    let sofia = f.user("sofia.garcia@example.es");
    assert_waitlisted(&sofia, "referralhero");
    assert_eq!(sofia["profile"]["first_name"], "Sofía García");
    assert_eq!(sofia["profile"]["last_name"], "López");
    assert_eq!(sofia["profile"]["signed_up_at"], "2025-03-25T18:40:00Z");
    assert_eq!(sofia["profile"]["referral_count"], "3");
    let cher = f.user("cher@example.com");
    assert_eq!(cher["profile"]["first_name"], "Cher");
    assert!(cher["profile"].get("last_name").is_none());
    // 3 April, never 4 March.
    assert_eq!(cher["profile"]["signed_up_at"], "2025-04-03");
    assert_eq!(
        cher["profile"]["source_referrer"],
        "sofia.garcia@example.es"
    );
    let elif = f.user("elif.yilmaz@example.tr");
    assert_eq!(elif["profile"]["last_name"], "Yılmaz");
    assert_eq!(elif["profile"]["signed_up_at"], "2025-01-13T07:05:00Z");
    let results = f.results();
    let rejected: Vec<_> = results.iter().filter(|r| r[2] == "rejected").collect();
    assert_eq!(rejected.len(), 1);
    assert!(
        rejected[0][5].contains("\"31/02/2025\""),
        "{:?}",
        rejected[0]
    );
}

#[tokio::test]
async fn launchlist_skips_spam_and_reads_month_names() {
    let f = Fixture::new().await;
    let s = f.import(&sample("launchlist.csv"), "launchlist").await;
    assert_eq!(
        counts(&s),
        Counts {
            created: 51,
            flagged: 6,
            would_suppress: 0,
            rejected: 1
        }
    );
    let kai = f.user("kai.nakamura@example.jp");
    assert_waitlisted(&kai, "launchlist");
    assert_eq!(kai["profile"]["first_name"], "Kai");
    assert_eq!(kai["profile"]["last_name"], "Nakamura");
    assert_eq!(kai["profile"]["signed_up_at"], "2025-07-01T15:04:00Z");
    assert_eq!(kai["profile"]["source_referral_code"], "KAI2025");
    assert_eq!(kai["profile"]["source_position"], "1");
    let ngozi = f.user("ngozi@example.ng");
    assert_eq!(ngozi["profile"]["last_name"], "Chukwu-Eze");
    assert_eq!(ngozi["profile"]["source_referrer"], "KAI2025");
    let lukasz = f.user("lukasz@example.pl");
    assert_eq!(lukasz["profile"]["first_name"], "Łukasz");
    assert!(lukasz["profile"].get("last_name").is_none());
    // A spam row with a broken email is skipped, not rejected.
    let results = f.results();
    let spam = results.iter().find(|r| r[0] == "52").unwrap();
    assert_eq!((spam[2].as_str(), spam[4].as_str()), ("skipped", "flagged"));
}

/// The preset each sample's header row must be recognised as.
const SAMPLES: &[(&str, &str)] = &[
    (
        "mailchimp/subscribed_members_export_4f2a9c.csv",
        "mailchimp",
    ),
    (
        "mailchimp/unsubscribed_members_export_4f2a9c.csv",
        "mailchimp",
    ),
    ("mailchimp/cleaned_members_export_4f2a9c.csv", "mailchimp"),
    ("getwaitlist.csv", "getwaitlist"),
    ("viral-loops.csv", "viral-loops"),
    ("kickofflabs.csv", "kickofflabs"),
    ("referralhero.csv", "referralhero"),
    ("launchlist.csv", "launchlist"),
];

fn headers(rel: &str) -> Vec<String> {
    let mut r = csv::Reader::from_path(sample(rel)).unwrap();
    r.headers().unwrap().iter().map(str::to_string).collect()
}

#[test]
fn auto_recognises_every_sample_and_refuses_an_ambiguous_header() {
    for (rel, want) in SAMPLES {
        let d = presets::detect(&headers(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert_eq!(d.preset.name, *want, "{rel}: matched {:?}", d.matched);
    }
    let ambiguous: Vec<String> = [
        "email",
        "amount_referred",
        "referral_token",
        "family_name",
        "fraudulent",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let e = presets::detect(&ambiguous).unwrap_err();
    assert!(
        e.contains("getwaitlist (amount_referred, referral_token)"),
        "{e}"
    );
    assert!(e.contains("kickofflabs (family_name, fraudulent)"), "{e}");
}

#[tokio::test]
async fn auto_imports_with_the_preset_it_picked_and_refuses_a_tie_before_any_call() {
    let f = Fixture::new().await;
    let s = f.import(&sample("launchlist.csv"), "auto").await;
    assert_eq!(s.preset.as_deref(), Some("launchlist"));
    assert_eq!((s.created, s.skipped_flagged), (51, 6));
    let tie = f.dir.path().join("tie.csv");
    std::fs::write(
        &tie,
        "email,amount_referred,referral_token,family_name,fraudulent\na@x.io,1,t,L,false\n",
    )
    .unwrap();
    let e = f.run(&f.opts(&tie, "auto")).await.unwrap_err();
    assert!(format!("{e:#}").contains("fit equally"), "{e:#}");
    assert_eq!(prefsync::exit::exit_for(&e), prefsync::Exit::Usage);
    assert!(!f.has_user("a@x.io"));
}

#[tokio::test]
async fn a_map_overrides_the_preset_and_a_wrong_date_format_stops_before_any_call() {
    let f = Fixture::new().await;
    // Read ReferralHero's dates month first, as a careless map would: none
    // of the first twenty parses (days above 12), so nothing is sent.
    let map = f.dir.path().join("map.toml");
    std::fs::write(
        &map,
        "[columns]\n\"date\" = { to = \"profile.signed_up_at\", date = \"%m/%d/%Y %H:%M\" }\n\"extra field\" = \"custom_var1\"\n",
    )
    .unwrap();
    let mut bad = tempfile::NamedTempFile::new_in(f.dir.path()).unwrap();
    use std::io::Write;
    writeln!(bad, "email,name,date,extra field").unwrap();
    for i in 0..25 {
        writeln!(bad, "p{i}@x.io,P {i},2{}/03/2025 10:00,x", i % 9).unwrap();
    }
    let mut o = f.opts(bad.path(), "referralhero");
    o.map = Some(map.clone());
    let e = f.run(&o).await.unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("column \"date\"") && msg.contains("%m/%d/%Y %H:%M") && msg.contains("line 2"),
        "{msg}"
    );
    assert_eq!(prefsync::exit::exit_for(&e), prefsync::Exit::Usage);
    assert!(!f.has_user("p0@x.io"));
    // The map's other entry overrides the preset's: extra field lands in
    // custom_var1 instead of profile.extra_field.
    std::fs::write(&map, "[columns]\n\"extra field\" = \"custom_var1\"\n").unwrap();
    let mut o = f.opts(bad.path(), "referralhero");
    o.map = Some(map);
    o.fresh = true;
    let s = f.run(&o).await.unwrap();
    assert_eq!(s.created, 25);
    let p = f.user("p3@x.io");
    assert_eq!(p["profile"]["custom_var1"], "x");
    assert!(p["profile"].get("extra_field").is_none());
    assert_eq!(p["profile"]["signed_up_at"], "2025-03-23T10:00:00Z");
}

#[test]
fn preset_show_prints_the_file_a_map_can_be_made_of() {
    let out = assert_cmd::Command::cargo_bin("prefsync")
        .unwrap()
        .args(["preset", "show", "kickofflabs"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        presets::find("kickofflabs").unwrap().toml
    );
    let out = assert_cmd::Command::cargo_bin("prefsync")
        .unwrap()
        .args(["preset", "list"])
        .output()
        .unwrap();
    let list = String::from_utf8(out.stdout).unwrap();
    for p in presets::names() {
        assert!(list.contains(p), "{list}");
    }
    let out = assert_cmd::Command::cargo_bin("prefsync")
        .unwrap()
        .args(["preset", "show", "hubspot"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_bad_date_format_in_the_map_exits_2_before_any_call() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    std::fs::write(&input, "email,joined\na@x.io,2025-01-01\n").unwrap();
    let map = dir.path().join("map.toml");
    std::fs::write(
        &map,
        "[columns]\n\"joined\" = { to = \"profile.joined\", date = \"%Y-%Q\" }\n",
    )
    .unwrap();
    // Nothing listens on port 9: a call would fail differently (exit 1).
    let out = assert_cmd::Command::cargo_bin("prefsync")
        .unwrap()
        .env("PREFINERY_API_KEY", "k")
        .env("PREFINERY_BASE_URL", "http://127.0.0.1:9/api/v2")
        .current_dir(dir.path())
        .args(["import", "testers", "--beta", "1", "--file"])
        .arg(&input)
        .arg("--map")
        .arg(&map)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("\"%Y-%Q\" is not valid"), "{stderr}");
    assert!(stderr.contains("map.toml"), "{stderr}");
}

/// Every preset sends creates oldest signup first, one after another:
/// the sandbox numbers users as it creates them, so their ids follow the
/// signup times (people without one last), whatever the file's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_preset_creates_oldest_signup_first() {
    for (file, preset) in [
        ("getwaitlist.csv", "getwaitlist"),
        ("viral-loops.csv", "viral-loops"),
        ("kickofflabs.csv", "kickofflabs"),
        ("referralhero.csv", "referralhero"),
        ("launchlist.csv", "launchlist"),
        (
            "mailchimp/subscribed_members_export_4f2a9c.csv",
            "mailchimp",
        ),
    ] {
        let f = Fixture::new().await;
        let s = f.import(&sample(file), preset).await;
        assert!(s.created > 40, "{preset}: {s:?}");
        assert_eq!(s.order, "strict", "{preset}");
        let mut users = common::users(&f.sandbox, 1);
        users.sort_by_key(|u| u["id"].as_u64().unwrap());
        let key = |u: &Value| {
            u["profile"]["signed_up_at"]
                .as_str()
                .and_then(prefsync::import::mapping::date_order_key)
                .unwrap_or(i64::MAX)
        };
        for w in users.windows(2) {
            assert!(
                key(&w[0]) <= key(&w[1]),
                "{preset}: {} ({}) created before {} ({})",
                w[0]["email"],
                w[0]["profile"]["signed_up_at"],
                w[1]["email"],
                w[1]["profile"]["signed_up_at"]
            );
        }
    }
}

/// `--link-referrers` on the GetWaitlist sample: each referred_by token
/// found among the file's referral tokens is sent as the referrer's
/// Prefinery id (the referrer signed up earlier, so was created first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn getwaitlist_links_referrers_with_the_flag() {
    let f = Fixture::new().await;
    let mut o = f.opts(&sample("getwaitlist.csv"), "getwaitlist");
    o.link_referrers = true;
    let s = f.run(&o).await.unwrap();
    assert_eq!(s.created, 53);
    // 14 rows name a referrer: 12 are rows of the file, 2 name a token
    // no row has.
    assert_eq!(
        (s.referrers_linked, s.referrers_not_linked),
        (Some(12), Some(2))
    );
    let ada = f.user("ada.lovelace@example.com");
    let hiroshi = f.user("hiroshi.tanaka@example.jp");
    assert_eq!(
        hiroshi["referred_by"],
        Value::String(ada["id"].as_u64().unwrap().to_string())
    );
    assert!(f.user("olafur.304@example.com")["referred_by"].is_null());
}

/// `--suppress`: Mailchimp's unsubscribed people become `Unsubscribe`
/// suppressions (one who is a user of the project is unsubscribed), its
/// cleaned people `Manual` ones, KickoffLabs' opted-out rows
/// `Unsubscribe`; nobody who left becomes a user, and a second run finds
/// them suppressed already. Without the flag they are only counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suppress_sends_the_people_who_left_as_suppressions() {
    let f = Fixture::new().await;
    let suppressions = || -> Vec<Value> {
        f.sandbox.app.with_world(|w| {
            w.project(1)
                .suppressions
                .values()
                .map(|s| serde_json::to_value(s).unwrap())
                .collect()
        })
    };
    // One of the unsubscribed people is a user of the project already.
    let existing = f.dir.path().join("existing.csv");
    std::fs::write(&existing, "email\nleft.early@example.com\n").unwrap();
    let mut o = f.opts(&existing, "mailchimp");
    o.preset = None;
    o.checkpoint = f.dir.path().join("existing.sqlite");
    f.run(&o).await.unwrap();

    let unsub = sample("mailchimp/unsubscribed_members_export_4f2a9c.csv");
    let mut o = f.opts(&unsub, "mailchimp");
    o.checkpoint = f.dir.path().join("plain.sqlite");
    o.dry_run = true;
    let s = f.run(&o).await.unwrap();
    assert_eq!((s.would_suppress, s.suppressed), (12, 0), "{s:?}");

    let mut o = f.opts(&unsub, "mailchimp");
    o.suppress = true;
    o.checkpoint = f.dir.path().join("unsub.sqlite");
    let s = f.run(&o).await.unwrap();
    assert_eq!(
        (s.created, s.would_suppress, s.suppressed, s.unsubscribed),
        (0, 0, 11, 1),
        "{s:?}"
    );
    let all = suppressions();
    assert_eq!(all.len(), 12);
    assert!(all.iter().all(|x| x["reason"] == "Unsubscribe"), "{all:?}");
    let left = f.user("left.early@example.com");
    assert!(!left["unsubscribed_at"].is_null(), "{left}");
    assert_eq!(
        common::users(&f.sandbox, 1).len(),
        1,
        "nobody who left was created"
    );

    let mut o = f.opts(
        &sample("mailchimp/cleaned_members_export_4f2a9c.csv"),
        "mailchimp",
    );
    o.suppress = true;
    o.checkpoint = f.dir.path().join("cleaned.sqlite");
    let s = f.run(&o).await.unwrap();
    assert_eq!(s.suppressed, 6, "{s:?}");
    let manual = suppressions()
        .into_iter()
        .filter(|x| x["reason"] == "Manual")
        .count();
    assert_eq!(manual, 6);

    // KickoffLabs: the opted-out rows, beside the people imported.
    let mut o = f.opts(&sample("kickofflabs.csv"), "kickofflabs");
    o.suppress = true;
    o.checkpoint = f.dir.path().join("kol.sqlite");
    let s = f.run(&o).await.unwrap();
    assert_eq!(
        (s.created, s.skipped_flagged, s.would_suppress, s.suppressed),
        (50, 4, 0, 5),
        "{s:?}"
    );
    // The same file again (--fresh): already suppressed, unchanged.
    o.fresh = true;
    let s = f.run(&o).await.unwrap();
    assert_eq!((s.suppressed, s.unsubscribed), (0, 0), "{s:?}");
}
