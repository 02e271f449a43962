//! HTTP dispatch: authentication, permissions, rate limits, faults, then the
//! operation on the world. Paths are accepted with and without `.json`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use serde_json::{Map, Value, json};

use super::App;
use super::faults::{AfterWrite, Fault};
use super::keys::Permission;
use super::limits::LimitClass;
use super::world::{Outcome, Refusal, World};

const PER_PAGE: usize = 25;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/__sandbox/stats", get(admin_stats))
        .route("/__sandbox/outbox", get(admin_outbox))
        .route("/__sandbox/state", get(admin_state))
        .route("/__sandbox/webhooks", get(admin_webhooks))
        .fallback(api)
        .with_state(app)
}

async fn admin_stats(State(app): State<Arc<App>>) -> Response {
    axum::Json(app.stats_json()).into_response()
}

/// What the webhook sender did (`null` when webhooks are off).
async fn admin_webhooks(State(app): State<Arc<App>>) -> Response {
    let v = app.webhooks.as_ref().map(|h| h.stats.to_json());
    axum::Json(v).into_response()
}

async fn admin_outbox(State(app): State<Arc<App>>) -> Response {
    let outbox = app.with_world(|w| serde_json::to_value(&w.outbox).unwrap());
    axum::Json(outbox).into_response()
}

/// Every project with every record, for tests to compare against.
async fn admin_state(
    State(app): State<Arc<App>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let only = q.get("beta").cloned();
    let v = app.with_world(|w| {
        let mut projects = Vec::new();
        for p in w.projects.values() {
            if only
                .as_deref()
                .is_some_and(|b| w.project_id(b) != Some(p.id))
            {
                continue;
            }
            projects.push(json!({
                "id": p.id,
                "uid": p.uid,
                "name": p.name,
                "users": p.users.values().map(|u| p.user_json(u)).collect::<Vec<_>>(),
                "rewards": p.rewards.values().collect::<Vec<_>>(),
                "points": p.points.values().collect::<Vec<_>>(),
                "suppressions": p.suppressions.values().collect::<Vec<_>>(),
            }));
        }
        json!({ "projects": projects })
    });
    axum::Json(v).into_response()
}

fn error_response(status: u16, code: Option<u32>, message: &str) -> Response {
    let r = Refusal::new(status, code, message);
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(r.body()),
    )
        .into_response()
}

/// A response whose body fails: the client sees the connection drop.
fn dropped() -> Response {
    let stream = futures::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("connection dropped by the sandbox"))
    });
    Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn key_of(headers: &HeaderMap, query: &HashMap<String, String>) -> Option<String> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(b64) = v.strip_prefix("Basic ") {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()?;
            let s = String::from_utf8(raw).ok()?;
            return Some(s.split_once(':').map_or(s.clone(), |(u, _)| u.to_string()));
        }
        if let Some(t) = v.strip_prefix("Bearer ") {
            return Some(t.trim().to_string());
        }
    }
    query.get("api_key").cloned()
}

/// What a request is, once its path is read.
struct Route {
    name: &'static str,
    permission: Option<Permission>,
    limits: &'static [LimitClass],
    write: bool,
    beta: Option<String>,
    id: Option<u64>,
}

