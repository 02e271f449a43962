//! Exit codes (documented in the README) and the errors that pick them.

use std::fmt;

use crate::api::ApiError;

/// What a run ended with. The numbers are a public interface: scripts and
/// cron jobs test them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done.
    Done = 0,
    /// An unexpected internal error.
    Internal = 1,
    /// A usage or configuration error.
    Usage = 2,
    /// The API refused the credentials, the plan or a permission.
    AccessDenied = 3,
    /// Finished, but some rows were rejected (see the report).
    RowsRejected = 4,
    /// Stopped before the end; running the same command again resumes.
    Resumable = 5,
    /// Another run holds the lock.
    Locked = 6,
    /// The API could not be reached: connection refused before anything
    /// answered, a host name that does not resolve, a TLS failure.
    Unreachable = 7,
}

impl Exit {
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// A configuration or usage problem found before any work: exit 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Another run holds the lock: exit 6.
#[derive(Debug)]
pub struct LockedError(pub String);

impl fmt::Display for LockedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LockedError {}

/// A run that stopped early but can be resumed: exit 5.
#[derive(Debug)]
pub struct StoppedError(pub String);

impl fmt::Display for StoppedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoppedError {}

/// The key lacks a permission a job needs (`check --for`): exit 3.
#[derive(Debug)]
pub struct AccessDeniedError(pub String);

impl fmt::Display for AccessDeniedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AccessDeniedError {}

pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

/// An error as the user reads it: one line, `error: cause: cause`, and
/// apart from it the reports some causes carry after their first line (a
/// run's summary, which a stopped run adds to its error). The summary is
/// printed as itself, before the message, never inside it.
pub fn render(err: &anyhow::Error) -> (Vec<String>, String) {
    let mut reports = Vec::new();
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = cause.to_string();
        match text.split_once('\n') {
            Some((first, rest)) => {
                let first = first.trim_end().trim_end_matches(':').trim_end();
                if !first.is_empty() {
                    parts.push(first.to_string());
                }
                if !rest.trim().is_empty() {
                    reports.push(rest.trim_end().to_string());
                }
            }
            None => parts.push(text),
        }
    }
    (reports, parts.join(": "))
}

/// The exit code for an error that ended the run.
pub fn exit_for(err: &anyhow::Error) -> Exit {
    for cause in err.chain() {
        if cause.is::<UsageError>() {
            return Exit::Usage;
        }
        if cause.is::<LockedError>() {
            return Exit::Locked;
        }
        if cause.is::<StoppedError>() {
            return Exit::Resumable;
        }
        if cause.is::<AccessDeniedError>() {
            return Exit::AccessDenied;
        }
        if let Some(api) = cause.downcast_ref::<ApiError>() {
            return match api {
                e if e.is_access_denied() => Exit::AccessDenied,
                ApiError::ProjectNotFound { .. } => Exit::Usage,
                ApiError::Throttled { .. }
                | ApiError::Unavailable { .. }
                | ApiError::Cancelled { .. } => Exit::Resumable,
                ApiError::Unreachable { .. } => Exit::Unreachable,
                _ => Exit::Internal,
            };
        }
    }
    Exit::Internal
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (issue 16, defect 8): a key that lacks a permission
    /// stopped an import with the run's summary inside the error,
    /// `error: the run stopped:\n<summary>\n: failed to create a user...`.
    #[test]
    fn a_summary_inside_an_error_is_printed_apart_from_it() {
        let summary = "import of in.csv into project 1: 3 rows\n  created 0, not done yet 3\n";
        let err = anyhow::Error::new(ApiError::Forbidden {
            op: "create a user",
            permission: "Users > Create",
        })
        .context(format!("the run stopped:\n{summary}"));
        let (reports, message) = render(&err);
        assert_eq!(
            reports,
            ["import of in.csv into project 1: 3 rows\n  created 0, not done yet 3"]
        );
        assert_eq!(
            message,
            "the run stopped: failed to create a user: permission denied (HTTP 403). \
             hint: this API key lacks Users > Create; edit it under Company Settings > API Keys"
        );
        assert!(!message.contains('\n'));
        // An error of one line each is the whole chain, as `{:#}` gives it.
        let plain = anyhow::anyhow!("boom").context("failed to import");
        assert_eq!(render(&plain), (vec![], format!("{plain:#}")));
    }

    #[test]
    fn errors_map_to_documented_codes() {
        assert_eq!(exit_for(&usage("bad flag")), Exit::Usage);
        let forbidden = anyhow::Error::new(ApiError::Forbidden {
            op: "create a user",
            permission: "Users > Create",
        })
        .context("failed to import");
        assert_eq!(exit_for(&forbidden).code(), 3);
        assert_eq!(
            exit_for(&anyhow::Error::new(LockedError("x".into()))).code(),
            6
        );
        assert_eq!(exit_for(&anyhow::anyhow!("boom")).code(), 1);
        let refused = anyhow::Error::new(ApiError::Unreachable {
            op: "show the project",
            reason: crate::api::Unreachable::Refused {
                addr: "127.0.0.1:9".into(),
            },
        })
        .context("failed to import");
        assert_eq!(exit_for(&refused).code(), 7);
        let unavailable = anyhow::Error::new(ApiError::Unavailable {
            op: "create a user",
            attempts: 8,
            cause: "HTTP 503".into(),
        });
        assert_eq!(exit_for(&unavailable).code(), 5);
    }
}
