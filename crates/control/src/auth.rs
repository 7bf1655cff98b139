//! Operators and what they may change.
//!
//! `platform-security` operators may change anything; a change to a baseline policy, the
//! `Mesh` or a federation needs a second platform-security operator's approval. Namespace
//! owners may change the other resources of their namespaces.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The role that owns the baseline tier.
pub const PLATFORM_SECURITY: &str = "platform-security";

/// One operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Operator {
    pub name: String,
    #[serde(default)]
    pub roles: Vec<String>,
    /// Namespaces this operator owns.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// SHA-256 (hex) of the operator's bearer tokens.
    #[serde(default)]
    pub token_sha256: Vec<String>,
}

impl Operator {
    pub fn is_platform_security(&self) -> bool {
        self.roles.iter().any(|r| r == PLATFORM_SECURITY)
    }

    pub fn owns(&self, ns: &str) -> bool {
        self.is_platform_security() || self.namespaces.iter().any(|n| n == ns)
    }

    /// The audit actor name.
    pub fn actor(&self) -> String {
        format!("operator:{}", self.name)
    }
}

/// The operators file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operators {
    pub operators: Vec<Operator>,
}

/// SHA-256 hex of a secret.
pub fn sha256_hex(s: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, s.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new random secret, 32 bytes, URL-safe.
pub fn random_secret(prefix: &str) -> String {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 32];
    // A failing system RNG leaves the buffer zeroed; refuse rather than issue a guessable secret.
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        return String::new();
    }
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{prefix}{hex}")
}

impl Operators {
    /// Reads `operators.json`.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| format!("`{}` is not a valid operators file: {e}", path.display()))
    }

    pub fn by_token(&self, token: &str) -> Option<&Operator> {
        let h = sha256_hex(token);
        self.operators.iter().find(|o| o.token_sha256.contains(&h))
    }

    pub fn by_name(&self, name: &str) -> Option<&Operator> {
        self.operators.iter().find(|o| o.name == name)
    }
}
