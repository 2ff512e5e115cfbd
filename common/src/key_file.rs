//! Shared secrets kept in files (the directory's HMAC key, the gossip key):
//! at least 32 random bytes, written as hex, readable by the owner only.

use anyhow::{Context, Result, anyhow, bail};
use std::path::Path;

/// Reads the key in `path`; `what` names it in errors.
pub fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the {what} {}", path.display()))?;
    parse(text.trim()).with_context(|| format!("{what} {}", path.display()))
}

/// Decodes a key written as hex: at least 32 bytes.
pub fn parse(hex: &str) -> Result<Vec<u8>> {
    let bytes = crate::hex::decode(hex).ok_or_else(|| anyhow!("not hex"))?;
    if bytes.len() < 32 {
        bail!("must hold at least 32 bytes");
    }
    Ok(bytes)
}

/// Writes a new random 32-byte key to `path` (owner-only) unless a file is
/// there already.
pub fn create_if_missing(path: &Path) -> Result<()> {
    if !path.exists() {
        let mut key = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
            .map_err(|_| anyhow!("no randomness"))?;
        crate::tls::write_private(path, crate::hex::encode(&key).as_bytes())?;
    }
    Ok(())
}

/// Creates a directory that holds data or secrets (and its parents), and
/// makes it the owner's alone (0700): a datastore, a replica, a seal or a
/// CA key is nobody else's to read.
pub fn create_private_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path).map_err(|e| anyhow!("cannot create {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| anyhow!("cannot make {} private: {e}", path.display()))
}
