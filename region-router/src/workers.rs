//! The router's workers, nginx's model: `threads` OS threads, each with its
//! own single-threaded runtime that accepts connections from the shared
//! listening sockets on its own reactor and serves them there, every
//! request and every cell connection of a client connection on one thread.
//!
//! Why not Pingora's listening service: it accepts on one worker's reactor
//! and spawns the connection on a random worker, so for about half the
//! connections each readiness event woke the serving thread from the
//! accepting one (0.39–0.47 eventfd writes and 0.16 extra context switches
//! per request, bench/HISTORY.md). Here a socket is registered only with
//! the reactor of the thread that serves it.
//!
//! Spreading: every worker's reactor is woken by a new connection and the
//! first to call `accept` takes it, so a burst would all land on whichever
//! worker was awake. A worker holding more than one connection above the
//! least loaded one leaves the accept to the others until a connection
//! opens or closes somewhere (a wake-up, not a poll).

use crate::clients::{Arrival, Refused, Slot};
use crate::edge::Edge;
use crate::metrics::{CLIENTS_CLOSED, WORKER_CONNECTIONS};
use anyhow::{Context as _, Result};
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::listeners::tls::Acceptor;
use pingora::protocols::ALPN;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{GetProxyDigest, GetSocketDigest, GetTimingDigest};
use pingora::protocols::{Peek, Shutdown, Ssl, UniqueID, UniqueIDType};
use pingora::protocols::{SocketDigest, TimingDigest};
use pingora::server::ListenFds;
use pingora::server::ShutdownWatch;
use prometheus::IntGauge;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, BufWriter, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// One TCP segment: an answer's header and a small body leave in one send
/// (Pingora's own default for its buffered streams).
const WRITE_BUFFER: usize = 1460;
/// How long a worker waits for its connections to end at shutdown.
const DRAIN: Duration = Duration::from_secs(2);

/// A listening socket and, for HTTPS, its TLS acceptor.
pub struct Listener {
    socket: std::net::TcpListener,
    tls: Option<Arc<Acceptor>>,
}

impl Listener {
    /// Binds `addr` (a clean error when another process holds it).
    pub fn bind(addr: SocketAddr, tls: Option<Acceptor>) -> Result<Self> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        // Restarts rebind at once over connections in TIME_WAIT; no
        // SO_REUSEPORT, so a port another process serves is refused.
        socket.set_reuse_address(true)?;
        socket
            .bind(&addr.into())
            .with_context(|| format!("cannot listen on {addr}"))?;
        socket.listen(65535)?;
        socket.set_nonblocking(true)?;
        Ok(Self {
            socket: socket.into(),
            tls: tls.map(Arc::new),
        })
    }
}

/// The Pingora service that runs the workers; Pingora gives it one thread
/// of its own, which only waits for the workers to end.
pub struct Workers {
    edge: Arc<Edge>,
    listeners: Arc<Vec<Listener>>,
    threads: usize,
}

impl Workers {
    pub fn new(edge: Edge, listeners: Vec<Listener>, threads: usize) -> Self {
        Self {
            edge: Arc::new(edge),
            listeners: Arc::new(listeners),
            threads,
        }
    }
}

#[async_trait]
impl pingora::services::Service for Workers {
    async fn start_service(
        &mut self,
        _fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        // Each worker's open connections: what spreading reads, and a
        // metric for the operator.
        let load: Arc<[IntGauge]> = (0..self.threads)
            .map(|i| WORKER_CONNECTIONS.with_label_values(&[i.to_string()]))
            .collect();
        let load_changed = Arc::new(Notify::new());
        let mut handles = Vec::with_capacity(self.threads);
        for index in 0..self.threads {
            let worker = Worker {
                index,
                load: load.clone(),
                load_changed: load_changed.clone(),
                edge: self.edge.clone(),
                shutdown: shutdown.clone(),
            };
            let listeners = self.listeners.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("router-worker-{index}"))
                .spawn(move || worker.run(&listeners));
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => tracing::error!(error = %e, "cannot start a router worker"),
            }
        }
        let joined = tokio::task::spawn_blocking(move || {
            for h in handles {
                match h.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!("router worker failed: {e:#}"),
                    Err(_) => tracing::error!("router worker panicked"),
                }
            }
        });
        let _ = joined.await;
    }

    fn name(&self) -> &str {
        "router"
    }

    fn threads(&self) -> Option<usize> {
        Some(1)
    }
}

