//! Notices end to end: mail at a real SMTP server, SMS failover between two
//! providers, retries into the dead-letter queue and a re-drive, live events
//! through the router, messages across cells, preferences, templates and
//! hostile input.

use homecell_harness::api::Api;
use homecell_harness::provider::TestSms;
use homecell_harness::smtp::SmtpSink;
use homecell_harness::{Cluster, standard};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

type Result<T = ()> = anyhow::Result<T>;

const PW: &str = "correct horse battery";
const SMS_SECRET: &str = "sms-provider-secret-0123456789";
const PAY_SECRET: &str = "testpay-shared-secret-0123456789";

async fn cluster(extra: &str) -> Result<Cluster> {
    let c = standard()
        .cell_config(&format!(
            "{extra}[payments.testpay]\nsecret = {PAY_SECRET:?}\n"
        ))
        .start()
        .await?;
    Ok(c)
}

/// A cms session of a fresh admin of `region`'s cell.
async fn admin(c: &Cluster, api: &Api, ident: &str) -> Result<Api> {
    api.register(ident, PW).await?;
    let region = api.region.clone();
    let out = c.cell_command(
        &region,
        &["grant-role", "--identifier", ident, "--role", "admin"],
    )?;
    anyhow::ensure!(out.success, "{}", out.stderr);
    Ok(api.as_client("cms").signed_in(ident, PW).await?.0)
}

async fn eventually<F, Fut>(what: &str, mut f: F) -> Result<Value>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<Value>>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn inbox_has(api: &Api, needle: &str) -> Result<Value> {
    eventually(needle, || async {
        let r = api.get("/v1/notices").await?;
        Ok(r.body.to_string().contains(needle).then_some(r.body))
    })
    .await
}

