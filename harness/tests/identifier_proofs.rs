//! Identifiers proven before they are claimed, end to end through the
//! router with the real SMTP server and the test SMS provider: a
//! registration by email or phone waits for the code sent to it; a
//! stranger's registration of someone else's address holds nothing, so the
//! owner registers (in another region, even) at once, and the stranger's
//! can never finish; a pending registration expires; a code is used once
//! and takes five guesses; a signed-in user changes their email (the old
//! one is free, the new one theirs alone) and removes a phone.

use anyhow::{Context, Result, ensure};
use homecell_harness::api::{Api, Reply};
use homecell_harness::provider::TestSms;
use homecell_harness::smtp::SmtpSink;
use homecell_harness::{Cluster, standard};
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::time::{Duration, Instant};

const PW: &str = "correct horse battery";
const SMS_SECRET: &str = "sms-provider-secret-0123456789";

async fn cluster(mail: &SmtpSink, sms: &TestSms) -> Result<Cluster> {
    standard()
        .prove_identifiers()
        .cell_config(&format!(
            "{}[[notice.sms]]\nname = \"sms\"\nurl = {:?}\nsecret = {SMS_SECRET:?}\n",
            mail.cell_config(),
            sms.url()
        ))
        .start()
        .await
}

/// Asks for a change of `api`'s account to `identifier`: its verification id.
async fn ask_change(api: &Api, identifier: &str) -> Result<String> {
    let r = api
        .post(
            "/v1/users/me/identifiers",
            json!({ "identifier": identifier }),
        )
        .await?;
    ensure!(r.status == StatusCode::ACCEPTED, "{:?}", r.body);
    Ok(r.body["verification_id"]
        .as_str()
        .context("no verification_id")?
        .to_string())
}

async fn confirm_change(api: &Api, verification_id: &str, code: &str) -> Result<Reply> {
    api.post(
        "/v1/users/me/identifiers/verify",
        json!({ "verification_id": verification_id, "code": code }),
    )
    .await
}

/// Until every router and cell has the directory's latest claims: a login
/// through a router is routed by them.
async fn settled(c: &Cluster) -> Result<()> {
    c.wait_applied(c.revision()?, 3, Duration::from_secs(10))
        .await?;
    Ok(())
}

/// The newest verification code among `texts`.
async fn new_code(texts: impl Fn() -> Vec<String>, seen: &mut Vec<String>) -> Result<String> {
    homecell_harness::wait::new_code(texts, "verification code is ", seen).await
}

fn mail_to(mail: &SmtpSink, to: &str) -> Vec<String> {
    mail.messages()
        .into_iter()
        .filter(|m| m.contains(to))
        .collect()
}

async fn verify(api: &Api, registration_id: &str, code: &str) -> Result<Reply> {
    api.post(
        "/v1/auth/register/verify",
        json!({ "registration_id": registration_id, "code": code }),
    )
    .await
}

fn pending_id(r: &Reply) -> Result<String> {
    ensure!(
        r.status == StatusCode::ACCEPTED,
        "{} {:?}",
        r.status,
        r.body
    );
    Ok(r.body["registration_id"]
        .as_str()
        .context("no registration_id")?
        .to_string())
}

