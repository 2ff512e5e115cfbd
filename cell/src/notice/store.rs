//! The notice tables, for both backends (one SQL text each).

use crate::db::Datastore;

/// The notice service's tables over the cell's datastore: the outbox, the
/// inbox, deliveries, templates, preferences and broadcasts.
#[derive(Clone, Debug)]
pub struct NoticeStore {
    db: Datastore,
}

/// The topics whose messages carry a one-time code, as an SQL list: a
/// dead delivery of one keeps no text and is never redriven.
macro_rules! code_topics {
    () => {
        "('auth.password_reset', 'auth.sign_in_code', 'auth.identifier_code')"
    };
}

impl NoticeStore {
    pub fn new(db: Datastore) -> Self {
        Self { db }
    }

    /// Whether other instances share this datastore (`live.rs`).
    pub fn is_shared(&self) -> bool {
        self.db.is_shared()
    }

    /// Tells the other instances (`live.rs`).
    pub async fn announce(&self, channel: &str, payloads: &[String]) -> DbResult<()> {
        self.db.announce(channel, payloads).await
    }

    /// Hears the other instances (`live.rs`).
    pub async fn listen(&self, channel: &str) -> Option<DbResult<crate::db::Listener>> {
        self.db.listen(channel).await
    }
}
use crate::db::DbResult;
use crate::db::stmt;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, sqlx::FromRow)]
pub struct Template {
    pub key: String,
    /// inbox, email or sms.
    pub channel: String,
    pub locale: String,
    /// security and money are critical: they bypass opt-outs.
    pub category: String,
    pub subject: String,
    pub body: String,
    pub updated_at: i64,
    pub updated_by: String,
}

macro_rules! template_cols {
    () => {
        "key, channel, locale, category, subject, body, updated_at, updated_by"
    };
}

#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
    sqlx::FromRow,
)]
pub struct InboxItem {
    pub id: String,
    pub category: String,
    pub title: String,
    pub body: String,
    pub created_at: i64,
    pub read_at: Option<i64>,
    pub archived_at: Option<i64>,
}

/// An event from the outbox.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: String,
    pub topic: String,
    pub user_id: Option<String>,
    pub payload: String,
    pub created_at: i64,
    /// The request that caused it (its `traceparent`), if one did: the
    /// dispatch's span links to that trace.
    pub traceparent: Option<String>,
}

/// A rendered message for one channel, waiting to be sent.
/// What a re-drive came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redrive {
    Queued,
    /// No dead delivery has that id.
    NotDead,
    /// A dead delivery of a one-time code: never sent again.
    OneTimeCode,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, sqlx::FromRow)]
pub struct Delivery {
    pub id: String,
    pub event_id: String,
    pub user_id: String,
    pub channel: String,
    #[serde(skip)]
    pub recipient: String,
    #[serde(skip)]
    pub subject: String,
    #[serde(skip)]
    pub body: String,
    #[serde(skip)]
    pub html: Option<String>,
    pub state: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub created_at: i64,
}

macro_rules! delivery_cols {
    () => {
        "id, event_id, user_id, channel, recipient, subject, body, html, state, attempts, next_attempt_at, last_error, created_at"
    };
}

/// What an event turns into, written with the event marked handled.
#[derive(Default)]
pub struct FanOut {
    pub inbox: Option<(InboxItem, i64)>,
    pub deliveries: Vec<Delivery>,
}

/// Contacts and locale of a user.
pub struct Contacts {
    pub status: String,
    pub locale: Option<String>,
    pub display_name: String,
    pub email: Option<String>,
    pub phone: Option<String>,
}

impl NoticeStore {
    /// Adds an event; false if its id is already there (triggers are
    /// idempotent by event id).
    pub async fn enqueue_event(
        &self,
        id: &str,
        topic: &str,
        user_id: &str,
        payload: &str,
        now: i64,
    ) -> DbResult<bool> {
        let n = stmt("INSERT INTO outbox (id, topic, user_id, payload, created_at, traceparent) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING")
            .bind(id).bind(topic).bind(user_id).bind(payload).bind(now).bind(homecell_common::trace::current_header()).execute(&self.db).await?;
        Ok(n == 1)
    }

