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

/// The verification code among `texts` not in `seen` (then in it).
async fn new_code(texts: impl Fn() -> Vec<String>, seen: &mut Vec<String>) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let fresh = texts().iter().find_map(|t| {
            let at = t.find("verification code is ")? + "verification code is ".len();
            t.get(at..at + 6)
                .map(str::to_string)
                .filter(|c| !seen.contains(c))
        });
        if let Some(code) = fresh {
            seen.push(code.clone());
            return Ok(code);
        }
        ensure!(Instant::now() < deadline, "no new code arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
async fn register(api: &Api, mail: &SmtpSink, who: &str, seen: &mut Vec<String>) -> Result<Api> {
    let pending = pending_id(&api.register(who, PW).await?)?;
    let code = new_code(|| mail_to(mail, who), seen).await?;
    let r = verify(api, &pending, &code).await?;
    ensure!(r.status == StatusCode::CREATED, "{:?}", r.body);
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
    let ana = register(&cn, &mail, "ana@example.com", &mut seen).await?;
    let bob = register(&cn, &mail, "bob@example.com", &mut seen).await?;
    let cat = register(&eu, &mail, "cat@example.com", &mut seen).await?;

    // The change: a code to the new address, then the swap.
    let r = ana
        .post(
            "/v1/users/me/identifiers",
            json!({"identifier": "ana.new@example.com"}),
        )
        .await?;
    ensure!(r.status == StatusCode::ACCEPTED, "{:?}", r.body);
    let vid = r.body["verification_id"]
        .as_str()
        .context("id")?
        .to_string();
    let code = new_code(|| mail_to(&mail, "ana.new@example.com"), &mut seen).await?;
    // Not bob's to use.
    let r = bob
        .post(
            "/v1/users/me/identifiers/verify",
            json!({"verification_id": vid, "code": code}),
        )
        .await?;
    ensure!(
        r.status == StatusCode::UNAUTHORIZED,
        "another user's change: {:?}",
        r.body
    );
    let r = ana
        .post(
            "/v1/users/me/identifiers/verify",
            json!({"verification_id": vid, "code": code}),
        )
        .await?;
    ensure!(r.status == StatusCode::OK, "{:?}", r.body);
    ensure!(
        r.body["identifier"] == "email:ana.new@example.com",
        "{:?}",
        r.body
    );
    ensure!(web.login("ana.new@example.com", PW).await?.status == StatusCode::OK);
    ensure!(web.login("ana@example.com", PW).await?.status == StatusCode::UNAUTHORIZED);
    // The old address is free: someone registers it, in the other region.
    register(&eu, &mail, "ana@example.com", &mut seen).await?;
    // The new one is ana's alone. Bob (at her cell) and cat (in the other
    // region) are told nothing about it when they ask, get a code, and the
    // control plane refuses the claim.
    for other in [&bob, &cat] {
        let r = other
            .post(
                "/v1/users/me/identifiers",
                json!({"identifier": "ana.new@example.com"}),
            )
            .await?;
        ensure!(r.status == StatusCode::ACCEPTED, "{:?}", r.body);
        let vid = r.body["verification_id"]
            .as_str()
            .context("id")?
            .to_string();
        let code = new_code(|| mail_to(&mail, "ana.new@example.com"), &mut seen).await?;
        let taken = other
            .post(
                "/v1/users/me/identifiers/verify",
                json!({"verification_id": vid, "code": code}),
            )
            .await?;
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
    let r = ana
        .post(
            "/v1/users/me/identifiers",
            json!({"identifier": "+8613800000077"}),
        )
        .await?;
    ensure!(r.status == StatusCode::ACCEPTED, "{:?}", r.body);
    let vid = r.body["verification_id"]
        .as_str()
        .context("id")?
        .to_string();
    let texts = || {
        sms.received()
            .into_iter()
            .filter(|m| m["to"] == "+8613800000077")
            .filter_map(|m| m["text"].as_str().map(str::to_string))
            .collect::<Vec<_>>()
    };
    let code = new_code(texts, &mut seen).await?;
    let r = ana
        .post(
            "/v1/users/me/identifiers/verify",
            json!({"verification_id": vid, "code": code}),
        )
        .await?;
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
