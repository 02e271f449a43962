//! prefsync: bulk import, export and sync for Prefinery waitlists.

pub mod api;
