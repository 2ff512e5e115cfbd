//! Money end to end, through the router into real cells: signed deposits,
//! same-cell and cross-cell transfers, idempotency, bad input, CMS
//! adjustments, and the audit over both cells' datastores.
//!
//! Why one file of this length: one area's end-to-end tests share their
//! fixtures (the cluster helpers and clients above the tests), and each test
//! starts its own processes, so they stay independent.

use homecell_harness::api::Api;
use homecell_harness::{Cluster, standard};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

type Result<T = ()> = anyhow::Result<T>;

const PW: &str = "correct horse battery";
pub const SECRET: &str = "testpay-shared-secret-0123456789";

fn key() -> String {
    format!(
        "{:08x}-0000-4000-8000-{:012x}",
        rand_u32(),
        rand_u64() & 0xffff_ffff_ffff
    )
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn rand_u64() -> u64 {
    (u64::from(rand_u32()) << 32) | u64::from(rand_u32())
}

async fn cluster(extra: &str) -> Result<Cluster> {
    let c = standard()
        .cell_config(&format!("{extra}[payments.testpay]\nsecret = {SECRET:?}\n"))
        .start()
        .await?;
    Ok(c)
}

async fn user(api: &Api, ident: &str) -> Result<(Api, String)> {
    let (a, login) = api.signed_in(ident, PW).await?;
    Ok((a, login["user_id"].as_str().unwrap().to_string()))
}

/// Polls a transfer at the sender until it leaves `pending`.
async fn settled(api: &Api, id: &str) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = api.get(&format!("/v1/wallet/transfers/{id}")).await?;
        if r.status == StatusCode::OK && r.body["state"] != "pending" {
            return Ok(r.body);
        }
        anyhow::ensure!(Instant::now() < deadline, "still pending: {}", r.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn deposits_transfers_and_audit() -> Result {
    let c = cluster("").await?;
    let cn = Api::new(&c.router_url(0), "cn-east");
    let eu = Api::new(&c.router_url(0), "eu-west");
    let (alice, alice_id) = user(&cn, "alice@example.com").await?;
    let (bob, bob_id) = user(&cn, "bob@example.com").await?;
    let (carol, carol_id) = user(&eu, "carol@example.com").await?;

    // A signed deposit credits once, however often the provider repeats it.
    let d = cn
        .provider_deposit("testpay", SECRET, "evt-1", &alice_id, 10_000)
        .await?;
    assert_eq!(d.status, StatusCode::OK, "{}", d.body);
    let again = cn
        .provider_deposit("testpay", SECRET, "evt-1", &alice_id, 10_000)
        .await?;
    assert_eq!(again.body["transfer_id"], d.body["transfer_id"]);
    assert_eq!(alice.available("CNY").await?, 10_000);
    // Forged, or the same event with another amount: refused, nothing moves.
    let forged = cn
        .provider_deposit(
            "testpay",
            "not-the-secret-at-all-0000",
            "evt-2",
            &alice_id,
            5,
        )
        .await?;
    assert_eq!(forged.status, StatusCode::UNAUTHORIZED);
    let changed = cn
        .provider_deposit("testpay", SECRET, "evt-1", &alice_id, 99)
        .await?;
    assert_eq!(changed.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(alice.available("CNY").await?, 10_000);

    // Same cell: one transaction, 201, repeat-safe.
    let k = key();
    let body = json!({"to_user_id": bob_id, "amount": 1_500, "currency": "CNY", "memo": "lunch"});
    let t = alice.transfer(&k, body.clone()).await?;
    assert_eq!(t.status, StatusCode::CREATED, "{}", t.body);
    assert_eq!(t.body["state"], "posted");
    let repeat = alice.transfer(&k, body).await?;
    assert_eq!(
        (repeat.status, &repeat.body),
        (StatusCode::CREATED, &t.body)
    );
    let reused = alice
        .transfer(
            &k,
            json!({"to_user_id": bob_id, "amount": 1, "currency": "CNY"}),
        )
        .await?;
    assert_eq!(
        (reused.status, reused.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused")
    );
    assert_eq!(alice.available("CNY").await?, 8_500);
    assert_eq!(bob.available("CNY").await?, 1_500);

    // A refusal is an outcome too: the repeat gets it even once funds exist.
    let k_poor = key();
    let poor = json!({"to_user_id": alice_id, "amount": 2_000, "currency": "CNY"});
    let r = bob.transfer(&k_poor, poor.clone()).await?;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "insufficient_funds")
    );
    cn.provider_deposit("testpay", SECRET, "evt-bob", &bob_id, 5_000)
        .await?;
    let r = bob.transfer(&k_poor, poor).await?;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "insufficient_funds")
    );
    assert_eq!(bob.available("CNY").await?, 6_500);

    // Bad input is refused and changes nothing.
    for (bad, field) in [
        (
            json!({"to_user_id": bob_id, "amount": 0, "currency": "CNY"}),
            "amount",
        ),
        (
            json!({"to_user_id": bob_id, "amount": -5, "currency": "CNY"}),
            "amount",
        ),
        (
            json!({"to_user_id": bob_id, "amount": 9_223_372_036_854_775_807i64, "currency": "CNY"}),
            "amount",
        ),
        (
            json!({"to_user_id": bob_id, "amount": "12", "currency": "CNY"}),
            "amount",
        ),
        (
            json!({"to_user_id": bob_id, "amount": 10, "currency": "XYZ"}),
            "currency",
        ),
        (
            json!({"to_user_id": alice_id, "amount": 10, "currency": "CNY"}),
            "to_user_id",
        ),
        (
            json!({"to_user_id": bob_id, "amount": 10, "currency": "CNY", "from_user_id": bob_id}),
            "",
        ),
    ] {
        let r = alice.transfer(&key(), bad.clone()).await?;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.body);
        assert!(r.body.to_string().contains(field), "{bad}: {}", r.body);
    }
    let no_key = alice
        .post(
            "/v1/wallet/transfers",
            json!({"to_user_id": bob_id, "amount": 1, "currency": "CNY"}),
        )
        .await?;
    assert_eq!(no_key.status, StatusCode::BAD_REQUEST);
    let bad_key = alice
        .transfer(
            "not-a-uuid",
            json!({"to_user_id": bob_id, "amount": 1, "currency": "CNY"}),
        )
        .await?;
    assert_eq!(bad_key.status, StatusCode::BAD_REQUEST);
    let unknown = alice
        .transfer(&key(), json!({"to_user_id": "0190c0de-0000-7000-8000-000000000000", "amount": 1, "currency": "CNY"}))
        .await?;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    // Someone else's transfer is not yours to read.
    let tid = t.body["transfer_id"].as_str().unwrap();
    let (eve, _) = user(&cn, "eve@example.com").await?;
    let r = eve.get(&format!("/v1/wallet/transfers/{tid}")).await?;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "permission_denied")
    );
    assert_eq!(alice.available("CNY").await?, 8_500);

    // Cross cell: 202, then posted at both ends; the receiver gets notice.
    let x = alice
        .transfer(
            &key(),
            json!({"to_user_id": carol_id, "amount": 700, "currency": "CNY"}),
        )
        .await?;
    assert_eq!(x.status, StatusCode::ACCEPTED, "{}", x.body);
    assert_eq!(x.body["state"], "pending");
    let xid = x.body["transfer_id"].as_str().unwrap().to_string();
    let done = settled(&alice, &xid).await?;
    assert_eq!(done["state"], "posted", "{done}");
    assert_eq!(alice.available("CNY").await?, 7_800);
    assert_eq!(carol.available("CNY").await?, 700);
    let seen = carol.get(&format!("/v1/wallet/transfers/{xid}")).await?;
    assert_eq!(
        (
            &seen.body["state"],
            &seen.body["direction"],
            &seen.body["peer_region"]
        ),
        (&json!("posted"), &json!("in"), &json!("cn-east"))
    );
    // The receiver gets a notice in their inbox.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let inbox = carol.get("/v1/notices").await?;
        if inbox.body.to_string().contains("You received 700 CNY") {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "no notice: {}", inbox.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And back the other way.
    let back = carol
        .transfer(
            &key(),
            json!({"to_user_id": alice_id, "amount": 200, "currency": "CNY"}),
        )
        .await?;
    assert_eq!(back.status, StatusCode::ACCEPTED);
    let done = settled(&carol, back.body["transfer_id"].as_str().unwrap()).await?;
    assert_eq!(done["state"], "posted");
    assert_eq!(alice.available("CNY").await?, 8_000);

    // History: newest first, cursor pages, filters.
    let page = alice.get("/v1/wallet/transfers?limit=2").await?;
    assert_eq!(page.body["items"].as_array().unwrap().len(), 2);
    let cursor = page.body["next_cursor"].as_str().unwrap();
    let next = alice
        .get(&format!("/v1/wallet/transfers?limit=50&cursor={cursor}"))
        .await?;
    let all: Vec<Value> = page.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .chain(next.body["items"].as_array().unwrap())
        .cloned()
        .collect();
    // One deposit, two sent, one received, and the refusal to an unknown
    // user; the refusal bob got is not alice's to see.
    assert_eq!(all.len(), 5, "{all:?}");
    assert_eq!(all[0]["direction"], "in");
    let deposits = alice.get("/v1/wallet/transfers?kind=deposit").await?;
    assert_eq!(deposits.body["items"].as_array().unwrap().len(), 1);

    let report = c.audit(&["cn-east", "eu-west"])?;
    assert!(report.contains("cn-east↔eu-west CNY"), "{report}");
    Ok(())
}