#[tokio::test]
async fn a_registration_waits_for_its_code_and_a_stranger_blocks_no_one() -> Result<()> {
    let mail = SmtpSink::start().await?;
    let sms = TestSms::start(SMS_SECRET, false).await?;
    let c = cluster(&mail, &sms).await?;
    let cn = Api::new(&c.router_url(0), "cn-east");
    let eu = Api::new(&c.router_url(0), "eu-west");
    let owner = "owner@example.com";
    let mut seen = Vec::new();

    // A stranger registers the owner's address: a code goes to the owner,
    // and nothing is registered.
    let stranger = pending_id(&cn.register(owner, "stranger's password 1").await?)?;
    ensure!(stranger.starts_with("cn-east~"), "{stranger}");
    let strangers_code = new_code(|| mail_to(&mail, owner), &mut seen).await?;
    let r = cn.login(owner, "stranger's password 1").await?;
    ensure!(
        r.status == StatusCode::UNAUTHORIZED,
        "a pending registration signs in: {:?}",
        r.body
    );

    // The owner registers at once, in the other region.
    let mine = pending_id(&eu.register(owner, PW).await?)?;
    let code = new_code(|| mail_to(&mail, owner), &mut seen).await?;
    // Through a client that names the other region: the router takes the
    // verification to the cell holding it, by the id's prefix.
    let done = verify(&cn, &mine, &code).await?;
    ensure!(done.status == StatusCode::CREATED, "{:?}", done.body);
    ensure!(done.body["home_region"] == "eu-west", "{:?}", done.body);
    settled(&c).await?;
    ensure!(cn.login(owner, PW).await?.status == StatusCode::OK);
    // Used once.
    let again = verify(&cn, &mine, &code).await?;
    ensure!(
        (again.status, again.code()) == (StatusCode::UNAUTHORIZED, "invalid_credentials"),
        "a code reused: {:?}",
        again.body
    );
    // The stranger's registration cannot finish, even with its code.
    let late = verify(&cn, &stranger, &strangers_code).await?;
    ensure!(
        (late.status, late.code()) == (StatusCode::CONFLICT, "already_exists"),
        "the stranger's registration finished: {:?}",
        late.body
    );
    ensure!(cn.login(owner, "stranger's password 1").await?.status == StatusCode::UNAUTHORIZED);

    // By phone, with the code texted.
    let phone = "+8613800000009";
    let pending = pending_id(&cn.register(phone, PW).await?)?;
    let texts = || {
        sms.received()
            .into_iter()
            .filter(|m| m["to"] == phone)
            .filter_map(|m| m["text"].as_str().map(str::to_string))
            .collect::<Vec<_>>()
    };
    let code = new_code(texts, &mut seen).await?;
    let wrong = if code == "000000" { "000001" } else { "000000" };
    ensure!(verify(&cn, &pending, wrong).await?.status == StatusCode::UNAUTHORIZED);
    let done = verify(&cn, &pending, &code).await?;
    ensure!(done.status == StatusCode::CREATED, "{:?}", done.body);
    ensure!(cn.login(phone, PW).await?.status == StatusCode::OK);

    // A username needs no proof.
    ensure!(cn.register("plain_handle", PW).await?.status == StatusCode::CREATED);
    Ok(())
}

#[tokio::test]
async fn a_pending_registration_expires_and_its_guesses_are_counted() -> Result<()> {
    let mail = SmtpSink::start().await?;
    let sms = TestSms::start(SMS_SECRET, false).await?;
    let c = cluster(&mail, &sms).await?;
    let cn = Api::new(&c.router_url(0), "cn-east");
    let mut seen = Vec::new();

    // Five guesses at one registration, then not even the right code.
    let guessed = "guessed@example.com";
    let pending = pending_id(&cn.register(guessed, PW).await?)?;
    let code = new_code(|| mail_to(&mail, guessed), &mut seen).await?;
    let wrong = if code == "000000" { "000001" } else { "000000" };
    for _ in 0..5 {
        ensure!(verify(&cn, &pending, wrong).await?.status == StatusCode::UNAUTHORIZED);
    }
    let r = verify(&cn, &pending, &code).await?;
    ensure!(
        r.status == StatusCode::UNAUTHORIZED,
        "a sixth guess was taken: {:?}",
        r.body
    );

    // A registration past its time is gone; the address is free.
    c.cli_ok(&[
        "config",
        "set",
        "auth.register.pending_ttl",
        "10s",
        "--region",
        "cn-east",
    ])?;
    c.wait_applied(c.revision()?, 3, Duration::from_secs(10))
        .await?;
    let late = "late@example.com";
    let pending = pending_id(&cn.register(late, PW).await?)?;
    let code = new_code(|| mail_to(&mail, late), &mut seen).await?;
    tokio::time::sleep(Duration::from_secs(11)).await;
    let r = verify(&cn, &pending, &code).await?;
    ensure!(
        (r.status, r.code()) == (StatusCode::UNAUTHORIZED, "invalid_credentials"),
        "an expired registration finished: {:?}",
        r.body
    );
    let pending = pending_id(&cn.register(late, PW).await?)?;
    let code = new_code(|| mail_to(&mail, late), &mut seen).await?;
    ensure!(verify(&cn, &pending, &code).await?.status == StatusCode::CREATED);
    Ok(())
}

/// Registers `who` (an email) with the code mailed to it; signs in.
async fn register(
    c: &Cluster,
    api: &Api,
    mail: &SmtpSink,
    who: &str,
    seen: &mut Vec<String>,
) -> Result<Api> {
    let pending = pending_id(&api.register(who, PW).await?)?;
    let code = new_code(|| mail_to(mail, who), seen).await?;
    let r = verify(api, &pending, &code).await?;
    ensure!(r.status == StatusCode::CREATED, "{:?}", r.body);
    settled(c).await?;
    Ok(api.signed_in(who, PW).await?.0)
}

