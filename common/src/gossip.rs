//! Membership and liveness among routers, cells and the control plane: SWIM
//! gossip (foca) over UDP.
//!
//! Gossip carries who is alive, never state: the directory, regions and
//! configuration stay with the control plane. Routers read it to stop
//! sending to a region whose cells are all down (beside their own active
//! health checks); the control plane's `status` lists every member.
//!
//! foca neither authenticates nor versions its packets, so every datagram is
//! sealed here: `"hc"`, our protocol version, the first 16 bytes of
//! HMAC-SHA256(gossip key, version ‖ payload), then foca's postcard payload.
//! Anything else (another version, a bad tag, a stray packet) is dropped and
//! counted. Packets are not encrypted (they hold names, roles, regions and
//! addresses, no personal data) and an old packet can be replayed by someone
//! on the path; SWIM's incarnations make a replay at most a stale rumour.
//!
//! foca does not recover from zero membership on its own: while a member
//! knows nobody, it announces itself to the seeds every two seconds.
//!
//! Why one file of this length: the packet seal, foca's runtime glue and the
//! membership view are one protocol, and its tests at the end run members
//! over real UDP sockets.

use anyhow::{Context, Result, bail};
use arc_swap::ArcSwap;
/// foca's membership events, as `Membership::record` takes them.
pub use foca::OwnedNotification;
use foca::{AccumulatingRuntime, Foca, PostcardCodec, Timer};
use prometheus::{IntCounterVec, IntGaugeVec};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};
use tokio::net::UdpSocket;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Our wire version. A member that speaks another one is not heard (its
/// packets are counted as dropped), so a mixed-version cluster splits
/// visibly instead of misreading each other.
pub const PROTOCOL_VERSION: u8 = 1;
const MAGIC: &[u8; 2] = b"hc";
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = MAGIC.len() + 1 + TAG_LEN;
/// The cluster size foca sizes its retransmissions for: a region's routers
/// and cells and the control plane, a few dozen members.
const CLUSTER_SIZE: NonZeroU32 = NonZeroU32::new(32).expect("non-zero");
const ANNOUNCE_EVERY: Duration = Duration::from_secs(2);
/// A member that went down is forgotten after this (a restarted process
/// usually comes back at another address).
const FORGET_DOWN_AFTER: Duration = Duration::from_secs(600);

static MEMBERS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    let g = IntGaugeVec::new(
        prometheus::Opts::new(
            "homecell_gossip_members",
            "Members this process's gossip knows, by role and state",
        ),
        &["role", "state"],
    )
    .expect("valid metric");
    let _ = prometheus::register(Box::new(g.clone()));
    g
});

static DROPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        prometheus::Opts::new(
            "homecell_gossip_packets_dropped_total",
            "Gossip packets refused: short, another protocol version, a bad tag, or undecodable",
        ),
        &["reason"],
    )
    .expect("valid metric");
    let _ = prometheus::register(Box::new(c.clone()));
    c
});

/// Timing profile: foca's LAN settings notice a dead member in about 4–5 s,
/// its WAN settings in about 30 s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    #[default]
    Lan,
    Wan,
}

/// The `[gossip]` table of a component's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GossipConfig {
    /// The UDP address to listen on (port 0: any).
    pub listen: SocketAddr,
    /// The address other members reach this one at (`ip:port`, or
    /// `host:port` resolved once at start, such as a container's service
    /// name); defaults to the bound address, and is required when `listen`
    /// is a wildcard address.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Members to announce to when this one knows nobody (`host:port`),
    /// usually the control plane's gossip address.
    #[serde(default)]
    pub seeds: Vec<String>,
    /// The cluster's shared gossip key (`control-plane pki gossip-key`).
    pub key_file: PathBuf,
    #[serde(default)]
    pub profile: Profile,
}

