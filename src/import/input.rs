//! Reading CSV input as other products and spreadsheets write it: UTF-8 with
//! or without a BOM, or Windows-1252 (Excel on Windows); `,`, `;` or tab;
//! quoted fields with embedded newlines; CRLF. Streamed record by record.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::exit::usage;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Utf8,
    Windows1252,
}

impl std::str::FromStr for Encoding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "utf-8" | "utf8" => Ok(Encoding::Utf8),
            "windows-1252" | "cp1252" | "latin-1" | "latin1" | "iso-8859-1" => {
                Ok(Encoding::Windows1252)
            }
            _ => Err(format!(
                "unknown encoding {s:?}; expected utf-8 or windows-1252 (latin-1)"
            )),
        }
    }
}

/// Where rows come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Stdin,
}

impl Source {
    pub fn parse(s: &str) -> Source {
        if s == "-" {
            Source::Stdin
        } else {
            Source::File(PathBuf::from(s))
        }
    }

    pub fn display(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Stdin => "<stdin>".into(),
        }
    }
}

/// The format found (or given) for an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    pub encoding: Encoding,
    pub delimiter: u8,
    pub bom: bool,
}

/// Looks at the start of the input: BOM, whether it is valid UTF-8, and
/// which delimiter the header line uses most (outside quotes).
pub fn sniff(
    head: &[u8],
    encoding: Option<Encoding>,
    delimiter: Option<u8>,
) -> anyhow::Result<Format> {
    if head.starts_with(&[0xFF, 0xFE]) || head.starts_with(&[0xFE, 0xFF]) {
        return Err(usage(
            "the input is UTF-16 (Excel's \"Unicode text\"): save it as \"CSV UTF-8\" and try again",
        ));
    }
    let bom = head.starts_with(&[0xEF, 0xBB, 0xBF]);
    let encoding = encoding.unwrap_or_else(|| {
        let body = if bom { &head[3..] } else { head };
        match std::str::from_utf8(body) {
            Ok(_) => Encoding::Utf8,
            // Cut in the middle of a character at the end of the sample.
            Err(e) if e.error_len().is_none() => Encoding::Utf8,
            Err(_) => Encoding::Windows1252,
        }
    });
    let delimiter = delimiter.unwrap_or_else(|| {
        let mut counts = [0usize; 3];
        let mut quoted = false;
        for &b in head.iter().skip(if bom { 3 } else { 0 }) {
            match b {
                b'"' => quoted = !quoted,
                b'\n' if !quoted => break,
                b',' if !quoted => counts[0] += 1,
                b';' if !quoted => counts[1] += 1,
                b'\t' if !quoted => counts[2] += 1,
                _ => {}
            }
        }
        let best = (0..3).max_by_key(|i| (counts[*i], 3 - i)).unwrap_or(0);
        [b',', b';', b'\t'][best]
    });
    Ok(Format {
        encoding,
        delimiter,
        bom,
    })
}

/// Reads the first bytes for sniffing, then gives them back in front of
/// the rest of the stream.
pub struct Peeked<R> {
    head: io::Cursor<Vec<u8>>,
    rest: R,
}

impl<R: Read> Read for Peeked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.head.read(buf)?;
        if n > 0 {
            return Ok(n);
        }
        self.rest.read(buf)
    }
}

const SNIFF_BYTES: usize = 64 * 1024;

/// The input as a byte stream.
type Stream = Peeked<Box<dyn Read + Send>>;

pub fn open_peeked(source: &Source) -> anyhow::Result<(Vec<u8>, Stream)> {
    let mut rest: Box<dyn Read + Send> = match source {
        Source::File(p) => Box::new(BufReader::with_capacity(
            256 * 1024,
            File::open(p)
                .map_err(|e| usage(format!("failed to open the input {}: {e}", p.display())))?,
        )),
        Source::Stdin => Box::new(io::stdin()),
    };
    let mut head = Vec::with_capacity(SNIFF_BYTES);
    (&mut rest)
        .take(SNIFF_BYTES as u64)
        .read_to_end(&mut head)
        .with_context(|| format!("failed to read {}", source.display()))?;
    Ok((
        head.clone(),
        Peeked {
            head: io::Cursor::new(head),
            rest,
        },
    ))
}

