//! Client addresses as limits count them, and the header in which the
//! router hands the address it resolved to the cells.

use std::net::IpAddr;

/// The router's own header: the client address it resolved (the peer, or
/// behind trusted proxies the first untrusted `X-Forwarded-For` hop). The
/// router always overwrites it, so a client cannot choose it; cells read
/// only this for their per-address limits.
pub const CLIENT_IP_HEADER: &str = "x-homecell-client-ip";

/// The unit an address limit counts: an IPv4 address, or an IPv6 /64 (one
/// subscriber's network, in which a client can pick any of 2^64 source
/// addresses). An IPv4-mapped IPv6 address counts as its IPv4 address.
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_counts_per_64() {
        let key = |s: &str| limit_key(s.parse().unwrap()).to_string();
        assert_eq!(key("2001:db8:1:2::1"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2:ffff:ffff:ffff:ffff"), "2001:db8:1:2::");
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
        assert_eq!(key("::ffff:10.0.0.9"), "10.0.0.9");
        assert_eq!(key("10.0.0.9"), "10.0.0.9");
    }
}