impl GossipConfig {
    pub fn validate(&self) -> Result<()> {
        crate::key_file::read(&self.key_file, "gossip key")?;
        if self.listen.ip().is_unspecified() && self.advertise.is_none() {
            bail!("gossip.advertise is required when gossip.listen is a wildcard address");
        }
        for s in self.seeds.iter().chain(&self.advertise) {
            if s.rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                bail!("gossip address {s:?} is not host:port");
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    ControlPlane,
    Router,
    Cell,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ControlPlane => "control-plane",
            Role::Router => "router",
            Role::Cell => "cell",
        }
    }
}

/// A member's identity. `addr` is its key in the cluster; `bump` grows
/// when it re-joins, so the newer identity at an address wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeId {
    pub addr: SocketAddr,
    pub role: Role,
    /// Empty for the control plane.
    pub region: String,
    pub name: String,
    pub bump: u64,
}

impl foca::Identity for NodeId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            bump: self.bump.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}

/// One member as this process sees it.
#[derive(Debug, Clone)]
pub struct Member {
    pub id: NodeId,
    pub alive: bool,
    /// When it was last seen to come up or go down.
    pub since: SystemTime,
}

#[derive(Default)]
struct View {
    members: HashMap<SocketAddr, Member>,
    /// Regions that have had cell members and have none alive now, with
    /// when the last of them went down.
    cell_regions_down: HashMap<String, SystemTime>,
}

/// This process's view of the cluster, read lock-free.
pub struct Membership {
    me: NodeId,
    view: ArcSwap<View>,
}

impl Membership {
    /// A view that knows only `me`; `start` feeds it.
    pub fn new(me: NodeId) -> Self {
        Self {
            me,
            view: ArcSwap::from_pointee(View::default()),
        }
    }

    pub fn me(&self) -> &NodeId {
        &self.me
    }

    /// Every member known, this process first.
    pub fn members(&self) -> Vec<Member> {
        let view = self.view.load();
        let mut out = vec![Member {
            id: self.me.clone(),
            alive: true,
            since: SystemTime::UNIX_EPOCH,
        }];
        let mut others: Vec<Member> = view.members.values().cloned().collect();
        others.sort_by(|a, b| {
            (a.id.role.as_str(), &a.id.region, a.id.addr).cmp(&(
                b.id.role.as_str(),
                &b.id.region,
                b.id.addr,
            ))
        });
        out.extend(others);
        out
    }

    /// True when gossip has seen cells of `region` and none is alive now.
    /// A region never seen by gossip is not judged here.
    pub fn cells_down(&self, region: &str) -> bool {
        self.cells_down_since(region).is_some()
    }

    /// When the last live cell of `region` went down, if none is alive.
    pub fn cells_down_since(&self, region: &str) -> Option<SystemTime> {
        self.view.load().cell_regions_down.get(region).copied()
    }

    /// Takes in one of foca's notifications.
    pub fn record(&self, note: OwnedNotification<NodeId>) {
        let mut members = self.view.load().members.clone();
        let now = SystemTime::now();
        let (id, alive) = match note {
            OwnedNotification::MemberUp(id) => (id, true),
            OwnedNotification::MemberDown(id) => (id, false),
            OwnedNotification::Rename(old, new) => {
                tracing::info!(member = %new.addr, from = old.bump, to = new.bump, "gossip: member re-joined");
                let alive = members.get(&old.addr).is_none_or(|m| m.alive);
                members.remove(&old.addr);
                (new, alive)
            }
            OwnedNotification::Idle => {
                tracing::warn!("gossip: no members known; announcing to the seeds");
                return;
            }
            OwnedNotification::Defunct => {
                tracing::warn!("gossip: the cluster declared this member down; re-joining");
                return;
            }
            OwnedNotification::Rejoin(id) => {
                tracing::info!(bump = id.bump, "gossip: re-joined under a new identity");
                return;
            }
            OwnedNotification::Active => return,
        };
        let state = if alive { "up" } else { "down" };
        if alive {
            tracing::info!(member = %id.addr, role = id.role.as_str(), region = %id.region, name = %id.name, "gossip: member {state}");
        } else {
            tracing::warn!(member = %id.addr, role = id.role.as_str(), region = %id.region, name = %id.name, "gossip: member {state}");
        }
        members.insert(
            id.addr,
            Member {
                id,
                alive,
                since: now,
            },
        );
        self.publish(members);
    }

