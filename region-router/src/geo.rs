//! Where a client is: its address (from the connection, or from
//! `X-Forwarded-For` only when the connection comes from a trusted proxy)
//! and that address's country from a MaxMind-format database. Both free
//! schemas are read: GeoLite2/DB-IP (`country.iso_code`) and flat
//! (`country_code`).

use anyhow::{Context, Result};
use maxminddb::{PathElement, Reader};
use std::net::IpAddr;
use std::path::Path;

pub struct Geo {
    reader: Reader<Vec<u8>>,
}

impl Geo {
    pub fn open(path: &Path) -> Result<Self> {
        let reader = Reader::open_readfile(path)
            .with_context(|| format!("cannot read the GeoIP database {}", path.display()))?;
        Ok(Self { reader })
    }

    /// The ISO 3166-1 alpha-2 country of `ip`, upper case.
    pub fn country(&self, ip: IpAddr) -> Option<String> {
        let found = self.reader.lookup(ip).ok()?;
        let nested: Option<String> = found
            .decode_path(&[PathElement::Key("country"), PathElement::Key("iso_code")])
            .ok()
            .flatten();
        let code = nested.or_else(|| {
            found
                .decode_path(&[PathElement::Key("country_code")])
                .ok()
                .flatten()
        })?;
        let code = code.trim().to_ascii_uppercase();
        (code.len() == 2 && code.bytes().all(|b| b.is_ascii_uppercase())).then_some(code)
    }
}

/// Networks whose `X-Forwarded-For` the router believes.
#[derive(Debug, Default, Clone)]
pub struct TrustedProxies(Vec<(IpAddr, u8)>);

impl TrustedProxies {
    /// Parses `ip/prefix` (or a bare ip) entries.
    pub fn parse(entries: &[String]) -> Result<Self> {
        let mut nets = Vec::new();
        for e in entries {
            let (ip, prefix) = match e.split_once('/') {
                Some((ip, p)) => (ip, Some(p)),
                None => (e.as_str(), None),
            };
            let ip: IpAddr = ip
                .trim()
                .parse()
                .with_context(|| format!("trusted proxy {e:?} is not an address"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let prefix: u8 = match prefix {
                Some(p) => p
                    .trim()
                    .parse()
                    .ok()
                    .filter(|p| *p <= max)
                    .with_context(|| format!("trusted proxy {e:?} has a bad prefix"))?,
                None => max,
            };
            nets.push((ip, prefix));
        }
        Ok(Self(nets))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|(net, prefix)| in_net(ip, *net, *prefix))
    }
}

fn in_net(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix)
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix)
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// The client's address: the connection's peer, unless that peer is a
/// trusted proxy, in which case the right-most `X-Forwarded-For` entry that
/// is not itself a trusted proxy.
pub fn client_ip(peer: IpAddr, xff: Option<&str>, trusted: &TrustedProxies) -> IpAddr {
    if !trusted.contains(peer) {
        return peer;
    }
    let Some(xff) = xff else { return peer };
    for hop in xff.rsplit(',') {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) if trusted.contains(ip) => continue,
            Ok(ip) => return ip,
            Err(_) => return peer,
        }
    }
    peer
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn fixture(dir: &Path) -> std::path::PathBuf {
        use mmdb_writer::Writer;
        #[derive(serde::Serialize)]
        struct Country {
            iso_code: String,
        }
        #[derive(serde::Serialize)]
        struct Nested {
            country: Country,
        }
        #[derive(serde::Serialize)]
        struct Flat {
            country_code: String,
        }
        let mut w = Writer::new("Homecell-Test-Country");
        w.insert(
            "81.2.69.0/24".parse::<ipnet::IpNet>().unwrap(),
            &Nested {
                country: Country {
                    iso_code: "GB".into(),
                },
            },
        )
        .unwrap();
        w.insert(
            "1.0.16.0/20".parse::<ipnet::IpNet>().unwrap(),
            &Flat {
                country_code: "cn".into(),
            },
        )
        .unwrap();
        w.insert(
            "2001:db8::/32".parse::<ipnet::IpNet>().unwrap(),
            &Flat {
                country_code: "DE".into(),
            },
        )
        .unwrap();
        let path = dir.join("country.mmdb");
        std::fs::write(&path, w.to_bytes().unwrap()).unwrap();
        path
    }

    #[test]
    fn reads_both_schemas() {
        let dir = tempfile::tempdir().unwrap();
        let geo = Geo::open(&fixture(dir.path())).unwrap();
        assert_eq!(
            geo.country("81.2.69.142".parse().unwrap()).as_deref(),
            Some("GB")
        );
        assert_eq!(
            geo.country("1.0.16.1".parse().unwrap()).as_deref(),
            Some("CN")
        );
        assert_eq!(geo.country("127.0.0.1".parse().unwrap()), None);
        assert_eq!(
            geo.country("2001:db8::1".parse().unwrap()).as_deref(),
            Some("DE"),
            "IPv6"
        );
        assert_eq!(
            geo.country("10.1.2.3".parse().unwrap()),
            None,
            "private addresses have no country"
        );
        assert_eq!(geo.country("::1".parse().unwrap()), None);
        assert!(Geo::open(&dir.path().join("missing.mmdb")).is_err());
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let t = TrustedProxies::parse(&["10.0.0.0/8".into(), "::1".into()]).unwrap();
        let peer: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(
            client_ip(peer, Some("81.2.69.142, 10.9.9.9"), &t),
            "81.2.69.142".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(peer, None, &t), peer);
        assert_eq!(client_ip(peer, Some("garbage"), &t), peer);
        let stranger: IpAddr = "203.0.113.5".parse().unwrap();
        assert_eq!(
            client_ip(stranger, Some("81.2.69.142"), &t),
            stranger,
            "untrusted peers cannot claim an address"
        );
        assert!(TrustedProxies::parse(&["10.0.0.0/33".into()]).is_err());
        assert!(TrustedProxies::parse(&["nope".into()]).is_err());
    }
}