fn route(method: &Method, path: &str) -> Option<Route> {
    let path = path.strip_prefix("/api/v2/")?;
    let mut segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    if let Some(last) = segs.last_mut() {
        *last = last.strip_suffix(".json").unwrap_or(last);
    }
    use LimitClass as L;
    use Permission as P;
    let r = |name, permission, limits, write, beta: Option<&str>, id: Option<&str>| {
        let id = match id {
            Some(s) => Some(s.parse::<u64>().ok()?),
            None => None,
        };
        Some(Route {
            name,
            permission,
            limits,
            write,
            beta: beta.map(str::to_string),
            id,
        })
    };
    let m = method.as_str();
    match (m, segs.as_slice()) {
        ("GET", ["betas"]) => r(
            "betas.list",
            Some(P::ProjectsRead),
            &[L::Betas],
            false,
            None,
            None,
        ),
        ("GET", ["betas", b]) => r(
            "betas.show",
            Some(P::ProjectsRead),
            &[L::Betas],
            false,
            Some(b),
            None,
        ),
        ("DELETE", ["betas", b]) => r(
            "betas.delete",
            Some(P::ProjectsDelete),
            &[],
            true,
            Some(b),
            None,
        ),
        ("GET", ["betas", b, "testers"]) => r(
            "testers.list",
            Some(P::UsersRead),
            &[L::TestersList, L::AccountList],
            false,
            Some(b),
            None,
        ),
        ("POST", ["betas", b, "testers"]) => r(
            "testers.create",
            Some(P::UsersCreate),
            &[],
            true,
            Some(b),
            None,
        ),
        ("GET", ["betas", b, "testers", id]) => r(
            "testers.show",
            Some(P::UsersRead),
            &[],
            false,
            Some(b),
            Some(id),
        ),
        ("PUT", ["betas", b, "testers", id]) => r(
            "testers.update",
            Some(P::UsersUpdate),
            &[],
            true,
            Some(b),
            Some(id),
        ),
        ("DELETE", ["betas", b, "testers", id]) => r(
            "testers.delete",
            Some(P::UsersDelete),
            &[],
            true,
            Some(b),
            Some(id),
        ),
        ("POST", ["betas", b, "testers", id, "checkin"]) => r(
            "testers.checkin",
            Some(P::UsersUpdate),
            &[],
            true,
            Some(b),
            Some(id),
        ),
        ("POST", ["betas", b, "checkins"]) => r(
            "checkins.create",
            Some(P::UsersUpdate),
            &[],
            true,
            Some(b),
            None,
        ),
        // The permission for listing points is not documented: any valid key.
        ("GET", ["betas", b, "points"]) => {
            r("points.list", None, &[L::PointsList], false, Some(b), None)
        }
        ("POST", ["betas", b, "points"]) => r(
            "points.create",
            Some(P::PointsCreate),
            &[],
            true,
            Some(b),
            None,
        ),
        ("GET", ["betas", b, "rewards"]) => r(
            "rewards.list",
            Some(P::RewardsRead),
            &[L::RewardsList],
            false,
            Some(b),
            None,
        ),
        ("POST", ["betas", b, "rewards"]) => r(
            "rewards.create",
            Some(P::RewardsCreate),
            &[],
            true,
            Some(b),
            None,
        ),
        ("GET", ["betas", b, "rewards", id]) => r(
            "rewards.show",
            Some(P::RewardsRead),
            &[],
            false,
            Some(b),
            Some(id),
        ),
        ("PUT", ["betas", b, "rewards", id]) => r(
            "rewards.update",
            Some(P::RewardsUpdate),
            &[],
            true,
            Some(b),
            Some(id),
        ),
        ("GET", ["betas", b, "suppressions"]) => r(
            "suppressions.list",
            Some(P::SuppressionsRead),
            &[],
            false,
            Some(b),
            None,
        ),
        ("POST", ["betas", b, "suppressions"]) => r(
            "suppressions.create",
            Some(P::SuppressionsCreate),
            &[],
            true,
            Some(b),
            None,
        ),
        ("DELETE", ["betas", b, "suppressions", id]) => r(
            "suppressions.delete",
            Some(P::SuppressionsDelete),
            &[],
            true,
            Some(b),
            Some(id),
        ),
        _ => None,
    }
}

/// Reads a JSON or form-encoded body. A write that is neither gets the 500
/// the docs warn about.
fn parse_body(headers: &HeaderMap, body: &Bytes) -> Result<Value, Refusal> {
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ctype.starts_with("application/json") {
        if body.is_empty() {
            return Ok(json!({}));
        }
        return serde_json::from_slice(body)
            .map_err(|_| Refusal::new(400, None, "The request body is not valid JSON."));
    }
    if ctype.starts_with("application/x-www-form-urlencoded") {
        let mut root = Map::new();
        for (k, v) in url::form_urlencoded::parse(body) {
            insert_form_field(&mut root, &k, v.into_owned());
        }
        return Ok(Value::Object(root));
    }
    if body.is_empty() {
        return Ok(json!({}));
    }
    Err(Refusal::new(500, None, "A general error has occurred."))
}

