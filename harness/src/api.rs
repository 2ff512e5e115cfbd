//! A small typed client for the public API through a router, for tests and
//! benchmarks.

use anyhow::{Context, Result};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// A client for one router, addressing one region (via `x-home-region`,
/// the foundation's routing key).
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub region: String,
    pub client_type: String,
    pub token: Option<String>,
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    /// The problem code of an error answer.
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl Api {
    pub fn new(base: &str, region: &str) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()
                .expect("client"),
            base: base.to_string(),
            region: region.to_string(),
            client_type: "app".into(),
            token: None,
        }
    }

    pub fn with_token(&self, token: &str) -> Self {
        Self {
            token: Some(token.to_string()),
            ..self.clone()
        }
    }

    pub fn as_client(&self, client_type: &str) -> Self {
        Self {
            client_type: client_type.to_string(),
            ..self.clone()
        }
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        extra: &[(&str, &str)],
    ) -> Result<Reply> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("x-home-region", &self.region)
            .header("x-client-type", &self.client_type);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.context("request failed")?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    pub async fn get(&self, path: &str) -> Result<Reply> {
        self.call(Method::GET, path, None, &[]).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Reply> {
        self.call(Method::POST, path, Some(body), &[]).await
    }

    pub async fn register(&self, identifier: &str, password: &str) -> Result<Reply> {
        self.post(
            "/v1/auth/register",
            json!({"identifier": identifier, "password": password}),
        )
        .await
    }

    pub async fn login(&self, identifier: &str, password: &str) -> Result<Reply> {
        self.post(
            "/v1/auth/login",
            json!({"identifier": identifier, "password": password}),
        )
        .await
    }

    /// Registers (if needed) and logs in; returns an API carrying the token
    /// and the login answer.
    pub async fn signed_in(&self, identifier: &str, password: &str) -> Result<(Api, Value)> {
        let r = self.register(identifier, password).await?;
        anyhow::ensure!(
            r.status == StatusCode::CREATED || r.status == StatusCode::CONFLICT,
            "register: {} {}",
            r.status,
            r.body
        );
        let l = self.login(identifier, password).await?;
        anyhow::ensure!(l.status == StatusCode::OK, "login: {} {}", l.status, l.body);
        let token = l.body["access_token"]
            .as_str()
            .context("no token")?
            .to_string();
        Ok((self.with_token(&token), l.body))
    }

    /// `POST /v1/wallet/transfers` with an `Idempotency-Key`.
    pub async fn transfer(&self, key: &str, body: Value) -> Result<Reply> {
        self.call(
            Method::POST,
            "/v1/wallet/transfers",
            Some(body),
            &[("idempotency-key", key)],
        )
        .await
    }

    /// Available balance in `currency` (0 without a wallet).
    pub async fn available(&self, currency: &str) -> Result<i64> {
        let r = self.get("/v1/wallet").await?;
        anyhow::ensure!(
            r.status == StatusCode::OK,
            "wallet: {} {}",
            r.status,
            r.body
        );
        Ok(r.body["wallets"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|w| w["currency"] == currency)
            .and_then(|w| w["available"].as_i64())
            .unwrap_or(0))
    }

    /// A payment provider's signed deposit notification for `user_id`.
    pub async fn provider_deposit(
        &self,
        provider: &str,
        secret: &str,
        event_id: &str,
        user_id: &str,
        amount: i64,
    ) -> Result<Reply> {
        let body = serde_json::to_vec(&json!({
            "event_id": event_id,
            "type": "deposit.succeeded",
            "user_id": user_id,
            "amount": amount,
            "currency": "CNY",
        }))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs() as i64;
        let signature = homecell_common::webhook::sign(secret, &body, now);
        let resp = self
            .http
            .post(format!("{}/v1/payments/{provider}/callback", self.base))
            .header("x-home-region", &self.region)
            .header("content-type", "application/json")
            .header("x-homecell-signature", signature)
            .body(body)
            .send()
            .await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.json().await.unwrap_or(Value::Null);
        Ok(Reply {
            status,
            headers,
            body,
        })
    }
}