    /// Forgets members down for long; called now and then.
    fn prune(&self) {
        let view = self.view.load();
        let cutoff = SystemTime::now() - FORGET_DOWN_AFTER;
        if view.members.values().any(|m| !m.alive && m.since < cutoff) {
            let members = view
                .members
                .iter()
                .filter(|(_, m)| m.alive || m.since >= cutoff)
                .map(|(a, m)| (*a, m.clone()))
                .collect();
            self.publish(members);
        }
    }

    fn publish(&self, members: HashMap<SocketAddr, Member>) {
        // Per region: any cell alive, and the latest time one went down.
        let mut seen: HashMap<&str, (bool, SystemTime)> = HashMap::new();
        for m in members.values().filter(|m| m.id.role == Role::Cell) {
            let e = seen
                .entry(m.id.region.as_str())
                .or_insert((false, SystemTime::UNIX_EPOCH));
            e.0 |= m.alive;
            e.1 = e.1.max(m.since);
        }
        let cell_regions_down = seen
            .into_iter()
            .filter(|(_, (alive, _))| !alive)
            .map(|(r, (_, since))| (r.to_string(), since))
            .collect();
        MEMBERS.reset();
        for m in members.values() {
            let state = if m.alive { "alive" } else { "down" };
            MEMBERS
                .with_label_values(&[m.id.role.as_str(), state])
                .inc();
        }
        self.view.store(Arc::new(View {
            members,
            cell_regions_down,
        }));
    }
}

/// Seals a foca payload for the wire.
fn seal(key: &ring::hmac::Key, payload: &[u8]) -> Vec<u8> {
    let mut ctx = ring::hmac::Context::with_key(key);
    ctx.update(&[PROTOCOL_VERSION]);
    ctx.update(payload);
    let tag = ctx.sign();
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(PROTOCOL_VERSION);
    out.extend_from_slice(&tag.as_ref()[..TAG_LEN]);
    out.extend_from_slice(payload);
    out
}

/// The foca payload of a sealed packet, or why it is refused.
fn open<'a>(key: &ring::hmac::Key, packet: &'a [u8]) -> Result<&'a [u8], &'static str> {
    if packet.len() < HEADER_LEN || &packet[..2] != MAGIC {
        return Err("short");
    }
    if packet[2] != PROTOCOL_VERSION {
        return Err("version");
    }
    let (tag, payload) = packet[3..].split_at(TAG_LEN);
    let mut ctx = ring::hmac::Context::with_key(key);
    ctx.update(&[PROTOCOL_VERSION]);
    ctx.update(payload);
    let expected = ctx.sign();
    // Constant-time comparison of the truncated tag.
    let diff = expected.as_ref()[..TAG_LEN]
        .iter()
        .zip(tag)
        .fold(0u8, |d, (a, b)| d | (a ^ b));
    if diff != 0 {
        return Err("tag");
    }
    Ok(payload)
}

