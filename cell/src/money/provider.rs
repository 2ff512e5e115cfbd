//! Payment providers: the signed deposit callback, and payouts.
//!
//! Deposits: the provider POSTs JSON to `/v1/payments/{provider}/callback`,
//! signed with `x-homecell-signature` as `homecell_common::webhook`
//! describes, under a secret shared with that provider. A bad signature or
//! a stale timestamp is refused; a genuine repeat is harmless because the
//! deposit's id derives from the provider's `event_id`.
//!
//! Payouts (withdrawals): the cell POSTs `{payout_id, amount, currency,
//! user_id}` to the provider's `payout_url` (`https://` outside tests),
//! signed the same way. The provider answers `{"payout_id", "status":
//! "succeeded" | "failed" | "processing", "reason"?}`, signed the same way
//! with the same secret; only such an answer, naming this payout, with a
//! 2xx, decides (redirects are not followed). A 409 means the
//! provider knows the payout already: the cell then POSTs `{payout_id}` to
//! `<payout_url>/status` for the same signed answer. Anything else (a
//! timeout, a 5xx, "processing", an unsigned or unverifiable answer) is
//! undecided, and the payout is asked again with the same `payout_id`, which
//! the provider deduplicates. An undecided payout is never voided
//! (withdrawal.rs): a provider that paid and whose answer was lost would
//! otherwise pay the user twice.

use homecell_common::webhook;
use homecell_proto::error::{CodedError, ErrorCode};
use std::collections::BTreeMap;

pub const SIGNATURE_HEADER: &str = "x-homecell-signature";

/// One provider's settings in the cell config (`[payments.<name>]`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// A file holding the shared secret (preferred: keeps it out of the config).
    #[serde(default)]
    pub secret_file: Option<std::path::PathBuf>,
    /// The shared secret itself, for development.
    #[serde(default)]
    pub secret: Option<String>,
    /// Where payouts are requested (`https://`; `http://` only with
    /// `allow_http_providers`); without it, this provider only sends
    /// deposits.
    #[serde(default)]
    pub payout_url: Option<String>,
}

struct Provider {
    key: ring::hmac::Key,
    payout_url: Option<String>,
}

/// The providers a cell accepts callbacks from and pays out through, by name.
#[derive(Clone, Default)]
pub struct Providers {
    by_name: std::sync::Arc<BTreeMap<String, Provider>>,
    http: reqwest::Client,
}

/// `<payout_url>/status`, built as a path (load refuses a payout URL with
/// a query or fragment).
fn status_url(payout_url: &str) -> Option<String> {
    let mut url = reqwest::Url::parse(payout_url).ok()?;
    url.path_segments_mut().ok()?.pop_if_empty().push("status");
    Some(url.to_string())
}

/// An answer larger than this is not a payout answer.
const MAX_ANSWER: usize = 64 * 1024;

/// What one request to the provider came to.
enum Asked {
    Answer(Payout),
    /// 409: the provider has this payout already (ask its status).
    Known,
}

/// What a payout request came back with.
#[derive(Debug, PartialEq, Eq)]
pub enum Payout {
    Succeeded,
    /// Definitive: the money goes back to the wallet.
    Failed(String),
    /// Not decided yet, not reachable, or not said in a verified answer:
    /// ask again later; never a reason to give the money back.
    Undecided(String),
}

