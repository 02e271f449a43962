//! API keys and their permissions, as Prefinery's Company Settings > API Keys
//! page grants them.
//!
//! A keys file (TOML or JSON) maps each key to its permissions:
//!
//! ```toml
//! [keys]
//! full = ["all"]
//! no-create = ["users:read", "users:update", "projects:read"]
//! old = { permissions = ["all"], expired = true }
//! ```

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    ProjectsRead,
    ProjectsDelete,
    UsersCreate,
    UsersRead,
    UsersUpdate,
    UsersDelete,
    PointsCreate,
    RewardsCreate,
    RewardsRead,
    RewardsUpdate,
    SuppressionsCreate,
    SuppressionsRead,
    SuppressionsDelete,
}

impl Permission {
    pub const ALL: [Permission; 13] = [
        Permission::ProjectsRead,
        Permission::ProjectsDelete,
        Permission::UsersCreate,
        Permission::UsersRead,
        Permission::UsersUpdate,
        Permission::UsersDelete,
        Permission::PointsCreate,
        Permission::RewardsCreate,
        Permission::RewardsRead,
        Permission::RewardsUpdate,
        Permission::SuppressionsCreate,
        Permission::SuppressionsRead,
        Permission::SuppressionsDelete,
    ];

    pub fn name(self) -> &'static str {
        use Permission::*;
        match self {
            ProjectsRead => "projects:read",
            ProjectsDelete => "projects:delete",
            UsersCreate => "users:create",
            UsersRead => "users:read",
            UsersUpdate => "users:update",
            UsersDelete => "users:delete",
            PointsCreate => "points:create",
            RewardsCreate => "rewards:create",
            RewardsRead => "rewards:read",
            RewardsUpdate => "rewards:update",
            SuppressionsCreate => "suppressions:create",
            SuppressionsRead => "suppressions:read",
            SuppressionsDelete => "suppressions:delete",
        }
    }

    /// Reads `users:create`, `Users > Create` or `email suppressions:read`.
    pub fn parse(s: &str) -> Option<Permission> {
        let norm = s
            .to_lowercase()
            .replace("email suppressions", "suppressions")
            .replace('>', ":")
            .replace(' ', "");
        Permission::ALL.into_iter().find(|p| p.name() == norm)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct KeySpec {
    pub permissions: BTreeSet<Permission>,
    pub expired: bool,
}

/// The keys the sandbox accepts.
#[derive(Debug, Clone)]
pub struct Keys(pub HashMap<String, KeySpec>);

/// The key accepted when no keys file is given.
pub const DEFAULT_KEY: &str = "sandbox-key";

impl Default for Keys {
    fn default() -> Self {
        let mut m = HashMap::new();
        m.insert(
            DEFAULT_KEY.to_string(),
            KeySpec {
                permissions: Permission::ALL.into_iter().collect(),
                expired: false,
            },
        );
        Keys(m)
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawSpec {
    List(Vec<String>),
    Full {
        permissions: Vec<String>,
        #[serde(default)]
        expired: bool,
    },
}

#[derive(Deserialize)]
struct RawFile {
    keys: HashMap<String, RawSpec>,
}

impl Keys {
    pub fn from_file(path: &Path) -> anyhow::Result<Keys> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read the keys file {}", path.display()))?;
        Keys::parse(
            &text,
            path.extension().and_then(|e| e.to_str()) == Some("json"),
        )
        .with_context(|| format!("failed to read the keys file {}", path.display()))
    }

    pub fn parse(text: &str, json: bool) -> anyhow::Result<Keys> {
        let raw: RawFile = if json {
            serde_json::from_str(text)?
        } else {
            toml::from_str(text)?
        };
        let mut out = HashMap::new();
        for (key, spec) in raw.keys {
            let (names, expired) = match spec {
                RawSpec::List(l) => (l, false),
                RawSpec::Full {
                    permissions,
                    expired,
                } => (permissions, expired),
            };
            let mut permissions = BTreeSet::new();
            for n in names {
                if n.eq_ignore_ascii_case("all") {
                    permissions.extend(Permission::ALL);
                } else {
                    let p = Permission::parse(&n).with_context(|| {
                        let all: Vec<_> = Permission::ALL.iter().map(|p| p.name()).collect();
                        format!(
                            "unknown permission {n:?}; expected \"all\" or one of {}",
                            all.join(", ")
                        )
                    })?;
                    permissions.insert(p);
                }
            }
            out.insert(
                key,
                KeySpec {
                    permissions,
                    expired,
                },
            );
        }
        Ok(Keys(out))
    }

    /// A keys set with one key holding every permission but those listed.
    pub fn single_without(key: &str, missing: &[Permission]) -> Keys {
        let mut m = HashMap::new();
        m.insert(
            key.to_string(),
            KeySpec {
                permissions: Permission::ALL
                    .into_iter()
                    .filter(|p| !missing.contains(p))
                    .collect(),
                expired: false,
            },
        );
        Keys(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_toml_and_json() {
        let k = Keys::parse(
            "[keys]\nfull = [\"all\"]\nsome = [\"Users > Create\", \"email suppressions:read\"]\nold = { permissions = [\"all\"], expired = true }\n",
            false,
        )
        .unwrap();
        assert_eq!(k.0["full"].permissions.len(), 13);
        assert!(k.0["some"].permissions.contains(&Permission::UsersCreate));
        assert!(
            k.0["some"]
                .permissions
                .contains(&Permission::SuppressionsRead)
        );
        assert!(k.0["old"].expired);
        let j = Keys::parse(
            r#"{"keys":{"k":{"permissions":["users:read"],"expired":false}}}"#,
            true,
        )
        .unwrap();
        assert_eq!(j.0["k"].permissions.len(), 1);
        assert!(Keys::parse("[keys]\nx = [\"users:fly\"]", false).is_err());
    }
}
