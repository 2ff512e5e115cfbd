//! The routing table: every region's status and resolved cell addresses,
//! built from the replica off the request path and swapped in atomically.

use homecell_common::replica::ReplicaState;
use homecell_proto::config::format_value;
use homecell_proto::control::{RegionStatus, config_value::Kind};
use homecell_proto::region::internal_endpoints;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

#[derive(Debug)]
pub struct Upstream {
    pub region: String,
    pub status: RegionStatus,
    /// Resolved addresses of the region's cell(s); may be empty when the
    /// endpoint does not resolve.
    pub addrs: Vec<SocketAddr>,
    /// The name the cell's certificate must carry.
    pub sni: String,
    /// The countries whose registrations the region takes.
    pub countries: Vec<String>,
    next: AtomicUsize,
}

impl Upstream {
    /// Round-robin over the resolved addresses that are up (health.rs says
    /// which), skipping those this request already failed to reach.
    pub fn pick(
        &self,
        is_up: impl Fn(&SocketAddr) -> bool,
        skip: &[SocketAddr],
    ) -> Option<SocketAddr> {
        let n = self.addrs.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| self.addrs[(start + k) % n])
            .find(|a| is_up(a) && !skip.contains(a))
    }
}

#[derive(Debug, Default)]
pub struct RouteTable {
    /// The replica revision this table was built from (0: none yet).
    pub revision: u64,
    pub default_region: String,
    pub regions: HashMap<String, Arc<Upstream>>,
    pub draining_retry_after: Duration,
    /// Requests per second per client address / per user; None: unlimited.
    pub rate_per_ip: Option<u32>,
    pub rate_per_user: Option<u32>,
    /// Registrations per client address (IPv6 per /64) per minute
    /// (`router.rate_limit.registrations_per_ip`; 0 turns it off).
    pub registrations_per_ip_per_minute: Option<u32>,
}

/// Registrations per address per minute when the config says nothing.
pub const DEFAULT_REGISTRATIONS_PER_IP_PER_MINUTE: u32 = 30;

/// Splits `https://host:port` into host and port.
fn host_port(endpoint: &str) -> Option<(String, u16)> {
    let uri: http::Uri = endpoint.parse().ok()?;
    let auth = uri.authority()?;
    let host = auth.host().trim_start_matches('[').trim_end_matches(']');
    Some((host.to_string(), auth.port_u16()?))
}

async fn resolve(endpoint: &str) -> Option<Vec<SocketAddr>> {
    let (host, port) = host_port(endpoint)?;
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Some(vec![SocketAddr::new(ip, port)]);
    }
    match tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::lookup_host((host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(addrs)) => Some(addrs.collect()),
        _ => None,
    }
}

/// Builds a table from the replica. An endpoint that does not resolve now
/// keeps the addresses `previous` had for it, so a DNS hiccup does not take
/// a region down.
pub async fn build(
    state: &ReplicaState,
    default_region: &str,
    fallback_retry_after: Duration,
    previous: &RouteTable,
) -> RouteTable {
    let mut regions = HashMap::with_capacity(state.regions.len());
    for r in state.regions.values() {
        // Every instance the endpoint names (a list, or a name with several
        // addresses); one that does not resolve keeps what it had.
        let mut addrs = Vec::new();
        for endpoint in internal_endpoints(&r.internal_endpoint) {
            match resolve(endpoint).await {
                Some(a) => addrs.extend(a),
                None => {
                    tracing::warn!(region = %r.id, endpoint, "cannot resolve the cell endpoint");
                    if let Some(u) = previous.regions.get(&r.id) {
                        addrs.extend(u.addrs.iter().copied());
                    }
                }
            }
        }
        addrs.sort();
        addrs.dedup();
        regions.insert(
            r.id.clone(),
            Arc::new(Upstream {
                region: r.id.clone(),
                status: r.status(),
                addrs,
                sni: format!("cell.{}", r.id),
                countries: r.countries.clone(),
                next: AtomicUsize::new(0),
            }),
        );
    }
    let draining_retry_after = match state
        .config_value("router.draining.retry_after", default_region)
        .and_then(|v| v.kind.as_ref())
    {
        Some(Kind::DurationMs(ms)) => Duration::from_millis(*ms),
        Some(_) => {
            tracing::warn!(value = %format_value(state.config_value("router.draining.retry_after", default_region).expect("present")), "router.draining.retry_after is not a duration; ignored");
            fallback_retry_after
        }
        None => fallback_retry_after,
    };
    let rate = |key: &str| match state
        .config_value(key, default_region)
        .and_then(|v| v.kind.as_ref())
    {
        Some(Kind::IntValue(n)) if *n > 0 => Some((*n).min(u32::MAX as i64) as u32),
        _ => None,
    };
    RouteTable {
        rate_per_ip: rate("router.rate_limit.per_ip"),
        rate_per_user: rate("router.rate_limit.per_user"),
        // On unless set to 0: registrations are the costliest anonymous call.
        registrations_per_ip_per_minute: match state
            .config_value("router.rate_limit.registrations_per_ip", default_region)
            .and_then(|v| v.kind.as_ref())
        {
            Some(Kind::IntValue(n)) if *n <= 0 => None,
            Some(Kind::IntValue(n)) => Some((*n).min(u32::MAX as i64) as u32),
            _ => Some(DEFAULT_REGISTRATIONS_PER_IP_PER_MINUTE),
        },
        revision: state.revision,
        default_region: default_region.to_string(),
        regions,
        draining_retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_endpoints() {
        assert_eq!(
            host_port("https://127.0.0.1:9443"),
            Some(("127.0.0.1".into(), 9443))
        );
        assert_eq!(
            host_port("https://cell-cn-east:9443"),
            Some(("cell-cn-east".into(), 9443))
        );
        assert_eq!(host_port("https://[::1]:9443"), Some(("::1".into(), 9443)));
        assert_eq!(host_port("nope"), None);
    }
}
