//! A TCP relay in front of a cell that can drop one request on a kept-alive
//! connection, the way a cell that closes an idle connection just as the
//! router reuses it looks from the router: the request is written, and the
//! connection ends with no answer. Or, in its closing mode, it closes
//! every connection that the cell answered and that then stays quiet for a
//! random 1 to N ms, racing whatever the router sends next. TLS passes
//! through untouched (the relay never reads it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A connection whose last traffic is at least this old is "idle": the
/// next bytes the router sends on it are a new request.
const IDLE: Duration = Duration::from_millis(150);

/// Only a connection past its handshake is tripped: the router has begun
/// to speak at least this often, each time after the cell did (TLS 1.3:
/// its ClientHello, then its certificate and Finished, with the first
/// request right behind them). A health check (a handshake, then a close)
/// takes the drop only if it idles between the two, which on loopback it
/// does not.
const TURNS_BEFORE: u32 = 2;

pub struct Relay {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct State {
    armed: AtomicBool,
    dropped: AtomicU64,
    /// Close idle connections after a random 1..=N ms (0: never).
    close_idle_ms: AtomicU64,
    closed_idle: AtomicU64,
    /// A xorshift state for the random idle times (seeded, repeatable).
    random: AtomicU64,
}

impl Relay {
    /// Listens on a free loopback port and relays every connection to `to`.
    pub async fn start(to: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let s = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    if let Ok(cell) = TcpStream::connect(to).await {
                        relay(client, cell, &s).await;
                    }
                });
            }
        });
        Ok(Self { addr, state, task })
    }

    /// The next request on an idle kept-alive connection is read and
    /// dropped with the connection, unanswered.
    pub fn arm(&self) {
        self.state.armed.store(true, Ordering::SeqCst);
    }

    /// How many requests were dropped so.
    pub fn dropped(&self) -> u64 {
        self.state.dropped.load(Ordering::SeqCst)
    }

    /// From now on, a connection the cell answered last and that stays
    /// quiet for a random 1..=`max_ms` ms is closed, both ways.
    pub fn close_idle(&self, max_ms: u64, seed: u64) {
        self.state.random.store(seed | 1, Ordering::SeqCst);
        self.state.close_idle_ms.store(max_ms, Ordering::SeqCst);
    }

    /// How many idle connections were closed so.
    pub fn closed_idle(&self) -> u64 {
        self.state.closed_idle.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl State {
    fn next_random(&self) -> u64 {
        let mut x = self.random.load(Ordering::SeqCst);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.random.store(x, Ordering::SeqCst);
        x
    }
}

struct Traffic {
    at: Instant,
    cell_last: bool,
    turns: u32,
}

async fn relay(client: TcpStream, cell: TcpStream, state: &State) {
    let (mut from_router, mut to_router) = client.into_split();
    let (mut from_cell, mut to_cell) = cell.into_split();
    // When either side last sent, whether that was the cell, and how many
    // times the router has begun to speak.
    let seen = std::sync::Mutex::new(Traffic {
        at: Instant::now(),
        cell_last: true,
        turns: 0,
    });
    let up = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from_router.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            {
                let mut t = seen.lock().expect("lock");
                let new_request = t.cell_last && t.turns >= TURNS_BEFORE && t.at.elapsed() >= IDLE;
                if new_request && state.armed.swap(false, Ordering::SeqCst) {
                    state.dropped.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                if t.cell_last {
                    t.turns += 1;
                }
                t.at = Instant::now();
                t.cell_last = false;
            }
            if to_cell.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from_cell.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            {
                let mut t = seen.lock().expect("lock");
                t.at = Instant::now();
                t.cell_last = true;
            }
            if to_router.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let closing = async {
        loop {
            let max = state.close_idle_ms.load(Ordering::SeqCst);
            if max == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            let quiet = Duration::from_millis(1 + state.next_random() % max);
            tokio::time::sleep(quiet).await;
            let t = seen.lock().expect("lock");
            // Only a connection that has carried a request: a fresh one
            // is not idle yet (the router's one retry goes on one).
            if t.cell_last && t.turns > TURNS_BEFORE && t.at.elapsed() >= quiet {
                state.closed_idle.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
    };
    // Whichever side ends first ends the connection, both halves dropped.
    tokio::select! {
        () = up => {}
        () = down => {}
        () = closing => {}
    }
}
