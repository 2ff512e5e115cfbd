//! The router's one retry of a request whose pooled cell connection died
//! under it (the cell closed the idle connection as the router reused it):
//! an idempotent request goes again on a fresh connection; anything else is
//! answered 502, never sent twice, since the cell may have acted on it.
//! A relay in front of the cell drops exactly one request so.

use homecell_harness::Cluster;
use homecell_harness::api::Api;
use homecell_harness::relay::Relay;
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

type Result<T = ()> = anyhow::Result<T>;

/// Longer than the relay's idle mark: the next request is a new one on a
/// kept-alive connection.
const PAUSE: Duration = Duration::from_millis(300);

/// One region whose registered internal endpoint is a relay, with the cell
/// listening behind it, and a router.
async fn behind_a_relay() -> Result<(Cluster, Relay)> {
    let mut c = Cluster::temp()?;
    c.start_control_plane().await?;
    let real = c.plan_cell("cn-east").api;
    let relay = Relay::start(real).await?;
    c.cell_mut("cn-east").expect("planned").api = relay.addr;
    c.add_region("cn-east", "CN")?;
    c.cell_mut("cn-east").expect("planned").api = real;
    c.start_cell("cn-east").await?;
    c.start_router("cn-east", "cn-east").await?;
    c.wait_ready(Duration::from_secs(20)).await?;
    Ok((c, relay))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_pooled_connection_is_retried_for_idempotent_requests_only() -> Result {
    let (c, relay) = behind_a_relay().await?;
    // One client connection, so one router worker and its pool.
    let api = Api::new(&c.router_url(0), "cn-east");

    // A first answer leaves the cell connection in the router's pool.
    let r = api.get("/v1/region").await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    // A GET on the pooled connection dies unanswered, and goes again.
    tokio::time::sleep(PAUSE).await;
    relay.arm();
    let r = api.get("/v1/region").await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        relay.dropped(),
        1,
        "the GET went out on the pooled connection first"
    );

    // A POST is not sent twice: 502, where a retry would have reached the
    // cell (which answers a wrong password with 401).
    tokio::time::sleep(PAUSE).await;
    relay.arm();
    let login = json!({"identifier": "nobody@example.com", "password": "wrong password"});
    let r = api.post("/v1/auth/login", login.clone()).await?;
    assert_eq!(
        relay.dropped(),
        2,
        "the POST went out on the pooled connection"
    );
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_GATEWAY, "bad_gateway"),
        "{}",
        r.body
    );
    // The router closes the client connection after such an answer, and
    // says so, so the client's next request goes on a new one.
    assert_eq!(r.header("connection"), Some("close"));

    // Nothing stays broken: the same POST now reaches the cell.
    let r = api.post("/v1/auth/login", login).await?;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    Ok(())
}

/// The cell's side closes idle connections at random (a relay that closes
/// any connection quiet for 1 to 15 ms after an answer) while four clients
/// keep the router busy with requests that are safe to send twice: reads,
/// a money write with its `Idempotency-Key`, and the same write without a
/// token, which the cell refuses without reading its body. No request
/// gets a 502: a request whose pooled connection died under it goes again
/// on a fresh one. (A keyless POST is the case left: it is answered 502
/// rather than risk acting twice, as the test above shows.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cells_closing_idle_connections_at_random_cost_no_request_a_502() -> Result {
    let (c, relay) = behind_a_relay().await?;
    let api = Api::new(&c.router_url(0), "cn-east");
    let (user, _) = api
        .signed_in("steady@example.com", "a long password 1")
        .await?;
    let (other, login) = api
        .signed_in("other@example.com", "a long password 2")
        .await?;
    let other_id = login["user_id"].as_str().expect("user_id").to_string();
    drop(other);

    relay.close_idle(15, 0x5eed);
    let deadline = std::time::Instant::now() + Duration::from_secs(6);
    let mut clients = Vec::new();
    for n in 0..4u32 {
        let user = user.clone();
        let anonymous = api.clone();
        let to = other_id.clone();
        clients.push(tokio::spawn(async move {
            let mut answers: Vec<(StatusCode, String)> = Vec::new();
            let mut i = 0u32;
            while std::time::Instant::now() < deadline && i < 3000 {
                i += 1;
                let transfer = json!({"to_user_id": to, "amount": 1, "currency": "CNY"});
                let key = format!("00000000-0000-4000-8000-{:06}{:06}", n, i);
                let r = match i % 4 {
                    0 => user.get("/v1/region").await?,
                    1 => user.get("/v1/me").await?,
                    // No money: refused after the key is checked.
                    2 => user.transfer(&key, transfer).await?,
                    _ => anonymous.transfer(&key, transfer).await?,
                };
                answers.push((r.status, r.body.to_string()));
                // Some quiet, so connections idle long enough to be closed.
                if i.is_multiple_of(3) {
                    tokio::time::sleep(Duration::from_millis(u64::from(i % 7) * 2)).await;
                }
            }
            anyhow::Ok(answers)
        }));
    }
    let mut total = 0;
    for client in clients {
        for (status, body) in client.await?? {
            total += 1;
            assert!(
                !status.is_server_error(),
                "{status} after {} idle closes: {body}\n{}",
                relay.closed_idle(),
                c.routers[0]
                    .process
                    .as_ref()
                    .map(|p| p
                        .log_tail(100000)
                        .lines()
                        .filter(|l| l.contains("WARN"))
                        .collect::<Vec<_>>()
                        .join("\n"))
                    .unwrap_or_default()
            );
        }
    }
    assert!(total > 400, "only {total} requests");
    assert!(
        relay.closed_idle() >= 20,
        "only {} idle connections were closed under {total} requests",
        relay.closed_idle()
    );
    Ok(())
}
