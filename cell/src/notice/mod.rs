//! The notice service: turns outbox events into inbox items and deliveries
//! (`dispatch`), sends deliveries by email and SMS with retries and a
//! dead-letter queue (`send`), renders templates (`template`), and keeps its
//! tables (`store`).

pub mod backoffice;
pub mod dispatch;
pub mod inbox;
pub mod live;
pub mod send;
pub mod store;
pub mod streams;
pub mod template;

use crate::db::Datastore;
use homecell_common::replica::Replica;
use std::sync::Arc;
use tokio::sync::{Notify, broadcast};

pub const CHANNELS: &[&str] = &["inbox", "email", "sms"];
/// Categories no preference can switch off.
pub const CRITICAL: &[&str] = &["security", "money"];
/// The topic of a code that proves an email or phone (a registration, a
/// change): its registration's user does not exist yet.
pub const IDENTIFIER_CODE: &str = "auth.identifier_code";
/// The system's messages addressed to one email or phone named in the event
/// (`channel`, `to`), not to the user's contacts: codes go only where they
/// were asked for, and a changed identifier's notice to the old one. Any
/// other event goes to the user's own contacts, whatever its payload says.
pub const ADDRESSED: &[&str] = &[
    "auth.password_reset",
    "auth.sign_in_code",
    IDENTIFIER_CODE,
    "auth.identifier_changed",
];

/// The cell config's `[notice]` section.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoticeConfig {
    /// Locale of users who chose none, and the fallback for a template
    /// missing in the user's locale.
    #[serde(default = "default_locale")]
    pub default_locale: String,
    /// Inbox items are deleted this long after they arrive.
    #[serde(default = "default_inbox_ttl")]
    pub inbox_ttl_days: u32,
    /// The sender of every email, e.g. `Homecell <no-reply@example.com>`.
    #[serde(default)]
    pub email_from: Option<String>,
    /// The SMTP relay; without it, nothing is sent by email.
    #[serde(default)]
    pub smtp: Option<SmtpConfig>,
    /// SMS providers, tried in this order for each message.
    #[serde(default)]
    pub sms: Vec<SmsProvider>,
}

impl Default for NoticeConfig {
    fn default() -> Self {
        Self {
            default_locale: default_locale(),
            inbox_ttl_days: default_inbox_ttl(),
            email_from: None,
            smtp: None,
            sms: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    pub host: String,
    #[serde(default = "default_smtp_port")]
    pub port: u16,
    /// `none` (a relay on a trusted network), `starttls` or `tls`.
    #[serde(default = "default_smtp_security")]
    pub security: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
}

/// An HTTP SMS provider: `POST url` with `{id, to, text}`, signed like a
/// payment webhook (`x-homecell-signature`); any 2xx means accepted.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmsProvider {
    pub name: String,
    pub url: String,
    pub secret: String,
}

fn default_locale() -> String {
    "en".into()
}
fn default_inbox_ttl() -> u32 {
    90
}
fn default_smtp_port() -> u16 {
    25
}
fn default_smtp_security() -> String {
    "starttls".into()
}

impl NoticeConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.smtp.is_some() != self.email_from.is_some() {
            anyhow::bail!("notice: set both smtp and email_from, or neither");
        }
        if let Some(from) = &self.email_from {
            from.parse::<lettre::message::Mailbox>()
                .map_err(|e| anyhow::anyhow!("notice.email_from: {e}"))?;
        }
        if let Some(s) = &self.smtp
            && !["none", "starttls", "tls"].contains(&s.security.as_str())
        {
            anyhow::bail!("notice.smtp.security must be none, starttls or tls");
        }
        for p in &self.sms {
            if !(p.url.starts_with("http://") || p.url.starts_with("https://")) {
                anyhow::bail!("notice.sms {}: url must be http(s)", p.name);
            }
            if p.secret.len() < 16 {
                anyhow::bail!(
                    "notice.sms {}: the secret must be at least 16 characters",
                    p.name
                );
            }
        }
        Ok(())
    }
}

/// A new inbox item, for live streams.
#[derive(Debug, Clone)]
pub struct Live {
    pub user_id: String,
    pub item: store::InboxItem,
}

pub struct Notices {
    pub region: String,
    pub store: store::NoticeStore,
    pub replica: Arc<Replica>,
    pub config: NoticeConfig,
    pub sender: send::Sender,
    /// New inbox items, for `GET /v1/notices/stream`.
    pub live: broadcast::Sender<Live>,
    /// The open streams, per user.
    pub streams: Arc<streams::Streams>,
    /// Wakes the worker when an event was just written.
    pub wake: Notify,
}

impl Notices {
    pub fn new(
        region: &str,
        db: Datastore,
        replica: Arc<Replica>,
        config: NoticeConfig,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        let sender = send::Sender::new(&config)?;
        Ok(Self {
            region: region.to_string(),
            store: store::NoticeStore::new(db),
            replica,
            config,
            sender,
            live: broadcast::channel(1024).0,
            streams: Default::default(),
            wake: Notify::new(),
        })
    }

    /// How many failed attempts move a delivery to the dead-letter queue
    /// (`notice.outbox.max_attempts`, live from control-plane config).
    pub fn max_attempts(&self) -> i64 {
        self.replica
            .state()
            .config_int("notice.outbox.max_attempts", &self.region, 5)
    }
}
