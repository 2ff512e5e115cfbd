//! From events to notices. Each outbox event is rendered for every channel
//! its templates cover and the user allows (critical categories ignore
//! opt-outs), then written as an inbox item and deliveries together with the
//! event marked handled. Rendering happens before anything is written, so a
//! broken template sends nothing rather than half. The worker loop also
//! sends due deliveries and purges expired inbox items.

use super::store::{Delivery, Event, FanOut, InboxItem, Template};
use super::template::render;
use super::{CRITICAL, Live, Notices};
use crate::clock::now_ms;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Events dispatched per transaction.
const BATCH: i64 = 256;
/// How often an idle worker looks at the outbox.
const IDLE_POLL: Duration = Duration::from_millis(25);

/// The template for `channel` in the user's locale, else the default
/// locale, else none.
fn pick<'a>(
    ts: &'a [Template],
    channel: &str,
    locale: &str,
    default: &str,
) -> Option<&'a Template> {
    ts.iter()
        .find(|t| t.channel == channel && t.locale == locale)
        .or_else(|| {
            ts.iter()
                .find(|t| t.channel == channel && t.locale == default)
        })
}

impl Notices {
    /// Runs until shutdown.
    pub async fn run(self: Arc<Self>, token: CancellationToken) {
        let mut last_purge = now_ms();
        let mut last_broadcast = 0;
        loop {
            let mut busy = false;
            match self.store.pending_events(BATCH).await {
                Ok(events) => {
                    busy |= events.len() as i64 == BATCH;
                    if let Err(err) = self.dispatch(&events).await {
                        tracing::warn!(error = %err, "cannot dispatch events; will retry");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the outbox"),
            }
            busy |= self.send_due().await;
            // Broadcasts are paced: one chunk a second.
            if now_ms() - last_broadcast >= 1_000 {
                last_broadcast = now_ms();
                let per_second = self.replica.state().config_int(
                    "notice.broadcast.per_second",
                    &self.region,
                    200,
                );
                match self
                    .store
                    .advance_broadcasts(per_second, last_broadcast)
                    .await
                {
                    Ok(n) => busy |= n > 0,
                    Err(e) => tracing::warn!(error = %e, "cannot advance broadcasts"),
                }
            }
            if now_ms() - last_purge > 60_000 {
                last_purge = now_ms();
                if let Err(e) = self.store.purge_inbox(last_purge).await {
                    tracing::warn!(error = %e, "cannot purge expired inbox items");
                }
            }
            if busy {
                continue;
            }
            tokio::select! {
                _ = token.cancelled() => return,
                _ = self.wake.notified() => {}
                // Events are written by other transactions (and other
                // instances), so the outbox is also polled: a cheap indexed
                // read that bounds the event-to-inbox delay.
                _ = tokio::time::sleep(IDLE_POLL) => {}
            }
        }
    }

    /// Renders one event for every channel; nothing is written unless all
    /// of it renders.
    pub async fn render_event(
        &self,
        e: &Event,
        user_id: &str,
        templates: &[Template],
        now: i64,
    ) -> Result<Option<FanOut>, String> {
        let contacts = match self
            .store
            .contacts(user_id)
            .await
            .map_err(|e| e.to_string())?
        {
            Some(c) => c,
            // A registration's proof: its user is created only once the
            // code comes back, and the code goes to the address it names.
            None if e.topic == super::IDENTIFIER_CODE => super::store::Contacts {
                status: "pending".into(),
                locale: None,
                display_name: String::new(),
                email: None,
                phone: None,
            },
            None => return Ok(None),
        };
        if contacts.status == "deleted" {
            return Ok(None);
        }
        if templates.is_empty() {
            return Err(format!("no template for {}", e.topic));
        }
        let mut vars: Map<String, Value> = match serde_json::from_str(&e.payload) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        vars.entry("display_name")
            .or_insert_with(|| Value::String(contacts.display_name.clone()));
        let locale = contacts
            .locale
            .clone()
            .unwrap_or_else(|| self.config.default_locale.clone());
        let opted_out = self
            .store
            .opted_out(user_id)
            .await
            .map_err(|e| e.to_string())?;
        let allowed = |t: &Template| {
            CRITICAL.contains(&t.category.as_str())
                || !opted_out
                    .iter()
                    .any(|(c, ch)| *c == t.category && *ch == t.channel)
        };
        // A code goes only where it was asked for (super::ADDRESSED).
        let addressed = super::ADDRESSED.contains(&e.topic.as_str());
        let asked = vars
            .get("channel")
            .and_then(Value::as_str)
            .filter(|_| addressed)
            .map(String::from);
        let to = vars.get("to").and_then(Value::as_str).map(String::from);
        let (email, phone) = match asked.as_deref() {
            Some("email") => (to.clone(), None),
            Some("phone") => (None, to.clone()),
            _ => (contacts.email.clone(), contacts.phone.clone()),
        };
        let default = self.config.default_locale.as_str();
        let mut out = FanOut {
            inbox: None,
            deliveries: Vec::new(),
        };
        if let Some(t) = pick(templates, "inbox", &locale, default).filter(|t| allowed(t)) {
            let item = InboxItem {
                id: uuid::Uuid::now_v7().to_string(),
                category: t.category.clone(),
                title: render(&t.subject, &vars, false)?,
                body: render(&t.body, &vars, false)?,
                created_at: now,
                read_at: None,
                archived_at: None,
            };
            let ttl = i64::from(self.config.inbox_ttl_days) * 86_400_000;
            out.inbox = Some((item, now + ttl));
        }
        let targets = [
            ("email", email.filter(|_| self.sender.has_email())),
            ("sms", phone.filter(|_| self.sender.has_sms())),
        ];
        for (channel, recipient) in targets {
            let (Some(t), Some(recipient)) =
                (pick(templates, channel, &locale, default), recipient)
            else {
                continue;
            };
            if !allowed(t) {
                continue;
            }
            out.deliveries.push(Delivery {
                id: uuid::Uuid::now_v7().to_string(),
                event_id: e.id.clone(),
                user_id: user_id.to_string(),
                channel: channel.into(),
                recipient,
                subject: render(&t.subject, &vars, false)?,
                body: render(&t.body, &vars, false)?,
                html: (channel == "email")
                    .then(|| render(&t.body, &vars, true))
                    .transpose()?,
                state: "pending".into(),
                attempts: 0,
                next_attempt_at: now,
                last_error: None,
                created_at: now,
            });
        }
        Ok(Some(out))
    }

    /// Renders a batch of events side by side, then writes them all in one
    /// transaction.
    async fn dispatch(&self, events: &[Event]) -> anyhow::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut templates: HashMap<&str, Vec<Template>> = HashMap::new();
        for e in events {
            if !templates.contains_key(e.topic.as_str()) {
                templates.insert(&e.topic, self.store.templates_for(&e.topic).await?);
            }
        }
        let users: Vec<String> = events
            .iter()
            .map(|e| e.user_id.clone().unwrap_or_default())
            .collect();
        let rendered = futures::future::join_all(events.iter().zip(&users).map(|(e, user_id)| {
            let ts = &templates[e.topic.as_str()];
            let span = dispatch_span(e);
            async move {
                match self.render_event(e, user_id, ts, now).await {
                    Ok(Some(f)) => f,
                    Ok(None) => FanOut::default(),
                    Err(reason) => {
                        // Never half-sent: the event is dropped whole, loudly.
                        tracing::error!(event = %e.id, topic = %e.topic, reason, "event not rendered; nothing sent");
                        crate::metrics::NOTICES_UNRENDERED.inc();
                        FanOut::default()
                    }
                }
            }
            .instrument(span)
        }))
        .await;
        let batch: Vec<(&str, &str, &FanOut)> = events
            .iter()
            .zip(&users)
            .zip(&rendered)
            .map(|((e, u), f)| (e.id.as_str(), u.as_str(), f))
            .collect();
        let inserted = self.store.fan_out_many(&batch, now).await?;
        let mut live = Vec::new();
        for ((user_id, f), new) in users.into_iter().zip(rendered).zip(inserted) {
            if new && let Some((item, _)) = f.inbox {
                live.push(Live { user_id, item });
            }
        }
        self.publish(live).await;
        Ok(())
    }
}

/// The exported span of one event's dispatch (when spans are exported),
/// linked to the request that caused the event: the dispatch runs later,
/// in a trace of its own, as OpenTelemetry models work a message starts.
fn dispatch_span(e: &Event) -> tracing::Span {
    if !homecell_common::otel::enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: homecell_common::otel::TARGET,
        "dispatch",
        otel.name = %format_args!("notice.dispatch {}", e.topic),
        otel.kind = "consumer",
        messaging.system = "homecell.outbox",
        messaging.operation.type = "process",
        messaging.destination.name = %e.topic,
    );
    if let Some(cause) = e
        .traceparent
        .as_deref()
        .and_then(homecell_common::trace::TraceParent::parse)
    {
        homecell_common::otel::add_link(&span, cause);
    }
    span
}
