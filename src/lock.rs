//! A lock file beside an output or checkpoint, so two overlapping runs (two
//! cron jobs, say) never write the same thing. The operating system releases
//! it when the process dies, even by kill -9.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::exit::LockedError;

/// A lock held for one run. Released (and its file removed: a finished run
/// leaves nothing beside its output) when dropped; by the operating system
/// if the process dies, which leaves the file, harmless, to the next run.
pub struct RunLock {
    file: File,
    pub path: PathBuf,
}

/// Who holds a lock, as its file says (JSON since issue 16; older files
/// hold a line of text, shown as it is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    /// Unix time, seconds.
    pub started_at: i64,
}

impl Holder {
    fn now() -> Holder {
        Holder {
            pid: std::process::id(),
            host: host_name(),
            started_at: crate::checkpoint::now_secs(),
        }
    }

    /// `pid 4242 on build-01, started 2026-11-29 21:14:56 +01:00 (3 minutes ago)`.
    pub fn describe(&self, now: i64) -> String {
        use chrono::TimeZone;
        let when = match chrono::Local.timestamp_opt(self.started_at, 0).single() {
            Some(t) => t.format("%Y-%m-%d %H:%M:%S %:z").to_string(),
            None => format!("unix time {}", self.started_at),
        };
        let ago = now.saturating_sub(self.started_at).max(0) as u64;
        format!(
            "pid {}{}{}, started {when} ({} ago)",
            self.pid,
            if self.host.is_empty() { "" } else { " on " },
            self.host,
            humantime::format_duration(std::time::Duration::from_secs(ago))
        )
    }
}

/// What a lock file says of its holder, whatever its age.
fn describe_holder(text: &str) -> String {
    let text = text.trim();
    if text.is_empty() {
        return "unknown process".into();
    }
    match serde_json::from_str::<Holder>(text) {
        Ok(h) => h.describe(crate::checkpoint::now_secs()),
        // A lock file from an older prefsync: `pid N on HOST, started at
        // unix time T`; its time made readable when it parses.
        Err(_) => match text
            .rsplit_once("started at unix time ")
            .and_then(|(head, t)| Some((head, t.trim().parse::<i64>().ok()?)))
        {
            Some((head, t)) => {
                let h = Holder {
                    pid: 0,
                    host: String::new(),
                    started_at: t,
                };
                let d = h.describe(crate::checkpoint::now_secs());
                let when = d.split_once(", ").map_or(d.as_str(), |(_, w)| w);
                format!("{}, {when}", head.trim_end_matches([',', ' ']))
            }
            None => text.to_string(),
        },
    }
}

/// This machine's name, for a lock's holder.
fn host_name() -> String {
    for p in ["/proc/sys/kernel/hostname", "/etc/hostname"] {
        if let Ok(s) = std::fs::read_to_string(p)
            && !s.trim().is_empty()
        {
            return s.trim().to_string();
        }
    }
    std::env::var("HOSTNAME")
        .or_else(|_| std::env::var("COMPUTERNAME"))
        .unwrap_or_default()
}

/// Whether `file` is still the file at `path` (a finished run removes its
/// lock file; a lock taken on a removed file guards nothing).
fn is_at(file: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        true
    }
}

impl RunLock {
    /// Takes the lock `<target>.lock`, or fails naming the process that holds
    /// it: its pid, host and when it started, in local time.
    pub fn acquire(target: &Path) -> anyhow::Result<RunLock> {
        let mut name = target.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        loop {
            // Private like the file it guards: it names the host and the process.
            let mut file = crate::fsutil::open_private(&path).map_err(|e| {
                anyhow::anyhow!("failed to open the lock file {}: {e}", path.display())
            })?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    return Err(anyhow::Error::new(LockedError(format!(
                        "another prefsync run ({}) holds the lock {}; wait for it to finish, or stop it",
                        describe_holder(&holder),
                        path.display()
                    ))));
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(anyhow::anyhow!("failed to lock {}: {e}", path.display()));
                }
            }
            // The holder before us removed the file between our open and
            // our lock: take the lock on the file now at the path.
            if !is_at(&file, &path) {
                continue;
            }
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            serde_json::to_writer(&mut file, &Holder::now())?;
            file.flush()?;
            return Ok(RunLock { file, path });
        }
    }
}

impl Drop for RunLock {
    /// Removes the file while still holding the lock (a run waiting to
    /// open it then finds it gone, or another file, and tries again).
    fn drop(&mut self) {
        if is_at(&self.file, &self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
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
        assert!(
            !dir.path().join("out.csv.lock").exists(),
            "released, the lock file is removed"
        );
        RunLock::acquire(&target).unwrap();
    }

    #[test]
    fn the_holder_is_told_in_local_time_old_lock_files_too() {
        let h = Holder {
            pid: 42,
            host: "build-01".into(),
            started_at: 1_795_966_496,
        };
        let text = describe_holder(&serde_json::to_string(&h).unwrap());
        assert!(
            text.starts_with("pid 42 on build-01, started 2026-"),
            "{text}"
        );
        assert!(!text.contains("unix time"), "{text}");
        let old = describe_holder("pid 7 on old-host, started at unix time 1795966496");
        assert!(old.starts_with("pid 7 on old-host, started 2026-"), "{old}");
        assert!(old.ends_with(" ago)"), "{old}");
        assert_eq!(describe_holder("  "), "unknown process");
        assert_eq!(describe_holder("something else"), "something else");
    }
}