    pub async fn pending_events(&self, limit: i64) -> DbResult<Vec<Event>> {
        // Not for a user a move has frozen here (their events go to the
        // new home with them: moving/store.rs reads this table too), nor
        // for one a move is bringing here and has not cut over (the old
        // home still sends theirs, and does if the move is undone).
        let sql = "SELECT id, topic, user_id, payload, created_at, traceparent FROM outbox WHERE delivered_at IS NULL \
                   AND NOT EXISTS (SELECT 1 FROM user_moves m WHERE m.user_id = outbox.user_id) \
                   AND NOT EXISTS (SELECT 1 FROM user_arrivals a WHERE a.user_id = outbox.user_id) ORDER BY created_at, id LIMIT $1";
        // id, topic, user_id, payload, created_at, traceparent.
        type Row = (String, String, Option<String>, String, i64, Option<String>);
        let rows: Vec<Row> = stmt(sql).bind(limit).fetch_all(&self.db).await?;
        Ok(rows
            .into_iter()
            .map(
                |(id, topic, user_id, payload, created_at, traceparent)| Event {
                    id,
                    topic,
                    user_id,
                    payload,
                    created_at,
                    traceparent,
                },
            )
            .collect())
    }

    pub async fn contacts(&self, user_id: &str) -> DbResult<Option<Contacts>> {
        let user: Option<(String, Option<String>, String)> =
            stmt("SELECT status, locale, display_name FROM users WHERE id = $1")
                .bind(user_id)
                .fetch_optional(&self.db)
                .await?;
        let Some((status, locale, display_name)) = user else {
            return Ok(None);
        };
        let ids: Vec<(String, String)> =
            stmt("SELECT kind, value FROM identifiers WHERE user_id = $1 ORDER BY kind")
                .bind(user_id)
                .fetch_all(&self.db)
                .await?;
        let find = |k: &str| {
            ids.iter()
                .find(|(kind, _)| kind == k)
                .map(|(_, v)| v.clone())
        };
        Ok(Some(Contacts {
            status,
            locale,
            display_name,
            email: find("email"),
            phone: find("phone"),
        }))
    }

    /// (category, channel) pairs the user switched off.
    pub async fn opted_out(&self, user_id: &str) -> DbResult<Vec<(String, String)>> {
        stmt("SELECT category, channel FROM notice_preferences WHERE user_id = $1 AND NOT enabled")
            .bind(user_id)
            .fetch_all(&self.db)
            .await
    }

    pub async fn preferences(&self, user_id: &str) -> DbResult<Vec<(String, String, bool)>> {
        stmt("SELECT category, channel, enabled FROM notice_preferences WHERE user_id = $1 ORDER BY category, channel")
            .bind(user_id)
            .fetch_all(&self.db)
            .await
    }