impl Providers {
    pub fn load(config: &BTreeMap<String, ProviderConfig>) -> anyhow::Result<Self> {
        let mut keys = BTreeMap::new();
        for (name, c) in config {
            let secret = match (&c.secret, &c.secret_file) {
                (Some(s), None) => s.clone(),
                (None, Some(f)) => std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("payments.{name}.secret_file: {e}"))?
                    .trim()
                    .to_string(),
                _ => anyhow::bail!("payments.{name}: set exactly one of secret, secret_file"),
            };
            if secret.len() < 16 {
                anyhow::bail!("payments.{name}: the secret must be at least 16 characters");
            }
            if let Some(url) = &c.payout_url {
                let parsed = reqwest::Url::parse(url)
                    .map_err(|e| anyhow::anyhow!("payments.{name}.payout_url: {e}"))?;
                if !["http", "https"].contains(&parsed.scheme())
                    || parsed.query().is_some()
                    || parsed.fragment().is_some()
                    || parsed.cannot_be_a_base()
                {
                    anyhow::bail!(
                        "payments.{name}.payout_url must be an http(s) URL without a query or fragment"
                    );
                }
            }
            keys.insert(
                name.clone(),
                Provider {
                    key: webhook::key(&secret),
                    payout_url: c.payout_url.clone(),
                },
            );
        }
        // No redirects: an answer is the endpoint's own, and a redirect
        // could lead off https.
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .connect_timeout(std::time::Duration::from_secs(3))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            by_name: std::sync::Arc::new(keys),
            http,
        })
    }

    /// True if `name` is a provider that takes payout requests.
    pub fn pays_out(&self, name: &str) -> bool {
        self.by_name
            .get(name)
            .is_some_and(|p| p.payout_url.is_some())
    }

    /// Asks `provider` to pay out; the same `payout_id` may be asked again.
    /// A 409 (the provider knows this payout already) is followed by asking
    /// its status.
    pub async fn payout(
        &self,
        provider: &str,
        payout_id: &str,
        user_id: &str,
        amount: i64,
        currency: &str,
    ) -> Payout {
        let Some((p, url)) = self
            .by_name
            .get(provider)
            .and_then(|p| Some((p, p.payout_url.as_ref()?)))
        else {
            return Payout::Undecided(format!("{provider} takes no payouts"));
        };
        let body = serde_json::json!({
            "payout_id": payout_id,
            "amount": amount,
            "currency": currency,
            "user_id": user_id,
        });
        match self.ask(provider, p, url, &body, payout_id).await {
            Asked::Answer(answer) => answer,
            Asked::Known => {
                let Some(status_url) = status_url(url) else {
                    return Payout::Undecided(format!("{provider}: no status URL"));
                };
                let body = serde_json::json!({ "payout_id": payout_id });
                match self.ask(provider, p, &status_url, &body, payout_id).await {
                    Asked::Answer(answer) => answer,
                    Asked::Known => Payout::Undecided(format!("{provider}: 409 to a status query")),
                }
            }
        }
    }

    /// One signed request to the provider and what its answer decides.
    /// Only an answer signed with the provider's secret, naming this payout,
    /// decides anything: anything else is undecided, never a failure, as
    /// voiding a payout the provider made would pay the user twice.
    async fn ask(
        &self,
        provider: &str,
        p: &Provider,
        url: &str,
        body: &serde_json::Value,
        payout_id: &str,
    ) -> Asked {
        let body = body.to_string();
        let now = crate::clock::now_ms() / 1000;
        let signature = webhook::sign_with(&p.key, body.as_bytes(), now);
        let resp = match self
            .http
            .post(url)
            .header("content-type", "application/json")
            .header(SIGNATURE_HEADER, signature)
            .body(body)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return Asked::Answer(Payout::Undecided(format!(
                    "{provider} unreachable: {}",
                    e.without_url()
                )));
            }
        };
        let status = resp.status();
        if status == reqwest::StatusCode::CONFLICT {
            return Asked::Known;
        }
        let undecided =
            |why: String| Asked::Answer(Payout::Undecided(format!("{provider}: {why}")));
        // Only a 2xx carries a decision: a 4xx may be about this request
        // (a repeat, a malformed field), not about the payout.
        if !status.is_success() {
            return undecided(format!("answered {status}"));
        }
        let signature = resp
            .headers()
            .get(SIGNATURE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = match resp.bytes().await {
            Ok(b) if b.len() <= MAX_ANSWER => b,
            Ok(_) => return undecided("answer too large".into()),
            Err(e) => return undecided(format!("unreadable answer: {}", e.without_url())),
        };
        let Some(signature) = signature else {
            return undecided(format!("unsigned answer ({status})"));
        };
        let now = crate::clock::now_ms() / 1000;
        if let Err(why) = webhook::verify(&p.key, &signature, &bytes, now) {
            return undecided(format!("answer not verified: {why}"));
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            payout_id: String,
            status: String,
            #[serde(default)]
            reason: Option<String>,
        }
        let a = match serde_json::from_slice::<Answer>(&bytes) {
            Ok(a) => a,
            Err(e) => return undecided(format!("unreadable answer: {e}")),
        };
        if a.payout_id != payout_id {
            return undecided("an answer about another payout".into());
        }
        Asked::Answer(match a.status.as_str() {
            "succeeded" => Payout::Succeeded,
            "failed" => Payout::Failed(
                a.reason
                    .unwrap_or_else(|| format!("{provider} declined the payout")),
            ),
            other => Payout::Undecided(format!("{provider}: {other}")),
        })
    }

    /// Checks the signature of a callback body; `now` in unix seconds.
    pub fn verify(
        &self,
        provider: &str,
        header: Option<&str>,
        body: &[u8],
        now: i64,
    ) -> Result<(), CodedError> {
        let key = &self
            .by_name
            .get(provider)
            .ok_or_else(|| CodedError::not_found("no such payment provider"))?
            .key;
        let header = header
            .ok_or_else(|| CodedError::new(ErrorCode::Unauthenticated, "missing signature"))?;
        webhook::verify(key, header, body, now)
            .map_err(|m| CodedError::new(ErrorCode::Unauthenticated, m))
    }
}

