//! Turns flags and environment into plain settings, and checks them before
//! any work starts. Every problem here is a usage error (exit 2).

use std::path::Path;

use url::Url;

use crate::api::{ApiKey, Client, Limiter, RateOverride, RetryPolicy};
use crate::cli::ApiArgs;
use crate::exit::usage;

/// Where and as whom to talk to Prefinery.
#[derive(Debug, Clone)]
pub struct Connection {
    pub base_url: Url,
    pub key: ApiKey,
    pub beta: Option<String>,
    /// Every `--beta` given (export takes several).
    pub betas: Vec<String>,
    pub rates: Vec<RateOverride>,
}

impl Connection {
    /// Reads the key from, in this order (the first that is set wins):
    /// `--api-key-file`, the file `PREFINERY_API_KEY_FILE` names (systemd
    /// credentials, container secrets), `PREFINERY_API_KEY`.
    pub fn from_args(g: &ApiArgs) -> anyhow::Result<Connection> {
        let key = resolve_key(
            g.api_key_file.as_deref(),
            std::env::var_os("PREFINERY_API_KEY_FILE").as_deref(),
            std::env::var("PREFINERY_API_KEY").ok().as_deref(),
        )?;
        let base_url = parse_base_url(&g.base_url)?;
        let betas = g
            .betas
            .iter()
            .map(|b| check_beta(b))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Connection {
            base_url,
            key,
            beta: betas.first().cloned(),
            betas,
            rates: g.rates.clone(),
        })
    }

    pub fn client(&self) -> Client {
        Client::new(
            self.base_url.clone(),
            self.key.clone(),
            Limiter::new(&self.rates),
            RetryPolicy::default(),
        )
    }

    pub fn require_beta(&self) -> anyhow::Result<&str> {
        if self.betas.len() > 1 {
            return Err(usage("this command takes one --beta"));
        }
        self.beta.as_deref().ok_or_else(|| {
            usage("no project given: pass --beta ID (the numeric API Beta ID or the project UID) or set PREFINERY_BETA")
        })
    }
}

/// The key from its sources, in the order of precedence.
fn resolve_key(
    flag: Option<&Path>,
    env_file: Option<&std::ffi::OsStr>,
    env_key: Option<&str>,
) -> anyhow::Result<ApiKey> {
    if let Some(path) = flag {
        return read_key_file(path);
    }
    if let Some(path) = env_file.filter(|p| !p.is_empty()) {
        return read_key_file(Path::new(path)).map_err(|e| {
            usage(format!(
                "PREFINERY_API_KEY_FILE names a file that gives no key: {e:#}"
            ))
        });
    }
    match env_key {
        Some(k) if !k.trim().is_empty() => Ok(ApiKey::new(k)),
        _ => Err(usage(
            "no API key: set PREFINERY_API_KEY, or PREFINERY_API_KEY_FILE, or pass --api-key-file PATH. \
             hint: create a key under Company Settings > API Keys",
        )),
    }
}

fn read_key_file(path: &Path) -> anyhow::Result<ApiKey> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        usage(format!(
            "failed to read the API key file {}: {e}",
            path.display()
        ))
    })?;
    // Notepad saves UTF-8 with a BOM; it is no part of the key.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path)
            && m.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                "the API key file {} can be read by other users of this machine (mode {:o}); chmod 600 it",
                path.display(),
                m.permissions().mode() & 0o777
            );
        }
    }
    let first = text.lines().next().unwrap_or("").trim();
    if first.is_empty() {
        return Err(usage(format!(
            "the API key file {} is empty: put the key on its first line",
            path.display()
        )));
    }
    Ok(ApiKey::new(first))
}

/// The base URL, refusing plain HTTP except on loopback (where the sandbox
/// runs): the key would otherwise cross the network in clear text.
pub fn parse_base_url(s: &str) -> anyhow::Result<Url> {
    let url = Url::parse(s).map_err(|e| usage(format!("invalid --base-url {s:?}: {e}")))?;
    if url.query().is_some() || !url.username().is_empty() || url.password().is_some() {
        return Err(usage(format!(
            "invalid --base-url {s:?}: it must not carry a query or credentials (the key goes in a header)"
        )));
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" => {
            let loopback = match url.host() {
                Some(url::Host::Domain(d)) => d == "localhost",
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                None => false,
            };
            if loopback {
                Ok(url)
            } else {
                Err(usage(format!(
                    "refusing plain http:// for {s:?}: the API key would travel unencrypted. \
                     Use https://, or a loopback address for the sandbox"
                )))
            }
        }
        other => Err(usage(format!(
            "invalid --base-url {s:?}: unsupported scheme {other:?}"
        ))),
    }
}

/// A beta is a numeric id or a UID: letters, digits, `-` and `_` only, so it
/// is safe in a URL path.
pub fn check_beta(s: &str) -> anyhow::Result<String> {
    let s = s.trim();
    if s.is_empty()
        || s.len() > 64
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(usage(format!(
            "invalid --beta {s:?}: expected the numeric API Beta ID or the project UID (e.g. a9b8c7de)"
        )));
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_on_loopback() {
        assert!(parse_base_url("http://127.0.0.1:8787/api/v2").is_ok());
        assert!(parse_base_url("http://localhost/api/v2").is_ok());
        assert!(parse_base_url("http://[::1]:1/api/v2").is_ok());
        assert!(parse_base_url("https://api.prefinery.com/api/v2").is_ok());
        let err = parse_base_url("http://api.prefinery.com/api/v2").unwrap_err();
        assert!(err.to_string().contains("unencrypted"));
        assert!(parse_base_url("https://x.io/api?api_key=1").is_err());
    }

    #[test]
    fn beta_ids_and_uids() {
        assert_eq!(check_beta("12345").unwrap(), "12345");
        assert_eq!(check_beta("a9b8c7de").unwrap(), "a9b8c7de");
        assert!(check_beta("../1").is_err());
        assert!(check_beta("").is_err());
    }

    #[test]
    fn the_key_sources_in_their_order_of_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("flag");
        let env = dir.path().join("env");
        std::fs::write(&flag, "from-flag\n").unwrap();
        std::fs::write(&env, "from-env-file\n").unwrap();
        let key = |f: Option<&Path>, e: Option<&Path>, k: Option<&str>| {
            resolve_key(f, e.map(|p| p.as_os_str()), k).map(|k| k.expose().to_string())
        };
        assert_eq!(
            key(Some(&flag), Some(&env), Some("from-env")).unwrap(),
            "from-flag"
        );
        assert_eq!(
            key(None, Some(&env), Some("from-env")).unwrap(),
            "from-env-file"
        );
        assert_eq!(key(None, None, Some("from-env")).unwrap(), "from-env");
        // A file that is named but missing is an error, not a silent fall
        // back to another key; the message names the variable, not the key.
        let err = key(None, Some(&dir.path().join("nope")), Some("from-env")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("PREFINERY_API_KEY_FILE"), "{msg}");
        assert!(!msg.contains("from-env"), "{msg}");
        assert!(key(None, None, None).is_err());
    }

    #[test]
    fn a_key_file_saved_with_a_bom_and_crlf_gives_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        std::fs::write(&p, "\u{feff}sk-live-123\r\n").unwrap();
        assert_eq!(read_key_file(&p).unwrap().expose(), "sk-live-123");
    }
}
