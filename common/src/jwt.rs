//! Access tokens: compact JWS with EdDSA (Ed25519) only, through
//! `jsonwebtoken` with a crypto provider of our own on `ring`.
//!
//! Deliberately narrow, so there is nothing to confuse: the header must say
//! `alg: EdDSA` and name a `kid`; any other `alg` (`none`, `HS256`, …) is
//! refused before a key is even looked up, and the key comes from our own
//! key set by `kid`, never from the token. Expiry, not-before and issuer are
//! checked after the signature.
//!
//! `jsonwebtoken` parses, encodes and checks the algorithm; the provider
//! below (`RING`) does the signing and verifying with ring, which rustls
//! brings already: the crate's own backends would add the `rsa` crate
//! (RUSTSEC-2023-0071) or aws-lc's C build. The provider refuses every
//! algorithm but EdDSA, and `Validation` is pinned to EdDSA too. The times
//! and the issuer are checked here rather than by `Validation`: the time
//! is the caller's (a cache re-checks a remembered token at its own `now`),
//! and the issuer a token must name depends on the key that signed it.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{Error as JwtError, ErrorKind};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header, Validation};
use ring::signature::{self, Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, Once};

/// Longest an access token may live.
pub const MAX_ACCESS_TTL_SECS: i64 = 15 * 60;

/// The claims of a Homecell access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// The user's home region.
    pub home: String,
    /// The session id; the home cell checks that it is alive.
    pub sid: String,
    /// Client type: app, web, mp or cms.
    pub ct: String,
    pub roles: Vec<String>,
    /// The issuing cell: `cell.<region>`.
    pub iss: String,
    pub iat: i64,
    pub exp: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("unsupported algorithm")]
    Algorithm,
    #[error("unknown signing key")]
    UnknownKey,
    #[error("bad signature")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("unknown issuer")]
    Issuer,
    #[error("token lives longer than an access token may")]
    Lifetime,
    #[error("unknown critical header")]
    Critical,
}

/// The crypto provider `jsonwebtoken` signs and verifies with: Ed25519 on
/// ring, nothing else.
static RING: CryptoProvider = CryptoProvider {
    signer_factory: ring_signer,
    verifier_factory: ring_verifier,
    // JWKs are written here (`jwk`), never read through the crate.
    key_utils: KeyUtils::new_unimplemented(),
};

/// Installs `RING` as the process's provider, once, before any use.
fn provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Only this module installs one, so there is none before it.
        let _ = RING.install_default();
    });
}

struct RingSigner(Arc<Ed25519KeyPair>);

impl jsonwebtoken::signature::Signer<Vec<u8>> for RingSigner {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, jsonwebtoken::signature::Error> {
        Ok(self.0.sign(msg).as_ref().to_vec())
    }
}

impl JwtSigner for RingSigner {
    fn algorithm(&self) -> Algorithm {
        Algorithm::EdDSA
    }
}

struct RingVerifier(Vec<u8>);

impl jsonwebtoken::signature::Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> Result<(), jsonwebtoken::signature::Error> {
        signature::UnparsedPublicKey::new(&signature::ED25519, &self.0)
            .verify(msg, sig)
            .map_err(|_| jsonwebtoken::signature::Error::new())
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        Algorithm::EdDSA
    }
}

fn ring_signer(
    alg: &Algorithm,
    key: &EncodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtSigner>> {
    if *alg != Algorithm::EdDSA || key.family() != AlgorithmFamily::Ed {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    Ok(Box::new(RingSigner(key_pair(key.as_bytes())?)))
}

/// The key pair of a PKCS#8 document, read once. ring derives the public
/// half whenever it reads a key (a scalar multiplication, about what a
/// signature costs), and jsonwebtoken hands the provider only the key's
/// bytes on every signature, so the pairs are kept by the document's
/// SHA-256. A cell holds a handful of keys; the map is emptied if it ever
/// holds more than 16 (rotations over a long life).
fn key_pair(pkcs8: &[u8]) -> jsonwebtoken::errors::Result<Arc<Ed25519KeyPair>> {
    static PAIRS: LazyLock<Mutex<HashMap<[u8; 32], Arc<Ed25519KeyPair>>>> =
        LazyLock::new(Default::default);
    let mut id = [0u8; 32];
    id.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, pkcs8).as_ref());
    let mut pairs = PAIRS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(pair) = pairs.get(&id) {
        return Ok(pair.clone());
    }
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8)
        .map_err(|_| JwtError::from(ErrorKind::InvalidEddsaKey))?;
    let pair = Arc::new(pair);
    if pairs.len() >= 16 {
        pairs.clear();
    }
    pairs.insert(id, pair.clone());
    Ok(pair)
}

