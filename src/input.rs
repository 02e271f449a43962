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
    /// Standard input, copied to this file so that it can be read twice;
    /// named "standard input" in messages.
    Spooled(PathBuf),
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
            Source::Stdin | Source::Spooled(_) => "standard input".into(),
        }
    }

    /// The file to read, once standard input is spooled.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Source::File(p) | Source::Spooled(p) => Some(p),
            Source::Stdin => None,
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
        guess_encoding(body)
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

/// UTF-8 unless the bytes look like Windows-1252 text. One bad sequence
/// in a file that is otherwise UTF-8 (`Zo\xC3\xAB` on many rows, `\xC3\x28`
/// on one) must not turn every `ë` into `Ã«`: the file stays UTF-8 and the
/// row holding the bad bytes is rejected, naming its line and column.
/// Windows-1252 text almost never forms valid multi-byte UTF-8 sequences,
/// so it is chosen only when invalid sequences outnumber valid ones.
fn guess_encoding(body: &[u8]) -> Encoding {
    // Nearly every file is valid UTF-8: told at SIMD speed, and only a
    // file that is not is looked at character by character.
    match std::str::from_utf8(body) {
        Ok(_) => return Encoding::Utf8,
        Err(e) if e.error_len().is_none() => return Encoding::Utf8,
        Err(_) => {}
    }
    let (mut valid, mut invalid) = (0usize, 0usize);
    let mut chunks = body.utf8_chunks().peekable();
    while let Some(chunk) = chunks.next() {
        valid += chunk.valid().chars().filter(|c| !c.is_ascii()).count();
        // A sequence cut at the end of the sample is not an error.
        let cut = chunks.peek().is_none() && chunk.invalid().len() < 4;
        if !chunk.invalid().is_empty() && !cut {
            invalid += 1;
        }
    }
    if invalid > valid {
        Encoding::Windows1252
    } else {
        Encoding::Utf8
    }
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
        Source::File(p) => Box::new(BufReader::with_capacity(256 * 1024, open_input(p)?)),
        Source::Spooled(p) => Box::new(BufReader::with_capacity(256 * 1024, File::open(p)?)),
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
    /// The byte offset it starts at.
    pub offset: u64,
}

/// A record that could not be read as text in the input's encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRecord {
    pub line: u64,
    pub message: String,
    /// The cells, decoded lossily (as the report shows them).
    pub fields: csv::StringRecord,
}

/// The longest cell a row may have. No waitlist field comes near it, and
/// a row carrying a bigger one is refused by web servers before it is read
/// (a 10 MB cell was answered by a 413, or by a connection reset that the
/// client retried four times, sending 40 MB, and then gave up on as
/// unknown): rejected here, before any call, the row is named by line and
/// column like any other bad cell.
pub const MAX_CELL_BYTES: usize = 64 * 1024;

