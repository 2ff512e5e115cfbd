//! WeChat mini-program login. The mini-program gets a one-time `code` from
//! `wx.login()`; the cell trades it at WeChat's `code2session`
//! (`GET {base_url}/sns/jscode2session?appid&secret&js_code&grant_type=
//! authorization_code`) for the user's `openid` and a `session_key`. The
//! session key stays here (it is not even stored: nothing we do needs it
//! yet); the client gets our own tokens. An openid signs in its bound user,
//! or creates one, claimed globally as `wechat:<openid>` so it has one home.

use super::service::{Identity, TokenPair};
use crate::clock::now_ms;
use homecell_proto::error::{CodedError, ErrorCode};
use std::time::Duration;

/// The cell config's `[wechat]` section.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WechatConfig {
    /// `https://api.weixin.qq.com` in production.
    pub base_url: String,
    pub appid: String,
    /// A file holding the mini-program's AppSecret.
    #[serde(default)]
    pub secret_file: Option<std::path::PathBuf>,
    /// The AppSecret itself, for development.
    #[serde(default)]
    pub secret: Option<String>,
}

pub struct Wechat {
    base_url: String,
    appid: String,
    secret: String,
    http: reqwest::Client,
}

#[derive(serde::Deserialize)]
struct Session {
    #[serde(default)]
    openid: Option<String>,
    #[serde(default)]
    errcode: i64,
}

impl Wechat {
    pub fn new(c: &WechatConfig) -> anyhow::Result<Self> {
        if !(c.base_url.starts_with("http://") || c.base_url.starts_with("https://")) {
            anyhow::bail!("wechat.base_url must be an http(s) URL");
        }
        let secret = match (&c.secret, &c.secret_file) {
            (Some(s), None) => s.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)?.trim().to_string(),
            _ => anyhow::bail!("wechat: set exactly one of secret, secret_file"),
        };
        Ok(Self {
            base_url: c.base_url.trim_end_matches('/').to_string(),
            appid: c.appid.clone(),
            secret,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
        })
    }

    /// The openid behind a login code.
    async fn openid(&self, code: &str) -> Result<String, CodedError> {
        let url = format!("{}/sns/jscode2session", self.base_url);
        let query = [
            ("appid", self.appid.as_str()),
            ("secret", self.secret.as_str()),
            ("js_code", code),
            ("grant_type", "authorization_code"),
        ];
        let unavailable = |e: String| {
            tracing::warn!(error = %e, "code2session failed");
            CodedError::new(ErrorCode::BadGateway, "WeChat could not be reached; retry")
        };
        let resp = self
            .http
            .get(url)
            .query(&query)
            .send()
            .await
            // Never the URL: its query holds the AppSecret and the code.
            .map_err(|e| unavailable(e.without_url().to_string()))?;
        if !resp.status().is_success() {
            return Err(unavailable(format!("status {}", resp.status())));
        }
        // WeChat answers JSON with a text/plain content type.
        let body = resp
            .bytes()
            .await
            .map_err(|e| unavailable(e.without_url().to_string()))?;
        let s: Session = serde_json::from_slice(&body).map_err(|e| unavailable(e.to_string()))?;
        match s.openid.filter(|o| !o.is_empty() && o.len() <= 128) {
            Some(openid) if s.errcode == 0 => Ok(openid),
            _ => Err(CodedError::new(
                ErrorCode::InvalidCredentials,
                "the WeChat login code is invalid or already used",
            )),
        }
    }
}

impl Identity {
    /// A signed-in user's proof by a fresh WeChat login code: its openid
    /// must be the one bound to this user.
    pub(super) async fn prove_by_wechat(
        &self,
        wechat: Option<&Wechat>,
        p: &super::service::Principal,
        code: &str,
    ) -> Result<(), CodedError> {
        let wechat = wechat.ok_or_else(|| {
            CodedError::new(
                ErrorCode::FailedPrecondition,
                "WeChat login is not configured in this region",
            )
        })?;
        let code = code.trim();
        if code.is_empty() || code.len() > 128 {
            return Err(CodedError::field("wechat_code", "1 to 128 characters"));
        }
        let openid = wechat.openid(code).await?;
        if self.store.wechat_user(&openid).await?.as_deref() != Some(p.user_id.as_str()) {
            return Err(CodedError::new(
                ErrorCode::InvalidCredentials,
                "this WeChat account is not the one bound to this user",
            ));
        }
        Ok(())
    }

    /// `POST /v1/auth/wechat`.
    pub async fn wechat_login(
        &self,
        wechat: Option<&Wechat>,
        code: &str,
        client_type: &str,
    ) -> Result<TokenPair, CodedError> {
        let wechat = wechat.ok_or_else(|| {
            CodedError::new(
                ErrorCode::FailedPrecondition,
                "WeChat login is not configured in this region",
            )
        })?;
        if client_type != "mp" {
            return Err(CodedError::invalid(
                "WeChat login is for the mini-program (x-client-type: mp)",
            ));
        }
        let code = code.trim();
        if code.is_empty() || code.len() > 128 {
            return Err(CodedError::invalid("code: 1 to 128 characters"));
        }
        let openid = wechat.openid(code).await?;
        let user_id = match self.store.wechat_user(&openid).await? {
            Some(id) => id,
            None => {
                let user_id = uuid::Uuid::now_v7().to_string();
                let qualified = format!("wechat:{openid}");
                // The openid is bound in another region: the code proved it
                // is the caller's, so they may learn where, and sign in there
                // with a fresh code (this one is spent; no router replays it).
                self.claim_or_holder(&qualified, &user_id)
                    .await
                    .map_err(|(e, holder)| match holder {
                        Some(home) if e.code == ErrorCode::AlreadyExists && home != self.region => {
                            CodedError::home_elsewhere(
                                &home,
                                format!(
                                    "this WeChat account lives in region {home}: sign in there with a new code and x-home-region: {home}"
                                ),
                            )
                        }
                        _ => e,
                    })?;
                let name = format!("wx-{}", &user_id[user_id.len() - 6..]);
                if let Err(e) = self
                    .store
                    .create_wechat_user(&user_id, &name, &openid, now_ms())
                    .await
                {
                    if let Err(re) = self.release(&qualified, &user_id).await {
                        tracing::warn!(error = %re, "cannot release a claim after a failed sign-up");
                    }
                    return Err(e.into());
                }
                tracing::info!(user_id, "user signed up with WeChat");
                user_id
            }
        };
        match self.store.user(&user_id).await? {
            Some(u) if u.status == "active" => {}
            _ => {
                return Err(CodedError::new(
                    ErrorCode::AccountDisabled,
                    "this account is disabled",
                ));
            }
        }
        self.start_session(&user_id, client_type).await
    }
}
