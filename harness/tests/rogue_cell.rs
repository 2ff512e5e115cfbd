//! A compromised cell can hurt only its own region: with a real `cell.<r>`
//! certificate (as a thief of one cell's credentials holds it), the control
//! plane refuses what would reach into another region, and another region's
//! cell refuses money it did not earn (finding 11).

type Result<T = ()> = anyhow::Result<T>;
use homecell_common::tls::{PeerIdentity, Pki, TlsPaths};
use homecell_harness::api::Api;
use homecell_harness::{Cluster, standard};
use homecell_proto::cell::cell_service_client::CellServiceClient;
use homecell_proto::cell::{
    CheckSessionRequest, DiscardImportRequest, ForwardDepositRequest, ImportUserRequest,
    IncomingTransfer, SendNoticeRequest,
};
use homecell_proto::control::directory_service_client::DirectoryServiceClient;
use homecell_proto::control::region_service_client::RegionServiceClient;
use homecell_proto::control::{
    ClaimIdentifierRequest, PublishSigningKeysRequest, ReassertClaimsRequest, SigningKey,
};
use std::time::Duration;

const PW: &str = "correct horse battery";

/// A control-plane channel with `region`'s cell certificate.
async fn as_cell(c: &Cluster, region: &str) -> Result<tonic::transport::Channel> {
    c.control_plane_as(&PeerIdentity::Cell {
        region: region.into(),
    })
    .await
}

/// A channel to `target`'s cell with `region`'s cell certificate.
async fn to_cell_as(c: &Cluster, region: &str, target: &str) -> Result<tonic::transport::Channel> {
    let endpoint = format!("https://{}", c.cells[target].api);
    channel_as(c, region, endpoint, &format!("cell.{target}")).await
}

async fn channel_as(
    c: &Cluster,
    region: &str,
    endpoint: String,
    server_name: &str,
) -> Result<tonic::transport::Channel> {
    let cell = PeerIdentity::Cell {
        region: region.into(),
    };
    channel_with(c, &cell, endpoint, server_name).await
}

async fn channel_with(
    c: &Cluster,
    identity: &PeerIdentity,
    endpoint: String,
    server_name: &str,
) -> Result<tonic::transport::Channel> {
    let pki = Pki::open_or_create(&c.pki_dir)?;
    let paths: TlsPaths = pki.issue(identity, &[])?;
    Ok(tonic::transport::Endpoint::from_shared(endpoint)?
        .tls_config(paths.load()?.tonic_client(server_name))?
        .connect()
        .await?)
}

const SECRET: &str = "testpay-shared-secret-0123456789";

