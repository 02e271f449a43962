//! The operations the engine runs, one module each: what is their own
//! (parse a row, decide, send, find out whether a call took effect).

pub mod points;
pub mod rewards;
pub mod testers_import;