#[tokio::test]
async fn cms_adjustments_need_money_adjust() -> Result {
    let c = cluster("").await?;
    let cn = Api::new(&c.router_url(0), "cn-east");
    let (dave, dave_id) = user(&cn, "dave@example.com").await?;
    let (plain, _) = cn
        .as_client("cms")
        .signed_in("clerk@example.com", PW)
        .await?;
    let path = format!("/v1/cms/users/{dave_id}/wallet/adjustments");
    let body = json!({"amount": 300, "currency": "CNY", "reason": "goodwill credit"});
    let k = key();
    let extra = [("idempotency-key", k.as_str())];
    let r = plain
        .call(reqwest::Method::POST, &path, Some(body.clone()), &extra)
        .await?;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    let out = c.cell_command(
        "cn-east",
        &[
            "grant-role",
            "--identifier",
            "root@example.com",
            "--role",
            "admin",
        ],
    );
    assert!(!out?.success, "no such user yet");
    cn.register("root@example.com", PW).await?;
    let out = c.cell_command(
        "cn-east",
        &[
            "grant-role",
            "--identifier",
            "root@example.com",
            "--role",
            "admin",
        ],
    )?;
    assert!(out.success, "{}", out.stderr);
    let (admin, _) = cn
        .as_client("cms")
        .signed_in("root@example.com", PW)
        .await?;
    let r = admin
        .call(reqwest::Method::POST, &path, Some(body.clone()), &extra)
        .await?;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r2 = admin
        .call(reqwest::Method::POST, &path, Some(body), &extra)
        .await?;
    assert_eq!(r2.body, r.body, "a repeat is the same adjustment");
    assert_eq!(dave.available("CNY").await?, 300);
    // A debit beyond the balance is refused.
    let over = json!({"amount": -301, "currency": "CNY", "reason": "chargeback"});
    let r = admin
        .call(
            reqwest::Method::POST,
            &path,
            Some(over),
            &[("idempotency-key", &key())],
        )
        .await?;
    assert_eq!(r.code(), "insufficient_funds");
    let audit_log = admin.get("/v1/cms/audit").await?;
    assert!(
        audit_log.body.to_string().contains("wallet.adjust"),
        "{}",
        audit_log.body
    );
    c.audit(&["cn-east", "eu-west"])?;
    Ok(())
}

