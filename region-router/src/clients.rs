//! What one client connection may take of the router: how long it may idle
//! between requests, send one request head, take for its TLS handshake and
//! stall a write, and how many connections may be open at once, in all and
//! per client address (an IPv6 /64 counts as one address).
//!
//! The anchors: nginx's `keepalive_timeout`, `client_header_timeout`,
//! `send_timeout` and `limit_conn`; HAProxy's `timeout http-request` (the
//! whole head, not each read: a client sending one byte a second never
//! stalls a read); Envoy's edge guide (idle and header timeouts, connection
//! limits). Without them one address could hold every descriptor and every
//! worker's attention with connections that never finish a request.

use futures::task::AtomicWaker;
use serde::Deserialize;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

/// The `[clients]` section of the router's file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientLimits {
    /// A kept-alive connection with no new request for this long is closed.
    pub idle_timeout_ms: u64,
    /// A request head (request line and headers) must arrive whole within
    /// this long of its first byte; a new connection's first byte must
    /// arrive within it too.
    pub head_timeout_ms: u64,
    /// An HTTPS client must finish its TLS handshake within this long.
    pub tls_handshake_timeout_ms: u64,
    /// A write to a client that makes no progress for this long (the
    /// client reads too slowly, or not at all) closes the connection.
    pub write_timeout_ms: u64,
    /// A request body must arrive whole within this long of its head.
    pub body_timeout_ms: u64,
    /// Open client connections, in all: more are closed as accepted.
    pub max_connections: usize,
    /// Open client connections from one address (an IPv6 /64): more are
    /// closed as accepted. Trusted proxies (`trusted_proxies`) are exempt:
    /// every client behind them shares their address.
    pub max_connections_per_ip: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            idle_timeout_ms: 60_000,
            head_timeout_ms: 10_000,
            tls_handshake_timeout_ms: 10_000,
            write_timeout_ms: 30_000,
            body_timeout_ms: 30_000,
            max_connections: 20_000,
            max_connections_per_ip: 256,
        }
    }
}

impl ClientLimits {
    pub fn validate(&self) -> anyhow::Result<()> {
        let timeouts = [
            self.idle_timeout_ms,
            self.head_timeout_ms,
            self.tls_handshake_timeout_ms,
            self.write_timeout_ms,
            self.body_timeout_ms,
        ];
        if timeouts.contains(&0) {
            anyhow::bail!("clients: every timeout must be positive");
        }
        if self.max_connections == 0 || self.max_connections_per_ip == 0 {
            anyhow::bail!("clients: connection caps must be positive");
        }
        Ok(())
    }

    pub fn idle(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
    pub fn head(&self) -> Duration {
        Duration::from_millis(self.head_timeout_ms)
    }
    pub fn tls_handshake(&self) -> Duration {
        Duration::from_millis(self.tls_handshake_timeout_ms)
    }
    pub fn write(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }
    pub fn body(&self) -> Duration {
        Duration::from_millis(self.body_timeout_ms)
    }
}

/// Why a connection was closed as it was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Total,
    PerAddress,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Total => "total",
            Self::PerAddress => "per_address",
        }
    }
}

/// The open connections, counted in all and per address, shared by every
/// worker (a lock per accepted connection, never per request).
pub struct Admission {
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl Admission {
    pub fn new(limits: &ClientLimits) -> Arc<Self> {
        Arc::new(Self {
            max_total: limits.max_connections,
            max_per_ip: limits.max_connections_per_ip,
            total: AtomicUsize::new(0),
            per_ip: Mutex::default(),
        })
    }

    /// A place for a connection from `peer`, held until the slot drops;
    /// `None` for a peer exempt from the per-address cap.
    pub fn admit(self: &Arc<Self>, peer: Option<IpAddr>) -> Result<Slot, Refused> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Total);
        }
        let key = peer.map(homecell_common::client_addr::limit_key);
        if let Some(key) = key {
            let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            let open = per_ip.entry(key).or_insert(0);
            if *open >= self.max_per_ip {
                drop(per_ip);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(Refused::PerAddress);
            }
            *open += 1;
        }
        Ok(Slot {
            admission: self.clone(),
            key,
        })
    }
}

/// One admitted connection's place in the counts.
pub struct Slot {
    admission: Arc<Admission>,
    key: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            let mut per_ip = self
                .admission
                .per_ip
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(open) = per_ip.get_mut(&key) {
                *open -= 1;
                if *open == 0 {
                    per_ip.remove(&key);
                }
            }
        }
        self.admission.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether bytes have come in from the client since the edge began to
/// wait for a request: the client's stream (workers.rs) marks it on every
/// read that returns data, and the edge (edge.rs) starts the head deadline
/// from it. An idle connection and one sending its head slowly look the
/// same to a parser that has not finished; this tells them apart.
#[derive(Default)]
pub struct Arrival {
    seen: AtomicBool,
    waker: AtomicWaker,
}

impl Arrival {
    /// Called by the stream when a read returned data.
    pub fn mark(&self) {
        if !self.seen.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    /// Forgets earlier bytes: the wait for the next request begins.
    pub fn arm(&self) {
        self.seen.store(false, Ordering::Release);
    }

    /// Resolves once a byte has arrived since `arm`.
    pub async fn arrived(&self) {
        std::future::poll_fn(|cx: &mut Context<'_>| {
            if self.seen.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if self.seen.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_caps_count_in_all_and_per_address_and_free_on_close() {
        let limits = ClientLimits {
            max_connections: 4,
            max_connections_per_ip: 2,
            ..ClientLimits::default()
        };
        let a = Admission::new(&limits);
        let one: IpAddr = "192.0.2.1".parse().unwrap();
        let two: IpAddr = "192.0.2.2".parse().unwrap();
        let first = a.admit(Some(one)).unwrap();
        let _second = a.admit(Some(one)).unwrap();
        assert_eq!(a.admit(Some(one)).err(), Some(Refused::PerAddress));
        // Another address still connects.
        let _third = a.admit(Some(two)).unwrap();
        // A trusted proxy is counted only in the total.
        let _fourth = a.admit(None).unwrap();
        assert_eq!(a.admit(Some(two)).err(), Some(Refused::Total));
        drop(first);
        let _again = a.admit(Some(one)).unwrap();
    }

    #[test]
    fn one_ipv6_slash_64_is_one_address() {
        let limits = ClientLimits {
            max_connections_per_ip: 1,
            ..ClientLimits::default()
        };
        let a = Admission::new(&limits);
        let _held = a.admit(Some("2001:db8:1:2::1".parse().unwrap())).unwrap();
        let same_64 = a.admit(Some("2001:db8:1:2:ffff::9".parse().unwrap()));
        assert_eq!(same_64.err(), Some(Refused::PerAddress));
        assert!(a.admit(Some("2001:db8:1:3::1".parse().unwrap())).is_ok());
    }

    #[tokio::test]
    async fn arrival_resolves_only_for_bytes_after_arming() {
        let arrival = Arc::new(Arrival::default());
        arrival.mark();
        arrival.arm();
        let waiting = tokio::time::timeout(Duration::from_millis(20), arrival.arrived()).await;
        assert!(waiting.is_err(), "bytes before arm do not count");
        let a = arrival.clone();
        let marker = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            a.mark();
        });
        tokio::time::timeout(Duration::from_secs(5), arrival.arrived())
            .await
            .expect("a byte after arm wakes the waiter");
        marker.await.unwrap();
    }
}
