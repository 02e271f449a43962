//! The client's errors: one variant per class of failure, each with a message
//! that says what happened and what to do.
//!
//! Nothing here ever holds the API key: requests are described by their
//! operation and path, never by their headers or full URL.

use std::fmt;
use std::time::Duration;

use serde_json::Value;

/// Every call prefsync makes, named after what it does. Used to pick the rate
/// class, to name the permission a 403 lacks, and to decide what is safe to
/// retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    BetasList,
    BetaShow,
    TestersList,
    TesterShow,
    TesterCreate,
    TesterUpdate,
    TesterDelete,
    TesterCheckin,
    CheckinCreate,
    PointsList,
    PointCreate,
    RewardsList,
    RewardShow,
    RewardCreate,
    RewardUpdate,
    SuppressionsList,
    SuppressionCreate,
    SuppressionDelete,
}

impl Op {
    /// The permission as Prefinery's settings page names it.
    pub fn permission(self) -> &'static str {
        use Op::*;
        match self {
            BetasList | BetaShow => "Projects > Read",
            TestersList | TesterShow => "Users > Read",
            TesterCreate => "Users > Create",
            TesterUpdate | TesterCheckin | CheckinCreate => "Users > Update",
            TesterDelete => "Users > Delete",
            // The permission for listing points is not documented.
            PointsList => "Points (list; the exact permission is not documented)",
            PointCreate => "Points > Create",
            RewardsList | RewardShow => "Rewards > Read",
            RewardCreate => "Rewards > Create",
            RewardUpdate => "Rewards > Update",
            SuppressionsList => "Email Suppressions > Read",
            SuppressionCreate => "Email Suppressions > Create",
            SuppressionDelete => "Email Suppressions > Delete",
        }
    }

    /// Whether the client may send the request again on its own after an
    /// answer that leaves its outcome unknown. Not for creates (a second
    /// record), nor check-ins (each one is a visit: the reference says they
    /// track logins and retention, so two count twice), nor deletes: a
    /// delete sent again answers 404 for its own first success, and only the
    /// operation, which asks whether the record is gone before it retries,
    /// can tell that from "already deleted".
    pub fn is_idempotent(self) -> bool {
        use Op::*;
        !matches!(
            self,
            TesterCreate
                | PointCreate
                | RewardCreate
                | SuppressionCreate
                | TesterCheckin
                | CheckinCreate
                | TesterDelete
                | SuppressionDelete
        )
    }

    pub fn describe(self) -> &'static str {
        use Op::*;
        match self {
            BetasList => "list projects",
            BetaShow => "show the project",
            TestersList => "list users",
            TesterShow => "show a user",
            TesterCreate => "create a user",
            TesterUpdate => "update a user",
            TesterDelete => "delete a user",
            TesterCheckin | CheckinCreate => "check a user in",
            PointsList => "list points",
            PointCreate => "issue points",
            RewardsList => "list rewards",
            RewardShow => "show a reward",
            RewardCreate => "issue a reward",
            RewardUpdate => "update a reward",
            SuppressionsList => "list suppressions",
            SuppressionCreate => "add a suppression",
            SuppressionDelete => "remove a suppression",
        }
    }

    /// Whether the URL names a record (`.../testers/{id}`) rather than a
    /// collection: a 404 on a collection can only mean the project is unknown.
    pub fn targets_record(self) -> bool {
        use Op::*;
        // A check-in by email names its user in the body: a 404 is most
        // likely an unknown email ([U] in the reference), and the project
        // was checked by the calls before it.
        matches!(
            self,
            TesterShow
                | TesterUpdate
                | TesterDelete
                | TesterCheckin
                | CheckinCreate
                | RewardShow
                | RewardUpdate
                | SuppressionDelete
        )
    }
}

/// One message from an error body, with the API's numeric code when it gave
/// one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiMessage {
    pub code: Option<i64>,
    pub message: String,
}

/// The messages of an error body, read from every shape the reference
/// mentions: `{"errors":[{"code","message"}]}`, `{"errors":["..."]}`,
/// `{"error":"..."}`, or plain text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiMessages(pub Vec<ApiMessage>);

