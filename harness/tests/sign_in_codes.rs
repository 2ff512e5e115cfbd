//! Sign-in by a one-time code, end to end through the router, with the
//! real SMTP server and the test SMS provider: the router takes both calls
//! to the identifier's home whatever region the client names; a code signs
//! in once, from its client type, before it expires; the guess budgets
//! hold; an unknown identifier is answered exactly as a known one.

use anyhow::{Context, Result, ensure};
use homecell_harness::api::{Api, Reply};
use homecell_harness::provider::TestSms;
use homecell_harness::smtp::SmtpSink;
use homecell_harness::{Cluster, standard};
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

const PW: &str = "correct horse battery";
const SMS_SECRET: &str = "sms-provider-secret-0123456789";

async fn ask(api: &Api, identifier: &str) -> Result<Reply> {
    api.post("/v1/auth/otp", json!({ "identifier": identifier }))
        .await
}

async fn verify(api: &Api, identifier: &str, code: &str) -> Result<Reply> {
    api.post(
        "/v1/auth/otp/verify",
        json!({ "identifier": identifier, "code": code }),
    )
    .await
}

/// The newest sign-in code among `texts`.
async fn new_code(texts: impl Fn() -> Vec<String>, seen: &mut Vec<String>) -> Result<String> {
    homecell_harness::wait::new_code(texts, "sign-in code is ", seen).await
}

async fn set(c: &Cluster, key: &str, value: &str) -> Result<()> {
    c.cli_ok(&["config", "set", key, value])?;
    c.wait_applied(c.revision()?, 3, Duration::from_secs(10))
        .await?;
    Ok(())
}

#[tokio::test]
async fn sign_in_by_a_code_sent_by_email_or_sms() -> Result<()> {
    let mail = SmtpSink::start().await?;
    let sms = TestSms::start(SMS_SECRET, false).await?;
    let c = standard()
        .cell_config(&format!(
            "{}[[notice.sms]]\nname = \"sms\"\nurl = {:?}\nsecret = {SMS_SECRET:?}\n",
            mail.cell_config(),
            sms.url()
        ))
        .start()
        .await?;
    let home = Api::new(&c.router_url(0), "cn-east");
    ensure!(home.register("ana@example.com", PW).await?.status == StatusCode::CREATED);
    ensure!(home.register("+8613800000002", PW).await?.status == StatusCode::CREATED);
    // The client names the other region: the router routes by the
    // identifier, to its home.
    let app = Api::new(&c.router_url(0), "eu-west");
    let mails = || {
        mail.messages()
            .into_iter()
            .filter(|m| m.contains("ana@example.com"))
            .collect::<Vec<_>>()
    };
    let (mut mailed, mut texted) = (Vec::new(), Vec::new());

    // By email: 202, the code, a session as a login's.
    let r = ask(&app, "ana@example.com").await?;
    ensure!(r.status == StatusCode::ACCEPTED, "{:?}", r.body);
    let code = new_code(mails, &mut mailed).await?;
    let signed = verify(&app, "ana@example.com", &code).await?;
    ensure!(signed.status == StatusCode::OK, "{:?}", signed.body);
    ensure!(signed.body["home_region"] == "cn-east", "{:?}", signed.body);
    let token = signed.body["access_token"].as_str().context("token")?;
    ensure!(app.with_token(token).get("/v1/users/me").await?.status == StatusCode::OK);

    // Used once.
    let again = verify(&app, "ana@example.com", &code).await?;
    ensure!(
        (again.status, again.code()) == (StatusCode::UNAUTHORIZED, "invalid_credentials"),
        "a code reused: {:?}",
        again.body
    );

    // Bound to the client type that asked: the web's code does not sign
    // the app in (and is not spent by trying), then signs the web in.
    let web = app.as_client("web");
    ensure!(ask(&web, "ana@example.com").await?.status == StatusCode::ACCEPTED);
    let web_code = new_code(mails, &mut mailed).await?;
    let wrong = verify(&app, "ana@example.com", &web_code).await?;
    ensure!(
        wrong.status == StatusCode::UNAUTHORIZED,
        "another client type: {:?}",
        wrong.body
    );
    let right = verify(&web, "ana@example.com", &web_code).await?;
    ensure!(right.status == StatusCode::OK, "{:?}", right.body);

    // By SMS.
    ensure!(ask(&app, "+8613800000002").await?.status == StatusCode::ACCEPTED);
    let texts = || {
        sms.received()
            .into_iter()
            .filter(|m| m["to"] == "+8613800000002")
            .filter_map(|m| m["text"].as_str().map(str::to_string))
            .collect::<Vec<_>>()
    };
    let code = new_code(texts, &mut texted).await?;
    let r = verify(&app, "+8613800000002", &code).await?;
    ensure!(r.status == StatusCode::OK, "{:?}", r.body);

    // A code proves the account is the caller's for what needs more than a
    // token: deleting it without a password. A wrong code changes nothing.
    let phone = app.with_token(r.body["access_token"].as_str().context("token")?);
    let delete = |code: String| {
        let phone = phone.clone();
        async move {
            phone
                .call(
                    reqwest::Method::DELETE,
                    "/v1/users/me",
                    Some(json!({ "code": code })),
                    &[],
                )
                .await
        }
    };
    ensure!(ask(&app, "+8613800000002").await?.status == StatusCode::ACCEPTED);
    let code = new_code(texts, &mut texted).await?;
    let wrong = if code == "000001" { "000002" } else { "000001" };
    let r = delete(wrong.to_string()).await?;
    ensure!(
        r.status == StatusCode::UNAUTHORIZED,
        "a wrong code: {:?}",
        r.body
    );
    ensure!(phone.get("/v1/users/me").await?.status == StatusCode::OK);
    let r = delete(code).await?;
    ensure!(r.status == StatusCode::NO_CONTENT, "{:?}", r.body);
    ensure!(
        home.register("+8613800000002", PW).await?.status == StatusCode::CREATED,
        "the number is free again"
    );

    // Expired: refused, though right.
    set(&c, "auth.otp.ttl", "10s").await?;
    ensure!(ask(&app, "ana@example.com").await?.status == StatusCode::ACCEPTED);
    let late = new_code(mails, &mut mailed).await?;
    tokio::time::sleep(Duration::from_secs(11)).await;
    let r = verify(&app, "ana@example.com", &late).await?;
    ensure!(
        r.status == StatusCode::UNAUTHORIZED,
        "an expired code: {:?}",
        r.body
    );

    // A username cannot get a code; the back office signs in with a
    // password (a code alone would make an admin's mailbox the admin).
    let r = ask(&app, "username:ana").await?;
    ensure!(r.status == StatusCode::BAD_REQUEST, "{:?}", r.body);
    let cms = app.as_client("cms");
    ensure!(ask(&cms, "ana@example.com").await?.status == StatusCode::BAD_REQUEST);
    ensure!(verify(&cms, "ana@example.com", "123456").await?.status == StatusCode::BAD_REQUEST);
    Ok(())
}

