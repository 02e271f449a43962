//! A lock file beside an output or checkpoint, so two overlapping runs (two
//! cron jobs, say) never write the same thing. The operating system releases
//! it when the process dies, even by kill -9.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::exit::LockedError;

pub struct RunLock {
    _file: File,
    pub path: PathBuf,
}

impl RunLock {
    /// Takes the lock `<target>.lock`, or fails naming the process that holds
    /// it.
    pub fn acquire(target: &Path) -> anyhow::Result<RunLock> {
        let mut name = target.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        // Private like the file it guards: it names the host and the process.
        let mut file = crate::fsutil::open_private(&path)
            .map_err(|e| anyhow::anyhow!("failed to open the lock file {}: {e}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(anyhow::Error::new(LockedError(format!(
                    "another prefsync run ({}) holds the lock {}; wait for it to finish, or stop it",
                    if holder.is_empty() {
                        "unknown process".to_string()
                    } else {
                        holder.to_string()
                    },
                    path.display()
                ))));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(anyhow::anyhow!("failed to lock {}: {e}", path.display()));
            }
        }
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        let host = std::env::var("HOSTNAME").unwrap_or_default();
        write!(
            file,
            "pid {}{}{}, started at unix time {}",
            std::process::id(),
            if host.is_empty() { "" } else { " on " },
            host,
            crate::checkpoint::now_secs()
        )?;
        file.flush()?;
        Ok(RunLock { _file: file, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_named() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.csv");
        let first = RunLock::acquire(&target).unwrap();
        let err = RunLock::acquire(&target).err().unwrap();
        assert!(
            err.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert_eq!(crate::exit::exit_for(&err).code(), 6);
        drop(first);
        RunLock::acquire(&target).unwrap();
    }
}
