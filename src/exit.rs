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

pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
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
