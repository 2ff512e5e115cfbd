//! The directory's HMAC key: `HMAC-SHA256(key, "kind:value")` is how the
//! directory names an identifier. Held by the control plane and the routers,
//! never by cells.

use std::path::Path;

/// The directory's HMAC key.
pub struct DirectoryKey(ring::hmac::Key);

impl DirectoryKey {
    /// Reads a key file: at least 32 bytes, written as hex.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let key = crate::key_file::read(path, "directory key")?;
        Ok(Self(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key)))
    }

    /// Writes a new random 32-byte key to `path` (owner-only) unless a key
    /// is there already; either way, loads it.
    pub fn create_if_missing(path: &Path) -> anyhow::Result<Self> {
        crate::key_file::create_if_missing(path)?;
        Self::load(path)
    }

    pub fn from_hex(hex: &str) -> anyhow::Result<Self> {
        let key = crate::key_file::parse(hex)?;
        Ok(Self(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key)))
    }

    pub fn hmac(&self, identifier: &str) -> String {
        let tag = ring::hmac::sign(&self.0, identifier.as_bytes());
        crate::hex::encode(tag.as_ref())
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
