//! The router's connection hygiene (region-router/src/clients.rs), each
//! case with a normal client whose requests keep succeeding meanwhile:
//! - a slowloris client, one header byte a second, is closed at the head
//!   deadline (no read ever stalls, so a per-read timeout would not);
//! - a kept-alive connection that sends nothing is closed at the idle
//!   timeout, while one that keeps asking stays open;
//! - one address's connections past the per-address cap are closed as
//!   accepted while another address still connects.

use homecell_harness::Cluster;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

type Result<T = ()> = anyhow::Result<T>;

/// One region, its cell and a router with `limits` (top-level TOML keys).
async fn cluster(limits: &str) -> Result<Cluster> {
    let mut c = Cluster::temp()?;
    c.router_extra_config = limits.to_string();
    c.start_control_plane().await?;
    c.add_region("cn-east", "CN")?;
    c.start_cell("cn-east").await?;
    c.start_router("cn-east", "cn-east").await?;
    c.wait_ready(Duration::from_secs(20)).await?;
    Ok(c)
}

/// A normal client asking every 100 ms until told to stop; how many of its
/// requests succeeded and how many did not.
fn normal_client(
    url: String,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<(u32, u32)>,
) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let http = reqwest::Client::new();
        let (mut ok, mut failed) = (0, 0);
        loop {
            match http.get(format!("{url}/v1/region")).send().await {
                Ok(r) if r.status().is_success() => ok += 1,
                _ => failed += 1,
            }
            tokio::select! {
                _ = &mut stopped => return (ok, failed),
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    });
    (stop, task)
}

async fn finish(
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<(u32, u32)>,
) -> Result {
    // Another second of the normal client, with the limited connections
    // still held.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = stop.send(());
    let (ok, failed) = task.await?;
    assert!(ok >= 5, "the normal client got only {ok} answers");
    assert_eq!(
        failed, 0,
        "the normal client's requests failed {failed} times"
    );
    Ok(())
}

/// A connection from `source` (a loopback address) to `to`.
async fn connect_from(source: &str, to: SocketAddr) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse()?)?;
    Ok(socket.connect(to).await?)
}

/// Sends a request and reads its whole answer (the router's answers to
/// `/v1/region` carry a length); the connection stays open.
async fn exchange(conn: &mut TcpStream) -> Result<String> {
    conn.write_all(b"GET /v1/region HTTP/1.1\r\nHost: router\r\n\r\n")
        .await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await??;
        anyhow::ensure!(n > 0, "closed before the answer was whole");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(head_end) = text.find("\r\n\r\n") {
            let length: usize = text[..head_end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if got.len() >= head_end + 4 + length {
                return Ok(text);
            }
        }
    }
}

/// Waits up to `within` for the peer to close; when it did, measured from
/// `since`.
async fn closed_after(conn: &mut TcpStream, since: Instant, within: Duration) -> Option<Duration> {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, conn.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(since.elapsed()),
            // A few bytes (say, a 408) before the close are allowed.
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_head_is_closed_at_the_head_deadline() -> Result {
    let c = cluster("clients.head_timeout_ms = 3000\n").await?;
    let router = c.routers[0].listen;
    let (stop, normal) = normal_client(c.router_url(0));

    let mut slow = connect_from("127.0.0.2", router).await?;
    let head = b"GET /v1/region HTTP/1.1\r\nHost: router\r\nX-Padding: aaaaaaaaaaaaaaaa\r\n\r\n";
    let first_byte = Instant::now();
    let mut sent = 0;
    let mut closed = None;
    for byte in head {
        if slow.write_all(&[*byte]).await.is_err() {
            closed = Some(first_byte.elapsed());
            break;
        }
        sent += 1;
        if let Some(after) = closed_after(&mut slow, first_byte, Duration::from_secs(1)).await {
            closed = Some(after);
            break;
        }
    }
    let closed = closed.expect("the slow head was never cut");
    assert!(sent < head.len(), "the whole head went through");
    assert!(
        closed >= Duration::from_millis(2500) && closed <= Duration::from_millis(5500),
        "closed {closed:?} after the first byte, with a 3 s head deadline"
    );
    finish(stop, normal).await?;
    let metrics = c.router_metrics(0).await?;
    assert!(
        metrics.contains("homecell_router_client_connections_closed_total{reason=\"head\"} 1"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_at_the_idle_timeout() -> Result {
    let c = cluster("clients.idle_timeout_ms = 1500\n").await?;
    let router = c.routers[0].listen;
    let (stop, normal) = normal_client(c.router_url(0));

    // One connection keeps asking every 500 ms: it outlives the timeout.
    let mut busy = connect_from("127.0.0.2", router).await?;
    // One asks once, then idles.
    let mut idle = connect_from("127.0.0.3", router).await?;
    exchange(&mut idle).await?;
    let quiet_since = Instant::now();
    for _ in 0..8 {
        let answer = exchange(&mut busy).await?;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // 4 s of requests on the busy connection; the idle one was closed.
    let closed = closed_after(&mut idle, quiet_since, Duration::from_secs(1))
        .await
        .expect("the idle connection was not closed");
    assert!(
        closed >= Duration::from_millis(1300),
        "closed {closed:?} after its answer, with a 1.5 s idle timeout"
    );
    finish(stop, normal).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_address_cap_refuses_only_that_address() -> Result {
    let c = cluster("clients.max_connections_per_ip = 3\n").await?;
    let router = c.routers[0].listen;
    let (stop, normal) = normal_client(c.router_url(0));

    let mut held = Vec::new();
    for _ in 0..3 {
        let mut conn = connect_from("127.0.0.2", router).await?;
        let answer = exchange(&mut conn).await?;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        held.push(conn);
    }
    // The fourth from that address is closed as accepted, unanswered.
    let mut extra = connect_from("127.0.0.2", router).await?;
    assert!(
        exchange(&mut extra).await.is_err(),
        "a fourth connection from one address was served"
    );
    // Another address still connects, and is served.
    let mut other = connect_from("127.0.0.3", router).await?;
    let answer = exchange(&mut other).await?;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // A closed connection frees its place.
    drop(held.pop());
    let mut again = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut conn = connect_from("127.0.0.2", router).await?;
        if exchange(&mut conn).await.is_ok() {
            again = Some(conn);
            break;
        }
    }
    assert!(again.is_some(), "the freed place was not given again");
    finish(stop, normal).await?;
    let metrics = c.router_metrics(0).await?;
    assert!(
        metrics.contains("homecell_router_client_connections_closed_total{reason=\"per_address\"}"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_slowly_is_cut_at_the_body_deadline() -> Result {
    let c = cluster("clients.body_timeout_ms = 2000\n").await?;
    let router = c.routers[0].listen;
    let (stop, normal) = normal_client(c.router_url(0));

    // A whole head at once, then a 20-byte body at one byte a second.
    let mut slow = connect_from("127.0.0.2", router).await?;
    slow.write_all(
        b"POST /v1/auth/login HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n",
    )
    .await?;
    let head_sent = Instant::now();
    let mut closed = None;
    for _ in 0..20 {
        if slow.write_all(b" ").await.is_err() {
            closed = Some(head_sent.elapsed());
            break;
        }
        if let Some(after) = closed_after(&mut slow, head_sent, Duration::from_secs(1)).await {
            closed = Some(after);
            break;
        }
    }
    let closed = closed.expect("the slow body was never cut");
    assert!(
        closed >= Duration::from_millis(1500) && closed <= Duration::from_millis(4500),
        "closed {closed:?} after the head, with a 2 s body deadline"
    );
    finish(stop, normal).await?;
    Ok(())
}