/// One CSV record, decoded, with the line it starts on (1 is the header).
/// Its cells share one buffer: a row is a few allocations, not one a cell.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub line: u64,
    pub fields: csv::StringRecord,
}

/// A record that could not be read as text in the input's encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRecord {
    pub line: u64,
    pub message: String,
    /// The cells, decoded lossily (as the report shows them).
    pub fields: csv::StringRecord,
}

pub struct CsvInput {
    pub source: Source,
    pub format: Format,
    pub headers: Vec<String>,
    reader: csv::Reader<Counting<Stream>>,
    raw: csv::ByteRecord,
    newlines: NewlineIndex,
}

/// Byte offsets of the newlines read but not yet passed, to turn a record's
/// byte offset into its line. The csv reader's own line count is not usable
/// here: with CRLF a record's start can sit on the terminator before it.
#[derive(Clone, Default)]
struct NewlineIndex {
    inner: std::sync::Arc<std::sync::Mutex<(std::collections::VecDeque<u64>, u64)>>,
}

impl NewlineIndex {
    /// The 1-based line of the record starting at byte `start`.
    fn line_at(&self, start: u64) -> u64 {
        let mut g = self.inner.lock().unwrap();
        let (pending, passed) = &mut *g;
        // A start on a newline is the terminator of the line before.
        while pending.front().is_some_and(|o| *o <= start) {
            pending.pop_front();
            *passed += 1;
        }
        *passed + 1
    }
}

struct Counting<R> {
    inner: R,
    offset: u64,
    index: NewlineIndex,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut g = self.index.inner.lock().unwrap();
        for (i, b) in buf[..n].iter().enumerate() {
            if *b == b'\n' {
                g.0.push_back(self.offset + i as u64);
            }
        }
        self.offset += n as u64;
        Ok(n)
    }
}

impl CsvInput {
    pub fn open(
        source: &Source,
        encoding: Option<Encoding>,
        delimiter: Option<u8>,
    ) -> anyhow::Result<CsvInput> {
        let (head, stream) = open_peeked(source)?;
        let format = sniff(&head, encoding, delimiter)?;
        let newlines = NewlineIndex::default();
        let stream = Counting {
            inner: stream,
            offset: 0,
            index: newlines.clone(),
        };
        let mut reader = csv::ReaderBuilder::new()
            .delimiter(format.delimiter)
            .has_headers(true)
            .flexible(true)
            .from_reader(stream);
        let header = reader
            .byte_headers()
            .map_err(|e| {
                usage(format!(
                    "failed to read the header row of {}: {e}",
                    source.display()
                ))
            })?
            .clone();
        let mut headers: Vec<String> = header
            .iter()
            .map(|f| {
                decode(format.encoding, f)
                    .unwrap_or_else(|| String::from_utf8_lossy(f))
                    .into_owned()
            })
            .collect();
        if let Some(first) = headers.first_mut()
            && let Some(stripped) = first.strip_prefix('\u{feff}')
        {
            *first = stripped.to_string();
        }
        if headers.iter().all(|h| h.trim().is_empty()) {
            return Err(usage(format!(
                "{} has no header row: the first line must name the columns (e.g. email,first_name,last_name)",
                source.display()
            )));
        }
        Ok(CsvInput {
            source: source.clone(),
            format,
            headers,
            reader,
            raw: csv::ByteRecord::new(),
            newlines,
        })
    }

    /// The next record; `Err` for one that is not text in the encoding (the
    /// caller rejects it and goes on); `None` at the end.
    pub fn next_record(&mut self) -> anyhow::Result<Option<Result<Record, BadRecord>>> {
        let ok = self.reader.read_byte_record(&mut self.raw).map_err(|e| {
            let at = e
                .position()
                .map(|p| format!(" at line {}", p.line()))
                .unwrap_or_default();
            anyhow::anyhow!("failed to read {}{at}: {e}", self.source.display())
        })?;
        if !ok {
            return Ok(None);
        }
        let start = self.raw.position().map_or(0, |p| p.byte());
        let line = self.newlines.line_at(start);
        let decoded = match self.format.encoding {
            Encoding::Utf8 => csv::StringRecord::from_byte_record(self.raw.clone())
                .map_err(|e| e.utf8_error().field()),
            Encoding::Windows1252 => {
                let mut r =
                    csv::StringRecord::with_capacity(self.raw.as_slice().len(), self.raw.len());
                for f in &self.raw {
                    r.push_field(&decode(Encoding::Windows1252, f).unwrap_or_default());
                }
                Ok(r)
            }
        };
        let fields = match decoded {
            Ok(fields) => fields,
            Err(col) => return Ok(Some(Err(self.bad_record(line, col)))),
        };
        Ok(Some(Ok(Record { line, fields })))
    }

