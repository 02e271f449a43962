//! Files written whole or not at all: a temporary file beside the final path,
//! renamed over it once complete, so a crash never leaves a half-written file
//! at the final path.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

pub struct AtomicFile {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl AtomicFile {
    /// Starts `path`'s temporary file, `.NAME.partial` beside it, created
    /// `0600` (reports hold people's data). Its name is fixed, so a run
    /// killed while writing leaves at most one behind, and the next write
    /// of the same output replaces it.
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
        let tmp = dir.join(format!(".{name}.partial"));
        let file = crate::fsutil::create_private(&tmp)?;
        Ok(AtomicFile {
            file,
            tmp,
            path: path.to_path_buf(),
            committed: false,
        })
    }

    /// A buffered writer into the temporary file.
    pub fn writer(&self) -> BufWriter<File> {
        BufWriter::with_capacity(
            256 * 1024,
            self.file.try_clone().expect("a file handle clones"),
        )
    }

    /// Flushes to disk and renames into place.
    pub fn commit(mut self) -> anyhow::Result<()> {
        self.file.flush()?;
        self.file.sync_all()?;
        std::fs::rename(&self.tmp, &self.path)
            .map_err(|e| anyhow::anyhow!("failed to rename into {}: {e}", self.path.display()))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for AtomicFile {
    /// A file given up (an error before the commit) leaves nothing behind.
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Neutralises a cell that a spreadsheet would run as a formula: a leading
/// `=`, `+`, `-`, `@`, tab or CR gets a `'` in front, which Excel shows as
/// text and does not display. A phone number (`+1 555 0100`, `+44 (20)
/// 7946-0958`: a `+` followed only by digits, spaces, dashes, dots and
/// parentheses) is no formula and is left as it is: it holds no cell
/// reference or function a spreadsheet could run.
pub fn excel_safe(s: String) -> String {
    match s.chars().next() {
        Some('+') if is_phone_number(&s[1..]) => s,
        Some('=' | '+' | '-' | '@' | '\t' | '\r') => format!("'{s}"),
        _ => s,
    }
}

fn is_phone_number(rest: &str) -> bool {
    rest.chars().any(|c| c.is_ascii_digit())
        && rest
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, ' ' | '-' | '.' | '(' | ')'))
}

/// Writes `value` as pretty JSON, whole or not at all.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let f = AtomicFile::create(path)?;
    {
        let mut w = f.writer();
        serde_json::to_writer_pretty(&mut w, value)?;
        w.flush()?;
    }
    f.commit()
}

/// Refuses, before any work, output paths that would destroy something:
/// an output that is the input (`--errors in.csv` on `in.csv`), two outputs
/// that are one file, an output that is a directory, or one whose
/// directory does not exist. Each refusal names the flags and the path.
pub fn check_outputs(input: Option<&Path>, outputs: &[(&str, &Path)]) -> anyhow::Result<()> {
    let input = input.map(identity);
    let mut seen: Vec<(&str, PathBuf)> = Vec::new();
    for (flag, path) in outputs {
        if path.is_dir() {
            return Err(crate::exit::usage(format!(
                "{flag} {} is a directory; give a file path",
                path.display()
            )));
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(crate::exit::usage(format!(
                "{flag} {}: the directory {} does not exist; create it first or choose another path",
                path.display(),
                dir.display()
            )));
        }
        let id = identity(path);
        if input.as_ref() == Some(&id) {
            return Err(crate::exit::usage(format!(
                "{flag} {} is the input file: it would be overwritten; choose another path",
                path.display()
            )));
        }
        if let Some((other, _)) = seen.iter().find(|(_, p)| *p == id) {
            return Err(crate::exit::usage(format!(
                "{flag} and {other} are the same file ({}): one would overwrite the other; choose another path",
                path.display()
            )));
        }
        seen.push((flag, id));
    }
    Ok(())
}

/// A path as one file is known by, whether or not it exists yet: its
/// directory resolved (symbolic links, `..`) and its name.
fn identity(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    match path.file_name() {
        Some(n) => dir.join(n),
        None => dir,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_that_would_destroy_something_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.csv");
        std::fs::write(&input, "email\n").unwrap();
        let other = dir.path().join("out.csv");
        let relative_input = dir.path().join("sub/../in.csv");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let refuse = |outputs: &[(&str, &Path)]| {
            let e = check_outputs(Some(&input), outputs).unwrap_err();
            assert_eq!(crate::exit::exit_for(&e).code(), 2, "{e:#}");
            e.to_string()
        };
        assert!(refuse(&[("--errors", &input)]).contains("is the input file"));
        assert!(refuse(&[("--errors", &relative_input)]).contains("is the input file"));
        assert!(
            refuse(&[("--errors", &other), ("--results", &other)])
                .contains("--results and --errors are the same file")
        );
        assert!(refuse(&[("--results", dir.path())]).contains("is a directory"));
        assert!(
            refuse(&[("--checkpoint", &dir.path().join("missing/ck.sqlite"))])
                .contains("does not exist")
        );
        // A file whose writer was killed (never dropped) is replaced by the
        // next write of the same output, leaving nothing behind.
        let report = dir.path().join("errors.csv");
        std::mem::forget(AtomicFile::create(&report).unwrap());
        let f = AtomicFile::create(&report).unwrap();
        std::io::Write::write_all(&mut f.writer(), b"x").unwrap();
        f.commit().unwrap();
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("errors"))
            .collect();
        assert_eq!(names, ["errors.csv"]);
        check_outputs(
            Some(&input),
            &[
                ("--errors", &other),
                ("--results", &dir.path().join("r.csv")),
            ],
        )
        .unwrap();
    }
}

#[cfg(test)]
mod excel_tests {
    use super::excel_safe;

    /// Regression (issue 16, defect 8): `--excel-safe` turned the phone
    /// number `+1 555 0100` into `'+1 555 0100`.
    #[test]
    fn a_phone_number_is_not_a_formula() {
        for phone in [
            "+1 555 0100",
            "+44 (20) 7946-0958",
            "+33.1.23.45.67.89",
            "+1",
        ] {
            assert_eq!(excel_safe(phone.into()), phone);
        }
        for formula in [
            "+SUM(A1:A9)",
            "+1+A1",
            "+cmd|' /C calc'!A0",
            "+",
            "+ ()",
            "=1+1",
            "@SUM(A1)",
            "-1 555 0100",
            "-2+3",
            "\t1",
        ] {
            assert_eq!(
                excel_safe(formula.into()),
                format!("'{formula}"),
                "{formula}"
            );
        }
        assert_eq!(excel_safe("Ada".into()), "Ada");
    }
}