#[tokio::test]
async fn a_transfer_to_an_unreachable_cell_is_voided_after_the_hold_timeout() -> Result {
    let mut c = cluster("transfer_hold_timeout_secs = 2\n").await?;
    let cn = Api::new(&c.router_url(0), "cn-east");
    let eu = Api::new(&c.router_url(0), "eu-west");
    let (alice, alice_id) = user(&cn, "alice@example.com").await?;
    let (_, carol_id) = user(&eu, "carol@example.com").await?;
    cn.provider_deposit("testpay", SECRET, "e", &alice_id, 1_000)
        .await?;
    c.kill_cell("eu-west");
    let x = alice
        .transfer(
            &key(),
            json!({"to_user_id": carol_id, "amount": 400, "currency": "CNY"}),
        )
        .await?;
    assert_eq!(x.status, StatusCode::ACCEPTED, "{}", x.body);
    assert_eq!(alice.available("CNY").await?, 600, "held while in flight");
    let done = settled(&alice, x.body["transfer_id"].as_str().unwrap()).await?;
    assert_eq!(done["state"], "voided", "{done}");
    assert_eq!(alice.available("CNY").await?, 1_000, "the hold is released");
    // The receiver's cell learns of the void when it is back.
    c.cell_mut("eu-west").unwrap().process.take();
    c.start_cell("eu-west").await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if c.audit(&["cn-east", "eu-west"]).is_ok() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "audit: {:?}",
            c.audit(&["cn-east", "eu-west"]).err()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

/// A cluster whose cells pay out through the test provider (undecided
/// payouts reconcile after 2 s), and alice with 1,000 CNY deposited.
async fn withdrawing_alice() -> Result<(homecell_harness::provider::TestProvider, Cluster, Api)> {
    let provider = homecell_harness::provider::TestProvider::start(SECRET).await?;
    let c = standard()
        .cell_config(&format!(
        "withdrawals_via = \"testpay\"\nwithdrawal_timeout_secs = 2\n[payments.testpay]\nsecret = {SECRET:?}\npayout_url = {:?}\n",
        provider.payout_url()
    ))
        .start()
        .await?;
    let cn = Api::new(&c.router_url(0), "cn-east");
    let (alice, alice_id) = user(&cn, "alice@example.com").await?;
    cn.provider_deposit("testpay", SECRET, "w", &alice_id, 1_000)
        .await?;
    Ok((provider, c, alice))
}

#[tokio::test]
async fn withdrawals_post_on_success_void_on_failure_and_reconcile_the_unknown() -> Result {
    let (provider, c, alice) = withdrawing_alice().await?;
    let withdraw = |key: String, amount: i64| {
        let alice = alice.clone();
        async move {
            alice
                .call(
                    reqwest::Method::POST,
                    "/v1/wallet/withdrawals",
                    Some(json!({"amount": amount, "currency": "CNY"})),
                    &[("idempotency-key", &key)],
                )
                .await
        }
    };

    // Paid: posted, and asked of the provider once however often repeated.
    let k = key();
    let w = withdraw(k.clone(), 200).await?;
    assert_eq!(w.status, StatusCode::ACCEPTED, "{}", w.body);
    let id = w.body["transfer_id"].as_str().unwrap().to_string();
    assert_eq!(settled(&alice, &id).await?["state"], "posted");
    let again = withdraw(k, 200).await?;
    assert_eq!(again.body["transfer_id"], id.as_str());
    assert_eq!(provider.paid(), 200);
    assert_eq!(alice.available("CNY").await?, 800);

    // Declined: voided, the money is back.
    let w = withdraw(key(), 103).await?;
    let done = settled(&alice, w.body["transfer_id"].as_str().unwrap()).await?;
    assert_eq!(
        (&done["state"], &done["reason"]),
        (&json!("voided"), &json!("account closed"))
    );
    assert_eq!(alice.available("CNY").await?, 800);

    // The provider is down: the outcome is unknown, so past the timeout the
    // withdrawal is reconciling, the money still held and asked about again:
    // never given back on "unknown" (the provider may have paid).
    let before = provider.requests();
    let w = withdraw(key(), 105).await?;
    assert_eq!(alice.available("CNY").await?, 695, "held while undecided");
    let id = w.body["transfer_id"].as_str().unwrap().to_string();
    let done = settled(&alice, &id).await?;
    assert_eq!(done["state"], "reconciling", "{done}");
    let asked = provider.requests();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        provider.requests() > asked,
        "a reconciling payout is asked again"
    );
    assert!(asked > before + 1, "the payout was not retried");
    let still = alice.get(&format!("/v1/wallet/transfers/{id}")).await?;
    assert_eq!(still.body["state"], "reconciling", "{}", still.body);
    assert_eq!(alice.available("CNY").await?, 695, "never credited back");

    // More than the balance is refused before anything is asked.
    let r = withdraw(key(), 5_000).await?;
    assert_eq!(r.code(), "insufficient_funds");
    let urls = format!("sqlite:{}", c.cell_sqlite_path("cn-east").display());
    let out = c.cell_command("cn-east", &["audit", "--database-url", &urls])?;
    assert!(out.success, "{}", out.stdout);
    assert!(
        out.stdout.contains("withdrawals and fees 200"),
        "{}",
        out.stdout
    );
    Ok(())
}

