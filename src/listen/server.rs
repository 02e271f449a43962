//! The HTTP side of `listen`: `POST <path>` takes deliveries, `GET /healthz`
//! and `GET /status` tell how it goes.
//!
//! A delivery's answer is one of three: 401 (signature wrong, missing, or
//! its time outside the tolerance; logged without the body, nothing
//! written), 200 (journalled durably, or already journalled), 429 (it
//! could not be journalled now: Prefinery sends it again). Never 410: that
//! answer removes the endpoint from the project.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use super::journal::{Delivery, Journalled, Writer, sha256_hex};
use super::signature::verify;
use super::{ListenConfig, Stats, now_unix};

/// The largest body taken (axum's default is 2 MB; a Prefinery event is a
/// few KB).
const MAX_BODY: usize = 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<ListenConfig>,
    pub stats: Arc<Stats>,
    pub writer: Writer,
}

pub fn router(state: AppState) -> Router {
    let path = state.config.path.clone();
    Router::new()
        .route(&path, post(deliver))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/status", get(status))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn status(State(s): State<AppState>) -> Response {
    axum::Json(s.stats.status()).into_response()
}

fn busy(s: &AppState, why: &str) -> Response {
    s.stats.refused_busy.fetch_add(1, Ordering::Relaxed);
    tracing::warn!("delivery answered 429 (Prefinery will send it again): {why}");
    (StatusCode::TOO_MANY_REQUESTS, "busy: send again later\n").into_response()
}

async fn deliver(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let sig = headers.get("x-prefinery-signature").map(|v| v.as_bytes());
    let signed_at = match verify(
        sig,
        &body,
        &s.config.secrets,
        now_unix(),
        s.config.tolerance,
    ) {
        Ok(t) => t,
        Err(why) => {
            s.stats.rejected_signature.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                bytes = body.len(),
                "delivery refused (401): {}",
                why.reason()
            );
            return (StatusCode::UNAUTHORIZED, "invalid signature\n").into_response();
        }
    };
    if s.stats.pending.load(Ordering::Relaxed) >= s.config.max_pending {
        return busy(
            &s,
            &format!(
                "{} events are waiting to be applied (--max-pending)",
                s.config.max_pending
            ),
        );
    }
    let d = Delivery {
        received_at: crate::time::iso8601(std::time::SystemTime::now()),
        signed_at,
        sha256: sha256_hex(&body),
        body,
    };
    match s.writer.journal(d).await {
        Ok(j) => {
            s.stats.received.fetch_add(1, Ordering::Relaxed);
            if j == Journalled::Duplicate {
                s.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            }
            s.stats
                .last_event_at
                .store(now_unix() as u64, Ordering::Relaxed);
            (StatusCode::OK, "ok\n").into_response()
        }
        Err(why) => busy(&s, &why),
    }
}
