//! The sandbox follows the reference: addressing, auth, permissions, rate
//! limits, faults, the outbox. And the client's limiter keeps under its
//! limits while using at least 97% of them.

mod common;

use std::sync::atomic::Ordering;

use futures::TryStreamExt;
use prefsync::api::{ApiError, Op, Tester, TesterInput};
use prefsync::sandbox::{Keys, Permission, SandboxConfig};
use serde_json::{Value, json};

async fn raw(base: &str, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new().request(method, format!("{base}/{path}"))
}

#[tokio::test]
async fn projects_by_numeric_id_and_uid_with_and_without_json() {
    let s = common::sandbox(SandboxConfig {
        seed_testers: 30,
        ..Default::default()
    })
    .await;
    let c = common::client(&s);
    let by_id = c.beta("1").await.unwrap();
    let by_uid = c.beta("a9b8c7de").await.unwrap();
    assert_eq!(by_id, by_uid);
    assert_eq!(by_id.testers_count, Some(30));
    let r = raw(
        &s.base_url(),
        reqwest::Method::GET,
        "betas/a9b8c7de/testers",
    )
    .await
    .basic_auth(common::KEY, Some(""))
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let pag: Value = serde_json::from_str(r.headers()["x-pagination"].to_str().unwrap()).unwrap();
    assert_eq!(pag["next_page"], 2);
    assert_eq!(pag["per_page"], 25);
    let list: Vec<Value> = r.json().await.unwrap();
    assert_eq!(list.len(), 25);
    let e = c.beta("zzzz").await.unwrap_err();
    assert!(
        matches!(
            e,
            ApiError::NotFound { .. } | ApiError::ProjectNotFound { .. }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn three_auth_methods_and_their_refusals() {
    let keys = Keys::parse(
        "[keys]\ngood = [\"all\"]\nold = { permissions = [\"all\"], expired = true }\nro = [\"users:read\"]\n",
        false,
    )
    .unwrap();
    let s = common::sandbox(SandboxConfig {
        keys,
        ..Default::default()
    })
    .await;
    let base = s.base_url();
    let get = |p: &str| {
        let url = format!("{base}/{p}");
        async move { reqwest::Client::new().get(url) }
    };
    let st = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(
        st(get("betas/1.json")
            .await
            .basic_auth("good", Some(""))
            .send()
            .await
            .unwrap()),
        200
    );
    assert_eq!(
        st(get("betas/1.json")
            .await
            .bearer_auth("good")
            .send()
            .await
            .unwrap()),
        200
    );
    assert_eq!(
        st(get("betas/1.json?api_key=good").await.send().await.unwrap()),
        200
    );
    assert_eq!(st(get("betas/1.json").await.send().await.unwrap()), 401);
    // Bearer keys: unknown, expired (`old`), Users > Read only (`ro`).
    for (path, key, want) in [
        ("betas/1.json", "nope", 401),
        ("betas/1.json", "old", 401),
        ("betas/1.json", "ro", 403),
        ("betas/1/testers.json", "ro", 200),
    ] {
        let got = st(get(path).await.bearer_auth(key).send().await.unwrap());
        assert_eq!(got, want, "{path} with key {key:?}");
    }
}

#[tokio::test]
async fn writes_need_json_content_type_or_a_form() {
    let s = common::sandbox(SandboxConfig::default()).await;
    let url = format!("{}/betas/1/checkins.json", s.base_url());
    let c = reqwest::Client::new();
    c.post(format!("{}/betas/1/testers.json", s.base_url()))
        .basic_auth(common::KEY, Some(""))
        .header("content-type", "application/json")
        .body(r#"{"tester":{"email":"leonard@bigbangtheory.com"}}"#)
        .send()
        .await
        .unwrap();
    let r = c
        .post(&url)
        .basic_auth(common::KEY, Some(""))
        .body("checkin[email]=x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500, "no content type");
    let r = c
        .post(&url)
        .basic_auth(common::KEY, Some(""))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("checkin[email]=leonard@bigbangtheory.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(common::users(&s, 1)[0]["status"], "active");
}

#[tokio::test]
async fn documented_error_codes_and_the_outbox() {
    let s = common::sandbox(SandboxConfig {
        seed_testers: 3,
        ..Default::default()
    })
    .await;
    let c = common::client(&s);
    let e = c
        .call(
            Op::PointCreate,
            Some("1"),
            "betas/1/points.json",
            &[],
            Some(&json!({"quantity": 1})),
        )
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("Email is required. (code 2802)"),
        "{e}"
    );
    let e = c
        .call(
            Op::PointCreate,
            Some("1"),
            "betas/1/points.json",
            &[],
            Some(&json!({"email": "nobody@x.io", "quantity": 1})),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("(code 2803)"), "{e}");
    let body = json!({"email": "user1@example.com", "reason": "Manual"});
    c.call(
        Op::SuppressionCreate,
        Some("1"),
        "betas/1/suppressions.json",
        &[],
        Some(&body),
    )
    .await
    .unwrap();
    let e = c
        .call(
            Op::SuppressionCreate,
            Some("1"),
            "betas/1/suppressions.json",
            &[],
            Some(&body),
        )
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("Email already exists. (code 2702)"),
        "{e}"
    );

    let t = c
        .create_tester(
            "1",
            &TesterInput {
                email: Some("new@x.io".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(t.status.as_deref(), Some("imported"));
    assert!(s.app.with_world(|w| w.outbox.is_empty()));
    c.update_tester(
        "1",
        t.id,
        &TesterInput {
            status: Some("invited".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let outbox = s.app.with_world(|w| w.outbox.clone());
    assert_eq!(outbox.len(), 1);
    assert_eq!(
        (outbox[0].kind.as_str(), outbox[0].to.as_str()),
        ("invitation", "new@x.io")
    );
    // invited -> applied is not an allowed transition.
    let e = c
        .update_tester(
            "1",
            t.id,
            &TesterInput {
                status: Some("applied".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(422));
}

#[tokio::test]
async fn throttles_past_the_limit_with_the_configured_status_and_retry_after() {
    let s = common::sandbox(SandboxConfig {
        rate_scale: 60.0,
        throttle_status: 429,
        retry_after: Some(2),
        ..Default::default()
    })
    .await;
    let c = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..70 {
        let r = c
            .get(format!("{}/betas/1/testers.json", s.base_url()))
            .basic_auth(common::KEY, Some(""))
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            assert_eq!(r.headers()["retry-after"], "2");
        }
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 60);
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 10);
    assert_eq!(s.app.stats.throttled.load(Ordering::Relaxed), 10);
}

/// Writes past `write_limit` get the throttle status and the rate-limit
/// body, and are not applied; reads are not counted against it.
#[tokio::test]
async fn throttles_writes_past_the_write_limit_without_applying_them() {
    let s = common::sandbox(SandboxConfig {
        rate_scale: 0.0,
        write_limit: Some((5, std::time::Duration::from_secs(60))),
        ..Default::default()
    })
    .await;
    let mut statuses = Vec::new();
    for i in 0..8 {
        let r = raw(&s.base_url(), reqwest::Method::POST, "betas/1/testers.json")
            .await
            .basic_auth(common::KEY, Some(""))
            .json(&json!({"tester": {"email": format!("w{i}@x.io")}}))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        if status == 503 {
            let body: Value = r.json().await.unwrap();
            assert!(body.to_string().contains("Rate limit exceeded"), "{body}");
        }
        statuses.push(status);
    }
    assert_eq!(statuses, [201, 201, 201, 201, 201, 503, 503, 503]);
    assert_eq!(common::users(&s, 1).len(), 5);
    let r = raw(&s.base_url(), reqwest::Method::GET, "betas/1/testers.json")
        .await
        .basic_auth(common::KEY, Some(""))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.app.stats.throttled.load(Ordering::Relaxed), 3);
}

#[tokio::test]
async fn fail_after_write_applies_the_write() {
    let s = common::sandbox(SandboxConfig {
        fail_after_write_rate: 1.0,
        ..Default::default()
    })
    .await;
    let c = common::client(&s);
    let e = c
        .create_tester(
            "1",
            &TesterInput {
                email: Some("ghost@x.io".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::OutcomeUnknown { .. }), "{e}");
    let found = c.find_tester("1", "GHOST@x.io").await.unwrap();
    assert!(found.is_some(), "the write was applied");
}

#[tokio::test]
async fn reads_survive_random_failures_and_drops() {
    let s = common::sandbox(SandboxConfig {
        seed_testers: 500,
        fail_rate: 0.1,
        drop_rate: 0.05,
        rate_scale: 0.0,
        ..Default::default()
    })
    .await;
    let c = common::unlimited_client(&s);
    let pages: Vec<prefsync::api::Page<Tester>> = c
        .pages(
            Op::TestersList,
            Some("1".into()),
            "betas/1/testers.json".into(),
            vec![],
            1,
        )
        .try_collect()
        .await
        .unwrap();
    let ids: Vec<u64> = pages
        .iter()
        .flat_map(|p| p.items.iter().map(|t| t.id))
        .collect();
    assert_eq!(ids.len(), 500);
    assert!(c.stats().retries.load(Ordering::Relaxed) > 0);
}

/// The limiter against the sandbox enforcing the documented testers-list
/// limit at 15x (60 per 4 s): nothing throttled, no window over the limit,
/// and at least 97% of the quota used. One page at a time: at 60x (a call
/// every 17 ms) a debug build's round trip on a loaded 2-core machine
/// outlasted the interval now and then, and a slot missed is lost (the
/// limiter never bursts to catch up: that could put 61 in a window). The
/// pacing's own figure is `bench limiter`'s, in release.
#[tokio::test]
async fn limiter_stays_under_and_uses_97_percent_of_the_quota() {
    let s = common::sandbox(SandboxConfig {
        seed_testers: 25 * 120,
        rate_scale: 15.0,
        ..Default::default()
    })
    .await;
    let c = common::client_for(
        &s.base_url(),
        common::KEY,
        &["testers-list=60/4s", "account-list=180/4s"],
    );
    let n: usize = c
        .pages::<Value>(
            Op::TestersList,
            Some("1".into()),
            "betas/1/testers.json".into(),
            vec![],
            1,
        )
        .map_ok(|p| p.items.len())
        .try_fold(0, |a, b| async move { Ok(a + b) })
        .await
        .unwrap();
    assert_eq!(n, 3000);
    let stats = s.app.stats_json();
    assert_eq!(stats["throttled"], 0, "{stats:#}");
    let w = &stats["windows"]["testers-list:1"];
    assert!(w["max_in_any_window"].as_u64().unwrap() <= 60, "{w}");
    let util = w["utilisation"].as_f64().unwrap();
    assert!(util >= 0.97, "utilisation {util}");
}

#[tokio::test]
async fn a_key_without_a_permission_gets_403_naming_it() {
    let s = common::sandbox(SandboxConfig {
        keys: Keys::single_without("k", &[Permission::UsersCreate]),
        ..Default::default()
    })
    .await;
    let c = common::client_for(&s.base_url(), "k", &[]);
    let e = c
        .create_tester(
            "1",
            &TesterInput {
                email: Some("a@x.io".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("lacks Users > Create"), "{e}");
    let report = prefsync::cmd::check::check(&c, "a9b8c7de").await;
    assert!(report.works());
    assert_eq!(
        report.grant("Users > Create"),
        Some(&prefsync::cmd::check::Grant::Missing)
    );
    assert_eq!(
        report.grant("Users > Update"),
        Some(&prefsync::cmd::check::Grant::Granted)
    );
    // The probes changed nothing.
    assert!(common::users(&s, 1).is_empty());
}

#[tokio::test]
async fn state_persists_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sandbox.sqlite");
    let config = SandboxConfig {
        state_path: Some(path.clone()),
        ..Default::default()
    };
    let s = common::sandbox(config.clone()).await;
    common::client(&s)
        .create_tester(
            "1",
            &TesterInput {
                email: Some("kept@x.io".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    s.shutdown().await;
    let s = common::sandbox(config).await;
    let found = common::client(&s)
        .find_tester("1", "kept@x.io")
        .await
        .unwrap();
    assert!(found.is_some());
}
