//! The global directory: which user holds each identifier, stored only as
//! HMAC-SHA256(normalised identifier) under a key held by the control plane
//! (and, for routing logins, the routers). Runs inside store transactions.

use crate::store::Tx;
use homecell_proto::control::IdentifierClaim;
use homecell_proto::error::{CodedError, ErrorCode};
use std::path::Path;

/// The directory's HMAC key.
pub struct DirectoryKey(ring::hmac::Key);

impl DirectoryKey {
    /// Reads a key file: at least 32 bytes, written as hex.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!("cannot read the directory key {}: {e}", path.display())
        })?;
        Self::from_hex(text.trim())
            .map_err(|e| anyhow::anyhow!("directory key {}: {e}", path.display()))
    }

    pub fn from_hex(hex: &str) -> anyhow::Result<Self> {
        let bytes = decode_hex(hex).ok_or_else(|| anyhow::anyhow!("not hex"))?;
        if bytes.len() < 32 {
            anyhow::bail!("must hold at least 32 bytes");
        }
        Ok(Self(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes)))
    }

    pub fn hmac(&self, identifier: &str) -> String {
        let tag = ring::hmac::sign(&self.0, identifier.as_bytes());
        tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A normalised identifier is `<kind>:<value>`; the cell normalises.
fn validate_identifier(identifier: &str) -> Result<(), CodedError> {
    let ok = identifier.len() <= 330
        && ["email:", "phone:", "username:"]
            .iter()
            .any(|p| identifier.strip_prefix(p).is_some_and(|v| !v.is_empty()));
    if ok {
        Ok(())
    } else {
        Err(CodedError::invalid(
            "identifier must be email:…, phone:… or username:…",
        ))
    }
}

fn validate_user_id(user_id: &str) -> Result<(), CodedError> {
    if user_id.is_empty() || user_id.len() > 64 {
        return Err(CodedError::invalid("user_id must be 1-64 characters"));
    }
    Ok(())
}

pub fn claim(
    tx: &mut Tx<'_>,
    key: &DirectoryKey,
    identifier: &str,
    user_id: &str,
    region: &str,
) -> Result<(), CodedError> {
    validate_identifier(identifier)?;
    validate_user_id(user_id)?;
    crate::regions::get(tx, region)?;
    let hmac = key.hmac(identifier);
    match tx.claim(&hmac)? {
        Some(c) if c.user_id == user_id && c.region == region => Ok(()),
        Some(_) => Err(CodedError::new(
            ErrorCode::AlreadyExists,
            "identifier is already registered",
        )),
        None => tx.put_claim(IdentifierClaim {
            hmac,
            user_id: user_id.to_string(),
            region: region.to_string(),
        }),
    }
}

/// Releases a claim held by `user_id`; releasing what is not held is a no-op.
pub fn release(
    tx: &mut Tx<'_>,
    key: &DirectoryKey,
    identifier: &str,
    user_id: &str,
    region: &str,
) -> Result<(), CodedError> {
    validate_identifier(identifier)?;
    validate_user_id(user_id)?;
    let hmac = key.hmac(identifier);
    match tx.claim(&hmac)? {
        Some(c) if c.user_id == user_id && c.region == region => tx.delete_claim(&hmac),
        Some(_) => Err(CodedError::new(
            ErrorCode::PermissionDenied,
            "identifier is held by another user",
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_is_keyed_and_stable() {
        let a = DirectoryKey::from_hex(&"ab".repeat(32)).unwrap();
        let b = DirectoryKey::from_hex(&"cd".repeat(32)).unwrap();
        assert_eq!(a.hmac("email:x@y.z"), a.hmac("email:x@y.z"));
        assert_ne!(a.hmac("email:x@y.z"), b.hmac("email:x@y.z"));
        assert_eq!(a.hmac("email:x@y.z").len(), 64);
        assert!(DirectoryKey::from_hex("abcd").is_err());
        assert!(DirectoryKey::from_hex(&"zz".repeat(32)).is_err());
    }
}
