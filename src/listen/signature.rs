//! Prefinery's webhook signature (API reference, section 8):
//! `X-Prefinery-Signature: t=<unix>,v1=<hex>`, where `v1` is
//! `HMAC-SHA256(secret, "<t>.<raw body>")` in hex. The header is split on
//! `,` and then on `=`; schemes other than `v1` are ignored; several `v1`
//! entries and several secrets (a rotation) are accepted. The comparison is
//! ring's `hmac::verify`, constant time.

use std::time::Duration;

use ring::hmac;

/// The project's signing secrets, one a line of `--secret-file`.
#[derive(Clone)]
pub struct Secrets(Vec<hmac::Key>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({} keys)", self.0.len())
    }
}

impl Secrets {
    /// Every non-empty line, trimmed (a BOM and CRLF are no part of a
    /// secret). `None` when there is none.
    pub fn from_text(text: &str) -> Option<Secrets> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let keys: Vec<hmac::Key> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| hmac::Key::new(hmac::HMAC_SHA256, l.as_bytes()))
            .collect();
        (!keys.is_empty()).then_some(Secrets(keys))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Why a delivery was refused (logged, never with the body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Missing,
    Malformed,
    /// The signature's time is farther from now than the tolerance.
    OutsideTolerance,
    /// No `v1` entry matches any secret.
    Mismatch,
}

impl Refused {
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Missing => "no X-Prefinery-Signature header",
            Refused::Malformed => "the signature header has no t= or no v1=",
            Refused::OutsideTolerance => "the signature's time is outside the tolerance",
            Refused::Mismatch => "the signature does not match any secret",
        }
    }
}

/// Checks a delivery; gives the signature's time.
pub fn verify(
    header: Option<&[u8]>,
    body: &[u8],
    secrets: &Secrets,
    now_unix: i64,
    tolerance: Duration,
) -> Result<i64, Refused> {
    let header = header.ok_or(Refused::Missing)?;
    let header = std::str::from_utf8(header).map_err(|_| Refused::Malformed)?;
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        let Some((k, v)) = part.split_once('=') else {
            continue;
        };
        match k.trim() {
            "t" => t = v.trim().parse::<i64>().ok(),
            "v1" => {
                if let Some(sig) = hex_decode(v.trim()) {
                    v1.push(sig);
                }
            }
            _ => {}
        }
    }
    let t = t.ok_or(Refused::Malformed)?;
    if v1.is_empty() {
        return Err(Refused::Malformed);
    }
    if now_unix.abs_diff(t) > tolerance.as_secs() {
        return Err(Refused::OutsideTolerance);
    }
    let mut msg = Vec::with_capacity(body.len() + 24);
    msg.extend_from_slice(t.to_string().as_bytes());
    msg.push(b'.');
    msg.extend_from_slice(body);
    // Every pair is tried, so the time taken says nothing of which failed.
    let mut ok = false;
    for key in &secrets.0 {
        for sig in &v1 {
            ok |= hmac::verify(key, &msg, sig).is_ok();
        }
    }
    if ok { Ok(t) } else { Err(Refused::Mismatch) }
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.is_empty() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The header a sender would write (for tests and the benchmark).
pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let mut msg = format!("{t}.").into_bytes();
    msg.extend_from_slice(body);
    let tag = hmac::sign(&key, &msg);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={t},v1={hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN5: Duration = Duration::from_secs(300);

    #[test]
    fn a_known_vector() {
        // HMAC-SHA256("secret", "1700000000.{}") computed independently
        // (python3 -c "import hmac,hashlib; print(hmac.new(b'secret', b'1700000000.{}', hashlib.sha256).hexdigest())").
        assert_eq!(
            sign("secret", 1_700_000_000, b"{}"),
            "t=1700000000,v1=b8569b78799ff9e3cbff0fc2d63a33a2b57f3282abd07c37ae5e8e7d79a5f163"
        );
    }

    #[test]
    fn signatures() {
        let s = Secrets::from_text("\u{feff}old\r\nnew\n\n").unwrap();
        assert_eq!(s.len(), 2);
        let now = 1_700_000_000;
        let body = br#"{"event":"tester_created"}"#;
        for secret in ["old", "new"] {
            let h = sign(secret, now, body);
            assert_eq!(verify(Some(h.as_bytes()), body, &s, now, MIN5), Ok(now));
        }
        let good = sign("new", now, body);
        // Other schemes are ignored; several v1 entries, one good, pass.
        let mixed = format!(
            "t={now},v0=abcd,v1=00ff,{}",
            &good[good.find("v1").unwrap()..]
        );
        assert_eq!(verify(Some(mixed.as_bytes()), body, &s, now, MIN5), Ok(now));
        // A changed body, a wrong secret, an old time, no header.
        assert_eq!(
            verify(Some(good.as_bytes()), b"{}", &s, now, MIN5),
            Err(Refused::Mismatch)
        );
        let other = sign("other", now, body);
        assert_eq!(
            verify(Some(other.as_bytes()), body, &s, now, MIN5),
            Err(Refused::Mismatch)
        );
        assert_eq!(
            verify(Some(good.as_bytes()), body, &s, now + 301, MIN5),
            Err(Refused::OutsideTolerance)
        );
        assert_eq!(verify(None, body, &s, now, MIN5), Err(Refused::Missing));
        assert_eq!(
            verify(
                Some(format!("t={now},v0=ab").as_bytes()),
                body,
                &s,
                now,
                MIN5
            ),
            Err(Refused::Malformed)
        );
    }
}
