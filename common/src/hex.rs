//! Lower-case hex, for keys and signatures in config files and headers, and
//! the SHA-256 digests the cells store in place of secrets.

const DIGITS: &[u8; 16] = b"0123456789abcdef";

pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push(&mut out, bytes);
    out
}

/// Appends the hex of `bytes` (a table lookup per nibble: the router writes
/// a trace id on every request, and `format!` per byte cost it 3 %).
pub fn push(out: &mut String, bytes: &[u8]) {
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
}

/// SHA-256 of `s` in hex: how a refresh token, a reset code or a request
/// body is kept (a stolen table row does not give the secret back).
pub fn sha256(s: &str) -> String {
    encode(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()).as_ref())
}

/// Decodes hex (either case); none if it is not hex.
pub fn decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip() {
        assert_eq!(super::encode(&[0, 171, 255]), "00abff");
        assert_eq!(super::decode("00ABff"), Some(vec![0, 171, 255]));
        assert_eq!(super::decode("0"), None);
        assert_eq!(super::decode("zz"), None);
        assert_eq!(super::decode("é0"), None);
        assert_eq!(
            super::sha256("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
