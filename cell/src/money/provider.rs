//! Payment providers: the signed deposit callback.
//!
//! The protocol (the common webhook shape, as Stripe and most Chinese PSPs
//! use it): the provider POSTs JSON to `/v1/payments/{provider}/callback`
//! with `x-homecell-signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
//! "<t>.<raw body>">` under a secret shared with that provider. We refuse a
//! bad signature, and a timestamp more than `TOLERANCE_SECS` away from now
//! (a replayed old message); a genuine repeat is harmless because the
//! deposit's id derives from the provider's `event_id`.

use homecell_proto::error::{CodedError, ErrorCode};
use std::collections::BTreeMap;

pub const SIGNATURE_HEADER: &str = "x-homecell-signature";
pub const TOLERANCE_SECS: i64 = 300;

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
            keys.insert(
                name.clone(),
                ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes()),
            );
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
        let bad = |m: &str| CodedError::new(ErrorCode::Unauthenticated, m.to_string());
        let header = header.ok_or_else(|| bad("missing signature"))?;
        let mut t = None;
        let mut v1 = None;
        for part in header.split(',') {
            match part.trim().split_once('=') {
                Some(("t", v)) => t = v.parse::<i64>().ok(),
                Some(("v1", v)) => v1 = decode_hex(v),
                _ => {}
            }
        }
        let (Some(t), Some(v1)) = (t, v1) else {
            return Err(bad("malformed signature"));
        };
        if (now - t).abs() > TOLERANCE_SECS {
            return Err(bad("signature timestamp out of tolerance"));
        }
        let mut signed = format!("{t}.").into_bytes();
        signed.extend_from_slice(body);
        ring::hmac::verify(key, &signed, &v1).map_err(|_| bad("bad signature"))
    }
}

/// Signs a body as a provider does (for tests, benches and the dev tools).
pub fn sign(secret: &str, body: &[u8], t: i64) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(body);
    let tag = ring::hmac::sign(&key, &signed);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={t},v1={hex}")
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
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

    fn providers() -> Providers {
        let mut c = BTreeMap::new();
        c.insert(
            "testpay".to_string(),
            ProviderConfig {
                secret: Some("0123456789abcdef-secret".into()),
                secret_file: None,
            },
        );
        Providers::load(&c).unwrap()
    }

    #[test]
    fn signatures() {
        let p = providers();
        let body = br#"{"event_id":"e1"}"#;
        let h = sign("0123456789abcdef-secret", body, 1000);
        assert!(p.verify("testpay", Some(&h), body, 1000).is_ok());
        assert!(
            p.verify("testpay", Some(&h), body, 1000 + TOLERANCE_SECS)
                .is_ok()
        );
        // Replayed too late, tampered, wrong secret, unknown provider.
        assert!(
            p.verify("testpay", Some(&h), body, 1001 + TOLERANCE_SECS)
                .is_err()
        );
        assert!(
            p.verify("testpay", Some(&h), br#"{"event_id":"e2"}"#, 1000)
                .is_err()
        );
        let other = sign("another-secret-of-16+", body, 1000);
        assert!(p.verify("testpay", Some(&other), body, 1000).is_err());
        assert_eq!(
            p.verify("nopay", Some(&h), body, 1000).unwrap_err().code,
            ErrorCode::NotFound
        );
        for junk in ["", "t=1", "v1=zz", "t=x,v1=00", "t=1000,v1=0g"] {
            assert!(
                p.verify("testpay", Some(junk), body, 1000).is_err(),
                "{junk}"
            );
        }
        assert!(p.verify("testpay", None, body, 1000).is_err());
    }
}