#[tokio::test]
async fn a_user_changes_their_email_and_removes_a_phone() -> Result<()> {
    let mail = SmtpSink::start().await?;
    let sms = TestSms::start(SMS_SECRET, false).await?;
    let c = cluster(&mail, &sms).await?;
    let cn = Api::new(&c.router_url(0), "cn-east");
    let eu = Api::new(&c.router_url(0), "eu-west");
    let mut seen = Vec::new();
    // Sign-in checks from another client type: a login ends the same
    // client type's earlier session.
    let web = cn.as_client("web");
    let ana = register(&c, &cn, &mail, "ana@example.com", &mut seen).await?;
    let bob = register(&c, &cn, &mail, "bob@example.com", &mut seen).await?;
    let cat = register(&c, &eu, &mail, "cat@example.com", &mut seen).await?;

    // The change: a code to the new address, then the swap.
    let vid = ask_change(&ana, "ana.new@example.com").await?;
    let code = new_code(|| mail_to(&mail, "ana.new@example.com"), &mut seen).await?;
    // Not bob's to use.
    let r = confirm_change(&bob, &vid, &code).await?;
    ensure!(
        r.status == StatusCode::UNAUTHORIZED,
        "another user's change: {:?}",
        r.body
    );
    let r = confirm_change(&ana, &vid, &code).await?;
    ensure!(r.status == StatusCode::OK, "{:?}", r.body);
    ensure!(
        r.body["identifier"] == "email:ana.new@example.com",
        "{:?}",
        r.body
    );
    ensure!(web.login("ana.new@example.com", PW).await?.status == StatusCode::OK);
    ensure!(web.login("ana@example.com", PW).await?.status == StatusCode::UNAUTHORIZED);
    // The old address hears of it.
    let told = Instant::now() + Duration::from_secs(20);
    while !mail_to(&mail, "ana@example.com")
        .iter()
        .any(|m| m.contains("no longer the email of your account"))
    {
        ensure!(Instant::now() < told, "the old address was not told");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The old address is free: someone registers it, in the other region.
    register(&c, &eu, &mail, "ana@example.com", &mut seen).await?;
    // The new one is ana's alone. Bob (at her cell) and cat (in the other
    // region) are told nothing about it when they ask, get a code, and the
    // control plane refuses the claim.
    for other in [&bob, &cat] {
        let vid = ask_change(other, "ana.new@example.com").await?;
        let code = new_code(|| mail_to(&mail, "ana.new@example.com"), &mut seen).await?;
        let taken = confirm_change(other, &vid, &code).await?;
        ensure!(
            (taken.status, taken.code()) == (StatusCode::CONFLICT, "already_exists"),
            "held by two users: {:?}",
            taken.body
        );
    }
    ensure!(
        web.login("cat@example.com", PW).await?.status == StatusCode::OK,
        "cat kept hers"
    );

    // A phone added, then removed with a fresh sign-in; the last way to
    // sign in stays.
    let vid = ask_change(&ana, "+8613800000077").await?;
    let texts = || {
        sms.received()
            .into_iter()
            .filter(|m| m["to"] == "+8613800000077")
            .filter_map(|m| m["text"].as_str().map(str::to_string))
            .collect::<Vec<_>>()
    };
    let code = new_code(texts, &mut seen).await?;
    let r = confirm_change(&ana, &vid, &code).await?;
    ensure!(r.status == StatusCode::OK, "{:?}", r.body);
    ensure!(web.login("+8613800000077", PW).await?.status == StatusCode::OK);
    let r = ana
        .call(Method::DELETE, "/v1/users/me/identifiers/phone", None, &[])
        .await?;
    ensure!(r.status == StatusCode::NO_CONTENT, "{:?}", r.body);
    ensure!(web.login("+8613800000077", PW).await?.status == StatusCode::UNAUTHORIZED);
    let r = ana
        .call(Method::DELETE, "/v1/users/me/identifiers/email", None, &[])
        .await?;
    ensure!(
        (r.status, r.code()) == (StatusCode::CONFLICT, "failed_precondition"),
        "the last way to sign in was removed: {:?}",
        r.body
    );
    // The removed phone is free again: someone else registers it.
    let pending = pending_id(&eu.register("+8613800000077", PW).await?)?;
    let code = new_code(texts, &mut seen).await?;
    let r = verify(&eu, &pending, &code).await?;
    ensure!(r.status == StatusCode::CREATED, "{:?}", r.body);
    Ok(())
}

#[tokio::test]
async fn a_stale_session_cannot_change_or_remove_an_identifier() -> Result<()> {
    let mail = SmtpSink::start().await?;
    let sms = TestSms::start(SMS_SECRET, false).await?;
    let c = cluster(&mail, &sms).await?;
    c.cli_ok(&[
        "config",
        "set",
        "auth.recent_sign_in",
        "10s",
        "--region",
        "cn-east",
    ])?;
    c.wait_applied(c.revision()?, 3, Duration::from_secs(10))
        .await?;
    let cn = Api::new(&c.router_url(0), "cn-east");
    let mut seen = Vec::new();
    let dee = register(&c, &cn, &mail, "dee@example.com", &mut seen).await?;
    tokio::time::sleep(Duration::from_secs(11)).await;
    // A token whose sign-in is older (a stolen one, say) does neither.
    let r = dee
        .post(
            "/v1/users/me/identifiers",
            json!({"identifier": "thief@example.com"}),
        )
        .await?;
    ensure!(
        (r.status, r.code()) == (StatusCode::FORBIDDEN, "recent_sign_in_required"),
        "a stale session repointed the account: {:?}",
        r.body
    );
    let r = dee
        .call(Method::DELETE, "/v1/users/me/identifiers/email", None, &[])
        .await?;
    ensure!(
        (r.status, r.code()) == (StatusCode::FORBIDDEN, "recent_sign_in_required"),
        "{:?}",
        r.body
    );
    ensure!(
        mail_to(&mail, "thief@example.com").is_empty(),
        "a code went out"
    );
    // Signed in again, it may.
    let (fresh, _) = cn.signed_in("dee@example.com", PW).await?;
    let r = fresh
        .post(
            "/v1/users/me/identifiers",
            json!({"identifier": "dee.new@example.com"}),
        )
        .await?;
    ensure!(r.status == StatusCode::ACCEPTED, "{:?}", r.body);
    Ok(())
}

/// The cell dies between the control plane's swap and its own update
/// (kill -9 at the failpoint): the directory holds the new address, the
/// cell the old. The reconciliation swaps back: the user keeps the old
/// address, and the new one is free for anyone.
#[tokio::test]
async fn a_change_cut_short_by_a_crash_is_swapped_back() -> Result<()> {
    let mail = SmtpSink::start().await?;
    let mut c = standard()
        .prove_identifiers()
        .cell_config(&format!(
            "unsettled_claims_release_after_secs = 10\n{}",
            mail.cell_config()
        ))
        .start()
        .await?;
    let cn = Api::new(&c.router_url(0), "cn-east");
    let web = cn.as_client("web");
    let mut seen = Vec::new();
    let eve = register(&c, &cn, &mail, "eve@example.com", &mut seen).await?;
    let vid = ask_change(&eve, "eve.new@example.com").await?;
    let code = new_code(|| mail_to(&mail, "eve.new@example.com"), &mut seen).await?;

    let restart = |c: &mut Cluster, failpoint: Option<&str>| {
        let node = c.cell_mut("cn-east").expect("cn-east");
        if let Some(mut p) = node.process.take() {
            p.kill();
        }
        node.env = failpoint
            .map(|f| vec![("HOMECELL_FAILPOINTS".to_string(), f.to_string())])
            .unwrap_or_default();
    };
    restart(&mut c, Some("identity.change.after_swap"));
    c.start_cell("cn-east").await?;
    c.wait_ready(Duration::from_secs(20)).await?;
    let r = eve
        .post(
            "/v1/users/me/identifiers/verify",
            json!({"verification_id": vid, "code": code}),
        )
        .await;
    ensure!(
        r.as_ref().map_or(true, |r| r.status.is_server_error()),
        "the cell answered: {:?}",
        r.map(|r| r.body)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while c
        .cell_mut("cn-east")
        .and_then(|n| n.process.as_mut())
        .is_some_and(|p| p.is_running())
    {
        ensure!(Instant::now() < deadline, "the failpoint was not reached");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    restart(&mut c, None);
    c.start_cell("cn-east").await?;
    c.wait_ready(Duration::from_secs(20)).await?;

    // After the settling time and a reconciliation pass, another user
    // registers the new address (each try spends one of the address's
    // five codes an hour, so few tries).
    tokio::time::sleep(Duration::from_secs(22)).await;
    let eu = Api::new(&c.router_url(0), "eu-west");
    let mut freed = false;
    for _ in 0..3 {
        let pending = pending_id(&eu.register("eve.new@example.com", PW).await?)?;
        let code = new_code(|| mail_to(&mail, "eve.new@example.com"), &mut seen).await?;
        let r = verify(&eu, &pending, &code).await?;
        if r.status == StatusCode::CREATED {
            freed = true;
            break;
        }
        ensure!(r.status == StatusCode::CONFLICT, "{:?}", r.body);
        tokio::time::sleep(Duration::from_secs(8)).await;
    }
    ensure!(
        freed,
        "the swap was never undone: the new address stays held"
    );
    settled(&c).await?;
    ensure!(
        web.login("eve@example.com", PW).await?.status == StatusCode::OK,
        "eve lost her address"
    );
    // And the directory holds it for her again: no one else takes it.
    let pending = pending_id(&eu.register("eve@example.com", PW).await?)?;
    let code = new_code(|| mail_to(&mail, "eve@example.com"), &mut seen).await?;
    let r = verify(&eu, &pending, &code).await?;
    ensure!(
        (r.status, r.code()) == (StatusCode::CONFLICT, "already_exists"),
        "eve's old address was left unheld: {:?}",
        r.body
    );
    Ok(())
}