/// The reset budgets hold for sign-in codes, known and unknown identifiers
/// alike: codes per hour, then wrong guesses per day, each answered 429
/// with Retry-After, with the same answers for an identifier no one holds.
#[tokio::test]
async fn the_guess_budgets_hold_for_sign_in_codes() -> Result<()> {
    let mail = SmtpSink::start().await?;
    let c = standard()
        .cell_config(&format!(
            "login_attempts_per_ip_per_minute = 1000\n{}",
            mail.cell_config()
        ))
        .start()
        .await?;
    set(&c, "auth.reset.max_failures_per_day", "3").await?;
    set(&c, "auth.reset.max_codes_per_hour", "2").await?;
    let app = Api::new(&c.router_url(0), "cn-east");
    ensure!(app.register("bo@example.com", PW).await?.status == StatusCode::CREATED);

    for who in ["bo@example.com", "nobody@example.com"] {
        for _ in 0..2 {
            let r = ask(&app, who).await?;
            ensure!(r.status == StatusCode::ACCEPTED, "{who}: {:?}", r.body);
        }
        let r = ask(&app, who).await?;
        ensure!(
            r.status == StatusCode::TOO_MANY_REQUESTS && r.header("retry-after").is_some(),
            "{who}: a third code within the hour: {} {:?}",
            r.status,
            r.body
        );
        for n in 0..3 {
            let r = verify(&app, who, "000000").await?;
            ensure!(
                (r.status, r.code()) == (StatusCode::UNAUTHORIZED, "invalid_credentials"),
                "{who}: wrong guess {n}: {:?}",
                r.body
            );
        }
        let r = verify(&app, who, "000000").await?;
        ensure!(
            r.status == StatusCode::TOO_MANY_REQUESTS,
            "{who}: a fourth wrong guess in a day: {:?}",
            r.body
        );
    }
    // The budget is the account's: even the right code waits now.
    let mails = || mail.messages();
    let mut seen = Vec::new();
    for _ in 0..2 {
        let code = new_code(mails, &mut seen).await?;
        let r = verify(&app, "bo@example.com", &code).await?;
        ensure!(r.status == StatusCode::TOO_MANY_REQUESTS, "{:?}", r.body);
    }
    Ok(())
}