/// `a[b][c]=v` into `{"a":{"b":{"c":v}}}`.
fn insert_form_field(root: &mut Map<String, Value>, key: &str, value: String) {
    let mut parts = key.split('[').map(|p| p.trim_end_matches(']'));
    let first = parts.next().unwrap_or_default().to_string();
    let rest: Vec<&str> = parts.collect();
    let mut cur = root;
    let mut name = first;
    for p in rest {
        let entry = cur.entry(name).or_insert_with(|| json!({}));
        if !entry.is_object() {
            *entry = json!({});
        }
        cur = entry.as_object_mut().unwrap();
        name = p.to_string();
    }
    cur.insert(name, Value::String(value));
}

fn pagination_header(page: usize, total: usize, count: usize, with_total: bool) -> HeaderValue {
    let pages = total.div_ceil(PER_PAGE);
    let mut v = json!({
        "previous_page": if page > 1 { Some(page - 1) } else { None },
        "next_page": if page < pages { Some(page + 1) } else { None },
        "current_page": page,
        "per_page": PER_PAGE,
        "count": count,
        "pages": pages,
    });
    if with_total {
        v["total_count"] = json!(total);
    }
    HeaderValue::from_str(&v.to_string()).unwrap()
}

fn list_response(items: Vec<Value>, page: usize, total: usize, with_total: bool) -> Response {
    let count = items.len();
    let mut resp = axum::Json(Value::Array(items)).into_response();
    resp.headers_mut().insert(
        "x-pagination",
        pagination_header(page, total, count, with_total),
    );
    resp
}

fn page_of<T>(items: impl Iterator<Item = T>, page: usize) -> (Vec<T>, usize) {
    let mut total = 0;
    let mut out = Vec::new();
    let start = (page - 1) * PER_PAGE;
    for (i, it) in items.enumerate() {
        if i >= start && i < start + PER_PAGE {
            out.push(it);
        }
        total += 1;
    }
    (out, total)
}

async fn api(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query: HashMap<String, String> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let Some(route) = route(&method, uri.path()) else {
        app.stats.record("unknown", 404);
        return error_response(404, None, "Not found.");
    };
    let resp = handle(&app, &route, &method, &headers, &query, &body).await;
    let status = resp.status().as_u16();
    app.stats.record(route.name, status);
    resp
}

async fn handle(
    app: &Arc<App>,
    route: &Route,
    method: &Method,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    body: &Bytes,
) -> Response {
    if let Some(d) = app.faults.latency() {
        tokio::time::sleep(d).await;
    }
    match app.faults.before() {
        Fault::DropBefore => return dropped(),
        Fault::FailBefore => return error_response(500, None, "A general error has occurred."),
        Fault::None => {}
    }
    let Some(key) = key_of(headers, query) else {
        return error_response(401, None, "Missing API key.");
    };
    let Some(spec) = app.config.keys.0.get(&key) else {
        return error_response(401, None, "Invalid API key.");
    };
    if spec.expired {
        return error_response(401, None, "This API key has expired.");
    }
    if let Some(p) = route.permission
        && !spec.permissions.contains(&p)
    {
        return error_response(
            403,
            None,
            &format!("This API key does not have the {} permission.", p.name()),
        );
    }
    let beta = match &route.beta {
        Some(b) => match app.with_world(|w| w.project_id(b)) {
            Some(id) => Some(id),
            None => return error_response(404, Some(2201), "Beta not found."),
        },
        None => None,
    };
    if !route.limits.is_empty() || route.write {
        let writes = route.write.then_some(&LimitClass::Writes);
        let scopes: Vec<(LimitClass, String)> = route
            .limits
            .iter()
            .chain(writes)
            .map(|c| {
                let scope = match c {
                    LimitClass::AccountList | LimitClass::Betas | LimitClass::Writes => {
                        "company".to_string()
                    }
                    _ => beta.unwrap_or(0).to_string(),
                };
                (*c, scope)
            })
            .collect();
        if !app.limits.admit(&scopes) {
            app.stats.throttled.fetch_add(1, Ordering::Relaxed);
            let mut resp = error_response(
                app.config.throttle_status,
                None,
                "Rate limit exceeded. Please slow down.",
            );
            if let Some(s) = app.config.retry_after {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(s));
            }
            return resp;
        }
    }
    let input = if matches!(*method, Method::POST | Method::PUT) {
        match parse_body(headers, body) {
            Ok(v) => v,
            Err(r) => return error_response(r.status, r.code, &r.message),
        }
    } else {
        Value::Null
    };

    let result = {
        let mut w = app.world.lock().unwrap();
        let r = execute(&mut w, app.config.total_key, route, beta, query, &input);
        app.announce(&mut w);
        r
    };
    if route.write {
        app.touched();
    }
    let resp = match result {
        Ok(r) => r,
        Err(refusal) => return error_response(refusal.status, refusal.code, &refusal.message),
    };
    if route.write && resp.status().is_success() {
        match app.faults.after_write() {
            AfterWrite::Fail => return error_response(500, None, "A general error has occurred."),
            AfterWrite::Drop => return dropped(),
            AfterWrite::None => {}
        }
    }
    resp
}