    pub async fn set_preferences(
        &self,
        user_id: &str,
        prefs: &[(String, String, bool)],
    ) -> DbResult<()> {
        let mut tx = self.db.begin().await?;
        for (category, channel, enabled) in prefs {
            stmt("INSERT INTO notice_preferences (user_id, category, channel, enabled) VALUES ($1, $2, $3, $4) \
                         ON CONFLICT (user_id, category, channel) DO UPDATE SET enabled = excluded.enabled")
                .bind(user_id).bind(category).bind(channel).bind(*enabled).execute(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn templates_for(&self, key: &str) -> DbResult<Vec<Template>> {
        let sql = concat!(
            "SELECT ",
            template_cols!(),
            " FROM notice_templates WHERE key = $1"
        );
        let rows: Vec<Template> = stmt(sql).bind(key).fetch_all(&self.db).await?;
        Ok(rows)
    }

    pub async fn list_templates(&self) -> DbResult<Vec<Template>> {
        let sql = concat!(
            "SELECT ",
            template_cols!(),
            " FROM notice_templates ORDER BY key, channel, locale"
        );
        let rows: Vec<Template> = stmt(sql).fetch_all(&self.db).await?;
        Ok(rows)
    }

    pub async fn put_template(&self, t: &Template) -> DbResult<()> {
        stmt("INSERT INTO notice_templates (key, channel, locale, category, subject, body, updated_at, updated_by) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (key, channel, locale) DO UPDATE SET \
                     category = excluded.category, subject = excluded.subject, body = excluded.body, \
                     updated_at = excluded.updated_at, updated_by = excluded.updated_by")
            .bind(&t.key).bind(&t.channel).bind(&t.locale).bind(&t.category).bind(&t.subject)
            .bind(&t.body).bind(t.updated_at).bind(&t.updated_by).execute(&self.db).await?;
        Ok(())
    }

    pub async fn delete_template(&self, key: &str, channel: &str, locale: &str) -> DbResult<bool> {
        let n =
            stmt("DELETE FROM notice_templates WHERE key = $1 AND channel = $2 AND locale = $3")
                .bind(key)
                .bind(channel)
                .bind(locale)
                .execute(&self.db)
                .await?;
        Ok(n == 1)
    }

    /// Writes what an event became and marks it handled, in one
    /// transaction; its payload (which may hold a reset code) is cleared.
    /// Unique keys make a second run of the same event a no-op.
    pub async fn fan_out(
        &self,
        event_id: &str,
        user_id: &str,
        f: &FanOut,
        now: i64,
    ) -> DbResult<bool> {
        Ok(self.fan_out_many(&[(event_id, user_id, f)], now).await?[0])
    }

    /// `fan_out` for a batch of events in one transaction (one fsync); for
    /// each, whether its inbox item is new.
    pub async fn fan_out_many(
        &self,
        batch: &[(&str, &str, &FanOut)],
        now: i64,
    ) -> DbResult<Vec<bool>> {
        let mut tx = self.db.begin().await?;
        let inserted = {
            let mut all = Vec::with_capacity(batch.len());
            for (event_id, user_id, f) in batch {
                let mut inserted = false;
                if let Some((item, expires_at)) = &f.inbox {
                    let n = stmt("INSERT INTO inbox (id, user_id, event_id, category, title, body, created_at, expires_at) \
                                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (user_id, event_id) DO NOTHING")
                    .bind(&item.id).bind(user_id).bind(event_id).bind(&item.category).bind(&item.title)
                    .bind(&item.body).bind(item.created_at).bind(*expires_at).execute(&mut tx).await?;
                    inserted = n == 1;
                }
                for d in &f.deliveries {
                    stmt("INSERT INTO deliveries (id, event_id, user_id, channel, recipient, subject, body, html, state, attempts, next_attempt_at, created_at) \
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', 0, $9, $9) ON CONFLICT (event_id, channel) DO NOTHING")
                    .bind(&d.id).bind(event_id).bind(user_id).bind(&d.channel).bind(&d.recipient)
                    .bind(&d.subject).bind(&d.body).bind(&d.html).bind(now).execute(&mut tx).await?;
                }
                stmt("UPDATE outbox SET delivered_at = $1, payload = '{}' WHERE id = $2")
                    .bind(now)
                    .bind(event_id)
                    .execute(&mut tx)
                    .await?;
                all.push(inserted);
            }
            all
        };
        tx.commit().await?;
        Ok(inserted)
    }

    pub async fn due_deliveries(&self, now: i64, limit: i64) -> DbResult<Vec<Delivery>> {
        let sql = concat!(
            "SELECT ",
            delivery_cols!(),
            " FROM deliveries WHERE state = 'pending' AND next_attempt_at <= $1 \
             AND NOT EXISTS (SELECT 1 FROM user_moves m WHERE m.user_id = deliveries.user_id) \
             AND NOT EXISTS (SELECT 1 FROM user_arrivals a WHERE a.user_id = deliveries.user_id) ORDER BY next_attempt_at LIMIT $2"
        );
        let rows: Vec<Delivery> = stmt(sql).bind(now).bind(limit).fetch_all(&self.db).await?;
        Ok(rows)
    }

    /// Takes a delivery for `until` (so another worker or instance leaves
    /// it alone); false if someone else took it first.
    pub async fn lease_delivery(&self, id: &str, seen_next: i64, until: i64) -> DbResult<bool> {
        let n = stmt("UPDATE deliveries SET next_attempt_at = $1 WHERE id = $2 AND state = 'pending' AND next_attempt_at = $3")
            .bind(until).bind(id).bind(seen_next).execute(&self.db).await?;
        Ok(n == 1)
    }

    pub async fn delivery_sent(&self, id: &str, provider: &str, now: i64) -> DbResult<()> {
        stmt("UPDATE deliveries SET state = 'sent', sent_at = $1, provider = $2, body = '', html = NULL, attempts = attempts + 1, last_error = NULL WHERE id = $3")
            .bind(now).bind(provider).bind(id).execute(&self.db).await?;
        Ok(())
    }

    /// Counts a failed attempt: retried at `next_at`, or dead.
    pub async fn delivery_failed(
        &self,
        id: &str,
        error: &str,
        next_at: i64,
        dead: bool,
    ) -> DbResult<()> {
        // A dead delivery keeps no one-time code: a password reset's or a
        // sign-in code's message is useless once the code expires, and the
        // dead-letter queue outlives it.
        stmt(concat!("UPDATE deliveries SET attempts = attempts + 1, last_error = $1, next_attempt_at = $2, \
                     state = CASE WHEN $3 THEN 'dead' ELSE 'pending' END, \
                     body = CASE WHEN $3 AND EXISTS (SELECT 1 FROM outbox o WHERE o.id = deliveries.event_id AND o.topic IN ", code_topics!(), ") THEN '' ELSE body END, \
                     html = CASE WHEN $3 AND EXISTS (SELECT 1 FROM outbox o WHERE o.id = deliveries.event_id AND o.topic IN ", code_topics!(), ") THEN NULL ELSE html END \
                     WHERE id = $4"))
            .bind(error).bind(next_at).bind(dead).bind(id).execute(&self.db).await?;
        Ok(())
    }

    pub async fn dead_deliveries(
        &self,
        after: Option<(i64, String)>,
        limit: i64,
    ) -> DbResult<Vec<Delivery>> {
        let (at, id) = after.unwrap_or((i64::MAX, String::new()));
        let sql = concat!(
            "SELECT ",
            delivery_cols!(),
            " FROM deliveries WHERE state = 'dead' AND (created_at < $1 OR (created_at = $1 AND id < $2)) ORDER BY created_at DESC, id DESC LIMIT $3"
        );
        let rows: Vec<Delivery> = stmt(sql)
            .bind(at)
            .bind(&id)
            .bind(limit)
            .fetch_all(&self.db)
            .await?;
        Ok(rows)
    }

    /// Puts a dead delivery back in the queue with a fresh attempt count,
    /// unless it carried a one-time code (its text is gone, above, and a
    /// code sent late is one the user may no longer expect).
    pub async fn redrive(&self, id: &str, now: i64) -> DbResult<Redrive> {
        let n = stmt(concat!("UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = $1 \
                     WHERE id = $2 AND state = 'dead' \
                     AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.id = deliveries.event_id AND o.topic IN ", code_topics!(), ")"))
            .bind(now).bind(id).execute(&self.db).await?;
        if n == 1 {
            return Ok(Redrive::Queued);
        }
        let dead: Option<(String,)> =
            stmt("SELECT id FROM deliveries WHERE id = $1 AND state = 'dead'")
                .bind(id)
                .fetch_optional(&self.db)
                .await?;
        Ok(if dead.is_some() {
            Redrive::OneTimeCode
        } else {
            Redrive::NotDead
        })
    }

    pub async fn inbox_page(
        &self,
        user_id: &str,
        archived: bool,
        after: Option<(i64, String)>,
        limit: i64,
        now: i64,
    ) -> DbResult<Vec<InboxItem>> {
        let (at, id) = after.unwrap_or((i64::MAX, String::new()));
        let sql = "SELECT id, category, title, body, created_at, read_at, archived_at FROM inbox \
                   WHERE user_id = $1 AND (archived_at IS NOT NULL) = $2 AND expires_at > $3 \
                   AND (created_at < $4 OR (created_at = $4 AND id < $5)) ORDER BY created_at DESC, id DESC LIMIT $6";
        let rows: Vec<InboxItem> = stmt(sql)
            .bind(user_id)
            .bind(archived)
            .bind(now)
            .bind(at)
            .bind(&id)
            .bind(limit)
            .fetch_all(&self.db)
            .await?;
        Ok(rows)
    }

    /// One of the user's inbox items.
    pub async fn inbox_item(&self, user_id: &str, id: &str) -> DbResult<Option<InboxItem>> {
        let sql = "SELECT id, category, title, body, created_at, read_at, archived_at FROM inbox WHERE user_id = $1 AND id = $2";
        let row: Option<InboxItem> = stmt(sql)
            .bind(user_id)
            .bind(id)
            .fetch_optional(&self.db)
            .await?;
        Ok(row)
    }

    pub async fn unread_count(&self, user_id: &str, now: i64) -> DbResult<i64> {
        let sql = "SELECT COUNT(*) FROM inbox WHERE user_id = $1 AND read_at IS NULL AND archived_at IS NULL AND expires_at > $2";
        stmt(sql).bind(user_id).bind(now).scalar(&self.db).await
    }

    /// Sets `read_at` or `archived_at` on one item (or, with no id, on all
    /// unread ones); the number of items changed.
    pub async fn mark_inbox(
        &self,
        user_id: &str,
        id: Option<&str>,
        archive: bool,
        now: i64,
    ) -> DbResult<u64> {
        let n = match (id, archive) {
            (Some(id), false) => {
                stmt("UPDATE inbox SET read_at = COALESCE(read_at, $1) WHERE user_id = $2 AND id = $3")
                .bind(now).bind(user_id).bind(id).execute(&self.db).await?
            }
            (Some(id), true) => {
                stmt("UPDATE inbox SET archived_at = COALESCE(archived_at, $1), read_at = COALESCE(read_at, $1) WHERE user_id = $2 AND id = $3")
                .bind(now).bind(user_id).bind(id).execute(&self.db).await?
            }
            (None, _) => {
                stmt("UPDATE inbox SET read_at = $1 WHERE user_id = $2 AND read_at IS NULL")
                .bind(now).bind(user_id).execute(&self.db).await?
            }
        };
        Ok(n)
    }

    pub async fn delete_inbox(&self, user_id: &str, id: &str) -> DbResult<bool> {
        let n = stmt("DELETE FROM inbox WHERE user_id = $1 AND id = $2")
            .bind(user_id)
            .bind(id)
            .execute(&self.db)
            .await?;
        Ok(n == 1)
    }

    /// Deletes expired inbox items; how many.
    pub async fn purge_inbox(&self, now: i64) -> DbResult<u64> {
        stmt("DELETE FROM inbox WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.db)
            .await
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema, sqlx::FromRow)]
pub struct Broadcast {
    pub id: String,
    pub template_key: String,
    /// Only users holding this role; none: every active user.
    pub role: Option<String>,
    pub created_by: String,
    pub created_at: i64,
    /// Users queued so far.
    pub queued: i64,
    pub done_at: Option<i64>,
}

impl NoticeStore {
    pub async fn create_broadcast(&self, b: &Broadcast, payload: &str) -> DbResult<()> {
        stmt("INSERT INTO broadcasts (id, template_key, payload, role, created_by, created_at) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(&b.id).bind(&b.template_key).bind(payload).bind(&b.role).bind(&b.created_by).bind(b.created_at)
            .execute(&self.db).await?;
        Ok(())
    }

    pub async fn broadcasts(&self, limit: i64) -> DbResult<Vec<Broadcast>> {
        let sql = "SELECT id, template_key, role, created_by, created_at, queued, done_at FROM broadcasts ORDER BY created_at DESC, id DESC LIMIT $1";
        let rows: Vec<Broadcast> = stmt(sql).bind(limit).fetch_all(&self.db).await?;
        Ok(rows)
    }

    /// Queues the next `chunk` users of every unfinished broadcast (oldest
    /// first); how many events were queued.
    pub async fn advance_broadcasts(&self, chunk: i64, now: i64) -> DbResult<u64> {
        let active: Vec<(String, String, String, Option<String>, String)> = stmt(
            "SELECT id, template_key, payload, role, cursor FROM broadcasts WHERE done_at IS NULL ORDER BY created_at LIMIT 4")
            .fetch_all(&self.db).await?;
        let mut total = 0;
        for (id, key, payload, role, cursor) in active {
            let mut tx = self.db.begin().await?;
            let n = {
                let users: Vec<(String,)> = stmt(
                "SELECT u.id FROM users u WHERE u.status = 'active' AND u.id > $1 \
                 AND ($2 = '' OR EXISTS (SELECT 1 FROM user_roles r WHERE r.user_id = u.id AND r.role = $2)) \
                 ORDER BY u.id LIMIT $3")
                .bind(&cursor).bind(role.as_deref().unwrap_or("")).bind(chunk).fetch_all(&mut tx).await?;
                for (user,) in &users {
                    let event = uuid::Uuid::new_v5(
                        &uuid::Uuid::NAMESPACE_OID,
                        format!("{id}\0{user}").as_bytes(),
                    )
                    .to_string();
                    stmt("INSERT INTO outbox (id, topic, user_id, payload, created_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING")
                    .bind(event).bind(&key).bind(user).bind(&payload).bind(now).execute(&mut tx).await?;
                }
                let last = users.last().map(|u| u.0.clone()).unwrap_or(cursor.clone());
                let done = (users.len() as i64) < chunk;
                stmt("UPDATE broadcasts SET cursor = $1, queued = queued + $2, done_at = CASE WHEN $3 THEN $4 ELSE NULL END WHERE id = $5")
                .bind(&last).bind(users.len() as i64).bind(done).bind(now).bind(&id).execute(&mut tx).await?;
                users.len() as u64
            };
            tx.commit().await?;
            total += n;
        }
        Ok(total)
    }
}