/// Polls a transfer at the sender until it is in `state`; every state seen
/// on the way.
async fn until_state(api: &Api, id: &str, state: &str) -> Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen: Vec<String> = Vec::new();
    loop {
        let r = api.get(&format!("/v1/wallet/transfers/{id}")).await?;
        let now = r.body["state"].as_str().unwrap_or_default().to_string();
        if seen.last() != Some(&now) {
            seen.push(now.clone());
        }
        if now == state {
            return Ok(seen);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "never {state}: {seen:?} {}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A payout whose outcome the provider does not tell at once is never
/// given back: "processing" past the timeout, and a lost answer whose
/// repeats get 409, both end paid, the money counted once.
#[tokio::test]
async fn unknown_withdrawal_outcomes_are_reconciled_not_voided() -> Result {
    let (provider, c, alice) = withdrawing_alice().await?;
    let withdraw = |amount: i64| {
        let alice = alice.clone();
        async move {
            let r = alice
                .call(
                    reqwest::Method::POST,
                    "/v1/wallet/withdrawals",
                    Some(json!({"amount": amount, "currency": "CNY"})),
                    &[("idempotency-key", &key())],
                )
                .await?;
            anyhow::ensure!(r.status == StatusCode::ACCEPTED, "{}", r.body);
            Ok::<_, anyhow::Error>(r.body["transfer_id"].as_str().unwrap().to_string())
        }
    };

    // "processing" for 4 s: past the 2 s timeout it is reconciling, held,
    // then paid when the provider says so.
    let processing = withdraw(107).await?;
    // Paid at once, but the answer is lost; every repeat gets 409, and the
    // status query says paid.
    let lost = withdraw(109).await?;
    let watcher = {
        let alice = alice.clone();
        tokio::spawn(async move {
            let mut most = 0;
            for _ in 0..60 {
                most = most.max(alice.available("CNY").await.unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            most
        })
    };
    let seen = until_state(&alice, &processing, "posted").await?;
    assert!(seen.contains(&"reconciling".to_string()), "{seen:?}");
    assert!(!seen.contains(&"voided".to_string()), "{seen:?}");
    let seen = until_state(&alice, &lost, "posted").await?;
    assert!(!seen.contains(&"voided".to_string()), "{seen:?}");
    assert!(
        provider.status_queries() >= 1,
        "the 409 was followed by a status query"
    );

    assert_eq!(
        watcher.await?,
        1_000 - 107 - 109,
        "the wallet was never credited back meanwhile"
    );
    assert_eq!(provider.paid(), 216, "each payout paid once");
    assert_eq!(alice.available("CNY").await?, 1_000 - 216);
    let urls = format!("sqlite:{}", c.cell_sqlite_path("cn-east").display());
    let out = c.cell_command("cn-east", &["audit", "--database-url", &urls])?;
    assert!(out.success, "{}", out.stdout);
    assert!(
        out.stdout.contains("withdrawals and fees 216"),
        "{}",
        out.stdout
    );

    // Outside tests a provider endpoint must be https://.
    let config = c.root.join("config").join("cell-cn-east.toml");
    let strict: String = std::fs::read_to_string(&config)?
        .lines()
        .filter(|l| !l.starts_with("allow_http_providers"))
        .map(|l| format!("{l}\n"))
        .collect();
    let strict_path = c.root.join("config").join("cell-strict.toml");
    std::fs::write(&strict_path, strict)?;
    let out = std::process::Command::new(homecell_harness::Binaries::locate()?.path("cell"))
        .arg("--config")
        .arg(&strict_path)
        .arg("--check")
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("payout_url must be https://"), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_deposit_reaching_another_region_is_booked_at_home() -> Result {
    let c = cluster("").await?;
    let cn = Api::new(&c.router_url(0), "cn-east");
    let eu = Api::new(&c.router_url(0), "eu-west");
    let (carol, carol_id) = user(&eu, "carol@example.com").await?;
    // The provider's callback lands at cn-east; carol lives in eu-west.
    let d = cn
        .provider_deposit("testpay", SECRET, "far-1", &carol_id, 900)
        .await?;
    assert_eq!(d.status, StatusCode::OK, "{}", d.body);
    assert_eq!(d.body["state"], "posted");
    let again = cn
        .provider_deposit("testpay", SECRET, "far-1", &carol_id, 900)
        .await?;
    assert_eq!(again.body["transfer_id"], d.body["transfer_id"]);
    // The same event straight at home is the same deposit, too.
    let home = eu
        .provider_deposit("testpay", SECRET, "far-1", &carol_id, 900)
        .await?;
    assert_eq!(home.body["transfer_id"], d.body["transfer_id"]);
    let changed = cn
        .provider_deposit("testpay", SECRET, "far-1", &carol_id, 1)
        .await?;
    assert_eq!(
        (changed.status, changed.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused")
    );
    assert_eq!(carol.available("CNY").await?, 900);
    let unknown = cn
        .provider_deposit(
            "testpay",
            SECRET,
            "far-2",
            "0190c0de-0000-7000-8000-000000000000",
            5,
        )
        .await?;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    c.audit(&["cn-east", "eu-west"])?;
    Ok(())
}