#[tokio::test]
async fn mail_inbox_preferences_and_templates() -> Result {
    let mail = SmtpSink::start().await?;
    let c = cluster(&mail.cell_config()).await?;
    let cn = Api::new(&c.router_url(0), "cn-east");
    let root = admin(&c, &cn, "root@example.com").await?;

    // An operator's template with a variable; hostile content in it is
    // escaped in the HTML part and nothing else changes.
    let t = json!({"category": "account", "subject": "Welcome", "body": "Hi {{display_name}}, welcome aboard."});
    let r = root
        .call(
            Method::PUT,
            "/v1/cms/templates/user.welcome/email/en",
            Some(t),
            &[],
        )
        .await?;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    let r = cn
        .post(
            "/v1/auth/register",
            json!({"identifier": "eve@example.com", "password": PW, "display_name": "<script>alert('x')</script>"}),
        )
        .await?;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let m = mail
        .wait_for("eve@example.com", "welcome aboard", Duration::from_secs(15))
        .await?;
    // The plain-text part carries the text as is; the HTML part escapes it.
    let html = &m[m.find("Content-Type: text/html").expect("an HTML part")..];
    assert!(
        html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"),
        "{m}"
    );
    assert!(
        !html.contains("<script>"),
        "raw markup in the HTML part:\n{m}"
    );

    // Bad templates are refused whole.
    for (path, body) in [
        (
            "/v1/cms/templates/user.welcome/email/en",
            json!({"category": "account", "body": "Hi {{name"}),
        ),
        (
            "/v1/cms/templates/user.welcome/fax/en",
            json!({"category": "account", "body": "x"}),
        ),
        (
            "/v1/cms/templates/user.welcome/email/en",
            json!({"category": "acc ount", "body": "x"}),
        ),
        (
            "/v1/cms/templates/user.welcome/email/en",
            json!({"category": "account", "body": "{{Bad}}"}),
        ),
    ] {
        let r = root.call(Method::PUT, path, Some(body), &[]).await?;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.body);
    }
    let list = root.get("/v1/cms/templates").await?;
    assert!(list.body.to_string().contains("welcome aboard"));
    let plain = cn
        .as_client("cms")
        .signed_in("clerk@example.com", PW)
        .await?
        .0;
    assert_eq!(
        plain.get("/v1/cms/templates").await?.status,
        StatusCode::FORBIDDEN
    );

    // The inbox: the welcome, read, unread count, archive, delete.
    let (eve, login) = cn.signed_in("eve@example.com", PW).await?;
    let eve_id = login["user_id"].as_str().unwrap().to_string();
    let page = inbox_has(&eve, "Welcome").await?;
    let id = page["items"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(eve.get("/v1/notices/unread-count").await?.body["unread"], 1);
    let r = eve
        .post(&format!("/v1/notices/{id}/read"), json!({}))
        .await?;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(eve.get("/v1/notices/unread-count").await?.body["unread"], 0);
    // Someone else's item is not found, and nothing changes.
    let (mallory, _) = cn.signed_in("mallory@example.com", PW).await?;
    let r = mallory
        .call(Method::DELETE, &format!("/v1/notices/{id}"), None, &[])
        .await?;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = eve
        .post(&format!("/v1/notices/{id}/archive"), json!({}))
        .await?;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        eve.get("/v1/notices").await?.body["items"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let archived = eve.get("/v1/notices?archived=true").await?;
    assert_eq!(archived.body["items"].as_array().unwrap().len(), 1);
    let r = eve
        .call(Method::DELETE, &format!("/v1/notices/{id}"), None, &[])
        .await?;
    assert_eq!(r.status, StatusCode::NO_CONTENT);

    // Preferences: messages off in the inbox; money is critical and arrives.
    let prefs = json!({"preferences": [
        {"category": "message", "channel": "inbox", "enabled": false},
        {"category": "money", "channel": "inbox", "enabled": false},
    ]});
    let r = eve
        .call(Method::PUT, "/v1/notices/preferences", Some(prefs), &[])
        .await?;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    let bad = json!({"preferences": [{"category": "x", "channel": "pigeon", "enabled": false}]});
    let r = eve
        .call(Method::PUT, "/v1/notices/preferences", Some(bad), &[])
        .await?;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let msg = json!({"to_user_id": eve_id, "title": "Hello", "text": "muted message"});
    assert_eq!(
        root.post("/v1/cms/messages", msg).await?.status,
        StatusCode::ACCEPTED
    );
    cn.provider_deposit("testpay", PAY_SECRET, "n1", &eve_id, 250)
        .await?;
    inbox_has(&eve, "Your deposit of 250 CNY").await?;
    let all = eve.get("/v1/notices").await?;
    assert!(
        !all.body.to_string().contains("muted message"),
        "{}",
        all.body
    );

    // A first sign-in on another client type is a security notice (and
    // security ignores opt-outs).
    let (eve_web, _) = cn.as_client("web").signed_in("eve@example.com", PW).await?;
    inbox_has(&eve_web, "signed in on a new web client").await?;
    let r = eve
        .call(
            Method::PUT,
            "/v1/notices/preferences",
            Some(json!({"preferences": []})),
            &[],
        )
        .await?;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = root
        .call(
            Method::PUT,
            "/v1/cms/templates/user.welcome/email/english",
            Some(json!({"category": "account", "body": "x"})),
            &[],
        )
        .await?;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "an unknown locale: {}",
        r.body
    );

    // One call for the home screen; the mini-program's shows no identifiers.
    let mp = cn.as_client("mp").signed_in("eve@example.com", PW).await?.0;
    inbox_has(&eve, "signed in on a new mp client").await?;
    let short = mp.get("/v1/me").await?;
    assert_eq!(
        short.body["user"]["identifiers"],
        json!([]),
        "{}",
        short.body
    );
    let me = eve.get("/v1/me").await?;
    assert_eq!(me.status, StatusCode::OK, "{}", me.body);
    assert_eq!(me.body["user"]["id"], eve_id.as_str());
    assert_eq!(me.body["wallets"][0]["available"], 250);
    assert_eq!(
        me.body["user"]["identifiers"][0]["value"],
        "eve@example.com"
    );
    // The deposit, the web sign-in and the mini-program sign-in.
    assert_eq!(me.body["unread_notices"], 3, "{}", me.body);
    Ok(())
}

