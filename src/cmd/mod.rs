//! One module per subcommand.

pub mod bulk;
pub mod check;
pub mod demo;
pub mod docs;
pub mod export;
pub mod import;
pub mod listen;
pub mod points;
pub mod preset;
pub mod rewards;
pub mod runs;
pub mod sandbox;
pub mod suppressions;
pub mod sync;
pub mod testers;
