//! Signed webhooks, the shape payment providers use: the header value is
//! `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">` under a
//! secret both sides hold. Signing is here (tests, benches and local
//! provider stand-ins sign); cells verify.

use ring::hmac;

/// How far a signature's timestamp may be from now: older messages are
/// replays.
pub const TOLERANCE_SECS: i64 = 300;

fn signed_bytes(t: i64, body: &[u8]) -> Vec<u8> {
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(body);
    signed
}

pub fn key(secret: &str) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes())
}

/// The header value for `body` signed at `t`.
pub fn sign(secret: &str, body: &[u8], t: i64) -> String {
    sign_with(&key(secret), body, t)
}

pub fn sign_with(key: &hmac::Key, body: &[u8], t: i64) -> String {
    let tag = hmac::sign(key, &signed_bytes(t, body));
    format!("t={t},v1={}", crate::hex::encode(tag.as_ref()))
}

/// Checks a header value against `body` at `now`; the reason on failure.
pub fn verify(key: &hmac::Key, header: &str, body: &[u8], now: i64) -> Result<(), &'static str> {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1 = crate::hex::decode(v).filter(|h| h.len() <= 64),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return Err("malformed signature");
    };
    // `t` is the sender's, checked before the MAC: no arithmetic on it may
    // overflow.
    if now
        .checked_sub(t)
        .is_none_or(|d| d.unsigned_abs() > TOLERANCE_SECS as u64)
    {
        return Err("signature timestamp out of tolerance");
    }
    hmac::verify(key, &signed_bytes(t, body), &v1).map_err(|_| "bad signature")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extreme_timestamps_are_refused_not_overflowed() {
        let k = key("0123456789abcdef-secret");
        for t in [i64::MIN, i64::MAX, -1] {
            let h = format!("t={t},v1=00");
            assert_eq!(
                verify(&k, &h, b"{}", 1000),
                Err("signature timestamp out of tolerance")
            );
        }
    }

    #[test]
    fn sign_then_verify() {
        let body = br#"{"event_id":"e1"}"#;
        let h = sign("0123456789abcdef-secret", body, 1000);
        let k = key("0123456789abcdef-secret");
        assert!(verify(&k, &h, body, 1000).is_ok());
        assert!(verify(&k, &h, body, 1000 + TOLERANCE_SECS).is_ok());
        // Replayed too late, tampered, wrong secret.
        assert!(verify(&k, &h, body, 1001 + TOLERANCE_SECS).is_err());
        assert!(verify(&k, &h, br#"{"event_id":"e2"}"#, 1000).is_err());
        assert!(verify(&key("another-secret-of-16+"), &h, body, 1000).is_err());
        for junk in [
            "",
            "t=1",
            "v1=zz",
            "t=x,v1=00",
            "t=1000,v1=0g",
            "t=1000,v1=é0",
        ] {
            assert!(verify(&k, junk, body, 1000).is_err(), "{junk}");
        }
    }
}
