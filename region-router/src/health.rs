//! Active health checks: every second the router opens a TLS connection to
//! each cell address it routes to (the same handshake a request needs, with
//! its client certificate). Two failures in a row mark the address down; one
//! success marks it up. A region whose addresses are all down is answered at
//! once with 503 and `Retry-After`, without trying to connect.
//!
//! With gossip configured, a region whose cell members gossip has declared
//! down is answered the same way, at once, until one of this router's own
//! probes reaches the region's cell after that: gossip can make a region
//! go down sooner (a cell that says goodbye, one others saw die), but not
//! keep a cell this router can reach out of service (a cell that came back
//! at another address, UDP blocked on a path).

use crate::routes::RouteTable;
use arc_swap::ArcSwap;
use homecell_common::gossip::Membership;
use prometheus::IntGaugeVec;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

const INTERVAL: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
const FAILURES_TO_MARK_DOWN: u32 = 2;

static CELL_UP: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    let g = IntGaugeVec::new(
        prometheus::Opts::new(
            "homecell_router_cell_up",
            "1 when the region's cell answers health checks",
        ),
        &["region"],
    )
    .expect("valid metric");
    let _ = prometheus::register(Box::new(g.clone()));
    g
});

/// Addresses that failed their last checks. Read on every request, lock-free.
#[derive(Default)]
pub struct Health {
    down: ArcSwap<HashSet<SocketAddr>>,
    /// Per region, when a probe last reached one of its cell's addresses.
    reached: ArcSwap<HashMap<String, SystemTime>>,
    gossip: arc_swap::ArcSwapOption<Membership>,
}

impl Health {
    pub fn is_up(&self, addr: &SocketAddr) -> bool {
        !self.down.load().contains(addr)
    }

    /// True when gossip has seen `region`'s cells go down and no probe of
    /// ours has reached one since.
    pub fn region_down_by_gossip(&self, region: &str) -> bool {
        let Some(since) = self
            .gossip
            .load()
            .as_ref()
            .and_then(|m| m.cells_down_since(region))
        else {
            return false;
        };
        self.reached
            .load()
            .get(region)
            .is_none_or(|at| *at <= since)
    }

    /// Records that probes started at `at` reached these regions' cells.
    pub fn reached<'a>(&self, regions: impl IntoIterator<Item = &'a str>, at: SystemTime) {
        let mut next = (**self.reached.load()).clone();
        next.extend(regions.into_iter().map(|r| (r.to_string(), at)));
        self.reached.store(Arc::new(next));
    }

    pub fn follow_gossip(&self, membership: Arc<Membership>) {
        self.gossip.store(Some(membership));
    }
}

async fn probe(connector: &TlsConnector, addr: SocketAddr, sni: &str) -> bool {
    let Ok(name) = rustls::pki_types::ServerName::try_from(sni.to_string()) else {
        return false;
    };
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        connector.connect(name, tcp).await.ok()
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, attempt).await,
        Ok(Some(_))
    )
}

/// Runs the checks until `shutdown`.
pub async fn run(
    health: Arc<Health>,
    table: Arc<ArcSwap<RouteTable>>,
    tls: Arc<rustls::ClientConfig>,
    shutdown: CancellationToken,
) {
    let connector = TlsConnector::from(tls);
    let mut failures: HashMap<SocketAddr, u32> = HashMap::new();
    let mut tick = tokio::time::interval(INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let t = table.load_full();
        let targets: Vec<(String, SocketAddr, String)> = t
            .regions
            .values()
            .flat_map(|u| {
                u.addrs
                    .iter()
                    .map(|a| (u.region.clone(), *a, u.sni.clone()))
            })
            .collect();
        // A success proves the cell reachable some time after this.
        let started = SystemTime::now();
        let results = futures::future::join_all(
            targets
                .iter()
                .map(|(_, addr, sni)| probe(&connector, *addr, sni)),
        )
        .await;
        let mut down = HashSet::new();
        let mut region_up: HashMap<&str, bool> = HashMap::new();
        let mut reached = HashSet::new();
        for ((region, addr, _), ok) in targets.iter().zip(results) {
            if ok {
                reached.insert(region.as_str());
            }
            let n = failures.entry(*addr).or_insert(0);
            let was_down = *n >= FAILURES_TO_MARK_DOWN;
            *n = if ok { 0 } else { n.saturating_add(1) };
            let is_down = *n >= FAILURES_TO_MARK_DOWN;
            if is_down {
                down.insert(*addr);
            }
            if is_down != was_down {
                if is_down {
                    tracing::warn!(region, %addr, "cell marked down");
                } else {
                    tracing::info!(region, %addr, "cell is back");
                }
            }
            *region_up.entry(region).or_insert(false) |= !is_down;
        }
        for (region, up) in region_up {
            CELL_UP.with_label_values(&[region]).set(up as i64);
        }
        health.reached(reached, started);
        failures.retain(|a, _| targets.iter().any(|(_, t, _)| t == a));
        health.down.store(Arc::new(down));
    }
}