/// Binds the socket and starts gossiping as `role` of `region` until
/// `shutdown` (then it leaves the cluster).
pub async fn start(
    config: &GossipConfig,
    role: Role,
    region: &str,
    name: &str,
    shutdown: CancellationToken,
) -> Result<Arc<Membership>> {
    config.validate()?;
    let key = crate::key_file::read(&config.key_file, "gossip key")?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let socket = UdpSocket::bind(config.listen)
        .await
        .with_context(|| format!("cannot bind gossip to {}", config.listen))?;
    let addr = match &config.advertise {
        Some(a) => resolve(std::slice::from_ref(a))
            .await
            .into_iter()
            .next()
            .with_context(|| format!("gossip.advertise {a:?} does not resolve"))?,
        None => socket.local_addr()?,
    };
    let bump = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let me = NodeId {
        addr,
        role,
        region: region.to_string(),
        name: name.to_string(),
        bump,
    };
    let membership = Arc::new(Membership::new(me.clone()));
    let foca_config = match config.profile {
        Profile::Lan => {
            // memberlist's LAN timings (1 s probes, 500 ms round trip) with
            // a 3 s suspicion instead of 4 s × log10(cluster size): a
            // suspect has three probe periods to refute, and a dead member
            // is declared within about 5 s of its last answer.
            let mut c = foca::Config::new_lan(CLUSTER_SIZE);
            c.suspect_to_down_after = Duration::from_secs(3);
            c
        }
        Profile::Wan => foca::Config::new_wan(CLUSTER_SIZE),
    };
    let foca = Foca::new(
        me,
        foca_config,
        rand::make_rng::<rand::rngs::StdRng>(),
        PostcardCodec,
    );
    tracing::info!(gossip = %addr, role = role.as_str(), "gossip listening");
    tokio::spawn(run(
        foca,
        socket,
        key,
        config.seeds.clone(),
        membership.clone(),
        shutdown,
    ));
    Ok(membership)
}

type Agent = Foca<NodeId, PostcardCodec, rand::rngs::StdRng, foca::NoCustomBroadcast>;

