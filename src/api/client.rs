//! The Prefinery HTTP client: authentication, the shared limiter, retries,
//! error classification and pagination.
//!
//! Guarantees:
//! - the key travels only in the `Authorization` header (HTTP Basic, key as
//!   user name, empty password), never in a URL, and is never printed;
//! - GET, PUT, DELETE and check-ins are retried on transient failures; a
//!   create (POST) is retried only when it surely did not reach the server
//!   (connection refused, a throttled answer); any other doubt comes back as
//!   [`ApiError::OutcomeUnknown`] for the caller to resolve by a lookup;
//! - a throttled answer (429, or a 503 that says so) is counted, slows the
//!   shared limiter and is sent again after a pause, whatever the request;
//! - a failure that waiting will not mend (TLS, DNS, nothing listening before
//!   the server ever answered) is [`ApiError::Unreachable`] at once.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::Stream;
use reqwest::{Method, StatusCode, header};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::time::Instant;
use url::Url;

use super::error::{ApiError, ApiMessages, Op, Unreachable};
use super::limiter::{Limiter, RateClass};
use super::models::{Beta, Pagination, Tester, TesterInput};

/// Page size of every list endpoint (fixed by the server).
pub const PAGE_SIZE: usize = 25;

/// The API key. Its `Debug` and `Display` never show it.
#[derive(Clone)]
pub struct ApiKey(Arc<str>);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> ApiKey {
        ApiKey(Arc::from(key.into().trim()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How hard to try before giving up on a request.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts for a transient failure (5xx, network), the first included.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            // At 10% random failures, 8 attempts all fail with odds 1e-8.
            max_attempts: 8,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(20),
            timeout: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// Exponential backoff with full jitter.
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_delay);
        exp.mul_f64(fastrand::f64())
    }
}

/// Counters for the run summary and progress display.
#[derive(Debug, Default)]
pub struct ClientStats {
    pub requests: AtomicU64,
    pub throttled: AtomicU64,
    pub retries: AtomicU64,
    /// Time spent waiting on the limiter, summed over workers, in ms.
    pub limiter_wait_ms: AtomicU64,
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    key: ApiKey,
    /// `Basic base64(key:)`, built once and marked sensitive.
    auth: header::HeaderValue,
    /// The URLs of the last few paths called (see [`Client::url_for`]).
    urls: Arc<std::sync::Mutex<Vec<(String, Url)>>>,
    limiter: Limiter,
    retry: RetryPolicy,
    stats: Arc<ClientStats>,
    /// Whether the server has answered anything yet, in this run (every
    /// clone shares it). Before that, a refused connection means a wrong
    /// address or a server that is not running, and retrying for a minute
    /// only hides it; after, it means a restart or a blip, worth retrying.
    answered: Arc<AtomicBool>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base.as_str())
            .field("key", &self.key)
            .finish()
    }
}

/// A response that passed classification.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub pagination: Option<Pagination>,
    pub body: bytes::Bytes,
}

impl Reply {
    pub fn json<T: DeserializeOwned>(&self, op: Op) -> Result<T, ApiError> {
        serde_json::from_slice(&self.body).map_err(|e| ApiError::Decode {
            op: op.describe(),
            status: self.status,
            cause: e.to_string(),
        })
    }
}

/// One page of a list.
#[derive(Debug)]
pub struct Page<T> {
    pub number: u64,
    pub items: Vec<T>,
    pub pagination: Option<Pagination>,
    /// Whether this is the last page.
    pub last: bool,
}