impl ApiMessages {
    pub fn parse(body: &[u8]) -> ApiMessages {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            if text.is_empty() {
                return ApiMessages::default();
            }
            // Plain text or HTML: keep a short, single-line excerpt.
            let mut excerpt: String = text.chars().take(200).collect();
            excerpt = excerpt.split_whitespace().collect::<Vec<_>>().join(" ");
            return ApiMessages(vec![ApiMessage {
                code: None,
                message: excerpt,
            }]);
        };
        let mut out = Vec::new();
        collect_messages(&v, &mut out);
        ApiMessages(out)
    }

    pub fn has_code(&self, code: i64) -> bool {
        self.0.iter().any(|m| m.code == Some(code))
    }

    pub fn mentions(&self, needle: &str) -> bool {
        let needle = needle.to_ascii_lowercase();
        self.0
            .iter()
            .any(|m| m.message.to_ascii_lowercase().contains(&needle))
    }
}

fn collect_messages(v: &Value, out: &mut Vec<ApiMessage>) {
    match v {
        Value::String(s) => out.push(ApiMessage {
            code: None,
            message: s.clone(),
        }),
        Value::Array(items) => items.iter().for_each(|i| collect_messages(i, out)),
        Value::Object(obj) => {
            if let Some(errors) = obj.get("errors").or_else(|| obj.get("error")) {
                // `{"errors": {"email": ["is invalid"]}}` (Rails style) too.
                if let Value::Object(fields) = errors
                    && !fields.contains_key("message")
                {
                    for (field, msgs) in fields {
                        let mut inner = Vec::new();
                        collect_messages(msgs, &mut inner);
                        for m in inner {
                            out.push(ApiMessage {
                                code: m.code,
                                message: format!("{field} {}", m.message),
                            });
                        }
                    }
                    return;
                }
                collect_messages(errors, out);
            } else if let Some(message) = obj.get("message").and_then(Value::as_str) {
                out.push(ApiMessage {
                    code: obj.get("code").and_then(|c| {
                        c.as_i64()
                            .or_else(|| c.as_str().and_then(|s| s.parse().ok()))
                    }),
                    message: message.to_string(),
                });
            } else {
                out.push(ApiMessage {
                    code: None,
                    message: v.to_string(),
                });
            }
        }
        other => out.push(ApiMessage {
            code: None,
            message: other.to_string(),
        }),
    }
}

impl fmt::Display for ApiMessages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(no message)");
        }
        for (i, m) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            match m.code {
                Some(c) => write!(f, "{} (code {c})", m.message)?,
                None => f.write_str(&m.message)?,
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "failed to {op}: the API key was rejected (HTTP 401); it is wrong, expired or deleted. hint: check PREFINERY_API_KEY or --api-key-file"
    )]
    Unauthorized { op: &'static str },

    #[error(
        "failed to {op}: the account's plan does not include API access (HTTP 402). hint: upgrade the plan under Company Settings > Billing"
    )]
    PaymentRequired { op: &'static str },

    #[error(
        "failed to {op}: permission denied (HTTP 403). hint: this API key lacks {permission}; edit it under Company Settings > API Keys"
    )]
    Forbidden {
        op: &'static str,
        permission: &'static str,
    },

    #[error(
        "failed to {op}: project {beta:?} was not found, or is not visible to this key (HTTP 404). hint: check --beta; it takes the numeric API Beta ID or the project UID, both under the project's Settings > General"
    )]
    ProjectNotFound { op: &'static str, beta: String },

    #[error("failed to {op}: {what} was not found (HTTP 404): {messages}")]
    NotFound {
        op: &'static str,
        what: String,
        messages: ApiMessages,
    },

    #[error("failed to {op}: refused by the API (HTTP {status}): {messages}")]
    Rejected {
        op: &'static str,
        status: u16,
        messages: ApiMessages,
    },

    #[error(
        "failed to {op}: still throttled by the API (HTTP {status}) after waiting {}s. hint: lower --concurrency or the --rate quotas, or run again later",
        waited.as_secs()
    )]
    Throttled {
        op: &'static str,
        status: u16,
        waited: Duration,
    },

    #[error("failed to {op}: server error (HTTP {status}) after {attempts} attempts: {messages}")]
    Server {
        op: &'static str,
        status: u16,
        attempts: u32,
        messages: ApiMessages,
    },

    #[error("failed to {op}: network error after {attempts} attempts: {cause}")]
    Transport {
        op: &'static str,
        attempts: u32,
        cause: String,
    },

    /// The API could not be reached in a way that waiting will not mend (a
    /// certificate, a name that does not resolve, nothing listening before
    /// anything answered): never retried, and the run stops.
    #[error("failed to {op}: could not reach the API: {reason}")]
    Unreachable {
        op: &'static str,
        reason: Unreachable,
    },

    /// A create was sent but no answer came back that says whether it was
    /// applied. The caller must look the record up before trying again.
    #[error("failed to {op}: outcome unknown, it may or may not have been applied ({cause})")]
    OutcomeUnknown {
        op: &'static str,
        /// The HTTP status of the answer, if one came (a 5xx or 408).
        status: Option<u16>,
        cause: String,
    },

    /// The server kept refusing as unavailable (plain 503s) a request that
    /// it did not apply, through every attempt: nothing was lost, so the run
    /// stops to be resumed later rather than giving up on the row.
    #[error(
        "failed to {op}: the API was unavailable {attempts} times in a row ({cause}). hint: run the same command again later; it resumes where it stopped"
    )]
    Unavailable {
        op: &'static str,
        attempts: u32,
        cause: String,
    },

    #[error("failed to {op}: unexpected response (HTTP {status}): {cause}")]
    Decode {
        op: &'static str,
        status: u16,
        cause: String,
    },

    #[error("stopped before {op}: the run was interrupted")]
    Cancelled { op: &'static str },
}

