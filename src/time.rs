//! Timestamps as the API writes them: ISO-8601 UTC to the second
//! (`2026-11-29T17:30:14Z`), through chrono rather than hand-written
//! calendar arithmetic. Shared by the export, the mirror and the sandbox.

use std::time::SystemTime;

use chrono::{DateTime, SecondsFormat, Utc};

/// `t` as ISO-8601 UTC, second precision.
pub fn iso8601(t: SystemTime) -> String {
    DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// An ISO-8601 / RFC 3339 time back, if it reads as one.
pub fn parse_iso8601(s: &str) -> Option<SystemTime> {
    DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|d| d.with_timezone(&Utc).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn round_trips_at_second_precision() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_437_414);
        assert_eq!(iso8601(t), "2025-11-29T17:30:14Z");
        assert_eq!(parse_iso8601("2025-11-29T17:30:14Z"), Some(t));
        assert_eq!(parse_iso8601("2025-11-29T18:30:14+01:00"), Some(t));
        assert_eq!(parse_iso8601("yesterday"), None);
    }
}
