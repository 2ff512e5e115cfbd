//! WeChat mini-program login through the router, against a local server
//! that speaks code2session.

use homecell_harness::api::Api;
use homecell_harness::provider::TestWechat;
use homecell_harness::standard;
use reqwest::StatusCode;
use serde_json::json;

type Result<T = ()> = anyhow::Result<T>;

#[tokio::test]
async fn mini_program_sign_up_and_sign_in() -> Result {
    let wx = TestWechat::start("wx-app-1", "wx-secret-0123456789").await?;
    let c = standard()
        .cell_config(&format!(
            "[wechat]\nbase_url = {:?}\nappid = \"wx-app-1\"\nsecret = \"wx-secret-0123456789\"\n",
            wx.base_url()
        ))
        .start()
        .await?;
    let cn = Api::new(&c.router_url(0), "cn-east").as_client("mp");
    let eu = Api::new(&c.router_url(0), "eu-west").as_client("mp");

    // First sign-in creates the account; the session key never leaves.
    let r = cn
        .post("/v1/auth/wechat", json!({"code": "code-amy-1"}))
        .await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(!r.body.to_string().contains("sk-amy"), "{}", r.body);
    let amy = r.body["user_id"].as_str().unwrap().to_string();
    let me = cn
        .with_token(r.body["access_token"].as_str().unwrap())
        .get("/v1/users/me")
        .await?;
    assert_eq!(me.status, StatusCode::OK);

    // A code is good once; a new code signs in the same user.
    let again = cn
        .post("/v1/auth/wechat", json!({"code": "code-amy-1"}))
        .await?;
    assert_eq!(
        (again.status, again.code()),
        (StatusCode::UNAUTHORIZED, "invalid_credentials")
    );
    let r = cn
        .post("/v1/auth/wechat", json!({"code": "code-amy-2"}))
        .await?;
    assert_eq!(r.body["user_id"], amy.as_str());

    // Bad input: junk codes, another client type, an empty code.
    let r = cn.post("/v1/auth/wechat", json!({"code": "junk"})).await?;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = cn
        .as_client("app")
        .post("/v1/auth/wechat", json!({"code": "code-bob-1"}))
        .await?;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = cn.post("/v1/auth/wechat", json!({"code": ""})).await?;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // The openid has one home: another region makes no second user, and
    // says where the account lives (the code proved it is the caller's).
    let r = eu
        .post("/v1/auth/wechat", json!({"code": "code-amy-3"}))
        .await?;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "home_elsewhere"),
        "{}",
        r.body
    );
    assert_eq!(r.header("x-home-region"), Some("cn-east"));
    // The mini-program signs in there with a new code, as the same user.
    let r = cn
        .post("/v1/auth/wechat", json!({"code": "code-amy-4"}))
        .await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["user_id"], amy.as_str());
    Ok(())
}

/// A WeChat-only user has no password: it deletes its account with a
/// fresh login code of its own WeChat account (another's is refused), and
/// the openid is free for a new account after.
#[tokio::test]
async fn a_wechat_only_user_deletes_the_account_with_a_fresh_code() -> Result {
    let wx = TestWechat::start("wx-app-1", "wx-secret-0123456789").await?;
    let c = standard()
        .cell_config(&format!(
            "[wechat]\nbase_url = {:?}\nappid = \"wx-app-1\"\nsecret = \"wx-secret-0123456789\"\n",
            wx.base_url()
        ))
        .start()
        .await?;
    let cn = Api::new(&c.router_url(0), "cn-east").as_client("mp");
    let r = cn
        .post("/v1/auth/wechat", json!({"code": "code-cat-1"}))
        .await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let cat = r.body["user_id"].as_str().unwrap().to_string();
    let me = cn.with_token(r.body["access_token"].as_str().unwrap());
    let delete = |body: serde_json::Value| {
        let me = me.clone();
        async move {
            me.call(reqwest::Method::DELETE, "/v1/users/me", Some(body), &[])
                .await
        }
    };

    let r = delete(json!({"password": "a guess"})).await?;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "no password to give");
    let r = delete(json!({"wechat_code": "code-dan-1"})).await?;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "invalid_credentials"),
        "another WeChat account's code"
    );
    let r = delete(json!({"wechat_code": "code-cat-2", "password": "x"})).await?;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "one proof only");
    let r = delete(json!({"wechat_code": "code-cat-3"})).await?;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    assert_eq!(
        me.get("/v1/users/me").await?.status,
        StatusCode::UNAUTHORIZED
    );

    // The openid's claim went with the account: it signs up anew.
    let r = cn
        .post("/v1/auth/wechat", json!({"code": "code-cat-4"}))
        .await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_ne!(r.body["user_id"], cat.as_str());
    Ok(())
}