    /// The current record, with column `col` not text in the encoding.
    fn bad_record(&self, line: u64, col: usize) -> BadRecord {
        let name = self
            .headers
            .get(col)
            .cloned()
            .unwrap_or_else(|| format!("#{}", col + 1));
        BadRecord {
            line,
            message: format!(
                "column {name:?} (column {}) is not valid UTF-8; if the file came from Excel on Windows, re-run with --encoding windows-1252",
                col + 1
            ),
            fields: self.raw.iter().map(String::from_utf8_lossy).collect(),
        }
    }

    /// Reads the remaining records without decoding them: how many there
    /// are (the run's total before its single pass).
    pub fn count_records(&mut self) -> anyhow::Result<u64> {
        let mut n = 0;
        while self
            .reader
            .read_byte_record(&mut self.raw)
            .map_err(|e| anyhow::anyhow!("failed to read {}: {e}", self.source.display()))?
        {
            // Keeps the newline index from growing.
            let start = self.raw.position().map_or(0, |p| p.byte());
            self.newlines.line_at(start);
            n += 1;
        }
        Ok(n)
    }
}

/// A cell as text in the encoding, borrowed where it can be; `None` when it
/// is not text in that encoding (every byte string is Windows-1252).
fn decode(enc: Encoding, bytes: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    match enc {
        Encoding::Utf8 => std::str::from_utf8(bytes).ok().map(Into::into),
        Encoding::Windows1252 => Some(encoding_rs::WINDOWS_1252.decode(bytes).0),
    }
}

/// Size and SHA-1 of a file, to refuse resuming a run on a changed input.
pub fn fingerprint(path: &Path) -> anyhow::Result<(i64, String)> {
    let mut f = File::open(path)
        .map_err(|e| usage(format!("failed to open the input {}: {e}", path.display())))?;
    let mut h = sha1_smol::Sha1::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0i64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as i64;
        h.update(&buf[..n]);
    }
    Ok((size, h.digest().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_bom_encoding_and_delimiter() {
        let f = sniff(b"\xEF\xBB\xBFemail;name\na@b.c;Zo\xC3\xAB\n", None, None).unwrap();
        assert_eq!(
            (f.encoding, f.delimiter, f.bom),
            (Encoding::Utf8, b';', true)
        );
        let f = sniff(b"email\tname\na@b.c\tZo\xEB\n", None, None).unwrap();
        assert_eq!((f.encoding, f.delimiter), (Encoding::Windows1252, b'\t'));
        let f = sniff(b"\"a;b\",c,d\n", None, None).unwrap();
        assert_eq!(f.delimiter, b',');
        assert!(sniff(b"\xFF\xFEe\x00", None, None).is_err());
    }
}

#[cfg(test)]
mod line_tests {
    use super::*;

    fn lines_of(text: &str) -> Vec<u64> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.csv");
        std::fs::write(&p, text).unwrap();
        let mut c = CsvInput::open(&Source::File(p), None, None).unwrap();
        let mut v = vec![];
        while let Some(r) = c.next_record().unwrap() {
            v.push(r.unwrap().line);
        }
        v
    }

    #[test]
    fn line_numbers_are_file_lines() {
        assert_eq!(
            lines_of("email,n\na@x.io,1\n\"b\nc\",2\nd@x.io,3\n"),
            vec![2, 3, 5]
        );
        assert_eq!(
            lines_of("email,n\r\na@x.io,1\r\n\"b\r\nc\",2\r\nd@x.io,3\r\n"),
            vec![2, 3, 5]
        );
        assert_eq!(lines_of("\u{feff}email,n\na@x.io,1\n"), vec![2]);
    }
}
