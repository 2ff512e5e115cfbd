//! Cross-cell transfers under crashes: the coordinator's cell and the
//! receiver's cell are killed (abort, as `kill -9`: no cleanup) at each saga
//! step, then restarted. Every saga must end posted or voided, a repeated
//! request must not apply twice, and the audit over both datastores must
//! pass after each crash.

use homecell_harness::api::Api;
use homecell_harness::{Cluster, standard};
use reqwest::StatusCode;
use serde_json::json;
use std::time::{Duration, Instant};

type Result<T = ()> = anyhow::Result<T>;

const PW: &str = "correct horse battery";
const SECRET: &str = "testpay-shared-secret-0123456789";

/// Restarts `region`'s cell with the given failpoint armed (or none).
async fn restart(c: &mut Cluster, region: &str, failpoint: Option<&str>) -> Result {
    c.restart_cell_with_failpoints(region, failpoint.unwrap_or(""))
        .await
}

async fn wait_exit(c: &mut Cluster, region: &str) -> Result {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let p = c.cell_mut(region).unwrap().process.as_mut().unwrap();
        if !p.is_running() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the failpoint was never reached:\n{}",
            p.log_tail(10)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sagas_finish_after_kill_9_at_every_step() -> Result {
    let mut c = standard()
        .cell_config(&format!("[payments.testpay]\nsecret = {SECRET:?}\n"))
        .start()
        .await?;
    let cn = Api::new(&c.router_url(0), "cn-east");
    let eu = Api::new(&c.router_url(0), "eu-west");
    let (alice, login) = cn.signed_in("alice@example.com", PW).await?;
    let alice_id = login["user_id"].as_str().unwrap().to_string();
    let (carol, login) = eu.signed_in("carol@example.com", PW).await?;
    let carol_id = login["user_id"].as_str().unwrap().to_string();
    let d = cn
        .provider_deposit("testpay", SECRET, "seed", &alice_id, 10_000)
        .await?;
    assert_eq!(d.status, StatusCode::OK, "{}", d.body);

    let (mut alice_expect, mut carol_expect) = (10_000, 0);
    let steps = [
        ("cn-east", "saga.coordinator.after_hold"),
        ("cn-east", "saga.coordinator.after_peer_hold"),
        ("cn-east", "saga.coordinator.after_post"),
        ("eu-west", "saga.participant.after_hold"),
        ("eu-west", "saga.participant.after_post"),
    ];
    for (i, (region, failpoint)) in steps.into_iter().enumerate() {
        restart(&mut c, region, Some(failpoint)).await?;
        let key = format!("00000000-0000-4000-8000-{i:012}");
        let body = json!({"to_user_id": carol_id, "amount": 100, "currency": "CNY"});
        // The answer may be lost with the crash; the client retries below.
        let _ = alice.transfer(&key, body.clone()).await?;
        wait_exit(&mut c, region).await?;
        if failpoint == "saga.coordinator.after_peer_hold" {
            // The sender's cell is down between steps 2 and 3: the receiver
            // already sees the money, as pending, not yet spendable.
            let w = carol.get("/v1/wallet").await?;
            assert_eq!(w.body["wallets"][0]["pending"], 100, "{}", w.body);
            assert_eq!(
                w.body["wallets"][0]["available"], carol_expect,
                "{}",
                w.body
            );
        }
        restart(&mut c, region, None).await?;

        // The client's retry finds the same transfer, whatever happened.
        let r = alice.transfer(&key, body.clone()).await?;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{failpoint}: {}", r.body);
        let id = r.body["transfer_id"].as_str().unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(40);
        let state = loop {
            let t = alice.get(&format!("/v1/wallet/transfers/{id}")).await?;
            let s = t.body["state"].as_str().unwrap_or("").to_string();
            if s == "posted" || s == "voided" {
                break s;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{failpoint}: stuck at {}",
                t.body
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if state == "posted" {
            alice_expect -= 100;
            carol_expect += 100;
            // The receiver's side is final once the sender's is.
            let seen = carol.get(&format!("/v1/wallet/transfers/{id}")).await?;
            assert_eq!(seen.body["state"], "posted", "{failpoint}: {}", seen.body);
        }
        // Once more after it settled: still one transfer.
        let again = alice.transfer(&key, body).await?;
        assert_eq!(again.body["transfer_id"], id.as_str());
        assert_eq!(alice.available("CNY").await?, alice_expect, "{failpoint}");
        assert_eq!(carol.available("CNY").await?, carol_expect, "{failpoint}");
        let report = c
            .audit(&["cn-east", "eu-west"])
            .map_err(|e| e.context(failpoint))?;
        assert!(report.contains("audit passed"), "{report}");
    }
    assert!(carol_expect > 0, "no transfer got through at all");
    Ok(())
}