fn created(v: Value) -> Response {
    (StatusCode::CREATED, axum::Json(v)).into_response()
}

fn wrapped<'a>(input: &'a Value, key: &str) -> Outcome<&'a Value> {
    input.get(key).filter(|v| v.is_object()).ok_or_else(|| {
        Refusal::new(
            422,
            None,
            format!("param is missing or the value is empty: {key}"),
        )
    })
}

fn execute(
    w: &mut World,
    with_total: bool,
    route: &Route,
    beta: Option<u64>,
    query: &HashMap<String, String>,
    input: &Value,
) -> Outcome<Response> {
    let page: usize = query
        .get("page")
        .and_then(|p| p.parse().ok())
        .filter(|p| *p >= 1)
        .unwrap_or(1);
    let b = beta.unwrap_or(0);
    let id = route.id.unwrap_or(0);
    let q = |k: &str| query.get(k).map(|s| s.as_str()).filter(|s| !s.is_empty());
    Ok(match route.name {
        "betas.list" => {
            let (items, total) = page_of(w.projects.values().map(|p| p.beta_json()), page);
            list_response(items, page, total, with_total)
        }
        "betas.show" => axum::Json(w.project(b).beta_json()).into_response(),
        "betas.delete" => {
            w.projects.remove(&b);
            StatusCode::OK.into_response()
        }
        "testers.list" => {
            let contains = q("email_contains").map(str::to_lowercase);
            let name = q("name").map(str::to_lowercase);
            let code = q("referral_code");
            let custom = q("custom_vars");
            let filtered =
                contains.is_some() || name.is_some() || code.is_some() || custom.is_some();
            let (items, total) = if let Some(email) = q("email_is").or_else(|| q("email")) {
                let p = w.project(b);
                let found: Vec<Value> = p
                    .user_by_email(email)
                    .map(|u| p.user_json(u))
                    .into_iter()
                    .collect();
                let n = found.len();
                (if page == 1 { found } else { vec![] }, n)
            } else if !filtered {
                // Fast path: pages by position in id order.
                let p = w.projects.get_mut(&b).unwrap();
                let total = p.users.len();
                let users: Vec<super::world::User> = p
                    .users_page((page - 1) * PER_PAGE, PER_PAGE)
                    .into_iter()
                    .cloned()
                    .collect();
                (users.iter().map(|u| p.user_json(u)).collect(), total)
            } else {
                let p = w.project(b);
                let pv = |u: &super::world::User, k: &str| {
                    u.profile
                        .get(k)
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_lowercase()
                };
                let it = p.users.values().filter(|u| {
                    contains
                        .as_ref()
                        .is_none_or(|c| u.email.to_lowercase().contains(c.as_str()))
                        && name.as_ref().is_none_or(|n| {
                            pv(u, "first_name").contains(n.as_str())
                                || pv(u, "last_name").contains(n.as_str())
                        })
                        && code.is_none_or(|c| u.referral_code == c)
                        && custom.is_none_or(|c| {
                            ["custom_var1", "custom_var2", "custom_var3"]
                                .iter()
                                .any(|k| u.profile.get(*k).and_then(Value::as_str) == Some(c))
                        })
                });
                let (users, total) = page_of(it, page);
                (users.into_iter().map(|u| p.user_json(u)).collect(), total)
            };
            list_response(items, page, total, with_total)
        }
        "testers.show" => {
            let p = w.project(b);
            let u = p
                .users
                .get(&id)
                .ok_or_else(|| Refusal::not_found("Tester"))?;
            axum::Json(p.user_json(u)).into_response()
        }
        "testers.create" => created(w.create_user(b, wrapped(input, "tester")?)?),
        "testers.update" => {
            axum::Json(w.update_user(b, id, wrapped(input, "tester")?)?).into_response()
        }
        "testers.delete" => {
            w.delete_user(b, id)?;
            StatusCode::OK.into_response()
        }
        "testers.checkin" => {
            w.checkin(b, Ok(id))?;
            StatusCode::ACCEPTED.into_response()
        }
        "checkins.create" => {
            let c = wrapped(input, "checkin")?;
            let email = c.get("email").and_then(Value::as_str).unwrap_or("");
            w.checkin(b, Err(email))?;
            StatusCode::ACCEPTED.into_response()
        }
        "points.list" => {
            let p = w.project(b);
            let user = q("email").map(|e| p.user_by_email(e).map(|u| u.id));
            let it = p
                .points
                .values()
                .filter(|r| user.is_none_or(|u| Some(r.user_id) == u))
                .map(|r| serde_json::to_value(r).unwrap());
            let (items, total) = page_of(it, page);
            list_response(items, page, total, with_total)
        }
        "points.create" => created(w.create_point(b, input)?),
        "rewards.list" => {
            let p = w.project(b);
            let user = q("email").map(|e| p.user_by_email(e).map(|u| u.id));
            let status = q("status");
            let it = p
                .rewards
                .values()
                .filter(|r| user.is_none_or(|u| Some(r.user_id) == u))
                .filter(|r| status.is_none_or(|s| r.status == s))
                .map(|r| serde_json::to_value(r).unwrap());
            let (items, total) = page_of(it, page);
            list_response(items, page, total, with_total)
        }
        "rewards.show" => {
            let r = w
                .project(b)
                .rewards
                .get(&id)
                .ok_or_else(|| Refusal::not_found("Reward"))?;
            axum::Json(serde_json::to_value(r).unwrap()).into_response()
        }
        "rewards.create" => {
            let body = input
                .get("reward")
                .filter(|v| v.is_object())
                .unwrap_or(input);
            created(w.create_reward(b, body)?)
        }
        "rewards.update" => {
            let body = input
                .get("reward")
                .filter(|v| v.is_object())
                .unwrap_or(input);
            axum::Json(w.update_reward(b, id, body)?).into_response()
        }
        "suppressions.list" => {
            let p = w.project(b);
            let email = q("email");
            let it = p
                .suppressions
                .values()
                .filter(|s| email.is_none_or(|e| s.email.eq_ignore_ascii_case(e)))
                .map(|r| serde_json::to_value(r).unwrap());
            let (items, total) = page_of(it, page);
            list_response(items, page, total, with_total)
        }
        "suppressions.create" => created(w.create_suppression(b, input)?),
        "suppressions.delete" => {
            w.delete_suppression(b, id)?;
            StatusCode::OK.into_response()
        }
        other => return Err(Refusal::new(500, None, format!("unhandled route {other}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_with_and_without_json_suffix() {
        let r = route(&Method::GET, "/api/v2/betas/a9b8c7de/testers.json").unwrap();
        assert_eq!(r.name, "testers.list");
        assert_eq!(r.beta.as_deref(), Some("a9b8c7de"));
        let r = route(&Method::PUT, "/api/v2/betas/1/testers/42").unwrap();
        assert_eq!((r.name, r.id), ("testers.update", Some(42)));
        assert!(route(&Method::GET, "/api/v2/betas/1/testers/abc").is_none());
        assert!(route(&Method::PATCH, "/api/v2/betas/1").is_none());
    }

    #[test]
    fn form_fields_nest() {
        let mut m = Map::new();
        insert_form_field(&mut m, "checkin[email]", "a@b.c".into());
        insert_form_field(&mut m, "quantity", "10".into());
        assert_eq!(
            Value::Object(m),
            json!({"checkin":{"email":"a@b.c"},"quantity":"10"})
        );
    }
}