/// A gRPC call's outcome, by status code.
fn code<T>(
    r: std::result::Result<tonic::Response<T>, tonic::Status>,
) -> std::result::Result<(), tonic::Code> {
    r.map(|_| ()).map_err(|s| s.code())
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// Another region's cell takes from a rogue cell only what a provider
/// signed, and only as the region its certificate names.
#[tokio::test]
async fn a_rogue_cell_cannot_mint_money_in_another_region() -> Result {
    let c = standard()
        .cell_config(&format!("[payments.testpay]\nsecret = {SECRET:?}\n"))
        .start()
        .await?;
    let eu = Api::new(&c.router_url(0), "eu-west");
    let (victim_api, login) = eu.signed_in("payee@x.test", PW).await?;
    let victim = login["user_id"].as_str().unwrap().to_string();
    let mut eu_cell = CellServiceClient::new(to_cell_as(&c, "cn-east", "eu-west").await?);
    let deposit = |event: &str, amount: i64| {
        serde_json::to_vec(&serde_json::json!({
            "event_id": event, "type": "deposit.succeeded",
            "user_id": victim, "amount": amount, "currency": "CNY",
        }))
        .unwrap()
    };
    let forward = |body: Vec<u8>, signature: String, from: &str| ForwardDepositRequest {
        provider: "testpay".into(),
        body,
        signature,
        from_region: from.into(),
    };

    // A deposit the provider never signed: no signature, or the rogue's own.
    let body = deposit("forged-1", 1_000_000);
    let unsigned = eu_cell
        .forward_deposit(forward(body.clone(), String::new(), "cn-east"))
        .await;
    assert_eq!(code(unsigned), Err(tonic::Code::Unauthenticated));
    let own_key = homecell_common::webhook::sign("a secret the rogue made up", &body, now_secs());
    let self_signed = eu_cell
        .forward_deposit(forward(body.clone(), own_key, "cn-east"))
        .await;
    assert_eq!(code(self_signed), Err(tonic::Code::Unauthenticated));
    // A signed one, passed on in another region's name.
    let signed = homecell_common::webhook::sign(SECRET, &body, now_secs());
    let as_other = eu_cell
        .forward_deposit(forward(body.clone(), signed.clone(), "ap-south"))
        .await;
    assert_eq!(code(as_other), Err(tonic::Code::PermissionDenied));

    // Incoming-transfer steps in another region's name.
    let transfer = IncomingTransfer {
        transfer_id: "0b7e5a6c-2f3d-4e1a-9c8b-7a6f5e4d3c2b".into(),
        from_region: "ap-south".into(),
        from_user: "someone".into(),
        to_user: victim.clone(),
        amount: 1_000_000,
        currency: "CNY".into(),
        memo: String::new(),
    };
    let hold = eu_cell.hold_incoming(transfer.clone()).await;
    assert_eq!(code(hold), Err(tonic::Code::PermissionDenied));
    let post = eu_cell.post_incoming(transfer.clone()).await;
    assert_eq!(code(post), Err(tonic::Code::PermissionDenied));

    assert_eq!(victim_api.available("CNY").await?, 0, "no forged money");

    // What the provider did sign, passed on as the rogue's own region, is
    // booked once: forwarding carries the provider's word, nothing more.
    let real = deposit("real-1", 2_500);
    let real_signed = homecell_common::webhook::sign(SECRET, &real, now_secs());
    for _ in 0..2 {
        eu_cell
            .forward_deposit(forward(real.clone(), real_signed.clone(), "cn-east"))
            .await?;
    }
    assert_eq!(victim_api.available("CNY").await?, 2_500);
    Ok(())
}

#[tokio::test]
async fn a_rogue_cell_cannot_reach_into_another_region() -> Result {
    let c = standard().start().await?;
    c.wait_signing_keys(Duration::from_secs(15)).await?;
    let eu = Api::new(&c.router_url(0), "eu-west");
    let (me, login) = eu.signed_in("victim@x.test", PW).await?;
    let victim = login["user_id"].as_str().unwrap().to_string();
    let before = c.revision()?;
    let rogue = as_cell(&c, "cn-east").await?;

    // Re-homing eu-west's user to cn-east through a fresh identifier.
    let claim = DirectoryServiceClient::new(rogue.clone())
        .claim_identifier(ClaimIdentifierRequest {
            identifier: "username:rogue-handle".into(),
            user_id: victim.clone(),
            region: "cn-east".into(),
            not_after_unix_ms: 0,
            replaces: String::new(),
        })
        .await;
    assert_eq!(
        claim.map(|_| ()).map_err(|s| s.code()),
        Err(tonic::Code::PermissionDenied)
    );

    // The same through ReassertClaims (what cells send after a restore):
    // refused on a store that was never rebuilt, and a batch naming
    // another region, or sent for another region, is refused outright.
    // (After a rebuild, it runs ClaimIdentifier's checks claim by claim:
    // control-plane/src/directory.rs's tests.)
    let reassert = |region: &str, claim_region: &str, user: &str| ReassertClaimsRequest {
        region: region.into(),
        claims: vec![ClaimIdentifierRequest {
            identifier: "username:rogue-handle-2".into(),
            user_id: user.into(),
            region: claim_region.into(),
            not_after_unix_ms: 0,
            replaces: String::new(),
        }],
        last: true,
        epoch: 0,
    };
    let r = DirectoryServiceClient::new(rogue.clone())
        .reassert_claims(reassert("cn-east", "cn-east", &victim))
        .await;
    assert_eq!(code(r), Err(tonic::Code::FailedPrecondition));
    for (region, claim_region) in [("cn-east", "eu-west"), ("eu-west", "eu-west")] {
        let r = DirectoryServiceClient::new(rogue.clone())
            .reassert_claims(reassert(region, claim_region, &victim))
            .await;
        assert_eq!(code(r), Err(tonic::Code::PermissionDenied), "{region}");
    }

    // Shadowing eu-west's signing key with cn-east's name on it, or a kid
    // that does not carry cn-east.
    let jwks = eu.get("/.well-known/jwks.json").await?;
    let eu_kid = jwks.body["keys"][0]["kid"].as_str().unwrap().to_string();
    let key = |kid: &str| SigningKey {
        kid: kid.into(),
        alg: "EdDSA".into(),
        public_key: vec![7; 32],
        ..Default::default()
    };
    for k in [key("eu-west-forged"), key("not-a-region-kid"), key(&eu_kid)] {
        let kid = k.kid.clone();
        let r = RegionServiceClient::new(rogue.clone())
            .publish_signing_keys(PublishSigningKeysRequest {
                region: "cn-east".into(),
                keys: vec![k],
            })
            .await;
        assert_eq!(
            r.map(|_| ()).map_err(|s| s.code()),
            Err(tonic::Code::PermissionDenied),
            "{kid}"
        );
    }
    assert_eq!(c.revision()?, before, "nothing changed");
    // The victim is still served at home.
    assert_eq!(
        me.get("/v1/users/me").await?.status,
        reqwest::StatusCode::OK
    );
    Ok(())
}

/// `CellService` admits cells only: a router's or an operator's certificate
/// is refused by every method, before the method runs (a router forwards
/// the internet's requests with its own certificate).
#[tokio::test]
async fn cell_service_admits_cells_only() -> Result {
    let c = standard().start().await?;
    let endpoint = format!("https://{}", c.cells["cn-east"].api);
    for identity in [
        PeerIdentity::Router {
            region: "cn-east".into(),
        },
        PeerIdentity::Operator {
            name: "admin".into(),
        },
    ] {
        let ch = channel_with(&c, &identity, endpoint.clone(), "cell.cn-east").await?;
        let mut cell = CellServiceClient::new(ch);
        let transfer = IncomingTransfer::default();
        let outcomes = [
            (
                "CheckSession",
                code(cell.check_session(CheckSessionRequest::default()).await),
            ),
            (
                "HoldIncoming",
                code(cell.hold_incoming(transfer.clone()).await),
            ),
            (
                "PostIncoming",
                code(cell.post_incoming(transfer.clone()).await),
            ),
            (
                "VoidIncoming",
                code(cell.void_incoming(transfer.clone()).await),
            ),
            (
                "SendNotice",
                code(cell.send_notice(SendNoticeRequest::default()).await),
            ),
            (
                "ForwardDeposit",
                code(cell.forward_deposit(ForwardDepositRequest::default()).await),
            ),
            (
                "ImportUser",
                code(cell.import_user(ImportUserRequest::default()).await),
            ),
            (
                "DiscardImport",
                code(cell.discard_import(DiscardImportRequest::default()).await),
            ),
        ];
        for (method, outcome) in outcomes {
            assert_eq!(
                outcome,
                Err(tonic::Code::PermissionDenied),
                "{method} as {identity}"
            );
        }
    }
    Ok(())
}

/// A subscriber's ACK counts only up to what the control plane sent: a
/// rogue cell cannot pose as the most current replica (the one an operator
/// would recover the control plane from).
#[tokio::test]
async fn a_subscriber_cannot_claim_revisions_it_was_never_sent() -> Result {
    use homecell_proto::control::{
        Ack, Subscribe, SubscriberKind, WatchRequest, sync_service_client::SyncServiceClient,
        watch_request,
    };
    let c = standard().start().await?;
    let rogue = as_cell(&c, "cn-east").await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(WatchRequest {
        kind: Some(watch_request::Kind::Subscribe(Subscribe {
            node_id: "rogue-replica".into(),
            kind: SubscriberKind::Cell as i32,
            region: "cn-east".into(),
            from_revision: 0,
            epoch: 0,
        })),
    })
    .await?;
    let mut stream = SyncServiceClient::new(rogue)
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    stream.message().await?.expect("a snapshot");
    tx.send(WatchRequest {
        kind: Some(watch_request::Kind::Ack(Ack {
            revision: 1_000_000_000_000,
        })),
    })
    .await?;
    let revision = c.revision()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v = c.cli_ok(&["-o", "json", "status"])?.json()?;
        let row = v["subscribers"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["node_id"] == "rogue-replica").cloned());
        if let Some(applied) = row.and_then(|r| r["applied_revision"].as_u64())
            && applied > 0
        {
            assert!(applied <= revision, "status shows {applied} > {revision}");
            return Ok(());
        }
        assert!(std::time::Instant::now() < deadline, "no ACK recorded: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A rogue cell with a move under way cannot smuggle a way into another
/// user's session at the target: a bundle's refresh tokens must belong to
/// the bundle's own sessions (a token tied to the victim's session id would
/// otherwise refresh into the victim's account).
#[tokio::test]
async fn a_rogue_cell_cannot_smuggle_a_session_into_a_move() -> Result {
    use base64::Engine;
    use homecell_proto::cell::ImportUserRequest;
    use homecell_proto::control::move_service_client::MoveServiceClient;
    use homecell_proto::control::{AdvanceMoveRequest, MoveState};
    let mut c = standard().start().await?;
    let west = Api::new(&c.router_url(0), "eu-west");
    let east = Api::new(&c.router_url(0), "cn-east");
    let (_, victim) = west.signed_in("victim@example.com", PW).await?;
    let token = victim["access_token"].as_str().unwrap_or_default();
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.split('.').nth(1).unwrap_or_default())?;
    let sid = serde_json::from_slice::<serde_json::Value>(&claims)?["sid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let r = east.register("mover@example.com", PW).await?;
    let mover = r.body["user_id"].as_str().unwrap_or_default().to_string();

    // cn-east's cell is down, so only the rogue acts for cn-east; the
    // operator starts the move, and the rogue reports it copying.
    if let Some(mut p) = c.cell_mut("cn-east").and_then(|n| n.process.take()) {
        p.kill();
    }
    let out = c.cli_ok(&[
        "-o",
        "json",
        "move",
        "user",
        &mover,
        "--to",
        "eu-west",
        "--no-wait",
    ])?;
    let id = out.json()?["id"].as_str().unwrap_or_default().to_string();
    MoveServiceClient::new(as_cell(&c, "cn-east").await?)
        .advance_move(AdvanceMoveRequest {
            id: id.clone(),
            from_state: MoveState::Pending as i32,
            to_state: MoveState::Copying as i32,
            ..Default::default()
        })
        .await?;

    let stolen = "eu-west~smuggled-refresh-token";
    let bundle = serde_json::json!({
        "version": 2,
        "user": [mover, "active", "Mover", null, null, null, 1, 0, 0],
        "identifiers": [["email", "mover@example.com"]],
        "password_hash": null,
        "addresses": [], "roles": [], "preferences": [], "inbox": [], "wechat": [],
        "sessions": [],
        "refresh_tokens": [[homecell_common::hex::sha256(stolen), sid, 0, null, null, null]],
        "operations": [], "outbox": [], "deliveries": [],
    });
    let mut cell = CellServiceClient::new(to_cell_as(&c, "cn-east", "eu-west").await?);
    // The rogue pushes `bundle` for the mover's move, as cn-east.
    let import = |cell: &mut CellServiceClient<tonic::transport::Channel>,
                  bundle: &serde_json::Value| {
        let req = ImportUserRequest {
            from_region: "cn-east".into(),
            user_id: mover.clone(),
            bundle: serde_json::to_vec(bundle).unwrap_or_default(),
            move_id: id.clone(),
        };
        let mut cell = cell.clone();
        async move { anyhow::Ok(code(cell.import_user(req).await)) }
    };
    let refused = import(&mut cell, &bundle).await?;
    assert_eq!(refused, Err(tonic::Code::InvalidArgument));
    let r = c
        .http()
        .post(format!("{}/v1/auth/refresh", c.router_url(0)))
        .json(&serde_json::json!({"refresh_token": stolen}))
        .send()
        .await?;
    assert_eq!(
        r.status(),
        reqwest::StatusCode::UNAUTHORIZED,
        "the victim's session stays theirs"
    );

    // Nor plant another person's identifier or WeChat binding there: the
    // new home asks the directory whether each is the mover's.
    let bundle_with = |identifiers: serde_json::Value, wechat: serde_json::Value| {
        serde_json::json!({
            "version": 2,
            "user": [mover, "active", "Mover", null, null, null, 1, 0, 0],
            "identifiers": identifiers,
            "password_hash": null,
            "addresses": [], "roles": [], "preferences": [], "inbox": [], "wechat": wechat,
            "sessions": [], "refresh_tokens": [],
            "operations": [], "outbox": [], "deliveries": [],
        })
    };
    let own = serde_json::json!([["email", "mover@example.com"]]);
    for (what, bundle) in [
        (
            "the victim's email",
            bundle_with(
                serde_json::json!([
                    ["email", "mover@example.com"],
                    ["email", "victim@example.com"]
                ]),
                serde_json::json!([]),
            ),
        ),
        (
            "an unclaimed email",
            bundle_with(
                serde_json::json!([
                    ["email", "mover@example.com"],
                    ["email", "nobody@example.com"]
                ]),
                serde_json::json!([]),
            ),
        ),
        (
            "a WeChat openid",
            bundle_with(
                own.clone(),
                serde_json::json!([["o-someone-elses-openid", 0]]),
            ),
        ),
    ] {
        let refused = import(&mut cell, &bundle).await?;
        assert_eq!(refused, Err(tonic::Code::PermissionDenied), "{what}");
    }
    // The unclaimed address is still free to register at eu-west.
    let r = west.register("nobody@example.com", PW).await?;
    assert!(r.status.is_success(), "{r:?}");
    // Nor an address in a form this cell would never store, even one the
    // rogue claimed for the mover in the directory (it takes any string):
    // the mail would go to whoever it names.
    use homecell_proto::control::ClaimIdentifierRequest;
    use homecell_proto::control::directory_service_client::DirectoryServiceClient;
    let odd = "Someone <someone-else@example.com>";
    DirectoryServiceClient::new(as_cell(&c, "cn-east").await?)
        .claim_identifier(ClaimIdentifierRequest {
            identifier: format!("email:{odd}"),
            user_id: mover.clone(),
            region: "cn-east".into(),
            not_after_unix_ms: 0,
            replaces: String::new(),
        })
        .await?;
    let mut odd_bundle = bundle_with(
        serde_json::json!([["email", "mover@example.com"], ["email", odd]]),
        serde_json::json!([]),
    );
    odd_bundle["deliveries"] = serde_json::json!([{"id": "d-odd", "event_id": "d-odd",
        "channel": "email", "recipient": odd, "subject": "Hi", "body": "Hi", "html": null,
        "attempts": 0, "next_attempt_at": 0, "created_at": 0}]);
    let refused = import(&mut cell, &odd_bundle).await?;
    assert_eq!(refused, Err(tonic::Code::InvalidArgument));

    // A user who is not active does not move.
    let mut disabled = bundle_with(own.clone(), serde_json::json!([]));
    disabled["user"][1] = "disabled".into();
    let refused = import(&mut cell, &disabled).await?;
    assert_eq!(refused, Err(tonic::Code::InvalidArgument));

    // The mover's own bundle is taken, without what it would send to
    // anyone else: mail to another address, a code message.
    let mut bundle = bundle_with(own, serde_json::json!([]));
    let letter = |id: &str, to: &str| {
        serde_json::json!({"id": id, "event_id": id, "channel": "email", "recipient": to,
            "subject": "Hello", "body": "Hello", "html": null, "attempts": 0,
            "next_attempt_at": 0, "created_at": 0})
    };
    bundle["deliveries"] = serde_json::json!([
        letter("d-own", "mover@example.com"),
        letter("d-spam", "someone-else@example.com"),
    ]);
    bundle["outbox"] = serde_json::json!([
        [
            "e-code",
            "auth.password_reset",
            "{\"to\": \"someone-else@example.com\"}",
            0,
            null
        ],
        ["e-note", "message", "{}", 0, null],
    ]);
    let taken = import(&mut cell, &bundle).await?;
    assert_eq!(taken, Ok(()));
    let pool = sqlx::SqlitePool::connect(&format!(
        "sqlite:{}",
        c.cell_sqlite_path("eu-west").display()
    ))
    .await?;
    let delivered: Vec<(String,)> =
        sqlx::query_as("SELECT id FROM deliveries WHERE user_id = ? ORDER BY id")
            .bind(&mover)
            .fetch_all(&pool)
            .await?;
    assert_eq!(delivered, [("d-own".to_string(),)]);
    let events: Vec<(String,)> =
        sqlx::query_as("SELECT id FROM outbox WHERE user_id = ? ORDER BY id")
            .bind(&mover)
            .fetch_all(&pool)
            .await?;
    assert_eq!(events, [("e-note".to_string(),)]);
    Ok(())
}
