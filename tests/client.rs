//! The client against scripted servers (wiremock) where exact requests and
//! answer sequences matter.

mod common;

use std::time::Duration;

use futures::TryStreamExt;
use prefsync::api::{ApiError, Op, Tester, TesterInput};
use serde_json::{Value, json};
use wiremock::matchers::{body_json, header, method, path, query_param};
use wiremock::{Mock, MockServer, Respond, ResponseTemplate};

fn tester(id: u64) -> Value {
    json!({"id": id, "email": format!("u{id}@x.io"), "status": "applied"})
}

fn page_json(from: u64, n: u64) -> Value {
    Value::Array((from..from + n).map(tester).collect())
}

fn pag(page: u64, next: Option<u64>) -> String {
    json!({"previous_page": null, "next_page": next, "current_page": page, "per_page": 25, "count": 25, "pages": 3}).to_string()
}

async fn collect(server: &MockServer) -> Result<Vec<u64>, ApiError> {
    let c = common::client_for(
        &format!("{}/api/v2", server.uri()),
        "k3y-secret",
        &["testers-list=1000/1s", "account-list=1000/1s"],
    );
    let pages: Vec<prefsync::api::Page<Tester>> = c
        .pages(
            Op::TestersList,
            Some("1".into()),
            "betas/1/testers.json".into(),
            vec![],
            1,
        )
        .try_collect()
        .await?;
    Ok(pages
        .into_iter()
        .flat_map(|p| p.items)
        .map(|t| t.id)
        .collect())
}

#[tokio::test]
async fn sends_basic_auth_json_and_wrapped_tester_body() {
    let server = MockServer::start().await;
    // base64("k3y-secret:")
    Mock::given(method("POST"))
        .and(path("/api/v2/betas/a9b8c7de/testers.json"))
        .and(header("authorization", "Basic azN5LXNlY3JldDo="))
        .and(header("content-type", "application/json"))
        .and(body_json(json!({"tester": {"email": "a@x.io", "status": "imported", "profile": {"first_name": "A"}}})))
        .respond_with(ResponseTemplate::new(201).set_body_json(tester(7)))
        .expect(1)
        .mount(&server)
        .await;
    let c = common::client_for(&format!("{}/api/v2", server.uri()), "k3y-secret", &[]);
    let mut input = TesterInput {
        email: Some("a@x.io".into()),
        status: Some("imported".into()),
        ..Default::default()
    };
    input.profile.insert("first_name".into(), "A".into());
    let t = c.create_tester("a9b8c7de", &input).await.unwrap();
    assert_eq!(t.id, 7);
    // The key is never in a URL.
    for r in server.received_requests().await.unwrap() {
        assert!(!r.url.as_str().contains("k3y-secret"));
    }
}

#[tokio::test]
async fn pages_until_next_page_is_null() {
    let server = MockServer::start().await;
    for (p, next) in [(1, Some(2)), (2, Some(3)), (3, None)] {
        Mock::given(path("/api/v2/betas/1/testers.json"))
            .and(query_param("page", p.to_string()))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(page_json((p - 1) * 25 + 1, 25))
                    .insert_header("X-Pagination", pag(p, next)),
            )
            .expect(1)
            .mount(&server)
            .await;
    }
    let ids = collect(&server).await.unwrap();
    assert_eq!(ids, (1..=75).collect::<Vec<_>>());
}

#[tokio::test]
async fn empty_first_page_yields_nothing() {
    let server = MockServer::start().await;
    Mock::given(path("/api/v2/betas/1/testers.json"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!([]))
                .insert_header("X-Pagination", pag(1, Some(2))),
        )
        .expect(1)
        .mount(&server)
        .await;
    assert!(collect(&server).await.unwrap().is_empty());
}