impl Client {
    pub fn new(base: Url, key: ApiKey, limiter: Limiter, retry: RetryPolicy) -> Client {
        let http = reqwest::Client::builder()
            .user_agent(concat!("prefsync/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(retry.timeout)
            .pool_max_idle_per_host(64)
            // The API never redirects; a redirect from loopback to
            // elsewhere would carry requests (and their bodies: people's
            // data) off the host the user named.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("the HTTP client builds with static settings");
        let mut base = base;
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        Client {
            http,
            base,
            auth: basic_auth_header(&key),
            key,
            urls: Arc::default(),
            limiter,
            retry,
            stats: Arc::new(ClientStats::default()),
            answered: Arc::default(),
        }
    }

    pub fn stats(&self) -> &Arc<ClientStats> {
        &self.stats
    }

    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// The base with `path` appended. Only the path is parsed (a `join`
    /// would parse the whole URL again, host included), and the last few
    /// paths' URLs are kept: an import sends one path over and over, and
    /// parsing it was ~2,300 instructions a request.
    fn url_for(&self, path: &str) -> Url {
        const KEPT: usize = 8;
        debug_assert!(!path.starts_with('/') && !path.contains(['?', '#']));
        let mut kept = self.urls.lock().unwrap();
        if let Some((_, url)) = kept.iter().find(|(p, _)| p == path) {
            return url.clone();
        }
        let mut url = self.base.clone();
        url.set_path(&format!("{}{path}", self.base.path()));
        if kept.len() == KEPT {
            kept.remove(0);
        }
        kept.push((path.to_string(), url.clone()));
        url
    }

    /// Waits before sending again a request that the server refused as
    /// unavailable (a plain 503) and that the caller found was not applied:
    /// `refusals` in a row so far. Paced like a server error's retries; past
    /// the policy's attempts the server is taken to be down, and the error
    /// says so ([`ApiError::Unavailable`]: the run stops, to be resumed).
    pub async fn pause_to_resend(
        &self,
        op: &'static str,
        refusals: u32,
        cause: &str,
    ) -> Result<(), ApiError> {
        if refusals >= self.retry.max_attempts {
            return Err(ApiError::Unavailable {
                op,
                attempts: refusals,
                cause: cause.to_string(),
            });
        }
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(self.retry.backoff(refusals)).await;
        Ok(())
    }

    /// Whether a network error is one that retrying will not mend: any TLS
    /// failure; and, while the server has never answered in this run, a
    /// name that does not resolve, a refused connection or no route.
    fn unreachable(&self, e: &reqwest::Error) -> Option<Unreachable> {
        let host = self.base.host_str().unwrap_or_default().to_string();
        let addr = match self.base.port_or_known_default() {
            Some(port) => format!("{host}:{port}"),
            None => host.clone(),
        };
        let answered = self.answered.load(Ordering::Relaxed);
        let mut dns = false;
        let mut innermost = String::new();
        for s in error_chain(e) {
            innermost = s.to_string();
            if let Some(tls) = s.downcast_ref::<rustls::Error>() {
                let cause = tls.to_string();
                return Some(match tls {
                    rustls::Error::InvalidCertificate(_) => {
                        Unreachable::Certificate { host, cause }
                    }
                    _ => Unreachable::Handshake { host, cause },
                });
            }
            if let Some(io) = s.downcast_ref::<std::io::Error>()
                && !answered
            {
                use std::io::ErrorKind as K;
                match io.kind() {
                    K::ConnectionRefused => return Some(Unreachable::Refused { addr }),
                    K::NetworkUnreachable | K::HostUnreachable => {
                        let cause = io.to_string();
                        return Some(Unreachable::NoRoute { addr, cause });
                    }
                    _ => {}
                }
            }
            // hyper-util's resolver failure: its type is private, its message
            // is not.
            if innermost == "dns error" {
                dns = true;
            }
        }
        (dns && !answered).then_some(Unreachable::Dns {
            host,
            cause: innermost,
        })
    }

    fn rate_class(op: Op) -> RateClass {
        match op {
            Op::TestersList => RateClass::TestersList,
            Op::RewardsList => RateClass::RewardsList,
            Op::PointsList => RateClass::PointsList,
            Op::BetasList | Op::BetaShow => RateClass::Betas,
            Op::TesterShow | Op::RewardShow | Op::SuppressionsList => RateClass::Other,
            _ => RateClass::Writes,
        }
    }

    fn method(op: Op) -> Method {
        use Op::*;
        match op {
            BetasList | BetaShow | TestersList | TesterShow | PointsList | RewardsList
            | RewardShow | SuppressionsList => Method::GET,
            TesterCreate | TesterCheckin | CheckinCreate | PointCreate | RewardCreate
            | SuppressionCreate => Method::POST,
            TesterUpdate | RewardUpdate => Method::PUT,
            TesterDelete | SuppressionDelete => Method::DELETE,
        }
    }

    /// Sends one call with the limiter, retries and error classification.
    /// `path` is relative to the base URL, e.g. `betas/1/testers.json`.
    pub async fn call(
        &self,
        op: Op,
        beta: Option<&str>,
        path: &str,
        query: &[(String, String)],
        body: Option<&Value>,
    ) -> Result<Reply, ApiError> {
        let body = body.map(|b| serde_json::to_vec(b).expect("a JSON value serialises"));
        self.call_raw(op, beta, path, query, body.map(Bytes::from))
            .await
    }

    /// [`Client::call`] with a body already serialised to JSON.
    pub async fn call_raw(
        &self,
        op: Op,
        beta: Option<&str>,
        path: &str,
        query: &[(String, String)],
        body: Option<Bytes>,
    ) -> Result<Reply, ApiError> {
        let class = Self::rate_class(op);
        let method = Self::method(op);
        let mut url = self.url_for(path);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let window = self
            .limiter
            .quota(class)
            .map_or(Duration::from_secs(60), |q| {
                q.period.max(Duration::from_secs(60))
            });
        let started = Instant::now();
        let mut throttle_waited = Duration::ZERO;
        let mut throttle_budget = window;
        let mut throttles = 0u32;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let wait_start = Instant::now();
            self.limiter.acquire(class, beta).await;
            self.stats
                .limiter_wait_ms
                .fetch_add(wait_start.elapsed().as_millis() as u64, Ordering::Relaxed);
            self.stats.requests.fetch_add(1, Ordering::Relaxed);

            let mut req = self
                .http
                .request(method.clone(), url.clone())
                .header(header::AUTHORIZATION, self.auth.clone())
                .header(header::ACCEPT, "application/json");
            if let Some(b) = &body {
                req = req
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(b.clone());
            }
            let outcome = match req.send().await {
                Ok(resp) => {
                    if !self.answered.load(Ordering::Relaxed) {
                        self.answered.store(true, Ordering::Relaxed);
                    }
                    let status = resp.status();
                    let pagination = resp
                        .headers()
                        .get("x-pagination")
                        .and_then(|v| v.to_str().ok())
                        .and_then(Pagination::parse);
                    // Sent at all, it is a sign of throttling; its value, if
                    // readable, is how long to wait.
                    let retry_after = resp
                        .headers()
                        .get(header::RETRY_AFTER)
                        .map(|v| v.to_str().ok().and_then(parse_retry_after));
                    match resp.bytes().await {
                        Ok(body) => Ok((status, pagination, retry_after, body)),
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            };

            let (status, pagination, retry_after, resp_body) = match outcome {
                Ok(x) => x,
                Err(e) => {
                    if let Some(reason) = self.unreachable(&e) {
                        return Err(ApiError::Unreachable {
                            op: op.describe(),
                            reason,
                        });
                    }
                    let cause = describe_transport(&e);
                    // A refused connection never reached the server.
                    let surely_unsent = e.is_connect();
                    if !op.is_idempotent() && !surely_unsent {
                        return Err(ApiError::OutcomeUnknown {
                            op: op.describe(),
                            status: None,
                            cause,
                        });
                    }
                    if attempt >= self.retry.max_attempts {
                        return Err(ApiError::Transport {
                            op: op.describe(),
                            attempts: attempt,
                            cause,
                        });
                    }
                    tracing::debug!(op = op.describe(), attempt, %cause, "retrying after a network error");
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(self.retry.backoff(attempt)).await;
                    continue;
                }
            };

            if status.is_success() {
                self.limiter.succeeded(class, beta);
                return Ok(Reply {
                    status: status.as_u16(),
                    pagination,
                    body: resp_body,
                });
            }

            let messages = ApiMessages::parse(&resp_body);
            let code = status.as_u16();
            // A rate limiter refuses before any work, so a throttled create is
            // as safe to send again as a read. (Were it counted as an unknown
            // outcome, the import would give the row up after a few of them.)
            if is_throttle_answer(status, retry_after.is_some(), &messages) {
                self.stats.throttled.fetch_add(1, Ordering::Relaxed);
                throttles += 1;
                let pause = match retry_after.flatten() {
                    Some(d) if !d.is_zero() => {
                        throttle_budget = throttle_budget.max(throttle_waited + d + window);
                        d
                    }
                    // Longer after each throttled answer to the same request.
                    _ => self
                        .retry
                        .backoff(throttles)
                        .max(Duration::from_millis(100)),
                };
                if throttle_waited + pause > throttle_budget {
                    return Err(ApiError::Throttled {
                        op: op.describe(),
                        status: code,
                        waited: started.elapsed(),
                    });
                }
                throttle_waited += pause;
                tracing::debug!(
                    op = op.describe(),
                    status = code,
                    pause_ms = pause.as_millis() as u64,
                    "throttled"
                );
                self.limiter.throttled(class, beta, pause);
                // Throttling is not a failure of this request: it does not use
                // up the attempts.
                attempt -= 1;
                continue;
            }

            match code {
                401 => return Err(ApiError::Unauthorized { op: op.describe() }),
                402 => return Err(ApiError::PaymentRequired { op: op.describe() }),
                403 => {
                    return Err(ApiError::Forbidden {
                        op: op.describe(),
                        permission: op.permission(),
                    });
                }
                404 if !op.targets_record() => {
                    return Err(ApiError::ProjectNotFound {
                        op: op.describe(),
                        beta: beta.unwrap_or_default().to_string(),
                    });
                }
                404 => {
                    return Err(ApiError::NotFound {
                        op: op.describe(),
                        what: format!("/{path}"),
                        messages,
                    });
                }
                // A 503 without a sign of throttling lands here too: for a
                // create it may come from past the write.
                408 | 500..=599 => {
                    if !op.is_idempotent() {
                        return Err(ApiError::OutcomeUnknown {
                            op: op.describe(),
                            status: Some(code),
                            cause: format!("HTTP {code}: {messages}"),
                        });
                    }
                    if attempt >= self.retry.max_attempts {
                        return Err(ApiError::Server {
                            op: op.describe(),
                            status: code,
                            attempts: attempt,
                            messages,
                        });
                    }
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(self.retry.backoff(attempt)).await;
                    continue;
                }
                _ => {
                    return Err(ApiError::Rejected {
                        op: op.describe(),
                        status: code,
                        messages,
                    });
                }
            }
        }
    }

    /// Pages through a list endpoint from `first_page` on. Stops on
    /// `next_page: null`, on an empty page, and, where the header is missing,
    /// on a short page.
    pub fn pages<T: DeserializeOwned + Send + 'static>(
        &self,
        op: Op,
        beta: Option<String>,
        path: String,
        query: Vec<(String, String)>,
        first_page: u64,
    ) -> impl Stream<Item = Result<Page<T>, ApiError>> + Send + 'static {
        let client = self.clone();
        futures::stream::try_unfold(Some(first_page), move |next| {
            let client = client.clone();
            let beta = beta.clone();
            let path = path.clone();
            let query = query.clone();
            async move {
                let Some(number) = next else {
                    return Ok(None);
                };
                let mut q = query;
                q.push(("page".into(), number.to_string()));
                let reply = client.call(op, beta.as_deref(), &path, &q, None).await?;
                let items: Vec<T> = reply.json(op)?;
                let p = reply.pagination.clone();
                let last = items.is_empty()
                    || match &p {
                        Some(p) if p.has_next_key => p.next_page.is_none(),
                        Some(Pagination {
                            pages: Some(pages),
                            current_page: Some(cur),
                            ..
                        }) => cur >= pages,
                        _ => items.len() < PAGE_SIZE,
                    };
                let following = if last {
                    None
                } else {
                    Some(
                        p.as_ref()
                            .and_then(|p| p.next_page)
                            .filter(|n| *n > number)
                            .unwrap_or(number + 1),
                    )
                };
                // An empty first page is an empty list. An empty later page
                // is a list that shrank while it was read: its header, which
                // tells the new size, is handed on (the export re-reads
                // what shifted onto pages already read).
                if items.is_empty() && (number == 1 || p.is_none()) {
                    return Ok(None);
                }
                Ok(Some((
                    Page {
                        number,
                        items,
                        pagination: p,
                        last,
                    },
                    following,
                )))
            }
        })
    }

    // ---- typed calls -------------------------------------------------------

    pub async fn betas(&self) -> Result<Vec<Beta>, ApiError> {
        use futures::TryStreamExt;
        let pages: Vec<Page<Beta>> = self
            .pages(Op::BetasList, None, "betas.json".into(), vec![], 1)
            .try_collect()
            .await?;
        Ok(pages.into_iter().flat_map(|p| p.items).collect())
    }

    pub async fn beta(&self, beta: &str) -> Result<Beta, ApiError> {
        let r = self
            .call(
                Op::BetaShow,
                Some(beta),
                &format!("betas/{beta}.json"),
                &[],
                None,
            )
            .await?;
        r.json(Op::BetaShow)
    }

    /// The tester with this email, if any (`email_is`, exact match).
    pub async fn find_tester(&self, beta: &str, email: &str) -> Result<Option<Tester>, ApiError> {
        let q = [("email_is".to_string(), email.to_string())];
        let r = self
            .call(
                Op::TestersList,
                Some(beta),
                &format!("betas/{beta}/testers.json"),
                &q,
                None,
            )
            .await?;
        let list: Vec<Tester> = r.json(Op::TestersList)?;
        // Compare case-insensitively: a server may match either way.
        Ok(list
            .into_iter()
            .find(|t| t.email.eq_ignore_ascii_case(email)))
    }

    /// Creates a tester; the answer is decoded as `T` (a [`Tester`], or
    /// something smaller when only the id matters).
    pub async fn create_tester_as<T: DeserializeOwned>(
        &self,
        beta: &str,
        input: &TesterInput,
    ) -> Result<T, ApiError> {
        self.send_create(beta, input).await?.json(Op::TesterCreate)
    }

    async fn send_create(&self, beta: &str, input: &TesterInput) -> Result<Reply, ApiError> {
        self.call_raw(
            Op::TesterCreate,
            Some(beta),
            &format!("betas/{beta}/testers.json"),
            &[],
            Some(input.to_body_bytes().into()),
        )
        .await
    }

    pub async fn create_tester(&self, beta: &str, input: &TesterInput) -> Result<Tester, ApiError> {
        self.create_tester_as(beta, input).await
    }

    /// Creates a tester and returns only its id: decoding the whole record
    /// costs more than the import needs.
    pub async fn create_tester_id(&self, beta: &str, input: &TesterInput) -> Result<u64, ApiError> {
        #[derive(serde::Deserialize)]
        struct Created {
            id: u64,
        }
        let r = self.send_create(beta, input).await?;
        match leading_id(&r.body) {
            Some(id) => Ok(id),
            None => Ok(r.json::<Created>(Op::TesterCreate)?.id),
        }
    }

    pub async fn update_tester(
        &self,
        beta: &str,
        id: u64,
        input: &TesterInput,
    ) -> Result<Tester, ApiError> {
        let r = self
            .call_raw(
                Op::TesterUpdate,
                Some(beta),
                &format!("betas/{beta}/testers/{id}.json"),
                &[],
                Some(input.to_body_bytes().into()),
            )
            .await?;
        r.json(Op::TesterUpdate)
    }
}

/// `Authorization: Basic base64(key:)`, as reqwest's `basic_auth` writes it,
/// built once rather than for every request (~2,500 instructions each).
/// Marked sensitive, so a debug print of a request does not show it.
fn basic_auth_header(key: &ApiKey) -> header::HeaderValue {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{}:", key.expose()));
    let mut value = header::HeaderValue::from_str(&format!("Basic {encoded}"))
        .expect("base64 is a valid header value");
    value.set_sensitive(true);
    value
}

/// The id of a tester object whose first key is `"id"`, as the documented
/// tester object has it, read without decoding the rest of the record
/// (decoding ~800 bytes of JSON for one number was a tenth of the import's
/// instructions per row). `None` for any other shape: the caller then
/// decodes the whole answer.
fn leading_id(body: &[u8]) -> Option<u64> {
    let rest = body.trim_ascii_start().strip_prefix(b"{")?;
    let rest = rest.trim_ascii_start().strip_prefix(b"\"id\"")?;
    let rest = rest.trim_ascii_start().strip_prefix(b":")?;
    let rest = rest.trim_ascii_start();
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let (number, after) = rest.split_at(digits);
    if !matches!(after.trim_ascii_start().first(), Some(b',' | b'}')) {
        return None;
    }
    std::str::from_utf8(number).ok()?.parse().ok()
}

/// Words of an error message that mean the rate limiter answered: the
/// wording is undocumented [U], so any of these, in any case, will do.
const THROTTLE_WORDS: [&str; 6] = [
    "rate limit",
    "rate-limit",
    "ratelimit",
    "too many requests",
    "throttl",
    "slow down",
];

/// Whether an error answer is the server's rate limiter: a 429 always; a
/// 503 (the status the reference gives for a throttled request [S], but
/// also any server's "unavailable") only with a sign of it: a `Retry-After`
/// header, or a message that speaks of rate limits. A plain 503 is a server
/// error.
fn is_throttle_answer(status: StatusCode, retry_after: bool, messages: &ApiMessages) -> bool {
    match status {
        StatusCode::TOO_MANY_REQUESTS => true,
        StatusCode::SERVICE_UNAVAILABLE => {
            retry_after || THROTTLE_WORDS.iter().any(|w| messages.mentions(w))
        }
        _ => false,
    }
}

/// `Retry-After` as seconds or an HTTP date. Zero means no hint.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// An error and every error under it, outermost first. An `io::Error`'s
/// `source()` skips the error it wraps (rustls's, say, often inside two of
/// them), so wrapped errors are visited too.
fn error_chain<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Vec<&'a (dyn std::error::Error + 'static)> {
    let mut out = Vec::new();
    let mut next = Some(e);
    while let Some(s) = next {
        out.push(s);
        next = match s
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => s.source(),
        };
    }
    out
}

