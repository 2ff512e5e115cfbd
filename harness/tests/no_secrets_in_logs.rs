//! No personal data or secret in any log line: a user's identifiers,
//! passwords, tokens, reset code and address, a payment provider's and an
//! SMS provider's secret, and WeChat's AppSecret, login code, session key
//! and openid go through the public routes that carry them (registration,
//! login, WeChat sign-in, profile, addresses, deposit, transfer, refresh,
//! password reset by email and by SMS, a path with an email in it), then
//! through every route of the OpenAPI document with those values in its
//! path, query and body; then every log line of every process, and the
//! dead-letter view, are searched for each (docs/SECURITY.md, "Personal
//! data").

use homecell_harness::api::Api;
use homecell_harness::provider::{TestSms, TestWechat};
use homecell_harness::smtp::SmtpSink;
use homecell_harness::standard;
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::time::{Duration, Instant};

type Result<T = ()> = anyhow::Result<T>;

const PW: &str = "a secret horse battery";
const NEW_PW: &str = "another secret horse 2";
const PAY_SECRET: &str = "testpay-shared-secret-0123456789";
const SMS_SECRET: &str = "sms-provider-secret-0123456789";
const WX_SECRET: &str = "wechat-appsecret-leakcheck-42";

/// Whether `needle` occurs in `text` not as part of a longer run of the
/// same kind (a 6-digit code inside a timestamp is not the code).
fn occurs(text: &str, needle: &str) -> bool {
    let digits = needle.bytes().all(|b| b.is_ascii_digit());
    text.match_indices(needle).any(|(at, _)| {
        if !digits {
            return true;
        }
        let before = text[..at].bytes().last();
        let after = text[at + needle.len()..].bytes().next();
        !before.is_some_and(|b| b.is_ascii_digit()) && !after.is_some_and(|b| b.is_ascii_digit())
    })
}