/// A notification as its provider sent it: the raw body and its signature
/// header, what a cell passes on to the user's home.
#[derive(Debug, Clone)]
pub struct Signed {
    pub body: axum::body::Bytes,
    pub signature: String,
}

/// A deposit notification's body.
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
pub struct Deposit {
    /// The provider's id of this event: repeats carry the same one.
    pub event_id: String,
    /// `deposit.succeeded`; other types are acknowledged and ignored.
    #[serde(rename = "type")]
    pub kind: String,
    pub user_id: String,
    pub amount: i64,
    pub currency: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_url_is_a_path_below_the_payout_url() {
        assert_eq!(
            status_url("https://pay.example/v1/payouts").as_deref(),
            Some("https://pay.example/v1/payouts/status")
        );
        assert_eq!(
            status_url("https://pay.example/v1/payouts/").as_deref(),
            Some("https://pay.example/v1/payouts/status")
        );
        let mut c = BTreeMap::new();
        c.insert(
            "q".to_string(),
            ProviderConfig {
                secret: Some("0123456789abcdef-secret".into()),
                secret_file: None,
                payout_url: Some("https://pay.example/payouts?acct=1".into()),
            },
        );
        assert!(Providers::load(&c).is_err(), "a query is refused");
    }

    #[test]
    fn providers_are_named_and_secrets_checked() {
        let mut c = BTreeMap::new();
        let cfg = |s: &str| ProviderConfig {
            secret: Some(s.into()),
            secret_file: None,
            payout_url: None,
        };
        c.insert("testpay".to_string(), cfg("0123456789abcdef-secret"));
        let p = Providers::load(&c).unwrap();
        let body = br#"{"event_id":"e1"}"#;
        let h = webhook::sign("0123456789abcdef-secret", body, 1000);
        assert!(p.verify("testpay", Some(&h), body, 1000).is_ok());
        assert_eq!(
            p.verify("nopay", Some(&h), body, 1000).unwrap_err().code,
            ErrorCode::NotFound
        );
        assert!(p.verify("testpay", None, body, 1000).is_err());
        c.insert("weak".to_string(), cfg("short"));
        assert!(Providers::load(&c).is_err());
    }
}
