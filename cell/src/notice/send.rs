//! Sending deliveries: email over SMTP (lettre), SMS through HTTP providers
//! with failover to the next one when a provider errors or times out.
//! A failed attempt is retried with exponential backoff and jitter; after
//! `notice.outbox.max_attempts` the delivery is dead (the DLQ), where the
//! CMS can inspect and re-drive it. A delivery is leased before it is sent,
//! so two workers (or instances) do not send it twice in the normal course;
//! a crash after sending and before recording means one more send, the
//! at-least-once that every notification system accepts.

use super::store::Delivery;
use super::{NoticeConfig, Notices};
use crate::clock::now_ms;
use lettre::message::{Mailbox, MultiPart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use std::time::Duration;

/// How long a worker holds a delivery while it sends.
const LEASE_MS: i64 = 60_000;

pub struct Sender {
    smtp: Option<(AsyncSmtpTransport<Tokio1Executor>, Mailbox)>,
    sms: Vec<(String, String, ring::hmac::Key)>,
    http: reqwest::Client,
}

impl Sender {
    pub fn new(c: &NoticeConfig) -> anyhow::Result<Self> {
        let smtp = match (&c.smtp, &c.email_from) {
            (Some(s), Some(from)) => {
                let mut b = match s.security.as_str() {
                    "tls" => AsyncSmtpTransport::<Tokio1Executor>::relay(&s.host)?,
                    "starttls" => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&s.host)?,
                    _ => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&s.host),
                }
                .port(s.port)
                .timeout(Some(Duration::from_secs(10)));
                if let (Some(user), Some(file)) = (&s.username, &s.password_file) {
                    let password = std::fs::read_to_string(file)?.trim().to_string();
                    b = b.credentials((user.clone(), password).into());
                }
                Some((b.build(), from.parse()?))
            }
            _ => None,
        };
        let sms = c
            .sms
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    p.url.clone(),
                    homecell_common::webhook::key(&p.secret),
                )
            })
            .collect();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .connect_timeout(Duration::from_secs(2))
            .build()?;
        Ok(Self { smtp, sms, http })
    }

    pub fn has_email(&self) -> bool {
        self.smtp.is_some()
    }

    pub fn has_sms(&self) -> bool {
        !self.sms.is_empty()
    }

    /// Sends one delivery; the provider that took it, or why none did.
    async fn send(&self, d: &Delivery) -> Result<String, String> {
        match d.channel.as_str() {
            "email" => {
                let (transport, from) = self.smtp.as_ref().ok_or("email is not configured")?;
                let to: Mailbox = d
                    .recipient
                    .parse()
                    .map_err(|e| format!("bad recipient: {e}"))?;
                let text = d.body.clone();
                let html = d
                    .html
                    .clone()
                    .unwrap_or_else(|| super::template::escape_html(&text));
                let msg = Message::builder()
                    .from(from.clone())
                    .to(to)
                    .subject(d.subject.clone())
                    .multipart(MultiPart::alternative_plain_html(text, html))
                    .map_err(|e| format!("cannot build the message: {e}"))?;
                transport
                    .send(msg)
                    .await
                    .map(|_| "smtp".to_string())
                    .map_err(|e| smtp_failure(&e))
            }
            "sms" => {
                let body =
                    serde_json::json!({"id": d.id, "to": d.recipient, "text": d.body}).to_string();
                let mut errors = Vec::new();
                for (name, url, key) in &self.sms {
                    let sig =
                        homecell_common::webhook::sign_with(key, body.as_bytes(), now_ms() / 1000);
                    let r = self
                        .http
                        .post(url)
                        .header("content-type", "application/json")
                        .header("x-homecell-signature", sig)
                        .body(body.clone())
                        .send()
                        .await;
                    match r {
                        Ok(resp) if resp.status().is_success() => return Ok(name.clone()),
                        Ok(resp) => errors.push(format!("{name}: {}", resp.status())),
                        // Without the URL: it may carry the provider's key.
                        Err(e) => errors.push(format!("{name}: {}", e.without_url())),
                    }
                }
                Err(errors.join("; "))
            }
            other => Err(format!("unknown channel {other}")),
        }
    }
}

/// What a failed SMTP send is recorded as (the log, the dead-letter view):
/// its kind and reply code, never the server's text, which usually echoes
/// the recipient's address.
fn smtp_failure(e: &lettre::transport::smtp::Error) -> String {
    let kind = if e.is_permanent() {
        "permanent"
    } else if e.is_transient() {
        "transient"
    } else if e.is_timeout() {
        "timeout"
    } else if e.is_tls() {
        "tls"
    } else {
        "connection"
    };
    match e.status() {
        Some(code) => format!("smtp: {kind} failure, reply {code}"),
        None => format!("smtp: {kind} failure"),
    }
}

impl Notices {
    /// Sends what is due; true if there may be more right away.
    pub(super) async fn send_due(&self) -> bool {
        let now = now_ms();
        let due = match self.store.due_deliveries(now, 32).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read due deliveries");
                return false;
            }
        };
        let full = due.len() == 32;
        let max = self.max_attempts();
        let sends = due.into_iter().map(|d| async move {
            match self.store.lease_delivery(&d.id, d.next_attempt_at, now + LEASE_MS).await {
                Ok(true) => {}
                _ => return,
            }
            let result = self.sender.send(&d).await;
            let done = now_ms();
            let recorded = match result {
                Ok(provider) => {
                    crate::metrics::DELIVERIES.with_label_values(&[&d.channel, "sent"]).inc();
                    self.store.delivery_sent(&d.id, &provider, done).await
                }
                Err(error) => {
                    let dead = d.attempts + 1 >= max;
                    let outcome = if dead { "dead" } else { "retry" };
                    crate::metrics::DELIVERIES.with_label_values(&[&d.channel, outcome]).inc();
                    tracing::warn!(delivery = %d.id, channel = %d.channel, attempts = d.attempts + 1, dead, error, "delivery failed");
                    self.store
                        .delivery_failed(&d.id, &error, done + homecell_common::backoff::jittered_ms(d.attempts, 1_000, 300_000), dead)
                        .await
                }
            };
            if let Err(e) = recorded {
                tracing::warn!(delivery = %d.id, error = %e, "cannot record a delivery attempt");
            }
        });
        futures::future::join_all(sends).await;
        full
    }
}