/// One worker thread: its place in the load table and what it serves with.
struct Worker {
    index: usize,
    load: Arc<[IntGauge]>,
    /// Told whenever any worker's count changes: what a worker that let
    /// the others accept waits for.
    load_changed: Arc<Notify>,
    edge: Arc<Edge>,
    shutdown: ShutdownWatch,
}

impl Worker {
    fn run(self, listeners: &[Listener]) -> Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let mut sockets = Vec::with_capacity(listeners.len());
            for l in listeners {
                // A duplicate of the shared socket, registered with this
                // worker's reactor.
                sockets.push((TcpListener::from_std(l.socket.try_clone()?)?, l.tls.clone()));
            }
            let this = Arc::new(self);
            let accepting = sockets
                .iter()
                .map(|(socket, tls)| this.clone().accept(socket, tls));
            futures::future::join_all(accepting).await;
            this.drain().await;
            Ok(())
        })
    }

    /// Accepts on one socket until shutdown, each connection served on
    /// this thread.
    async fn accept(self: Arc<Self>, socket: &TcpListener, tls: &Option<Arc<Acceptor>>) {
        loop {
            loop {
                // Registered before the check, so a change in between
                // still wakes this worker.
                let changed = self.load_changed.notified();
                let mut changed = std::pin::pin!(changed);
                changed.as_mut().enable();
                if self.may_accept() {
                    break;
                }
                tokio::select! {
                    _ = changed => {}
                    _ = crate::edge::shutting_down(&self.shutdown) => return,
                }
            }
            let accepted = tokio::select! {
                biased;
                _ = crate::edge::shutting_down(&self.shutdown) => return,
                a = socket.accept() => a,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    // Closed at once past a cap: before any read or
                    // handshake, so a flood of them costs an accept each.
                    let slot = match self.admit(peer) {
                        Ok(slot) => slot,
                        Err(refused) => {
                            CLIENTS_CLOSED.with_label_values(&[refused.as_str()]).inc();
                            tracing::debug!(cap = refused.as_str(), "client connection refused");
                            drop(tcp);
                            continue;
                        }
                    };
                    let served = Served::new(self.clone());
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        served.0.serve(tcp, peer, tls).await;
                        drop(served);
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    // Out of descriptors: accept fails again at once until
                    // some close; give them a moment.
                    if e.raw_os_error() == Some(24) {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    }

    /// A place under the connection caps; a trusted proxy's address counts
    /// only in the total, as every client behind it shares it.
    fn admit(&self, peer: SocketAddr) -> Result<Slot, Refused> {
        let exempt = self
            .edge
            .router
            .live
            .load()
            .trusted_proxies
            .contains(peer.ip());
        self.edge.admission.admit((!exempt).then_some(peer.ip()))
    }

    /// Whether this worker holds at most one connection more than the
    /// least loaded worker.
    fn may_accept(&self) -> bool {
        let mine = self.load[self.index].get();
        let least = self.load.iter().map(IntGauge::get).min();
        mine <= least.unwrap_or(0) + 1
    }

    /// One client connection: its requests until it closes or is not
    /// reusable.
    async fn serve(
        &self,
        tcp: tokio::net::TcpStream,
        peer: SocketAddr,
        tls: Option<Arc<Acceptor>>,
    ) {
        // As Pingora's listeners do: answers are written whole (below), so
        // Nagle's algorithm would only delay the parts of a streamed one.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let mut l4 = L4Stream::from(tcp);
        let digest = SocketDigest::from_raw_fd(l4.as_raw_fd());
        let _ = digest.peer_addr.set(Some(peer.into()));
        l4.set_socket_digest(digest);
        let arrival = Arc::new(Arrival::default());
        let plain = Buffered {
            inner: BufWriter::with_capacity(WRITE_BUFFER, l4),
            arrival: arrival.clone(),
            write_timeout: self.edge.limits.write(),
            stalled: None,
        };
        let handshake = self.edge.limits.tls_handshake();
        let stream: pingora::protocols::Stream = match tls {
            None => Box::new(plain),
            Some(acceptor) => {
                match tokio::time::timeout(handshake, acceptor.tls_handshake(plain)).await {
                    Ok(Ok(s)) => Box::new(s),
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "client TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        CLIENTS_CLOSED.with_label_values(&["tls_handshake"]).inc();
                        tracing::debug!("client TLS handshake timed out");
                        return;
                    }
                }
            }
        };
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            // Pingora's HTTP/2 connection handling, with our idle timeout;
            // its handshake waits for the client's preface without a limit,
            // so the preface must start within the head deadline.
            arrival.arm();
            let serving = self.edge.process_new(stream, &self.shutdown);
            let mut serving = std::pin::pin!(serving);
            tokio::select! {
                biased;
                _ = &mut serving => return,
                r = tokio::time::timeout(self.edge.limits.head(), arrival.arrived()) => {
                    if r.is_err() {
                        CLIENTS_CLOSED.with_label_values(&["head"]).inc();
                        return;
                    }
                }
            }
            serving.await;
        } else {
            self.edge
                .serve_http1(stream, &self.shutdown, &arrival)
                .await;
        }
    }

    /// At shutdown: waits, a bounded time, for this worker's connections
    /// (an idle keep-alive one closes at once, edge.rs).
    async fn drain(&self) {
        let deadline = tokio::time::Instant::now() + DRAIN;
        while self.load[self.index].get() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Counts a connection in its worker's load for as long as it lives.
struct Served(Arc<Worker>);

impl Served {
    fn new(worker: Arc<Worker>) -> Self {
        worker.load[worker.index].inc();
        worker.load_changed.notify_waiters();
        Self(worker)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.0.load[self.0.index].dec();
        self.0.load_changed.notify_waiters();
    }
}

/// A client's TCP stream with a write buffer: Pingora's constructor for a
/// TCP stream is unbuffered (its buffered one is crate-private), which
/// sent each answer's header and body apart. Every read that brings bytes
/// marks `arrival`, which starts a request's head deadline (edge.rs). A
/// write or flush that makes no progress for `write_timeout` (the client
/// stopped reading) fails: enforced here, under TLS and HTTP/2 alike, it
/// covers every write, including the final flush of a small answer, which
/// Pingora's own write timeout does not.
struct Buffered {
    inner: BufWriter<L4Stream>,
    arrival: Arc<Arrival>,
    write_timeout: Duration,
    /// Armed while a write waits on the client.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Buffered {
    /// Passes a write's outcome on; a write still pending after
    /// `write_timeout` without progress becomes an error.
    fn bounded<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let timeout = self.write_timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if stalled.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            CLIENTS_CLOSED.with_label_values(&["write"]).inc();
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading",
            )));
        }
        Poll::Pending
    }
}