#[tokio::test]
async fn no_secret_or_personal_data_reaches_a_log() -> Result {
    let mail = SmtpSink::start().await?;
    // An SMS provider in an outage: a code sent by SMS dies.
    let sms = TestSms::start(SMS_SECRET, true).await?;
    let wechat = TestWechat::start("wx-leak-app", WX_SECRET).await?;
    let c = standard()
        .cell_config(&format!(
            "{}[[notice.sms]]\nname = \"down\"\nurl = {:?}\nsecret = {SMS_SECRET:?}\n\
         [wechat]\nbase_url = {:?}\nappid = \"wx-leak-app\"\nsecret = {WX_SECRET:?}\n\
         [payments.testpay]\nsecret = {PAY_SECRET:?}\n",
            mail.cell_config(),
            sms.url(),
            wechat.base_url()
        ))
        .start()
        .await?;
    c.cli_ok(&["config", "set", "notice.outbox.max_attempts", "1"])?;
    let cn = Api::new(&c.router_url(0), "cn-east");
    let email = "private.person@leak-check.test";
    let phone = "+8613877770001";

    // Registration, a failed and a good login, the profile, an address.
    assert_eq!(cn.register(email, PW).await?.status, StatusCode::CREATED);
    assert_eq!(cn.register(phone, PW).await?.status, StatusCode::CREATED);
    cn.login(email, "a wrong secret guess").await?;
    let (me, login) = cn.signed_in(email, PW).await?;
    let access = login["access_token"].as_str().unwrap().to_string();
    let refresh = login["refresh_token"].as_str().unwrap().to_string();
    let user_id = login["user_id"].as_str().unwrap().to_string();
    let addr = json!({"recipient": "Private Person", "phone": phone, "line1": "1 Secret Road",
                      "city": "C", "country": "CN", "is_default": true});
    assert_eq!(
        me.post("/v1/users/me/addresses", addr).await?.status,
        StatusCode::CREATED
    );
    me.get(&format!("/v1/users/{user_id}")).await?;
    me.get("/v1/users/me").await?;
    me.get("/v1/notices").await?;
    // Money: a signed deposit, a transfer to the other account.
    let r = cn
        .provider_deposit("testpay", PAY_SECRET, "leak-evt-1", &user_id, 500)
        .await?;
    assert!(r.status.is_success(), "{r:?}");
    let (_, other) = cn.signed_in(phone, PW).await?;
    let r = me
        .transfer(
            "0193f9b2-7c1a-7c3e-9f00-00000000a001",
            json!({"to_user_id": other["user_id"], "amount": 100, "currency": "CNY"}),
        )
        .await?;
    assert!(r.status.is_success(), "{r:?}");
    // A refresh, a reset by code, the old tokens refused.
    let r = cn
        .post("/v1/auth/refresh", json!({"refresh_token": refresh}))
        .await?;
    assert_eq!(r.status, StatusCode::OK);
    let next_refresh = r.body["refresh_token"].as_str().unwrap().to_string();
    cn.post("/v1/auth/password/reset", json!({"identifier": email}))
        .await?;
    let m = mail
        .wait_for(email, "Your code is", Duration::from_secs(15))
        .await?;
    let at = m.find("Your code is ").unwrap() + "Your code is ".len();
    let code = m[at..at + 6].to_string();
    let r = cn
        .call(
            Method::PUT,
            "/v1/auth/password/reset",
            Some(json!({"identifier": email, "code": code, "new_password": NEW_PW})),
            &[],
        )
        .await?;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    me.get("/v1/users/me").await?;
    cn.post("/v1/auth/refresh", json!({"refresh_token": next_refresh}))
        .await?;
    // A path that carries an identifier, and a session id.
    me.get(&format!("/v1/users/{email}")).await?;
    cn.login(email, NEW_PW).await?;

    // WeChat: a sign-in, the same code again (WeChat refuses it), junk.
    let mp = cn.as_client("mp");
    let r = mp
        .post("/v1/auth/wechat", json!({"code": "code-leaky-1"}))
        .await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    mp.post("/v1/auth/wechat", json!({"code": "code-leaky-1"}))
        .await?;
    mp.post("/v1/auth/wechat", json!({"code": "junk-leaky-code"}))
        .await?;
    // A reset by SMS, whose delivery dies with the provider down.
    cn.post("/v1/auth/password/reset", json!({"identifier": phone}))
        .await?;
    let admin_ident = "leak-admin@leak-check.test";
    cn.register(admin_ident, PW).await?;
    let out = c.cell_command(
        "cn-east",
        &["grant-role", "--identifier", admin_ident, "--role", "admin"],
    )?;
    assert!(out.success, "{}", out.stderr);
    let admin = cn.as_client("cms").signed_in(admin_ident, PW).await?.0;
    let deadline = Instant::now() + Duration::from_secs(20);
    let dead_view = loop {
        let r = admin.get("/v1/cms/outbox/dead").await?;
        let sms_dead = r.body["items"]
            .as_array()
            .is_some_and(|a| a.iter().any(|d| d["channel"] == "sms"));
        if sms_dead {
            break r.body.to_string();
        }
        assert!(Instant::now() < deadline, "no dead SMS: {}", r.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(sms.attempts() >= 1, "the SMS provider was never asked");

    // Every route of the API, with the values in its path, query and body.
    let doc = cn.get("/v1/openapi.json").await?;
    let body = json!({
        "identifier": email, "password": NEW_PW, "new_password": PW, "code": code,
        "refresh_token": next_refresh, "display_name": "Private Person",
        "phone": phone, "email": email, "recipient": "Private Person",
        "line1": "1 Secret Road", "to_user_id": user_id, "amount": 1,
        "currency": "CNY", "title": "Private Person", "text": "1 Secret Road",
    });
    let mut swept = 0;
    for (path, item) in doc.body["paths"].as_object().expect("paths") {
        for method in ["get", "post", "put", "patch", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            let mut concrete = String::new();
            for part in path.split('/').filter(|p| !p.is_empty()) {
                concrete.push('/');
                concrete.push_str(if part.starts_with('{') { email } else { part });
            }
            let target = format!("{concrete}?cursor={email}&limit=5");
            let method = Method::from_bytes(method.to_uppercase().as_bytes())?;
            let with_body = method != Method::GET;
            me.call(method, &target, with_body.then(|| body.clone()), &[])
                .await?;
            swept += 1;
        }
    }
    assert!(swept > 40, "only {swept} routes in the OpenAPI document");

    // Give the processes a moment to write what they log.
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut logs = String::new();
    for entry in std::fs::read_dir(c.root.join("logs"))? {
        logs.push_str(&std::fs::read_to_string(entry?.path())?);
    }
    assert!(logs.lines().count() > 20, "the processes logged little");
    let values = [
        ("the email", email),
        ("the email's local part", "private.person"),
        ("the phone", phone),
        ("the password", PW),
        ("the new password", NEW_PW),
        ("the access token", access.as_str()),
        ("the refresh token", refresh.as_str()),
        ("the rotated refresh token", next_refresh.as_str()),
        ("the reset code", code.as_str()),
        ("the provider secret", PAY_SECRET),
        ("the recipient's name", "Private Person"),
        ("the address", "1 Secret Road"),
        ("the SMS provider's secret", SMS_SECRET),
        ("WeChat's AppSecret", WX_SECRET),
        ("a WeChat login code", "code-leaky-1"),
        ("a junk WeChat login code", "junk-leaky-code"),
        ("a WeChat session key", "sk-leaky-secret"),
        ("a WeChat openid", "o-leaky"),
    ];
    for (what, value) in values {
        assert!(!occurs(&logs, value), "{what} reached a log");
        assert!(
            !occurs(&dead_view, value),
            "{what} is in the dead-letter view"
        );
    }
    for text in ["password reset code", "Your code is"] {
        assert!(
            !dead_view.contains(text),
            "a message in the dead-letter view"
        );
    }
    Ok(())
}
