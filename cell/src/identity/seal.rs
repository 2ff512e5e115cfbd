//! Signing keys sealed at rest: the datastore holds each private key
//! encrypted (AES-256-GCM, bound to its key id) under a key kept in a file
//! beside the cell, so a copy of the database (a dump, a backup, a replica)
//! cannot mint tokens. Every instance of a cell reads the same file.
//!
//! Stored form: `HCS1` ‖ 12-byte random nonce ‖ ciphertext and tag. A key
//! stored before sealing existed is plain PKCS#8 (it begins with a DER
//! sequence, never with `HCS1`) and is sealed when a sealing cell opens it.

use anyhow::{Result, anyhow, bail};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use std::path::Path;

const MAGIC: &[u8; 4] = b"HCS1";

/// The key that seals this cell's signing keys.
pub struct Seal(LessSafeKey);

impl Seal {
    /// Reads a seal file: 32 bytes as hex (`control-plane pki seal-key`).
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = homecell_common::key_file::read(path, "signing key seal")?;
        Self::from_bytes(&bytes[..32])
    }

    /// Writes a new random seal to `path` (owner-only) unless one is there;
    /// either way, loads it.
    pub fn create_if_missing(path: &Path) -> Result<Self> {
        homecell_common::key_file::create_if_missing(path)?;
        Self::load(path)
    }

    fn from_bytes(key: &[u8]) -> Result<Self> {
        let key = UnboundKey::new(&AES_256_GCM, key).map_err(|_| anyhow!("bad seal key"))?;
        Ok(Self(LessSafeKey::new(key)))
    }

    /// The stored form of `pkcs8`, the private key `kid`.
    pub fn seal(&self, kid: &str, pkcs8: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| anyhow!("no randomness"))?;
        let mut body = pkcs8.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(kid.as_bytes()),
                &mut body,
            )
            .map_err(|_| anyhow!("cannot seal signing key {kid}"))?;
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// The PKCS#8 of a stored key sealed with this seal.
    pub fn open(&self, kid: &str, stored: &[u8]) -> Result<Vec<u8>> {
        let Some(rest) = stored.strip_prefix(MAGIC.as_slice()) else {
            bail!("signing key {kid} is not sealed");
        };
        if rest.len() < NONCE_LEN {
            bail!("signing key {kid} is truncated");
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| anyhow!("bad nonce"))?;
        let mut body = body.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(kid.as_bytes()), &mut body)
            .map_err(|_| {
                anyhow!(
                    "signing key {kid} does not open with this seal (another cell's seal file?)"
                )
            })?;
        Ok(plain.to_vec())
    }
}

/// Whether a stored private key is sealed.
pub fn is_sealed(stored: &[u8]) -> bool {
    stored.starts_with(MAGIC)
}

/// The PKCS#8 of a stored key: opened with the seal when sealed; as stored
/// when plain, only in a cell without a seal. A cell with a seal seals the
/// keys it had from before once (`keys::Keys::open`); a plain key after
/// that was written by someone who can write to the database but has no
/// seal, and signing with it would hand them the region's tokens.
pub fn unseal(seal: Option<&Seal>, kid: &str, stored: &[u8]) -> Result<Vec<u8>> {
    match (is_sealed(stored), seal) {
        (false, None) => Ok(stored.to_vec()),
        (false, Some(_)) => bail!(
            "signing key {kid} is stored plain in a cell that seals its keys: refused (it was not written by this cell)"
        ),
        (true, Some(seal)) => seal.open(kid, stored),
        (true, None) => bail!(
            "signing key {kid} is sealed and this cell has no seal (set signing_key_seal_file)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(byte: u8) -> Seal {
        Seal::from_bytes(&[byte; 32]).unwrap()
    }

    #[test]
    fn sealed_keys_open_only_with_their_seal_and_id() {
        let (_, pkcs8) = homecell_common::jwt::SigningKey::generate("k1".into()).unwrap();
        let stored = seal(1).seal("k1", &pkcs8).unwrap();
        assert!(is_sealed(&stored));
        assert!(!is_sealed(&pkcs8), "PKCS#8 never looks sealed");
        assert!(
            !stored.windows(pkcs8.len()).any(|w| w == pkcs8.as_slice()),
            "the plaintext is not in the stored form"
        );
        assert_eq!(seal(1).open("k1", &stored).unwrap(), pkcs8);
        assert_eq!(unseal(Some(&seal(1)), "k1", &stored).unwrap(), pkcs8);
        // Another seal, another key id, a flipped bit, a cut: refused.
        assert!(seal(2).open("k1", &stored).is_err());
        assert!(seal(1).open("k2", &stored).is_err());
        let mut flipped = stored.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(seal(1).open("k1", &flipped).is_err());
        assert!(seal(1).open("k1", &stored[..10]).is_err());
        // No seal: a sealed key is an error, a plain one passes.
        assert!(unseal(None, "k1", &stored).is_err());
        assert_eq!(unseal(None, "k1", &pkcs8).unwrap(), pkcs8);
        // A seal: a plain key is refused.
        assert!(unseal(Some(&seal(1)), "k1", &pkcs8).is_err());
    }
}
