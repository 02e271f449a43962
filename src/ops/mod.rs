//! The operations the engine runs, one module each: what is their own
//! (parse a row, decide, send, find out whether a call took effect).

pub mod points;
pub mod rewards;
pub mod suppressions;
pub mod tester_ref;
pub mod testers_apply;
pub mod testers_checkin;
pub mod testers_delete;
pub mod testers_import;