#[tokio::test]
async fn sms_fails_over_and_dead_letters_are_redriven() -> Result {
    let down = TestSms::start(SMS_SECRET, true).await?;
    let up = TestSms::start(SMS_SECRET, false).await?;
    // Mail goes to a port nobody listens on until the re-drive.
    let mail_port = homecell_harness::free_port();
    let extra = format!(
        "[notice]\nemail_from = \"Homecell <no-reply@homecell.test>\"\n[notice.smtp]\nhost = \"127.0.0.1\"\nport = {mail_port}\nsecurity = \"none\"\n\
         [[notice.sms]]\nname = \"down\"\nurl = {:?}\nsecret = {SMS_SECRET:?}\n\
         [[notice.sms]]\nname = \"up\"\nurl = {:?}\nsecret = {SMS_SECRET:?}\n",
        down.url(),
        up.url()
    );
    let c = cluster(&extra).await?;
    c.cli_ok(&["config", "set", "notice.outbox.max_attempts", "2"])?;
    let cn = Api::new(&c.router_url(0), "cn-east");
    let root = admin(&c, &cn, "root@example.com").await?;

    // A reset by phone: the first provider errors, the second delivers.
    cn.register("+8613800000001", PW).await?;
    let r = cn
        .post(
            "/v1/auth/password/reset",
            json!({"identifier": "+8613800000001"}),
        )
        .await?;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let sms = eventually("an SMS", || async {
        Ok(up
            .received()
            .into_iter()
            .find(|m| m["to"] == "+8613800000001"))
    })
    .await?;
    assert!(
        sms["text"]
            .as_str()
            .unwrap()
            .contains("password reset code")
    );
    assert!(
        down.attempts() >= 1,
        "the failing provider was not tried first"
    );

    // A reset by email with no SMTP server: retried, then dead.
    let dora = cn.register("dora@example.com", PW).await?;
    let dora_id = dora.body["user_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!dora_id.is_empty(), "{}", dora.body);
    cn.post(
        "/v1/auth/password/reset",
        json!({"identifier": "dora@example.com"}),
    )
    .await?;
    let dead = eventually("a dead letter", || async {
        let r = root.get("/v1/cms/outbox/dead").await?;
        Ok(r.body["items"]
            .as_array()
            .and_then(|a| a.iter().find(|d| d["channel"] == "email").cloned()))
    })
    .await?;
    assert_eq!(dead["attempts"], 2);
    assert!(
        dead.get("body").is_none(),
        "the DLQ view shows no message content"
    );
    let plain = cn
        .as_client("cms")
        .signed_in("clerk@example.com", PW)
        .await?
        .0;
    assert_eq!(
        plain.get("/v1/cms/outbox/dead").await?.status,
        StatusCode::FORBIDDEN
    );

    // Both of dora's letters (her welcome and her reset code) are dead
    // before the server comes up.
    let all = eventually("dora's two dead letters", || async {
        let r = root.get("/v1/cms/outbox/dead").await?;
        let items = r.body["items"].as_array().cloned().unwrap_or_default();
        let hers = items
            .iter()
            .filter(|d| d["user_id"] == dora_id.as_str())
            .count();
        Ok((hers >= 2).then_some(serde_json::Value::Array(items)))
    })
    .await?;
    let all = all.as_array().cloned().unwrap_or_default();
    // The server comes up; re-driving the dead letters delivers them, all
    // but the reset code: a dead code keeps no text and is never sent
    // again (the user asks for a new one).
    let mail = SmtpSink::start_on(mail_port).await?;
    let (mut refused, mut requeued) = (0, Vec::new());
    for d in &all {
        let id = d["id"].as_str().unwrap();
        let r = root
            .post(&format!("/v1/cms/outbox/dead/{id}/redrive"), json!({}))
            .await?;
        match r.status {
            StatusCode::NO_CONTENT => requeued.push(id.to_string()),
            StatusCode::CONFLICT => {
                assert_eq!(r.code(), "failed_precondition", "{}", r.body);
                refused += 1;
            }
            other => panic!("re-drive answered {other}: {}", r.body),
        }
    }
    assert_eq!(refused, 1, "exactly the reset code is refused: {all:?}");
    mail.wait_for("dora@example.com", "Welcome", Duration::from_secs(15))
        .await?;
    // A new code reaches her at once.
    cn.post(
        "/v1/auth/password/reset",
        json!({"identifier": "dora@example.com"}),
    )
    .await?;
    mail.wait_for("dora@example.com", "Your code is", Duration::from_secs(15))
        .await?;
    let id = requeued.first().expect("something was re-driven").clone();
    let again = root
        .post(&format!("/v1/cms/outbox/dead/{id}/redrive"), json!({}))
        .await?;
    assert_eq!(
        again.status,
        StatusCode::NOT_FOUND,
        "only dead letters re-drive"
    );
    Ok(())
}

#[tokio::test]
async fn live_events_through_the_router_and_messages_across_cells() -> Result {
    let c = cluster("").await?;
    let cn = Api::new(&c.router_url(0), "cn-east");
    let eu = Api::new(&c.router_url(0), "eu-west");
    let root = admin(&c, &cn, "root@example.com").await?;
    let (zoe, login) = eu.signed_in("zoe@example.com", PW).await?;
    let zoe_id = login["user_id"].as_str().unwrap().to_string();

    // Zoe (eu-west) listens through the router. The stream's header comes
    // at once, not with the first event or the 15 s keep-alive.
    let opened = Instant::now();
    let mut stream = c
        .http()
        .get(format!("{}/v1/notices/stream", c.router_url(0)))
        .header("x-client-type", "app")
        .bearer_auth(zoe.token.as_deref().unwrap())
        .timeout(Duration::from_secs(30))
        .send()
        .await?;
    assert_eq!(stream.status(), StatusCode::OK);
    assert!(
        opened.elapsed() < Duration::from_secs(10),
        "the stream opened only after {:?}",
        opened.elapsed()
    );
    assert!(
        stream
            .headers()
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap_or("").starts_with("text/event-stream"))
    );

    // A cn-east operator messages her: cell to cell, then live to her.
    let msg = json!({"to_user_id": zoe_id, "title": "Hello from the east", "text": "across cells"});
    let r = root.post("/v1/cms/messages", msg).await?;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert_eq!(r.body["region"], "eu-west");
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !seen.contains("across cells") {
        let left = deadline.saturating_duration_since(Instant::now());
        anyhow::ensure!(!left.is_zero(), "no live event; got {seen:?}");
        if let Ok(Some(chunk)) = tokio::time::timeout(left, stream.chunk()).await? {
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    assert!(seen.contains("event: notice"), "{seen}");
    inbox_has(&zoe, "Hello from the east").await?;

    // Bad messages change nothing.
    for bad in [
        json!({"to_user_id": zoe_id, "title": "", "text": "x"}),
        json!({"to_user_id": zoe_id, "title": "x"}),
    ] {
        let r = root.post("/v1/cms/messages", bad).await?;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    }
    let r = root
        .post(
            "/v1/cms/messages",
            json!({"to_user_id": "0190c0de-0000-7000-8000-000000000000", "title": "x", "text": "y"}),
        )
        .await?;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    Ok(())
}

#[tokio::test]
async fn broadcasts_reach_a_segment_once() -> Result {
    let c = cluster("").await?;
    c.cli_ok(&["config", "set", "notice.broadcast.per_second", "2"])?;
    let cn = Api::new(&c.router_url(0), "cn-east");
    let root = admin(&c, &cn, "root@example.com").await?;
    let mut users = Vec::new();
    for i in 0..4 {
        users.push(cn.signed_in(&format!("fan{i}@example.com"), PW).await?.0);
    }

    // Bad requests queue nothing.
    let missing = json!({"template_key": "message", "variables": {"title": "no text"}});
    let r = root.post("/v1/cms/broadcasts", missing).await?;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(r.body.to_string().contains("text is missing"), "{}", r.body);
    let r = root
        .post("/v1/cms/broadcasts", json!({"template_key": "no.such.key"}))
        .await?;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = root
        .post("/v1/cms/broadcasts", json!({"template_key": "message", "variables": {"title": "a", "text": "b"}, "role": "pirate"}))
        .await?;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(root.get("/v1/cms/broadcasts").await?.body, json!([]));

    // To admins only, then to everyone, paced at 2 users a second.
    let to_admins = json!({"template_key": "message", "variables": {"title": "Admins", "text": "for admins"}, "role": "admin"});
    assert_eq!(
        root.post("/v1/cms/broadcasts", to_admins).await?.status,
        StatusCode::ACCEPTED
    );
    let everyone = json!({"template_key": "message", "variables": {"title": "Everyone", "text": "maintenance tonight"}});
    assert_eq!(
        root.post("/v1/cms/broadcasts", everyone).await?.status,
        StatusCode::ACCEPTED
    );
    for u in &users {
        inbox_has(u, "maintenance tonight").await?;
        let inbox = u.get("/v1/notices").await?;
        assert!(!inbox.body.to_string().contains("for admins"));
        let n = inbox
            .body
            .to_string()
            .matches("maintenance tonight")
            .count();
        assert_eq!(n, 1, "{}", inbox.body);
    }
    let (root_app, _) = cn.signed_in("root@example.com", PW).await?;
    inbox_has(&root_app, "for admins").await?;
    let list = root.get("/v1/cms/broadcasts").await?;
    let all: Vec<Value> = list.body.as_array().unwrap().clone();
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|b| b["done_at"].is_i64()), "{all:?}");
    // root and the four fans: five users got "Everyone".
    assert_eq!(all[0]["queued"], 5);
    Ok(())
}

#[tokio::test]
async fn pending_mail_survives_a_cell_restart() -> Result {
    // Mail cannot be delivered yet: the SMTP server is not up.
    let mail_port = homecell_harness::free_port();
    let extra = format!(
        "[notice]\nemail_from = \"Homecell <no-reply@homecell.test>\"\n[notice.smtp]\nhost = \"127.0.0.1\"\nport = {mail_port}\nsecurity = \"none\"\n"
    );
    let mut c = cluster(&extra).await?;
    let cn = Api::new(&c.router_url(0), "cn-east");
    let r = cn.register("ray@example.com", PW).await?;
    assert_eq!(r.status, StatusCode::CREATED);
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.kill_cell("cn-east");
    let mail = SmtpSink::start_on(mail_port).await?;
    c.cell_mut("cn-east").unwrap().process.take();
    c.start_cell("cn-east").await?;
    mail.wait_for("ray@example.com", "Welcome", Duration::from_secs(30))
        .await?;
    Ok(())
}