/// The one task that owns foca: packets in, timers, announcements, and
/// what foca asks for in return.
async fn run(
    mut foca: Agent,
    socket: UdpSocket,
    key: ring::hmac::Key,
    seeds: Vec<String>,
    membership: Arc<Membership>,
    shutdown: CancellationToken,
) {
    let mut rt = AccumulatingRuntime::new();
    // foca schedules a handful of timers at a time: a list is enough.
    let mut timers: Vec<(Instant, Timer<NodeId>)> = Vec::new();
    let mut announce = tokio::time::interval(ANNOUNCE_EVERY);
    let mut buf = vec![0u8; 65_536];
    loop {
        let next_timer = timers.iter().map(|(at, _)| *at).min();
        tokio::select! {
            _ = shutdown.cancelled() => {
                if let Err(e) = foca.leave_cluster(&mut rt) {
                    tracing::debug!(error = %e, "gossip: cannot leave cleanly");
                }
                flush(&mut rt, &socket, &key, &mut timers, &membership).await;
                return;
            }
            got = socket.recv_from(&mut buf) => match got {
                Ok((n, _from)) => match open(&key, &buf[..n]) {
                    Ok(payload) => {
                        if let Err(e) = foca.handle_data(payload, &mut rt) {
                            DROPPED.with_label_values(&["undecodable"]).inc();
                            tracing::debug!(error = %e, "gossip: packet ignored");
                        }
                    }
                    Err(reason) => DROPPED.with_label_values(&[reason]).inc(),
                },
                Err(e) => {
                    tracing::debug!(error = %e, "gossip: receive failed");
                }
            },
            _ = sleep_until(next_timer) => {
                let now = Instant::now();
                let (due, later): (Vec<_>, Vec<_>) = timers.drain(..).partition(|(at, _)| *at <= now);
                timers = later;
                for (_, t) in due {
                    if let Err(e) = foca.handle_timer(t, &mut rt) {
                        tracing::debug!(error = %e, "gossip: timer failed");
                    }
                }
            }
            _ = announce.tick() => {
                membership.prune();
                if foca.num_members() == 0 {
                    for seed in resolve(&seeds).await {
                        if seed == foca.identity().addr {
                            continue;
                        }
                        let probe = NodeId {
                            addr: seed,
                            role: Role::ControlPlane,
                            region: String::new(),
                            name: "seed".into(),
                            bump: 0,
                        };
                        if let Err(e) = foca.announce(probe, &mut rt) {
                            tracing::debug!(error = %e, "gossip: cannot announce");
                        }
                    }
                }
            }
        }
        flush(&mut rt, &socket, &key, &mut timers, &membership).await;
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Carries out what foca asked for: packets, timers, notifications.
async fn flush(
    rt: &mut AccumulatingRuntime<NodeId>,
    socket: &UdpSocket,
    key: &ring::hmac::Key,
    timers: &mut Vec<(Instant, Timer<NodeId>)>,
    membership: &Membership,
) {
    while let Some((to, data)) = rt.to_send() {
        if let Err(e) = socket.send_to(&seal(key, &data), to.addr).await {
            tracing::debug!(to = %to.addr, error = %e, "gossip: send failed");
        }
    }
    let now = Instant::now();
    while let Some((after, timer)) = rt.to_schedule() {
        timers.push((now + after, timer));
    }
    while let Some(note) = rt.to_notify() {
        membership.record(note);
    }
}

/// The seeds' addresses now (names are resolved on every announcement, so
/// a control plane that moved is found again).
async fn resolve(seeds: &[String]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for s in seeds {
        match tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host(s.as_str()))
            .await
        {
            Ok(Ok(addrs)) => out.extend(addrs),
            _ => tracing::debug!(seed = %s, "gossip: cannot resolve the seed"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> ring::hmac::Key {
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[b; 32])
    }

    #[test]
    fn sealed_packets_open_only_with_the_key_and_version() {
        let sealed = seal(&key(1), b"payload");
        assert_eq!(open(&key(1), &sealed), Ok(&b"payload"[..]));
        assert_eq!(open(&key(2), &sealed), Err("tag"));
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(open(&key(1), &tampered), Err("tag"));
        let mut other_version = sealed.clone();
        other_version[2] = PROTOCOL_VERSION + 1;
        assert_eq!(open(&key(1), &other_version), Err("version"));
        assert_eq!(open(&key(1), b"hc"), Err("short"));
        assert_eq!(open(&key(1), &[0u8; 40]), Err("short"));
    }

    fn node(port: u16, role: Role, region: &str) -> NodeId {
        NodeId {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            role,
            region: region.into(),
            name: format!("n{port}"),
            bump: 1,
        }
    }

    #[test]
    fn a_region_is_down_when_all_its_cells_are() {
        let m = Membership::new(node(1, Role::Router, "a"));
        assert!(
            !m.cells_down("a"),
            "a region gossip never saw is not judged"
        );
        m.record(OwnedNotification::MemberUp(node(2, Role::Cell, "a")));
        m.record(OwnedNotification::MemberUp(node(3, Role::Cell, "a")));
        m.record(OwnedNotification::MemberUp(node(4, Role::Router, "b")));
        m.record(OwnedNotification::MemberDown(node(2, Role::Cell, "a")));
        assert!(!m.cells_down("a"), "one cell instance is still alive");
        m.record(OwnedNotification::MemberDown(node(3, Role::Cell, "a")));
        assert!(m.cells_down("a"));
        m.record(OwnedNotification::MemberDown(node(4, Role::Router, "b")));
        assert!(!m.cells_down("b"), "routers do not make a region down");
        let mut back = node(3, Role::Cell, "a");
        back.bump = 2;
        m.record(OwnedNotification::MemberUp(back));
        assert!(!m.cells_down("a"));
        assert_eq!(m.members().len(), 4);
        assert_eq!(m.members()[0].id, node(1, Role::Router, "a"));
    }

    #[test]
    fn configuration_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("gossip.key");
        crate::key_file::create_if_missing(&key_file).unwrap();
        let c = |listen: &str, seeds: &[&str]| GossipConfig {
            listen: listen.parse().unwrap(),
            advertise: None,
            seeds: seeds.iter().map(|s| s.to_string()).collect(),
            key_file: key_file.clone(),
            profile: Profile::Lan,
        };
        assert!(c("127.0.0.1:0", &["cp:7946"]).validate().is_ok());
        assert!(c("0.0.0.0:7946", &[]).validate().is_err());
        assert!(c("127.0.0.1:0", &["cp"]).validate().is_err());
        let mut missing = c("127.0.0.1:0", &[]);
        missing.key_file = dir.path().join("nope");
        assert!(missing.validate().is_err());
    }

    /// Three members on loopback find each other through one seed, and see
    /// one of them leave.
    #[tokio::test]
    async fn members_join_through_a_seed_and_see_a_departure() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("gossip.key");
        crate::key_file::create_if_missing(&key_file).unwrap();
        let token = CancellationToken::new();
        let config = |listen: &str, seeds: Vec<String>| GossipConfig {
            listen: listen.parse().unwrap(),
            advertise: None,
            seeds,
            key_file: key_file.clone(),
            profile: Profile::Lan,
        };
        let cp = start(
            &config("127.0.0.1:0", vec![]),
            Role::ControlPlane,
            "",
            "cp",
            token.clone(),
        )
        .await
        .unwrap();
        let seed = vec![cp.me().addr.to_string()];
        let cell_token = CancellationToken::new();
        let cell = start(
            &config("127.0.0.1:0", seed.clone()),
            Role::Cell,
            "a",
            "cell",
            cell_token.clone(),
        )
        .await
        .unwrap();
        let router = start(
            &config("127.0.0.1:0", seed),
            Role::Router,
            "a",
            "router",
            token.clone(),
        )
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while router.members().iter().filter(|m| m.alive).count() < 3 {
            assert!(Instant::now() < deadline, "members did not find each other");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!router.cells_down("a"));
        assert_eq!(cp.members().iter().filter(|m| m.alive).count(), 3);
        let cell_addr = cell.me().addr;
        cell_token.cancel();
        while !router.cells_down("a") {
            assert!(Instant::now() < deadline, "the departure was not noticed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            router
                .members()
                .iter()
                .any(|m| m.id.addr == cell_addr && !m.alive)
        );
        token.cancel();
    }

    /// A member left alone (its seed went away) finds the cluster again
    /// when the seed comes back at the same address: foca does not re-join
    /// from zero membership by itself, our announcements do.
    #[tokio::test]
    async fn a_member_left_alone_rejoins_when_the_seed_returns() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("gossip.key");
        crate::key_file::create_if_missing(&key_file).unwrap();
        let config = |listen: String, seeds: Vec<String>| GossipConfig {
            listen: listen.parse().unwrap(),
            advertise: None,
            seeds,
            key_file: key_file.clone(),
            profile: Profile::Lan,
        };
        let seed_token = CancellationToken::new();
        let seed = start(
            &config("127.0.0.1:0".into(), vec![]),
            Role::ControlPlane,
            "",
            "cp",
            seed_token.clone(),
        )
        .await
        .unwrap();
        let seed_addr = seed.me().addr;
        let token = CancellationToken::new();
        let lone = start(
            &config("127.0.0.1:0".into(), vec![seed_addr.to_string()]),
            Role::Cell,
            "a",
            "cell",
            token.clone(),
        )
        .await
        .unwrap();
        let alive_others = |m: &Membership| m.members().iter().skip(1).filter(|m| m.alive).count();
        let deadline = Instant::now() + Duration::from_secs(20);
        while alive_others(&lone) < 1 {
            assert!(Instant::now() < deadline, "did not join");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        seed_token.cancel();
        while alive_others(&lone) > 0 {
            assert!(
                Instant::now() < deadline,
                "the seed's departure was not noticed"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Let the socket go, then a new seed process at the same address.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let back = start(
            &config(seed_addr.to_string(), vec![]),
            Role::ControlPlane,
            "",
            "cp",
            CancellationToken::new(),
        )
        .await
        .unwrap();
        while alive_others(&lone) < 1 || alive_others(&back) < 1 {
            assert!(
                Instant::now() < deadline,
                "no re-join after zero membership"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        token.cancel();
    }
}