pub struct CsvInput {
    pub source: Source,
    pub format: Format,
    pub headers: Vec<String>,
    reader: csv::Reader<Counting<Stream>>,
    raw: csv::ByteRecord,
    newlines: NewlineIndex,
    /// The line of the last record: lines only grow, whatever the line
    /// ends, so no two records ever share one in the checkpoint.
    last_line: u64,
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

/// Notes where lines end as the CSV reader reads: at LF, at CRLF (its LF)
/// and at a lone CR (old Mac files, a stray CR), as the reader's records do.
struct Counting<R> {
    inner: R,
    offset: u64,
    index: NewlineIndex,
    /// A CR at this offset ended the last read: a line end unless an LF
    /// follows.
    pending_cr: Option<u64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut g = self.index.inner.lock().unwrap();
        // Only line ends matter: found with memchr (SIMD), not byte by byte.
        for i in memchr::memchr2_iter(b'\n', b'\r', &buf[..n]) {
            let at = self.offset + i as u64;
            // A CR ends a line unless an LF follows at once.
            if let Some(cr) = self.pending_cr.take()
                && !(buf[i] == b'\n' && cr + 1 == at)
            {
                g.0.push_back(cr);
            }
            if buf[i] == b'\n' {
                g.0.push_back(at);
            } else {
                self.pending_cr = Some(at);
            }
        }
        // A CR with a byte after it that is not an LF (or it would have been
        // taken above) ended its line; one at the very end waits for the
        // next read.
        if let Some(cr) = self.pending_cr
            && cr + 1 < self.offset + n as u64
        {
            self.pending_cr = None;
            g.0.push_back(cr);
        }
        if n == 0
            && let Some(cr) = self.pending_cr.take()
        {
            g.0.push_back(cr);
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
            pending_cr: None,
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
            last_line: 1,
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
        let line = self.newlines.line_at(start).max(self.last_line + 1);
        self.last_line = line;
        Ok(Some(check_record(
            &self.raw,
            &self.headers,
            self.format.encoding,
            line,
            start,
        )))
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

/// The checks every record passes, however it was read: as many cells as
/// the header, none too long, no NUL, text in the encoding. `start` is the
/// record's byte offset in the input (kept to read it again by seeking).
fn check_record(
    raw: &csv::ByteRecord,
    headers: &[String],
    encoding: Encoding,
    line: u64,
    start: u64,
) -> Result<Record, BadRecord> {
    let column_name = |col: usize| match headers.get(col) {
        Some(h) => format!("column {h:?} (column {})", col + 1),
        None => format!("column {} (past the header)", col + 1),
    };
    let bad = |message: String| BadRecord {
        line,
        message,
        fields: raw.iter().map(String::from_utf8_lossy).collect(),
    };
    if raw.len() != headers.len() {
        // The report keeps the header's columns: cells past them are
        // quoted here so that nothing of the row is lost.
        let extra: Vec<String> = raw
            .iter()
            .skip(headers.len())
            .map(|f| format!("{:?}", String::from_utf8_lossy(f)))
            .collect();
        return Err(bad(format!(
            "the row has {} fields and the header has {}{}: a delimiter too many or too few, or a quote out of place; \
             fix the row (nothing of it was sent)",
            raw.len(),
            headers.len(),
            if extra.is_empty() {
                String::new()
            } else {
                format!(" (past the header: {})", extra.join(", "))
            }
        )));
    }
    // One pass over the record's bytes (SIMD) when it is short enough
    // that no cell can be too long; the cells are looked at only then.
    if raw.as_slice().len() > MAX_CELL_BYTES
        && let Some(col) = raw.iter().position(|f| f.len() > MAX_CELL_BYTES)
    {
        return Err(bad(format!(
            "{} holds {} bytes; a cell may hold at most {MAX_CELL_BYTES} (a quote out of place, or data that is not a waitlist field?); \
             fix the row (nothing of it was sent)",
            column_name(col),
            raw[col].len()
        )));
    }
    if memchr::memchr(0, raw.as_slice()).is_some()
        && let Some(col) = raw.iter().position(|f| f.contains(&0))
    {
        return Err(bad(format!(
            "{} holds a NUL byte (\\0), which no field may hold; remove it (the file may not be text)",
            column_name(col)
        )));
    }
    let decoded = match encoding {
        Encoding::Utf8 => {
            csv::StringRecord::from_byte_record(raw.clone()).map_err(|e| e.utf8_error().field())
        }
        Encoding::Windows1252 => {
            let mut r = csv::StringRecord::with_capacity(raw.as_slice().len(), raw.len());
            for f in raw {
                r.push_field(&decode(Encoding::Windows1252, f).unwrap_or_default());
            }
            Ok(r)
        }
    };
    match decoded {
        Ok(fields) => Ok(Record {
            line,
            fields,
            offset: start,
        }),
        Err(col) => Err(bad(format!(
            "{} is not valid UTF-8; if the file came from Excel on Windows, re-run with --encoding windows-1252",
            column_name(col)
        ))),
    }
}

/// Reads records by their byte offset: the rows of a run sent in another
/// order than the file's (oldest signup first) are read back one by one
/// from where the planning pass saw them, so the file is never held in
/// memory, whatever its size. Each record passes the same checks as when
/// it was read in order.
pub struct RecordAt {
    reader: csv::Reader<File>,
    raw: csv::ByteRecord,
    headers: Vec<String>,
    encoding: Encoding,
    source: Source,
}

impl RecordAt {
    /// Opens the input read in order by `input` (its format and header).
    pub fn open(input: &CsvInput) -> anyhow::Result<RecordAt> {
        let path = input.source.path().ok_or_else(|| {
            anyhow::anyhow!("{} cannot be read by offset", input.source.display())
        })?;
        let file = open_input(path)?;
        let reader = csv::ReaderBuilder::new()
            .delimiter(input.format.delimiter)
            .has_headers(false)
            .flexible(true)
            .from_reader(file);
        Ok(RecordAt {
            reader,
            raw: csv::ByteRecord::new(),
            headers: input.headers.clone(),
            encoding: input.format.encoding,
            source: input.source.clone(),
        })
    }

    /// The record at byte `offset`, which the planning pass found on `line`.
    pub fn read(&mut self, offset: u64, line: u64) -> anyhow::Result<Result<Record, BadRecord>> {
        let mut pos = csv::Position::new();
        pos.set_byte(offset).set_line(line);
        self.reader
            .seek(pos)
            .with_context(|| format!("failed to read {}", self.source.display()))?;
        let ok = self.reader.read_byte_record(&mut self.raw).map_err(|e| {
            anyhow::anyhow!(
                "failed to read {} at line {line}: {e}",
                self.source.display()
            )
        })?;
        if !ok {
            anyhow::bail!(
                "{} ended before line {line}: was it changed during the run?",
                self.source.display()
            );
        }
        Ok(check_record(
            &self.raw,
            &self.headers,
            self.encoding,
            line,
            offset,
        ))
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

/// Opens an input file, refusing what cannot be one (a directory, a file
/// that cannot be read) as a usage error that names it.
pub fn open_input(path: &Path) -> anyhow::Result<File> {
    if path.is_dir() {
        return Err(usage(format!(
            "the input {} is a directory; give the CSV file itself",
            path.display()
        )));
    }
    File::open(path).map_err(|e| usage(format!("failed to open the input {}: {e}", path.display())))
}

/// The columns an operation reads by name (`email`, `quantity`, ...): a
/// header matches case-, space- and dash-insensitively, after the renames
/// of a `--map` file (`[columns] "Points awarded" = "quantity"`). The
/// report's own `prefsync_*` columns are left out, so an errors report
/// feeds back in.
#[derive(Debug, Clone, Default)]
pub struct Columns {
    index: std::collections::HashMap<String, usize>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RenameFile {
    #[serde(default)]
    columns: std::collections::BTreeMap<String, String>,
}

fn column_name(s: &str) -> String {
    s.trim()
        .to_lowercase()
        .chars()
        .map(|c| if c == ' ' || c == '-' { '_' } else { c })
        .collect()
}

impl Columns {
    pub fn new(headers: &[String], map: Option<&Path>) -> anyhow::Result<Columns> {
        let renames = match map {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| usage(format!("failed to read the map {}: {e}", p.display())))?;
                let file: RenameFile = toml::from_str(&text)
                    .map_err(|e| usage(format!("invalid map file {}: {e}", p.display())))?;
                for header in file.columns.keys() {
                    if !headers.iter().any(|h| h.trim() == header.trim()) {
                        return Err(usage(format!(
                            "the map {} names the column {header:?}, which the file does not have (its columns: {})",
                            p.display(),
                            headers.join(", ")
                        )));
                    }
                }
                file.columns
            }
            None => Default::default(),
        };
        let mut index = std::collections::HashMap::new();
        for (i, h) in headers.iter().enumerate() {
            if h.trim().starts_with("prefsync_") {
                continue;
            }
            let name = renames
                .get(h.trim())
                .map_or_else(|| column_name(h), |to| column_name(to));
            if let Some(first) = index.insert(name.clone(), i) {
                return Err(usage(format!(
                    "columns {} and {} both give {name:?}; rename or drop one",
                    first + 1,
                    i + 1
                )));
            }
        }
        Ok(Columns { index })
    }

    /// The column's index, if the file has it.
    pub fn get(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// The row's cell in that column, trimmed; `None` when it is empty or
    /// the file has no such column.
    pub fn cell<'r>(&self, rec: &'r csv::StringRecord, name: &str) -> Option<&'r str> {
        let v = rec.get(self.get(name)?)?.trim();
        (!v.is_empty()).then_some(v)
    }
}

/// Size and SHA-1 of a file, to refuse resuming a run on a changed input;
/// read in the same pass, the file's quoting is checked (see
/// [`QuoteScan`]): a quote that never closes refuses the file before the
/// first call, naming the line where it opened.
pub fn fingerprint(source: &Source, delimiter: u8) -> anyhow::Result<(i64, String)> {
    let path = source
        .path()
        .expect("standard input is spooled before it is fingerprinted");
    let mut f = open_input(path)?;
    let mut h = sha1_smol::Sha1::new();
    let mut quotes = QuoteScan::new(delimiter);
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0i64;
    loop {
        let n = f.read(&mut buf).map_err(|e| {
            usage(format!(
                "failed to read the input {}: {e}",
                source.display()
            ))
        })?;
        if n == 0 {
            break;
        }
        size += n as i64;
        h.update(&buf[..n]);
        quotes.feed(&buf[..n]);
    }
    if let Some(problem) = quotes.finish() {
        return Err(usage(format!("{}: {problem}", source.display())));
    }
    Ok((size, h.digest().to_string()))
}

/// A quoting mistake that makes a CSV reader swallow the records after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuoteProblem {
    /// A quoted field runs to the end of the file.
    NeverCloses { opened: u64 },
    /// A quoted field spans lines and is followed by more text after its
    /// closing quote: the quote that opened it was almost surely unbalanced
    /// and the lines in between are records read as one cell.
    TextAfterClose { opened: u64, closed: u64 },
}

impl std::fmt::Display for QuoteProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuoteProblem::NeverCloses { opened } => write!(
                f,
                "line {opened}: a quote (\") opens a field that never closes, so every line after it would be read as one cell; \
                 close the quote or remove it, then run again"
            ),
            QuoteProblem::TextAfterClose { opened, closed } => write!(
                f,
                "line {opened}: a quote (\") opens a field that closes only on line {closed}, followed by more text; \
                 the quote on line {opened} is probably unbalanced (lines {opened} to {closed} would be read as one record): \
                 close it or remove it, then run again"
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QuoteState {
    FieldStart,
    Unquoted,
    Quoted,
    /// A quote inside a quoted field: an escaped `""` or the closing quote.
    QuoteSeen,
    /// Blanks after a closing quote, before the delimiter.
    AfterClose,
}

/// Follows RFC 4180 quoting byte by byte (the delimiter, quotes, CR and LF
/// are single bytes in UTF-8 and Windows-1252 alike) and remembers the
/// first [`QuoteProblem`]. Lines end at LF, CRLF or a lone CR, as the CSV
/// reader's records do.
pub struct QuoteScan {
    delimiter: u8,
    state: QuoteState,
    line: u64,
    after_cr: bool,
    opened: u64,
    spans_lines: bool,
    problem: Option<QuoteProblem>,
}

impl QuoteScan {
    pub fn new(delimiter: u8) -> QuoteScan {
        QuoteScan {
            delimiter,
            state: QuoteState::FieldStart,
            line: 1,
            after_cr: false,
            opened: 0,
            spans_lines: false,
            problem: None,
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        if self.problem.is_some() {
            return;
        }
        let mut i = 0;
        while i < bytes.len() {
            // Inside a field, only its end matters: jump to the next byte
            // that can end it (memchr, SIMD) instead of looking at each.
            let next = match self.state {
                QuoteState::Unquoted => memchr::memchr3(self.delimiter, b'\n', b'\r', &bytes[i..]),
                QuoteState::Quoted => memchr::memchr3(b'"', b'\n', b'\r', &bytes[i..]),
                _ => Some(0),
            };
            match next {
                None => {
                    self.after_cr = false;
                    return;
                }
                Some(0) => {}
                Some(k) => {
                    self.after_cr = false;
                    i += k;
                }
            }
            let b = bytes[i];
            i += 1;
            let newline = b == b'\r' || (b == b'\n' && !self.after_cr);
            self.after_cr = b == b'\r';
            if newline {
                self.line += 1;
            }
            let end_of_line = b == b'\r' || b == b'\n';
            self.state = match self.state {
                QuoteState::FieldStart | QuoteState::Unquoted
                    if b == self.delimiter || end_of_line =>
                {
                    QuoteState::FieldStart
                }
                QuoteState::FieldStart if b == b'"' => {
                    self.opened = self.line;
                    self.spans_lines = false;
                    QuoteState::Quoted
                }
                QuoteState::FieldStart | QuoteState::Unquoted => QuoteState::Unquoted,
                QuoteState::Quoted if b == b'"' => QuoteState::QuoteSeen,
                QuoteState::Quoted => {
                    self.spans_lines |= end_of_line;
                    QuoteState::Quoted
                }
                QuoteState::QuoteSeen if b == b'"' => QuoteState::Quoted,
                QuoteState::QuoteSeen | QuoteState::AfterClose
                    if b == self.delimiter || end_of_line =>
                {
                    QuoteState::FieldStart
                }
                QuoteState::QuoteSeen | QuoteState::AfterClose if b == b' ' || b == b'\t' => {
                    QuoteState::AfterClose
                }
                QuoteState::QuoteSeen | QuoteState::AfterClose => {
                    if self.spans_lines {
                        self.problem = Some(QuoteProblem::TextAfterClose {
                            opened: self.opened,
                            closed: self.line,
                        });
                        return;
                    }
                    QuoteState::Unquoted
                }
            };
        }
    }

    /// The first problem found, once the whole input has been fed.
    pub fn finish(self) -> Option<QuoteProblem> {
        match (self.problem, self.state) {
            (Some(p), _) => Some(p),
            (None, QuoteState::Quoted) => Some(QuoteProblem::NeverCloses {
                opened: self.opened,
            }),
            _ => None,
        }
    }
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

    #[test]
    fn one_bad_sequence_does_not_make_a_utf8_file_windows_1252() {
        let mut utf8 = b"email,name\n".to_vec();
        for _ in 0..3 {
            utf8.extend("a@b.c,Zoë\n".as_bytes());
        }
        utf8.extend(b"x@b.c,\xC3\x28\n");
        assert_eq!(guess_encoding(&utf8), Encoding::Utf8);
        assert_eq!(
            guess_encoding(b"email,name\na@b.c,Zo\xEB\nb@b.c,Ren\xE9\n"),
            Encoding::Windows1252
        );
        // A character cut by the end of the sample.
        assert_eq!(guess_encoding(b"a,Zo\xC3"), Encoding::Utf8);
    }

    fn quotes(text: &[u8], chunk: usize) -> Option<QuoteProblem> {
        let mut q = QuoteScan::new(b',');
        for c in text.chunks(chunk) {
            q.feed(c);
        }
        q.finish()
    }

    #[test]
    fn quotes_that_swallow_records_are_found_in_any_chunking() {
        for chunk in [1, 2, 7, 1024] {
            assert_eq!(
                quotes(b"e,n\na,\"x\"\"y\"\nb,\"two\nlines\", z\n", chunk),
                None
            );
            assert_eq!(
                quotes(b"e,n\na,b\nc,\"open\nd,e\n", chunk),
                Some(QuoteProblem::NeverCloses { opened: 3 })
            );
            assert_eq!(
                quotes(b"e,n\r\nc,\"open\r\nd,e\r\nf,\"g\"h\r\n", chunk),
                Some(QuoteProblem::TextAfterClose {
                    opened: 2,
                    closed: 4
                })
            );
            // On one line, text after a closing quote swallows nothing.
            assert_eq!(quotes(b"e,n\na,\"b\"c\n", chunk), None);
            // Lone CRs count as line ends.
            assert_eq!(
                quotes(b"e,n\ra,b\rc,\"d\r", chunk),
                Some(QuoteProblem::NeverCloses { opened: 3 })
            );
        }
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

    /// Hands out `n` bytes a read, so line ends fall across reads.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.1.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn line_ends_are_found_across_reads() {
        let text = b"a\r\nb\rc\nd\r\re\r";
        for step in 1..=text.len() {
            let index = NewlineIndex::default();
            let mut c = Counting {
                inner: Trickle(text, step),
                offset: 0,
                index: index.clone(),
                pending_cr: None,
            };
            let mut sink = vec![];
            c.read_to_end(&mut sink).unwrap();
            let ends: Vec<u64> = index.inner.lock().unwrap().0.iter().copied().collect();
            // The LF of the CRLF, the lone CRs, the LF, both CRs, the last CR.
            assert_eq!(ends, [2, 4, 6, 8, 9, 11], "reads of {step} bytes");
        }
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
        assert_eq!(lines_of("email,n\ra@x.io,1\rb@x.io,2\r"), vec![2, 3]);
        assert_eq!(
            lines_of("email,n\na@x.io,1\rb@x.io,2\nc@x.io,3\n"),
            vec![2, 3, 4]
        );
    }

    #[test]
    fn a_cell_past_the_limit_rejects_its_row_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.csv");
        let at_limit = "x".repeat(MAX_CELL_BYTES);
        std::fs::write(
            &p,
            format!("email,n\na@x.io,{at_limit}\nb@x.io,{at_limit}y\nc@x.io,1\n"),
        )
        .unwrap();
        let mut c = CsvInput::open(&Source::File(p), None, None).unwrap();
        let mut got = vec![];
        while let Some(r) = c.next_record().unwrap() {
            got.push(r.map(|r| r.line).map_err(|b| (b.line, b.message)));
        }
        assert_eq!(got[0], Ok(2));
        let (line, message) = got[1].clone().unwrap_err();
        assert_eq!(line, 3);
        assert!(
            message.starts_with("column \"n\" (column 2) holds 65537 bytes"),
            "{message}"
        );
        assert_eq!(got[2], Ok(4));
    }
}
