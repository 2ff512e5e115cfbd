//! A write storm at one user while the user moves: deposits, transfers in
//! and out, profile edits and logins, each retried as a client would on a
//! retryable answer (503 with Retry-After). Every write ends accepted
//! exactly once or is still refused; none is accepted and then lost, none
//! applies twice, counted by idempotency key; the ledgers audit.

use anyhow::Context;
use homecell_harness::api::{Api, Reply};
use homecell_harness::standard;
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::time::{Duration, Instant};

type Result<T = ()> = anyhow::Result<T>;

const PW: &str = "correct horse battery";
const SECRET: &str = "testpay-shared-secret-0123456789";
/// At most this many writes of each kind: each writer goes on until the
/// move is over.
const MAX_EACH: usize = 300;

/// Sends `write` until it is answered with anything but a retryable
/// refusal; each retry repeats the same request (same key), as a client
/// does. Returns the final answer and how many attempts met the move: a
/// refusal, or an answer held back for the move (over half a second).
async fn until_answered<F, Fut>(what: &str, mut write: F) -> Result<(Reply, u32)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Reply>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut refused = 0;
    loop {
        let sent = Instant::now();
        let r = write().await?;
        if r.status != StatusCode::SERVICE_UNAVAILABLE {
            let held = u32::from(sent.elapsed() > Duration::from_millis(500));
            return Ok((r, refused + held));
        }
        anyhow::ensure!(
            r.code() == "user_moving" && r.header("retry-after").is_some(),
            "{what}: a 503 that is not user_moving with Retry-After: {r:?}"
        );
        refused += 1;
        anyhow::ensure!(Instant::now() < deadline, "{what}: refused for 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// Multi-threaded: the CLI that runs the move blocks its thread meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_aimed_at_a_moving_user_lands_once() -> Result {
    let mut c = standard()
        .cell_config(&format!("[payments.testpay]\nsecret = {SECRET:?}\n"))
        .start()
        .await?;
    // The source holds the user frozen for 1.5 s between the copy and the
    // cut-over: writes meanwhile must wait, then go to the new home, or be
    // refused as retryable; never land at the old home after the copy.
    c.restart_cell_with_failpoints("cn-east", "move.source.after_import=1500")
        .await?;
    let east = Api::new(&c.router_url(0), "cn-east");
    let (x, login) = east.signed_in("storm@example.com", PW).await?;
    let xid = login["user_id"].as_str().context("user")?.to_string();
    let (y, ylogin) = east.signed_in("neighbour@example.com", PW).await?;
    let yid = ylogin["user_id"].as_str().context("user")?.to_string();
    for (who, evt) in [(&xid, "storm-seed-x"), (&yid, "storm-seed-y")] {
        let r = east
            .provider_deposit("testpay", SECRET, evt, who, 1_000)
            .await?;
        anyhow::ensure!(r.status.is_success(), "{r:?}");
    }

    let over = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let going = |over: &std::sync::Arc<std::sync::atomic::AtomicBool>| {
        !over.load(std::sync::atomic::Ordering::Relaxed)
    };
    let deposits = {
        let east = east.clone();
        let xid = xid.clone();
        let over = over.clone();
        tokio::spawn(async move {
            let mut refused = 0;
            let mut done = 0;
            for i in (0..MAX_EACH).take_while(|_| going(&over)) {
                let evt = format!("storm-dep-{i}");
                let (r, n) = until_answered("deposit", || {
                    east.provider_deposit("testpay", SECRET, &evt, &xid, 10)
                })
                .await?;
                anyhow::ensure!(r.status.is_success(), "deposit {i}: {r:?}");
                refused += n;
                done += 1;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            Ok::<_, anyhow::Error>((done, refused))
        })
    };
    let transfers = |from: Api, to: String, amount: i64, tag: &'static str| {
        let over = over.clone();
        tokio::spawn(async move {
            let mut refused = 0;
            let mut done = 0;
            for i in (0..MAX_EACH).take_while(|_| going(&over)) {
                let key = uuid::Uuid::new_v4().to_string();
                let body = json!({"to_user_id": to, "amount": amount, "currency": "CNY"});
                let (r, n) = until_answered(tag, || from.transfer(&key, body.clone())).await?;
                anyhow::ensure!(r.status.is_success(), "{tag} {i}: {r:?}");
                // The same key again: the same transfer, never a second one.
                // (It too may meet the move, and be refused as retryable.)
                let (again, _) = until_answered(tag, || from.transfer(&key, body.clone())).await?;
                anyhow::ensure!(
                    again.status.is_success() && again.body["id"] == r.body["id"],
                    "{tag} {i} repeated: {again:?}"
                );
                refused += n;
                done += 1;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            Ok::<_, anyhow::Error>((done, refused))
        })
    };
    let incoming = transfers(y.clone(), xid.clone(), 7, "incoming");
    let outgoing = transfers(x.clone(), yid.clone(), 3, "outgoing");
    let edits = {
        let x = x.clone();
        let over = over.clone();
        tokio::spawn(async move {
            let mut refused = 0;
            let mut done = 0;
            for i in (0..MAX_EACH).take_while(|_| going(&over)) {
                let bio = format!("bio {i}");
                let (r, n) = until_answered("profile", || async {
                    let etag = x
                        .get("/v1/users/me")
                        .await?
                        .header("etag")
                        .unwrap_or("*")
                        .to_string();
                    x.call(
                        Method::PUT,
                        "/v1/users/me",
                        Some(json!({"bio": bio})),
                        &[("if-match", &etag)],
                    )
                    .await
                })
                .await?;
                anyhow::ensure!(r.status == StatusCode::OK, "edit {i}: {r:?}");
                refused += n;
                done += 1;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            Ok::<_, anyhow::Error>((done, refused))
        })
    };
    let logins = {
        let web = east.as_client("web");
        let over = over.clone();
        tokio::spawn(async move {
            let mut last = String::new();
            for i in (0..MAX_EACH).take_while(|_| going(&over)) {
                let (r, _) = until_answered("login", || web.login("storm@example.com", PW)).await?;
                anyhow::ensure!(r.status == StatusCode::OK, "login {i}: {r:?}");
                last = r.body["access_token"].as_str().unwrap_or("").to_string();
                tokio::time::sleep(Duration::from_millis(120)).await;
            }
            Ok::<_, anyhow::Error>(last)
        })
    };

    // The move, in the middle of it all.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = c.cli_ok(&["-o", "json", "move", "user", &xid, "--to", "eu-west"])?;
    assert!(out.stdout.contains("\"state\": \"done\""), "{}", out.stdout);
    // A little more traffic at the new home, then stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    over.store(true, std::sync::atomic::Ordering::Relaxed);

    let (d, r1) = deposits.await??;
    let (i, r2) = incoming.await??;
    let (o, r3) = outgoing.await??;
    let (e, r4) = edits.await??;
    let refused = r1 + r2 + r3 + r4;
    let last_login = logins.await??;
    eprintln!("writes held or refused by the move (then retried): {refused}");
    assert!(
        refused > 0,
        "no write met the move's freeze: the storm missed it"
    );

    // Every accepted write is there once: the balances are exact, on both
    // sides, once the transfers between the two cells have posted.
    eprintln!("deposits {d}, transfers in {i}, out {o}, edits {e}");
    let (d, i, o) = (d as i64, i as i64, o as i64);
    let want_x = 1_000 + 10 * d + 7 * i - 3 * o;
    let want_y = 1_000 - 7 * i + 3 * o;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (bx, by) = (x.available("CNY").await?, y.available("CNY").await?);
        if (bx, by) == (want_x, want_y) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "balances {bx}, {by}; want {want_x}, {want_y}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deposits = x.get("/v1/wallet/transfers?kind=deposit&limit=200").await?;
    assert_eq!(
        deposits.body["items"].as_array().map(Vec::len),
        Some(d as usize + 1),
        "{}",
        deposits.body
    );
    let profile = x.get("/v1/users/me").await?;
    assert_eq!(profile.header("x-home-region"), Some("eu-west"));
    assert_eq!(profile.body["bio"], format!("bio {}", e - 1));
    // The last login's session lives at the new home.
    let web = x.as_client("web").with_token(&last_login);
    let r = web.get("/v1/users/me").await?;
    assert_eq!(r.status, StatusCode::OK, "the last login: {r:?}");
    let report = c.audit(&["cn-east", "eu-west"])?;
    assert!(
        report.contains("cn-east↔eu-west CNY: clearing accounts net 0, in flight 0"),
        "{report}"
    );
    Ok(())
}