/// What could not be reached, and how. Each names the host (and port, for
/// a connection), never the path or the query.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreachable {
    #[error(
        "network: connection refused to {addr}. hint: check --base-url, and that the server is running and reachable from here"
    )]
    Refused { addr: String },

    #[error(
        "network: no route to {addr} ({cause}). hint: check the network connection and --base-url"
    )]
    NoRoute { addr: String, cause: String },

    #[error(
        "DNS: could not resolve {host} ({cause}). hint: check the host name in --base-url and this machine's DNS settings"
    )]
    Dns { host: String, cause: String },

    #[error(
        "TLS: certificate not trusted for {host} ({cause}). hint: the server must present a valid certificate for {host} from a public certificate authority; prefsync never skips the check"
    )]
    Certificate { host: String, cause: String },

    #[error(
        "TLS: handshake with {host} failed ({cause}). hint: check that --base-url is the https:// address of the API"
    )]
    Handshake { host: String, cause: String },
}

impl ApiError {
    /// Whether the key or the plan is refused outright: nothing else will
    /// work either, so the whole run should stop (exit code 3).
    pub fn is_access_denied(&self) -> bool {
        matches!(
            self,
            ApiError::Unauthorized { .. }
                | ApiError::PaymentRequired { .. }
                | ApiError::Forbidden { .. }
        )
    }

    /// The HTTP status, where there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Unauthorized { .. } => Some(401),
            ApiError::PaymentRequired { .. } => Some(402),
            ApiError::Forbidden { .. } => Some(403),
            ApiError::ProjectNotFound { .. } | ApiError::NotFound { .. } => Some(404),
            ApiError::Rejected { status, .. }
            | ApiError::Throttled { status, .. }
            | ApiError::Server { status, .. }
            | ApiError::Decode { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the failure is transient: the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ApiError::Throttled { .. }
                | ApiError::Server { .. }
                | ApiError::Transport { .. }
                | ApiError::Unavailable { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_documented_error_shape() {
        let m =
            ApiMessages::parse(br#"{"errors":[{"code":2702,"message":"Email already exists."}]}"#);
        assert_eq!(m.to_string(), "Email already exists. (code 2702)");
        assert!(m.has_code(2702));
        let m = ApiMessages::parse(br#"{"errors":["Email is invalid","Status is bad"]}"#);
        assert_eq!(m.to_string(), "Email is invalid; Status is bad");
        let m = ApiMessages::parse(br#"{"error":"Not authorized"}"#);
        assert_eq!(m.to_string(), "Not authorized");
        let m = ApiMessages::parse(b"<html><body>502 Bad\n Gateway</body></html>");
        assert_eq!(m.to_string(), "<html><body>502 Bad Gateway</body></html>");
        let m = ApiMessages::parse(br#"{"errors":{"email":["has already been taken"]}}"#);
        assert_eq!(m.to_string(), "email has already been taken");
        assert!(m.mentions("already been TAKEN"));
        assert_eq!(ApiMessages::parse(b"").to_string(), "(no message)");
    }

    #[test]
    fn forbidden_names_the_permission() {
        let e = ApiError::Forbidden {
            op: Op::TesterCreate.describe(),
            permission: Op::TesterCreate.permission(),
        };
        assert!(e.to_string().contains(
            "this API key lacks Users > Create; edit it under Company Settings > API Keys"
        ));
    }
}
