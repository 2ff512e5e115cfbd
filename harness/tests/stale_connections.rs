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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_pooled_connection_is_retried_for_idempotent_requests_only() -> Result {
    let mut c = Cluster::temp()?;
    c.start_control_plane().await?;
    // The region's internal endpoint is the relay; the cell listens behind it.
    let real = c.plan_cell("cn-east").api;
    let relay = Relay::start(real).await?;
    c.cell_mut("cn-east").expect("planned").api = relay.addr;
    c.add_region("cn-east", "CN")?;
    c.cell_mut("cn-east").expect("planned").api = real;
    c.start_cell("cn-east").await?;
    c.start_router("cn-east", "cn-east").await?;
    c.wait_ready(Duration::from_secs(20)).await?;
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
