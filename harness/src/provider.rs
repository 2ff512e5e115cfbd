//! A local stand-in for a payment provider's payout API, speaking the
//! protocol cells use (`cell/src/money/provider.rs`): signed JSON requests,
//! deduplicated by `payout_id`, and signed answers naming the payout. What
//! it answers depends on the amount, so a test can pick an outcome:
//! - ending in 3: declined;
//! - ending in 5: 503 to everything (the provider is down);
//! - ending in 7: "processing" for `PROCESSING` after it first sees the
//!   payout, then paid;
//! - ending in 9: paid at once, but the answer is lost (a 503), and every
//!   repeat is a 409 ("I know this payout"): only the status query says paid;
//! - anything else: paid.
//!
//! `POST /payouts/status` with `{payout_id}` answers the same signed shape.

use axum::response::{IntoResponse, Response};
use axum::{Router, body::Bytes, extract::State, http::HeaderMap, http::StatusCode, routing::post};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a payout of an amount ending in 7 stays "processing".
pub const PROCESSING: Duration = Duration::from_secs(4);

#[derive(Default)]
struct Ledger {
    /// payout_id → (amount, paid)
    payouts: HashMap<String, (i64, bool)>,
    /// payout_id → when it was first asked
    first_seen: HashMap<String, Instant>,
    requests: usize,
    status_queries: usize,
    /// How long amounts ending in 7 stay processing (`PROCESSING` unset).
    processing: Option<Duration>,
}

/// Serves `app` on a free loopback port until the test ends.
async fn serve(app: Router) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

pub struct TestProvider {
    pub addr: SocketAddr,
    ledger: Arc<Mutex<Ledger>>,
}

impl TestProvider {
    /// Starts on a free loopback port; it runs until the test ends.
    pub async fn start(secret: &str) -> anyhow::Result<Self> {
        let ledger: Arc<Mutex<Ledger>> = Arc::default();
        let key = homecell_common::webhook::key(secret);
        let app = Router::new()
            .route("/payouts", post(payout))
            .route("/payouts/status", post(status))
            .with_state((ledger.clone(), Arc::new(key)));
        let addr = serve(app).await?;
        Ok(Self { addr, ledger })
    }

    /// How long payouts of amounts ending in 7 stay processing from now
    /// on (counted from when each was first asked): a test holds one
    /// undecided as long as it needs, then lets it be paid.
    pub fn set_processing(&self, d: Duration) {
        self.ledger.lock().expect("poisoned").processing = Some(d);
    }

    pub fn payout_url(&self) -> String {
        format!("http://{}/payouts", self.addr)
    }

    /// Total paid out, each payout id counted once.
    pub fn paid(&self) -> i64 {
        let l = self.ledger.lock().expect("poisoned");
        l.payouts.values().filter(|(_, p)| *p).map(|(a, _)| a).sum()
    }

    pub fn requests(&self) -> usize {
        self.ledger.lock().expect("poisoned").requests
    }

    pub fn status_queries(&self) -> usize {
        self.ledger.lock().expect("poisoned").status_queries
    }
}

type AppState = (Arc<Mutex<Ledger>>, Arc<ring::hmac::Key>);

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// An answer signed as the provider signs its answers.
fn signed(key: &ring::hmac::Key, status: StatusCode, body: Value) -> Response {
    let body = body.to_string();
    let signature = homecell_common::webhook::sign_with(key, body.as_bytes(), now_secs());
    (
        status,
        [
            ("content-type", "application/json".to_string()),
            ("x-homecell-signature", signature),
        ],
        body,
    )
        .into_response()
}

/// The request's JSON, if its signature holds.
fn verified(key: &ring::hmac::Key, headers: &HeaderMap, body: &[u8]) -> Result<Value, StatusCode> {
    let sig = headers
        .get("x-homecell-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if homecell_common::webhook::verify(key, sig, body, now_secs()).is_err() {
        return Err(StatusCode::UNAUTHORIZED);
    }
    serde_json::from_slice::<Value>(body).map_err(|_| StatusCode::BAD_REQUEST)
}

/// Where a payout stands now, as the status query and repeats see it.
fn standing(l: &mut Ledger, id: &str) -> Option<&'static str> {
    let (amount, paid) = *l.payouts.get(id)?;
    if paid {
        return Some("succeeded");
    }
    if amount % 10 == 7
        && l.first_seen
            .get(id)
            .is_some_and(|t| t.elapsed() >= l.processing.unwrap_or(PROCESSING))
    {
        l.payouts.insert(id.to_string(), (amount, true));
        return Some("succeeded");
    }
    Some(if amount % 10 == 3 {
        "failed"
    } else {
        "processing"
    })
}

