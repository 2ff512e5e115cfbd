//! Payment providers: the signed deposit callback.
//!
//! The provider POSTs JSON to `/v1/payments/{provider}/callback`, signed
//! with `x-homecell-signature` as `homecell_common::webhook` describes,
//! under a secret shared with that provider. A bad signature or a stale
//! timestamp is refused; a genuine repeat is harmless because the deposit's
//! id derives from the provider's `event_id`.

use homecell_common::webhook;
use homecell_proto::error::{CodedError, ErrorCode};
use std::collections::BTreeMap;

pub const SIGNATURE_HEADER: &str = "x-homecell-signature";

/// One provider's settings in the cell config (`[payments.<name>]`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// A file holding the shared secret (preferred: keeps it out of the config).
    #[serde(default)]
    pub secret_file: Option<std::path::PathBuf>,
    /// The shared secret itself, for development.
    #[serde(default)]
    pub secret: Option<String>,
}

/// The providers a cell accepts callbacks from, by name.
#[derive(Clone, Default)]
pub struct Providers(BTreeMap<String, ring::hmac::Key>);

impl Providers {
    pub fn load(config: &BTreeMap<String, ProviderConfig>) -> anyhow::Result<Self> {
        let mut keys = BTreeMap::new();
        for (name, c) in config {
            let secret = match (&c.secret, &c.secret_file) {
                (Some(s), None) => s.clone(),
                (None, Some(f)) => std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("payments.{name}.secret_file: {e}"))?
                    .trim()
                    .to_string(),
                _ => anyhow::bail!("payments.{name}: set exactly one of secret, secret_file"),
            };
            if secret.len() < 16 {
                anyhow::bail!("payments.{name}: the secret must be at least 16 characters");
            }
            keys.insert(name.clone(), webhook::key(&secret));
        }
        Ok(Self(keys))
    }

    /// Checks the signature of a callback body; `now` in unix seconds.
    pub fn verify(
        &self,
        provider: &str,
        header: Option<&str>,
        body: &[u8],
        now: i64,
    ) -> Result<(), CodedError> {
        let key = self
            .0
            .get(provider)
            .ok_or_else(|| CodedError::not_found("no such payment provider"))?;
        let header = header
            .ok_or_else(|| CodedError::new(ErrorCode::Unauthenticated, "missing signature"))?;
        webhook::verify(key, header, body, now)
            .map_err(|m| CodedError::new(ErrorCode::Unauthenticated, m))
    }
}

/// A deposit notification's body.
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
pub struct Deposit {
    /// The provider's id of this event: repeats carry the same one.
    pub event_id: String,
    /// `deposit.succeeded`; other types are acknowledged and ignored.
    #[serde(rename = "type")]
    pub kind: String,
    pub user_id: String,
    pub amount: i64,
    pub currency: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn providers_are_named_and_secrets_checked() {
        let mut c = BTreeMap::new();
        let cfg = |s: &str| ProviderConfig {
            secret: Some(s.into()),
            secret_file: None,
        };
        c.insert("testpay".to_string(), cfg("0123456789abcdef-secret"));
        let p = Providers::load(&c).unwrap();
        let body = br#"{"event_id":"e1"}"#;
        let h = webhook::sign("0123456789abcdef-secret", body, 1000);
        assert!(p.verify("testpay", Some(&h), body, 1000).is_ok());
        assert_eq!(
            p.verify("nopay", Some(&h), body, 1000).unwrap_err().code,
            ErrorCode::NotFound
        );
        assert!(p.verify("testpay", None, body, 1000).is_err());
        c.insert("weak".to_string(), cfg("short"));
        assert!(Providers::load(&c).is_err());
    }
}
