//! Idle connections to cells, kept by the worker thread that used them.
//!
//! Pingora's own pool parks each idle connection with a watcher task that it
//! spawns on a random worker, and wakes that task when the connection is
//! taken again: with several workers in one service, a wake-up of another
//! thread on most requests. Here a connection never leaves its thread (each
//! worker is a single-threaded runtime, and a client connection is served
//! by the worker that accepted it, workers.rs), so the pool is a plain
//! thread-local map with no tasks and no locks. What the watcher did is
//! done when a connection is taken or returned: one the cell closed while
//! idle shows as readable (its FIN or close_notify) and is dropped; one idle
//! longer than `idle_timeout` is dropped unread.

use futures::FutureExt;
use pingora::protocols::Stream;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

/// Idle connections kept per cell instance and worker (nginx's `keepalive`).
const MAX_IDLE_PER_PEER: usize = 128;

thread_local! {
    /// By `key` (address and SNI), most recently used last.
    static IDLE: RefCell<HashMap<u64, VecDeque<(Stream, Instant)>>> = RefCell::default();
}

/// The pool's key for connections to a cell instance: its address and the
/// name its certificate must carry (the TLS settings are the connector's,
/// the same for every connection).
pub fn key(addr: SocketAddr, sni: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    addr.hash(&mut h);
    sni.hash(&mut h);
    h.finish()
}

/// The most recently used idle connection to the peer that is still open.
pub fn take(peer: u64, idle_timeout: Duration) -> Option<Stream> {
    IDLE.with_borrow_mut(|idle| {
        let queue = idle.get_mut(&peer)?;
        while let Some((mut stream, since)) = queue.pop_back() {
            if since.elapsed() < idle_timeout && still_open(&mut stream) {
                return Some(stream);
            }
        }
        None
    })
}

/// Keeps a connection whose exchange ended cleanly for the next request to
/// the same peer, dropping the ones that have idled too long.
pub fn put(peer: u64, mut stream: Stream, idle_timeout: Duration) {
    if !still_open(&mut stream) {
        return;
    }
    IDLE.with_borrow_mut(|idle| {
        let queue = idle.entry(peer).or_default();
        while queue
            .front()
            .is_some_and(|(_, since)| since.elapsed() >= idle_timeout)
        {
            queue.pop_front();
        }
        if queue.len() >= MAX_IDLE_PER_PEER {
            queue.pop_front();
        }
        queue.push_back((stream, Instant::now()));
    });
}

/// How many idle connections this thread holds.
#[cfg(test)]
fn idle_count() -> usize {
    IDLE.with_borrow(|idle| idle.values().map(VecDeque::len).sum())
}

/// An idle connection has nothing to read: a read that would not block
/// means the cell closed it (or sent what it never should unasked).
fn still_open(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    // unconstrained: a task out of its cooperative budget would see
    // "pending" whatever the socket holds.
    tokio::task::unconstrained(stream.read(&mut byte))
        .now_or_never()
        .is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn pair() -> (Stream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let stream: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(client));
        (stream, server)
    }

    #[tokio::test]
    async fn an_idle_connection_is_reused_until_the_cell_closes_it_or_it_idles_too_long() {
        let idle = Duration::from_secs(60);
        let (stream, mut server) = pair().await;
        put(1, stream, idle);
        assert_eq!(idle_count(), 1);
        let stream = take(1, idle).expect("an open idle connection is reused");
        assert!(take(1, idle).is_none(), "taken once");
        assert!(take(2, idle).is_none(), "another peer has none");

        // The cell closes it while it idles: it is dropped when taken.
        put(1, stream, idle);
        server.shutdown().await.unwrap();
        drop(server);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(take(1, idle).is_none());
        assert_eq!(idle_count(), 0);

        // Past the idle timeout it is not handed out.
        let (stream, _server) = pair().await;
        put(3, stream, Duration::from_millis(10));
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(take(3, Duration::from_millis(10)).is_none());
    }

    #[tokio::test]
    async fn the_pool_keeps_a_bounded_number_per_peer() {
        let idle = Duration::from_secs(60);
        let mut servers = Vec::new();
        for _ in 0..MAX_IDLE_PER_PEER + 5 {
            let (stream, server) = pair().await;
            servers.push(server);
            put(7, stream, idle);
        }
        assert_eq!(idle_count(), MAX_IDLE_PER_PEER);
    }
}