fn ring_verifier(
    alg: &Algorithm,
    key: &DecodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtVerifier>> {
    if *alg != Algorithm::EdDSA || key.family() != AlgorithmFamily::Ed {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    Ok(Box::new(RingVerifier(key.try_get_as_bytes()?.to_vec())))
}

/// EdDSA, and no check of times or audience by the crate (`verify` makes
/// them at the caller's time).
static VALIDATION: LazyLock<Validation> = LazyLock::new(|| {
    let mut v = Validation::new(Algorithm::EdDSA);
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    v.leeway = 0;
    v
});

/// A signing key: an Ed25519 key and its id.
pub struct SigningKey {
    pub kid: String,
    key: EncodingKey,
    public: Vec<u8>,
}

impl SigningKey {
    /// Generates a new key; returns it with its PKCS#8 document (to store).
    pub fn generate(kid: String) -> anyhow::Result<(Self, Vec<u8>)> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| anyhow::anyhow!("key generation failed"))?;
        let key = Self::from_pkcs8(kid, pkcs8.as_ref())?;
        Ok((key, pkcs8.as_ref().to_vec()))
    }

    pub fn from_pkcs8(kid: String, pkcs8: &[u8]) -> anyhow::Result<Self> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8)
            .map_err(|_| anyhow::anyhow!("stored signing key {kid} is unreadable"))?;
        Ok(Self {
            kid,
            key: EncodingKey::from_ed_der(pkcs8),
            public: pair.public_key().as_ref().to_vec(),
        })
    }

    /// The raw 32-byte public key.
    pub fn public_key(&self) -> Vec<u8> {
        self.public.clone()
    }

    pub fn sign(&self, claims: &Claims) -> anyhow::Result<String> {
        provider();
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key)
            .map_err(|e| anyhow::anyhow!("cannot sign an access token: {e}"))
    }
}

/// Looks up a verification key (raw Ed25519 public key) and its issuer by kid.
pub trait KeySet {
    /// Returns (public key, issuer) for `kid`.
    fn key(&self, kid: &str) -> Option<(Vec<u8>, String)>;

    /// Whether `kid` is still published as `public_key` for `issuer`: what
    /// a remembered token is checked against on every use (token_cache.rs).
    /// Key sets on a request path compare in place instead of copying the
    /// key out.
    fn publishes(&self, kid: &str, public_key: &[u8], issuer: &str) -> bool {
        self.key(kid)
            .is_some_and(|(pk, iss)| pk == public_key && iss == issuer)
    }
}

/// A verified token's claims, and the key that signed it.
#[derive(Debug, Clone)]
pub struct Verified {
    pub claims: Claims,
    pub kid: String,
    pub public_key: Vec<u8>,
}

/// Verifies signature, issuer, expiry and not-before. `now` in unix seconds.
pub fn verify(token: &str, keys: &impl KeySet, now: i64) -> Result<Claims, TokenError> {
    verify_with_key(token, keys, now).map(|v| v.claims)
}

/// `verify`, also telling which key signed the token (what a cache of
/// verified tokens checks is still published: token_cache.rs).
pub fn verify_with_key(token: &str, keys: &impl KeySet, now: i64) -> Result<Verified, TokenError> {
    provider();
    if token.len() > 4096 || token.split('.').count() != 3 {
        return Err(TokenError::Malformed);
    }
    let header = jsonwebtoken::decode_header(token).map_err(|_| header_error(token))?;
    if header.alg != Algorithm::EdDSA {
        return Err(TokenError::Algorithm);
    }
    // Extensions the recipient must understand (RFC 7515 §4.1.11): we
    // understand none, so a token that names any is refused.
    if header.crit.is_some() {
        return Err(TokenError::Critical);
    }
    let kid = header.kid.ok_or(TokenError::Malformed)?;
    let (public, issuer) = keys.key(&kid).ok_or(TokenError::UnknownKey)?;
    let claims: Claims =
        jsonwebtoken::decode(token, &DecodingKey::from_ed_der(&public), &VALIDATION)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => TokenError::Signature,
                ErrorKind::InvalidAlgorithm => TokenError::Algorithm,
                _ => TokenError::Malformed,
            })?
            .claims;
    // The key's owner issued it, and only for its own region's users: a
    // cell's key cannot speak for another region's.
    if claims.iss != issuer || claims.iss.strip_prefix("cell.") != Some(claims.home.as_str()) {
        return Err(TokenError::Issuer);
    }
    // However it was signed, no access token lives longer than this.
    if claims.exp.saturating_sub(claims.iat) > MAX_ACCESS_TTL_SECS {
        return Err(TokenError::Lifetime);
    }
    if claims.exp <= now {
        return Err(TokenError::Expired);
    }
    // A little slack for clocks, but no token from the future.
    if claims.iat > now + 60 {
        return Err(TokenError::NotYetValid);
    }
    Ok(Verified {
        claims,
        kid,
        public_key: public,
    })
}

/// Why a header the crate cannot read was refused: an algorithm it does
/// not know (`none`, say), or anything else.
fn header_error(token: &str) -> TokenError {
    #[derive(Deserialize)]
    struct Alg {
        alg: String,
    }
    let alg = token
        .split('.')
        .next()
        .and_then(|h| B64.decode(h).ok())
        .and_then(|b| serde_json::from_slice::<Alg>(&b).ok());
    match alg {
        Some(a) if a.alg != "EdDSA" => TokenError::Algorithm,
        _ => TokenError::Malformed,
    }
}