async fn payout(
    State((ledger, key)): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = match verified(&key, &headers, &body) {
        Ok(v) => v,
        Err(status) => return status.into_response(),
    };
    let id = req["payout_id"].as_str().unwrap_or("").to_string();
    let amount = req["amount"].as_i64().unwrap_or(0);
    let mut l = ledger.lock().expect("poisoned");
    l.requests += 1;
    let known = l.payouts.contains_key(&id);
    if amount % 10 == 5 {
        return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    if amount % 10 == 9 {
        if known {
            return (StatusCode::CONFLICT, "duplicate payout_id").into_response();
        }
        l.payouts.insert(id, (amount, true));
        return (StatusCode::SERVICE_UNAVAILABLE, "lost answer").into_response();
    }
    if !known {
        l.first_seen.insert(id.clone(), Instant::now());
        let paid = !matches!(amount % 10, 3 | 7);
        l.payouts.insert(id.clone(), (amount, paid));
    }
    let now = standing(&mut l, &id).unwrap_or("processing");
    let mut answer = json!({"payout_id": id, "status": now});
    if now == "failed" {
        answer["reason"] = json!("account closed");
    }
    signed(&key, StatusCode::OK, answer)
}

async fn status(
    State((ledger, key)): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = match verified(&key, &headers, &body) {
        Ok(v) => v,
        Err(status) => return status.into_response(),
    };
    let id = req["payout_id"].as_str().unwrap_or("").to_string();
    let mut l = ledger.lock().expect("poisoned");
    l.status_queries += 1;
    match standing(&mut l, &id) {
        Some(now) => signed(
            &key,
            StatusCode::OK,
            json!({"payout_id": id, "status": now}),
        ),
        None => signed(
            &key,
            StatusCode::NOT_FOUND,
            json!({"payout_id": id, "status": "unknown"}),
        ),
    }
}

/// A local SMS provider: `POST /sms` with `{id, to, text}`, signed like the
/// payment webhooks. A failing one answers 500 to everything, as a provider
/// in an outage does.
pub struct TestSms {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Value>>>,
    attempts: Arc<Mutex<usize>>,
}

type SmsState = (
    Arc<Mutex<Vec<Value>>>,
    Arc<Mutex<usize>>,
    Arc<ring::hmac::Key>,
    bool,
);

impl TestSms {
    pub async fn start(secret: &str, failing: bool) -> anyhow::Result<Self> {
        let received: Arc<Mutex<Vec<Value>>> = Arc::default();
        let attempts: Arc<Mutex<usize>> = Arc::default();
        let key = Arc::new(homecell_common::webhook::key(secret));
        let app = Router::new().route("/sms", post(sms)).with_state((
            received.clone(),
            attempts.clone(),
            key,
            failing,
        ));
        let addr = serve(app).await?;
        Ok(Self {
            addr,
            received,
            attempts,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}/sms", self.addr)
    }

    /// Messages accepted, as `{id, to, text}`.
    pub fn received(&self) -> Vec<Value> {
        self.received.lock().expect("poisoned").clone()
    }

    /// Requests seen, accepted or not.
    pub fn attempts(&self) -> usize {
        *self.attempts.lock().expect("poisoned")
    }
}

async fn sms(
    State((received, attempts, key, failing)): State<SmsState>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    *attempts.lock().expect("poisoned") += 1;
    if failing {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let sig = headers
        .get("x-homecell-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if homecell_common::webhook::verify(&key, sig, &body, now).is_err() {
        return StatusCode::UNAUTHORIZED;
    }
    match serde_json::from_slice::<Value>(&body) {
        Ok(v) => {
            received.lock().expect("poisoned").push(v);
            StatusCode::OK
        }
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

/// A local stand-in for WeChat's `code2session`: a code `code-<name>-<n>`
/// belongs to the openid `o-<name>`, is good once, and only with the right
/// appid and secret; anything else gets WeChat's error codes.
pub struct TestWechat {
    pub addr: SocketAddr,
}

impl TestWechat {
    pub async fn start(appid: &str, secret: &str) -> anyhow::Result<Self> {
        let used: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
        let creds = Arc::new((appid.to_string(), secret.to_string()));
        let app = Router::new()
            .route("/sns/jscode2session", axum::routing::get(code2session))
            .with_state((used, creds));
        let addr = serve(app).await?;
        Ok(Self { addr })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

type WechatState = (
    Arc<Mutex<std::collections::HashSet<String>>>,
    Arc<(String, String)>,
);

async fn code2session(
    State((used, creds)): State<WechatState>,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>,
) -> (StatusCode, String) {
    let get = |k: &str| q.get(k).map(String::as_str).unwrap_or("");
    // WeChat answers 200 with an errcode, and text/plain.
    let err = |code: i64, msg: &str| {
        (
            StatusCode::OK,
            json!({"errcode": code, "errmsg": msg}).to_string(),
        )
    };
    if get("appid") != creds.0 || get("secret") != creds.1 {
        return err(40125, "invalid appsecret");
    }
    if get("grant_type") != "authorization_code" {
        return err(40002, "invalid grant_type");
    }
    let code = get("js_code");
    let Some(name) = code
        .strip_prefix("code-")
        .and_then(|r| r.rsplit_once('-'))
        .map(|(n, _)| n)
    else {
        return err(40029, "invalid code");
    };
    if !used.lock().expect("poisoned").insert(code.to_string()) {
        return err(40163, "code been used");
    }
    (
        StatusCode::OK,
        json!({"openid": format!("o-{name}"), "session_key": format!("sk-{name}-secret")})
            .to_string(),
    )
}