/// A network error, described without its URL (which names the host and
/// path only, but keep it short and uniform).
fn describe_transport(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "the connection dropped while reading the answer"
    } else {
        "the request failed"
    };
    let mut cause = String::new();
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = src {
        cause = s.to_string();
        src = s.source();
    }
    if cause.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}: {cause}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_redacted() {
        let k = ApiKey::new("s3cret-key");
        assert!(!format!("{k:?} {k}").contains("s3cret"));
    }

    #[test]
    fn the_auth_header_is_what_basic_auth_sends_and_is_sensitive() {
        let key = ApiKey::new("s3cret-key");
        let ours = basic_auth_header(&key);
        let theirs = reqwest::Client::new()
            .get("http://localhost/")
            .basic_auth(key.expose(), Some(""))
            .build()
            .unwrap();
        assert_eq!(ours, theirs.headers()[header::AUTHORIZATION]);
        assert!(ours.is_sensitive());
        assert!(!format!("{ours:?}").contains("czNjcmV0"));
    }

    #[test]
    fn urls_are_built_from_the_base_and_kept_per_path() {
        let c = Client::new(
            "http://127.0.0.1:9/api/v2".parse().unwrap(),
            ApiKey::new("k"),
            Limiter::new(&[]),
            RetryPolicy::default(),
        );
        for _ in 0..2 {
            for i in 0..12 {
                let path = format!("betas/1/testers/{i}.json");
                assert_eq!(
                    c.url_for(&path).as_str(),
                    format!("http://127.0.0.1:9/api/v2/{path}")
                );
            }
        }
        assert_eq!(c.urls.lock().unwrap().len(), 8);
    }

    #[test]
    fn a_leading_id_is_read_and_other_shapes_are_left_to_serde() {
        assert_eq!(leading_id(br#"{"id":42,"email":"a@b.co"}"#), Some(42));
        assert_eq!(leading_id(b" {\n  \"id\" : 7 }"), Some(7));
        for other in [
            &br#"{"email":"a@b.co","id":42}"#[..],
            br#"{"id":"42"}"#,
            br#"{"id":4.2}"#,
            br#"{"id":-1}"#,
            br#"{"id":}"#,
            br#"{"identity":1}"#,
            br#"{"id":99999999999999999999}"#,
            br#"[{"id":1}]"#,
            b"",
        ] {
            assert_eq!(
                leading_id(other),
                None,
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }

    #[test]
    fn a_503_is_throttling_only_with_a_sign_of_it() {
        let throttled = |status: u16, retry_after: bool, body: &str| {
            is_throttle_answer(
                StatusCode::from_u16(status).unwrap(),
                retry_after,
                &ApiMessages::parse(body.as_bytes()),
            )
        };
        for body in [
            r#"{"errors":[{"code":null,"message":"Rate limit exceeded. Please slow down."}]}"#,
            r#"{"error":"Too Many Requests"}"#,
            r#"{"errors":["THROTTLED"]}"#,
            "Rate-Limit reached",
            "you are being ratelimited",
        ] {
            assert!(throttled(503, false, body), "{body}");
        }
        assert!(throttled(
            503,
            true,
            r#"{"errors":["Service Unavailable"]}"#
        ));
        assert!(throttled(503, true, ""));
        assert!(throttled(429, false, ""));
        assert!(!throttled(
            503,
            false,
            r#"{"errors":["Service Unavailable"]}"#
        ));
        assert!(!throttled(503, false, ""));
        assert!(!throttled(500, true, "rate limit exceeded"));
        assert!(!throttled(502, false, "<html>Bad Gateway</html>"));
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("0"), Some(Duration::ZERO));
        let future = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        let d = parse_retry_after(&future).unwrap();
        assert!(d > Duration::from_secs(25) && d <= Duration::from_secs(30));
        assert_eq!(parse_retry_after("soon"), None);
    }
}
