//! Files that hold people's data (checkpoints, exports, spools, reports,
//! locks) are created readable and writable by their owner only (`0600`),
//! whatever the umask, from their first byte: the mode is given to `open(2)`
//! itself, never set afterwards.
//!
//! SQLite creates a database's `-wal` and `-shm` with the permissions of the
//! database file, so creating the database file here, before SQLite opens
//! it, makes those private too ([`private_sqlite`]). A file that already
//! exists keeps the mode its owner gave it.

use std::fs::{File, OpenOptions};
use std::path::Path;

use anyhow::Context;

/// Options that create a file readable and writable by its owner only.
/// (Elsewhere than Unix, the platform's default.)
fn private() -> OpenOptions {
    let mut o = OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o
}

/// Opens `path` for reading and writing, creating it `0600` if it is not
/// there; never truncates.
pub fn open_private(path: &Path) -> std::io::Result<File> {
    private()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// Creates `path` `0600` (or truncates it) for writing.
pub fn create_private(path: &Path) -> anyhow::Result<File> {
    private()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("failed to create {}", path.display()))
}

/// Makes sure a SQLite database file exists before SQLite opens it, so
/// that it and its `-wal` and `-shm` are `0600`.
pub fn private_sqlite(path: &Path) -> anyhow::Result<()> {
    open_private(path).with_context(|| format!("failed to create {}", path.display()))?;
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_sqlite_database_and_its_wal_and_shm_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("x.sqlite");
        private_sqlite(&db).unwrap();
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        for p in [
            db.clone(),
            db.with_extension("sqlite-wal"),
            db.with_extension("sqlite-shm"),
        ] {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
    }

    #[test]
    fn an_existing_file_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "data").unwrap();
        drop(open_private(&p).unwrap());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "data");
        let mut f = create_private(&dir.path().join("g")).unwrap();
        std::io::Write::write_all(&mut f, b"x").unwrap();
        assert_eq!(mode(&dir.path().join("g")), 0o600);
    }
}