impl std::fmt::Debug for Buffered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl AsyncRead for Buffered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.arrival.mark();
        }
        polled
    }
}

impl AsyncWrite for Buffered {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.bounded(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.bounded(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.bounded(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.bounded(cx, polled)
    }
}

#[async_trait]
impl Shutdown for Buffered {
    async fn shutdown(&mut self) {
        // Flushes what is buffered, then shuts the socket down.
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut self.inner).await;
    }
}

impl UniqueID for Buffered {
    fn id(&self) -> UniqueIDType {
        self.inner.get_ref().id()
    }
}

impl Ssl for Buffered {}

impl GetTimingDigest for Buffered {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_ref().get_timing_digest()
    }
}

impl GetProxyDigest for Buffered {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_ref().get_proxy_digest()
    }
}

impl GetSocketDigest for Buffered {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_ref().get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.get_mut().set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Buffered {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.get_mut().try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_write_the_client_does_not_read_fails_at_the_write_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // A client that never reads, with a small window.
        let client = tokio::net::TcpSocket::new_v4().unwrap();
        client.set_recv_buffer_size(1024).unwrap();
        let _client = client.connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        socket2::SockRef::from(&server)
            .set_send_buffer_size(4096)
            .unwrap();
        let timeout = Duration::from_millis(300);
        let mut stream = Buffered {
            inner: BufWriter::with_capacity(WRITE_BUFFER, L4Stream::from(server)),
            arrival: Arc::default(),
            write_timeout: timeout,
            stalled: None,
        };
        let started = tokio::time::Instant::now();
        let chunk = vec![b'x'; 16 * 1024];
        let error = loop {
            let wrote = tokio::time::timeout(Duration::from_secs(10), async {
                stream.write_all(&chunk).await?;
                stream.flush().await
            })
            .await
            .expect("a stalled write never timed out");
            if let Err(e) = wrote {
                break e;
            }
        };
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
        assert!(started.elapsed() >= timeout);
    }
}