/// The JWK of an Ed25519 public key (RFC 8037).
pub fn jwk(kid: &str, public_key: &[u8]) -> serde_json::Value {
    serde_json::json!({
        "kty": "OKP",
        "crv": "Ed25519",
        "alg": "EdDSA",
        "use": "sig",
        "kid": kid,
        "x": B64.encode(public_key),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Keys(HashMap<String, (Vec<u8>, String)>);

    impl SigningKey {
        fn sign_ok(&self, claims: &Claims) -> String {
            self.sign(claims).unwrap()
        }
    }
    impl KeySet for Keys {
        fn key(&self, kid: &str) -> Option<(Vec<u8>, String)> {
            self.0.get(kid).cloned()
        }
    }

    fn setup() -> (SigningKey, Keys, Claims) {
        let (k, _) = SigningKey::generate("k1".into()).unwrap();
        let keys = Keys(HashMap::from([(
            "k1".to_string(),
            (k.public_key(), "cell.cn-east".to_string()),
        )]));
        let claims = Claims {
            sub: "u1".into(),
            home: "cn-east".into(),
            sid: "s1".into(),
            ct: "app".into(),
            roles: vec!["user".into()],
            iss: "cell.cn-east".into(),
            iat: 1000,
            exp: 1900,
        };
        (k, keys, claims)
    }

    #[test]
    fn round_trip_and_expiry() {
        let (k, keys, claims) = setup();
        let t = k.sign_ok(&claims);
        assert_eq!(verify(&t, &keys, 1500).unwrap(), claims);
        assert_eq!(verify(&t, &keys, 1900), Err(TokenError::Expired));
    }

    #[test]
    fn attacks_are_refused() {
        let (k, keys, claims) = setup();
        let t = k.sign_ok(&claims);
        let parts: Vec<&str> = t.split('.').collect();
        // alg: none, with no signature.
        let none = B64.encode(br#"{"alg":"none","kid":"k1"}"#);
        assert_eq!(
            verify(&format!("{none}.{}.", parts[1]), &keys, 1500),
            Err(TokenError::Algorithm)
        );
        // HS256 "signed" with the public key.
        let hs = B64.encode(br#"{"alg":"HS256","kid":"k1"}"#);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &keys.0["k1"].0);
        let input = format!("{hs}.{}", parts[1]);
        let mac = B64.encode(ring::hmac::sign(&key, input.as_bytes()).as_ref());
        assert_eq!(
            verify(&format!("{input}.{mac}"), &keys, 1500),
            Err(TokenError::Algorithm)
        );
        // Tampered claims.
        let mut forged = claims.clone();
        forged.roles = vec!["admin".into()];
        let p = B64.encode(serde_json::to_vec(&forged).unwrap());
        assert_eq!(
            verify(&format!("{}.{p}.{}", parts[0], parts[2]), &keys, 1500),
            Err(TokenError::Signature)
        );
        // Unknown kid.
        let (other, _) = SigningKey::generate("k2".into()).unwrap();
        assert_eq!(
            verify(&other.sign_ok(&claims), &keys, 1500),
            Err(TokenError::UnknownKey)
        );
        // Right kid, wrong issuer claim.
        let mut foreign = claims.clone();
        foreign.iss = "cell.eu-west".into();
        assert_eq!(
            verify(&k.sign_ok(&foreign), &keys, 1500),
            Err(TokenError::Issuer)
        );
        assert_eq!(verify("a.b", &keys, 1500), Err(TokenError::Malformed));
    }

    #[test]
    fn bounds_are_enforced() {
        let (k, keys, claims) = setup();
        // The key's own issuer, for a user of another region.
        let mut elsewhere = claims.clone();
        elsewhere.home = "eu-west".into();
        assert_eq!(
            verify(&k.sign_ok(&elsewhere), &keys, 1500),
            Err(TokenError::Issuer)
        );
        // Longer-lived than any access token may be.
        let mut long = claims.clone();
        long.exp = long.iat + MAX_ACCESS_TTL_SECS + 1;
        assert_eq!(
            verify(&k.sign_ok(&long), &keys, 1500),
            Err(TokenError::Lifetime)
        );
        let mut longest = claims.clone();
        longest.exp = longest.iat + MAX_ACCESS_TTL_SECS;
        assert!(verify(&k.sign_ok(&longest), &keys, 1500).is_ok());
        // A critical extension we do not understand, validly signed.
        let h = B64.encode(br#"{"alg":"EdDSA","kid":"k1","crit":["b64"],"b64":true}"#);
        let p = B64.encode(serde_json::to_vec(&claims).unwrap());
        let input = format!("{h}.{p}");
        let pair = Ed25519KeyPair::from_pkcs8(k.key.as_bytes()).unwrap();
        let sig = B64.encode(pair.sign(input.as_bytes()).as_ref());
        assert_eq!(
            verify(&format!("{input}.{sig}"), &keys, 1500),
            Err(TokenError::Critical)
        );
    }
}