#[tokio::test]
async fn without_the_header_a_short_page_is_the_last() {
    let server = MockServer::start().await;
    Mock::given(path("/api/v2/betas/1/testers.json"))
        .and(query_param("page", "1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page_json(1, 25)))
        .mount(&server)
        .await;
    Mock::given(path("/api/v2/betas/1/testers.json"))
        .and(query_param("page", "2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page_json(26, 3)))
        .mount(&server)
        .await;
    Mock::given(path("/api/v2/betas/1/testers.json"))
        .and(query_param("page", "3"))
        .respond_with(ResponseTemplate::new(500))
        .expect(0)
        .mount(&server)
        .await;
    assert_eq!(collect(&server).await.unwrap().len(), 28);
}

#[tokio::test]
async fn without_the_header_a_full_page_then_an_empty_one_ends() {
    let server = MockServer::start().await;
    Mock::given(path("/api/v2/betas/1/testers.json"))
        .and(query_param("page", "1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page_json(1, 25)))
        .mount(&server)
        .await;
    Mock::given(path("/api/v2/betas/1/testers.json"))
        .and(query_param("page", "2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([])))
        .mount(&server)
        .await;
    assert_eq!(collect(&server).await.unwrap().len(), 25);
}

#[tokio::test]
async fn a_failure_mid_way_is_an_error_after_retries() {
    let server = MockServer::start().await;
    Mock::given(path("/api/v2/betas/1/testers.json"))
        .and(query_param("page", "1"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(page_json(1, 25))
                .insert_header("X-Pagination", pag(1, Some(2))),
        )
        .mount(&server)
        .await;
    Mock::given(path("/api/v2/betas/1/testers.json"))
        .and(query_param("page", "2"))
        .respond_with(ResponseTemplate::new(502).set_body_string("<html>Bad gateway</html>"))
        .expect(8)
        .mount(&server)
        .await;
    let err = collect(&server).await.unwrap_err();
    assert!(
        matches!(
            err,
            ApiError::Server {
                status: 502,
                attempts: 8,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("Bad gateway"));
}

/// Answers with the given statuses in order, then 200.
struct Sequence {
    statuses: Vec<(u16, Option<&'static str>)>,
    calls: std::sync::atomic::AtomicUsize,
}

impl Respond for Sequence {
    fn respond(&self, _: &wiremock::Request) -> ResponseTemplate {
        let i = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        match self.statuses.get(i) {
            Some((s, retry_after)) => {
                let mut r = ResponseTemplate::new(*s)
                    .set_body_json(json!({"errors": [{"message": "slow down"}]}));
                if let Some(ra) = retry_after {
                    r = r.insert_header("Retry-After", *ra);
                }
                r
            }
            None => ResponseTemplate::new(200).set_body_json(json!({"id": 1, "name": "P"})),
        }
    }
}

async fn throttled_then_ok(statuses: Vec<(u16, Option<&'static str>)>) -> (Duration, u64) {
    let server = MockServer::start().await;
    let n = statuses.len();
    Mock::given(path("/api/v2/betas/1.json"))
        .respond_with(Sequence {
            statuses,
            calls: Default::default(),
        })
        .expect(n as u64 + 1)
        .mount(&server)
        .await;
    let c = common::client_for(&format!("{}/api/v2", server.uri()), "k", &["betas=1000/1s"]);
    let start = std::time::Instant::now();
    let b = c.beta("1").await.unwrap();
    assert_eq!(b.id, 1);
    (
        start.elapsed(),
        c.stats()
            .throttled
            .load(std::sync::atomic::Ordering::Relaxed),
    )
}

#[tokio::test]
async fn throttling_by_503_and_429_is_retried() {
    let (_, throttled) = throttled_then_ok(vec![(503, None), (429, None), (503, None)]).await;
    assert_eq!(throttled, 3);
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let (took, _) = throttled_then_ok(vec![(429, Some("1"))]).await;
    assert!(took >= Duration::from_millis(950), "waited only {took:?}");
    // Zero means no hint: the backoff applies, which is short here.
    let (took, _) = throttled_then_ok(vec![(503, Some("0"))]).await;
    assert!(took < Duration::from_millis(900), "waited {took:?}");
}

#[tokio::test]
async fn a_create_answered_by_5xx_is_an_unknown_outcome_and_not_resent() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500))
        .expect(1)
        .mount(&server)
        .await;
    let c = common::client_for(&format!("{}/api/v2", server.uri()), "k", &[]);
    let input = TesterInput {
        email: Some("a@x.io".into()),
        ..Default::default()
    };
    let err = c.create_tester("1", &input).await.unwrap_err();
    assert!(matches!(err, ApiError::OutcomeUnknown { .. }), "{err}");
}

#[tokio::test]
async fn every_error_class_has_its_message() {
    let server = MockServer::start().await;
    let cases: Vec<(u16, &str, Value)> = vec![
        (401, "betas/1.json", json!({"error": "bad key"})),
        (402, "betas/2.json", json!({})),
        (403, "betas/3/testers/5.json", json!({"errors": ["no"]})),
        (404, "betas/4/testers.json", json!({})),
        (
            404,
            "betas/5/testers/9.json",
            json!({"errors": [{"message": "Tester not found."}]}),
        ),
        (
            422,
            "betas/6/testers/9.json",
            json!({"errors": [{"code": 2702, "message": "Email already exists."}]}),
        ),
    ];
    for (status, p, body) in &cases {
        Mock::given(path(format!("/api/v2/{p}")))
            .respond_with(ResponseTemplate::new(*status).set_body_json(body.clone()))
            .mount(&server)
            .await;
    }
    let c = common::client_for(&format!("{}/api/v2", server.uri()), "k", &[]);
    let e = c.beta("1").await.unwrap_err();
    assert!(
        e.to_string()
            .contains("key was rejected (HTTP 401); it is wrong, expired or deleted"),
        "{e}"
    );
    let e = c.beta("2").await.unwrap_err();
    assert!(
        e.to_string().contains("plan does not include API access"),
        "{e}"
    );
    let e = c
        .call(
            Op::TesterShow,
            Some("3"),
            "betas/3/testers/5.json",
            &[],
            None,
        )
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("this API key lacks Users > Read; edit it under Company Settings > API Keys"),
        "{e}"
    );
    let e = c
        .call(
            Op::TestersList,
            Some("4"),
            "betas/4/testers.json",
            &[],
            None,
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("check --beta"), "{e}");
    let e = c
        .call(
            Op::TesterShow,
            Some("5"),
            "betas/5/testers/9.json",
            &[],
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, ApiError::NotFound { .. }) && e.to_string().contains("Tester not found."),
        "{e}"
    );
    let e = c
        .update_tester(
            "6",
            9,
            &TesterInput {
                status: Some("applied".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("HTTP 422): Email already exists. (code 2702)"),
        "{e}"
    );
    assert!(!e.is_retryable());
}

/// Answers with the given templates in order, then with `then`.
struct Script {
    answers: Vec<ResponseTemplate>,
    then: ResponseTemplate,
    calls: std::sync::atomic::AtomicUsize,
}

impl Script {
    fn new(answers: Vec<ResponseTemplate>, then: ResponseTemplate) -> Script {
        Script {
            answers,
            then,
            calls: Default::default(),
        }
    }
}

impl Respond for Script {
    fn respond(&self, _: &wiremock::Request) -> ResponseTemplate {
        let i = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.answers.get(i).unwrap_or(&self.then).clone()
    }
}

fn created(id: u64) -> ResponseTemplate {
    ResponseTemplate::new(201).set_body_json(tester(id))
}

/// Creates one tester against a server that answers `first`, then 201.
/// Returns the result, the requests sent and the throttled count.
async fn create_after(first: ResponseTemplate) -> (Result<Tester, ApiError>, usize, u64) {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(Script::new(vec![first], created(7)))
        .mount(&server)
        .await;
    let c = common::client_for(&format!("{}/api/v2", server.uri()), "k", &[]);
    let input = TesterInput {
        email: Some("a@x.io".into()),
        ..Default::default()
    };
    let r = c.create_tester("1", &input).await;
    let sent = server.received_requests().await.unwrap().len();
    let throttled = c
        .stats()
        .throttled
        .load(std::sync::atomic::Ordering::Relaxed);
    (r, sent, throttled)
}

/// Regression (defect 5): a 503 whose body says "rate limit" is throttling,
/// even for a create: it was refused before any work, so it is counted,
/// paused and sent again, never surfaced as an unknown outcome.
#[tokio::test]
async fn a_create_answered_by_503_with_a_rate_limit_body_is_throttled_and_resent() {
    for body in [
        json!({"errors": [{"message": "Rate limit exceeded. Please slow down."}]}),
        json!({"error": "TOO MANY REQUESTS"}),
        json!({"errors": ["Request throttled"]}),
    ] {
        let (r, sent, throttled) =
            create_after(ResponseTemplate::new(503).set_body_json(body.clone())).await;
        assert_eq!(r.map(|t| t.id).map_err(|e| e.to_string()), Ok(7), "{body}");
        assert_eq!((sent, throttled), (2, 1), "{body}");
    }
    // Plain text, as a proxy in front of the API might answer.
    let (r, sent, throttled) =
        create_after(ResponseTemplate::new(503).set_body_string("rate limit reached")).await;
    assert!(r.is_ok());
    assert_eq!((sent, throttled), (2, 1));
}

/// Regression (defect 5): a Retry-After header on a 503 is a throttling
/// sign, whatever the body says.
#[tokio::test]
async fn a_create_answered_by_503_with_retry_after_is_throttled_and_resent() {
    let (r, sent, throttled) = create_after(
        ResponseTemplate::new(503)
            .insert_header("Retry-After", "0")
            .set_body_string("Service Unavailable"),
    )
    .await;
    assert!(r.is_ok(), "{r:?}");
    assert_eq!((sent, throttled), (2, 1));
}

/// A 503 with no sign of throttling is a server failure: a create's outcome
/// is then unknown (it is not resent blindly) and a read is retried as a
/// server error, neither counted as throttled.
#[tokio::test]
async fn a_plain_503_is_a_server_error_not_throttling() {
    let plain = || {
        ResponseTemplate::new(503)
            .set_body_json(json!({"errors": [{"message": "Service Unavailable"}]}))
    };
    let (r, sent, throttled) = create_after(plain()).await;
    match r {
        Err(e @ ApiError::OutcomeUnknown { .. }) => {
            assert!(e.to_string().contains("HTTP 503"), "{e}")
        }
        other => panic!("expected an unknown outcome, got {other:?}"),
    }
    assert_eq!((sent, throttled), (1, 0));

    let server = MockServer::start().await;
    Mock::given(path("/api/v2/betas/1.json"))
        .respond_with(Script::new(
            vec![plain(); 8],
            ResponseTemplate::new(200).set_body_json(json!({"id": 1})),
        ))
        .mount(&server)
        .await;
    let c = common::client_for(&format!("{}/api/v2", server.uri()), "k", &["betas=1000/1s"]);
    let e = c.beta("1").await.unwrap_err();
    assert!(
        matches!(
            e,
            ApiError::Server {
                status: 503,
                attempts: 8,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        c.stats()
            .throttled
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// A port on 127.0.0.1 that nothing listens on: bound, then released.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A client with the production retry policy: what a stuck run would wait.
fn production_client(base: &str) -> prefsync::api::Client {
    prefsync::api::Client::new(
        base.parse().unwrap(),
        prefsync::api::ApiKey::new("k3y-secret"),
        prefsync::api::Limiter::new(&[]),
        prefsync::api::RetryPolicy::default(),
    )
}

/// Fails `call` on a fresh client, checks it took under 5 s, was not worth
/// retrying and blames neither the key nor anything else than `says`.
async fn fails_fast(base: &str, says: &str) -> ApiError {
    let c = production_client(base);
    let start = std::time::Instant::now();
    let e = c.beta("1").await.unwrap_err();
    let took = start.elapsed();
    let text = e.to_string();
    assert!(took < Duration::from_secs(5), "took {took:?}: {text}");
    assert!(text.contains(says), "{text}");
    assert!(!e.is_retryable(), "{text}");
    assert!(
        !text.contains("key") && !text.contains("k3y-secret"),
        "{text}"
    );
    e
}

/// Regression (defect 9): nothing listens, and nothing has answered yet.
#[tokio::test]
async fn connection_refused_on_the_first_call_fails_fast_naming_the_address() {
    let port = closed_port();
    fails_fast(
        &format!("http://127.0.0.1:{port}/api/v2"),
        &format!("network: connection refused to 127.0.0.1:{port}"),
    )
    .await;
}

/// Regression (defect 9): `.invalid` never resolves (RFC 6761).
#[tokio::test]
async fn an_unresolvable_host_fails_fast_naming_it() {
    fails_fast(
        "https://nonexistent.invalid/api/v2",
        "DNS: could not resolve nonexistent.invalid",
    )
    .await;
}

/// Regression (defect 9): a server on the https port that does not speak
/// TLS. Each connection is counted: a TLS failure is never retried.
#[tokio::test]
async fn a_tls_handshake_failure_is_named_and_not_retried() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut sock, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = sock
                .write_all(b"HTTP/1.1 200 OK\r\n\r\nthis is not TLS")
                .await;
        }
    });
    fails_fast(
        &format!("https://127.0.0.1:{port}/api/v2"),
        "TLS: handshake with 127.0.0.1 failed",
    )
    .await;
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// Once the server has answered, a refused connection is a server going
/// away for a moment (a restart, a deploy): it stays worth retrying.
#[tokio::test]
async fn once_the_server_has_answered_a_refused_connection_is_retried() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = sock.read(&mut buf).await;
        let body = r#"{"id":1,"name":"P"}"#;
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        sock.write_all(answer.as_bytes()).await.unwrap();
        // The listener closes here: every later connection is refused.
    });
    let c = common::client_for(
        &format!("http://127.0.0.1:{port}/api/v2"),
        "k",
        &["betas=1000/1s"],
    );
    assert_eq!(c.beta("1").await.unwrap().id, 1);
    server.await.unwrap();
    let e = c.beta("1").await.unwrap_err();
    assert!(
        matches!(e, ApiError::Transport { attempts: 8, .. }) && e.is_retryable(),
        "{e}"
    );
}

/// Regression (defect 9): a TLS server whose certificate is self-signed
/// (a throwaway key and certificate for 127.0.0.1, made for this test). The
/// certificate is refused, never retried, and verification is never skipped.
#[tokio::test]
async fn a_self_signed_certificate_is_not_trusted_and_not_retried() {
    use tokio_rustls::rustls;
    let cert = rustls::pki_types::CertificateDer::from(
        include_bytes!("fixtures/self-signed/cert.der").to_vec(),
    );
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
        include_bytes!("fixtures/self-signed/key.der")
            .to_vec()
            .into(),
    );
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // The client gives up during the handshake.
            let _ = acceptor.accept(sock).await;
        }
    });
    fails_fast(
        &format!("https://127.0.0.1:{port}/api/v2"),
        "TLS: certificate not trusted for 127.0.0.1",
    )
    .await;
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}
