//! Files written whole or not at all: a temporary file beside the final path,
//! renamed over it once complete, so a crash never leaves a half-written file
//! at the final path.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

pub struct AtomicFile {
    tmp: tempfile::NamedTempFile,
    path: PathBuf,
}

impl AtomicFile {
    pub fn create(path: &Path) -> anyhow::Result<AtomicFile> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".partial")
            .tempfile_in(&dir)
            .with_context(|| format!("failed to create a temporary file in {}", dir.display()))?;
        Ok(AtomicFile {
            tmp,
            path: path.to_path_buf(),
        })
    }

    /// A buffered writer into the temporary file.
    pub fn writer(&self) -> BufWriter<File> {
        BufWriter::with_capacity(
            256 * 1024,
            self.tmp
                .as_file()
                .try_clone()
                .expect("a file handle clones"),
        )
    }

    /// Flushes to disk and renames into place.
    pub fn commit(self) -> anyhow::Result<()> {
        let mut f = self.tmp.as_file();
        f.flush()?;
        f.sync_all()?;
        self.tmp.persist(&self.path).map_err(|e| {
            anyhow::anyhow!("failed to rename into {}: {}", self.path.display(), e.error)
        })?;
        Ok(())
    }
}
