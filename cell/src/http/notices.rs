//! `/v1/notices/*` (the inbox, preferences, the live stream), `/v1/me`, and
//! the CMS routes for templates, the dead-letter queue and messages.

use super::permission::Authorized;
use super::{ApiResult, Auth, ClientType, Json, cursor};
use super::{Path, Query};
use crate::clock::now_ms;
use crate::notice::store::{Delivery, InboxItem, Redrive, Template};
use crate::notice::{CHANNELS, template};
use crate::state::Cell;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use homecell_proto::error::{CodedError, ErrorCode};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Page sizes differ by client: a mini-program screen shows fewer items.
fn page_size(client: &str, asked: Option<i64>) -> i64 {
    let default = match client {
        "mp" => 10,
        "web" | "cms" => 50,
        _ => 20,
    };
    cursor::limit(asked, default, 100)
}

#[derive(Deserialize, JsonSchema)]
pub struct InboxQuery {
    pub limit: Option<i64>,
    pub cursor: Option<String>,
    /// true: the archive instead of the inbox.
    pub archived: Option<bool>,
}

#[derive(Serialize, JsonSchema)]
pub struct InboxPage {
    pub items: Vec<InboxItem>,
    pub next_cursor: Option<String>,
}

#[derive(Serialize, JsonSchema)]
pub struct UnreadCount {
    pub unread: i64,
}

pub async fn list(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
    ClientType(client): ClientType,
    Query(q): Query<InboxQuery>,
) -> ApiResult<axum::Json<InboxPage>> {
    let limit = page_size(client, q.limit);
    let after = q.cursor.as_deref().map(cursor::decode).transpose()?;
    let archived = q.archived.unwrap_or(false);
    let rows = cell
        .db
        .inbox_page(&p.user_id, archived, after, limit + 1, now_ms())
        .await
        .map_err(CodedError::from)?;
    let (items, next_cursor) = cursor::page(rows, limit, |i| (i.created_at, &i.id));
    Ok(axum::Json(InboxPage { items, next_cursor }))
}

pub async fn unread_count(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
) -> ApiResult<axum::Json<UnreadCount>> {
    let unread = cell
        .db
        .unread_count(&p.user_id, now_ms())
        .await
        .map_err(CodedError::from)?;
    Ok(axum::Json(UnreadCount { unread }))
}

fn changed(n: u64) -> ApiResult<StatusCode> {
    if n == 0 {
        return Err(CodedError::not_found("no such notice").into());
    }
    Ok(StatusCode::NO_CONTENT)
}

pub async fn read(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let n = cell
        .db
        .mark_inbox(&p.user_id, Some(&id), false, now_ms())
        .await;
    changed(n.map_err(CodedError::from)?)
}

pub async fn read_all(State(cell): State<Arc<Cell>>, Auth(p): Auth) -> ApiResult<StatusCode> {
    cell.db
        .mark_inbox(&p.user_id, None, false, now_ms())
        .await
        .map_err(CodedError::from)?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn archive(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let n = cell
        .db
        .mark_inbox(&p.user_id, Some(&id), true, now_ms())
        .await;
    changed(n.map_err(CodedError::from)?)
}

pub async fn delete(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let gone = cell.db.delete_inbox(&p.user_id, &id).await;
    changed(u64::from(gone.map_err(CodedError::from)?))
}

#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Preference {
    pub category: String,
    /// inbox, email or sms.
    pub channel: String,
    pub enabled: bool,
}

#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Preferences {
    /// Security and money notices are sent whatever is set here.
    pub preferences: Vec<Preference>,
}

pub async fn get_preferences(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
) -> ApiResult<axum::Json<Preferences>> {
    let rows = cell
        .db
        .preferences(&p.user_id)
        .await
        .map_err(CodedError::from)?;
    Ok(axum::Json(Preferences {
        preferences: rows
            .into_iter()
            .map(|(category, channel, enabled)| Preference {
                category,
                channel,
                enabled,
            })
            .collect(),
    }))
}

fn check_name(field: &str, v: &str) -> Result<(), CodedError> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(CodedError::field(
            field,
            "1 to 64 of a-z, 0-9, '.', '_', '-'",
        ))
    }
}

/// A BCP 47 tag of the shapes templates use: `en`, `zh-CN`, `zh-Hant-TW`.
fn check_locale(v: &str) -> Result<(), CodedError> {
    let mut parts = v.split('-');
    let lang = parts.next().unwrap_or("");
    let lang_ok = (2..=3).contains(&lang.len()) && lang.bytes().all(|b| b.is_ascii_lowercase());
    let rest_ok = parts.all(|p| {
        (p.len() == 2 && p.bytes().all(|b| b.is_ascii_uppercase()))
            || (p.len() == 4
                && p.as_bytes()[0].is_ascii_uppercase()
                && p.bytes().skip(1).all(|b| b.is_ascii_lowercase()))
    });
    if lang_ok && rest_ok && v.len() <= 16 {
        Ok(())
    } else {
        Err(CodedError::field(
            "locale",
            "a language tag such as en, zh-CN or zh-Hant-TW",
        ))
    }
}

fn check_channel(field: &str, v: &str) -> Result<(), CodedError> {
    if CHANNELS.contains(&v) {
        Ok(())
    } else {
        Err(CodedError::field(field, "must be inbox, email or sms"))
    }
}

pub async fn put_preferences(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
    Json(req): Json<Preferences>,
) -> ApiResult<StatusCode> {
    if req.preferences.len() > 100 {
        return Err(CodedError::invalid("at most 100 preferences").into());
    }
    let mut rows = Vec::new();
    for (i, pref) in req.preferences.into_iter().enumerate() {
        check_name(&format!("preferences[{i}].category"), &pref.category)?;
        check_channel(&format!("preferences[{i}].channel"), &pref.channel)?;
        rows.push((pref.category, pref.channel, pref.enabled));
    }
    cell.db
        .set_preferences(&p.user_id, &rows)
        .await
        .map_err(CodedError::from)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Server-sent events: each new inbox item as `event: notice`, JSON data.
/// The stream ends when its session does (`notice::streams`).
pub async fn stream(State(cell): State<Arc<Cell>>, Auth(p): Auth) -> ApiResult<Response> {
    if p.home != cell.region {
        // The inbox lives at home; so do its streams.
        return Err(crate::identity::service::not_at_home().into());
    }
    let max = cell.replica.state().config_int(
        "notice.stream.max_per_user",
        &cell.region,
        crate::notice::streams::DEFAULT_MAX_PER_USER,
    );
    let slot = cell.notices.streams.open(&p.user_id, max);
    let recheck = tokio::time::interval_at(
        tokio::time::Instant::now() + crate::notice::streams::RECHECK,
        crate::notice::streams::RECHECK,
    );
    let rx = cell.notices.live.subscribe();
    // Each of the user's new items; a subscriber that falls behind skips
    // what it missed (the inbox still has it) rather than ending.
    let items = futures::stream::unfold(
        (rx, recheck, slot, p, cell),
        |(mut rx, mut recheck, slot, p, cell)| async move {
            loop {
                tokio::select! {
                    () = slot.closed.cancelled() => return None,
                    _ = recheck.tick() => {
                        if !cell.identity.still_signed_in(&p).await {
                            return None;
                        }
                    }
                    got = rx.recv() => match got {
                        Ok(live) if live.user_id == p.user_id => {
                            let e = Event::default()
                                .event("notice")
                                .id(live.item.id.clone())
                                .json_data(&live.item)
                                .map_err(axum::Error::new);
                            return Some((e, (rx, recheck, slot, p, cell)));
                        }
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    },
                }
            }
        },
    );
    // The router and proxies must not buffer this.
    let mut resp = Sse::new(items)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    resp.headers_mut().insert(
        "x-accel-buffering",
        axum::http::HeaderValue::from_static("no"),
    );
    Ok(resp)
}

// ------------------------------------------------------------------ /v1/me

#[derive(Serialize, JsonSchema)]
pub struct Me {
    pub user: super::users::Profile,
    pub wallets: Vec<super::wallet::WalletBalance>,
    pub unread_notices: i64,
}

/// The mini-program facade shows less: no identifiers (phone, email) on a
/// screen that is easy to share.
pub async fn me(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
    ClientType(client): ClientType,
) -> ApiResult<axum::Json<Me>> {
    super::users::at_home(&cell, &p)?;
    let (full, balances, unread) = tokio::join!(
        cell.identity.profile(&p.user_id),
        cell.db.balances(&p.user_id),
        cell.db.unread_count(&p.user_id, now_ms()),
    );
    let mut profile = super::users::profile(&cell, full?);
    if client == "mp" {
        profile.identifiers.clear();
    }
    Ok(axum::Json(Me {
        user: profile,
        wallets: balances
            .map_err(CodedError::from)?
            .into_iter()
            .map(super::wallet::WalletBalance::from)
            .collect(),
        unread_notices: unread.map_err(CodedError::from)?,
    }))
}

// ------------------------------------------------------------------ CMS

pub async fn list_templates(
    State(cell): State<Arc<Cell>>,
    _: Authorized,
) -> ApiResult<axum::Json<Vec<Template>>> {
    Ok(axum::Json(
        cell.db.list_templates().await.map_err(CodedError::from)?,
    ))
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateBody {
    pub category: String,
    /// The inbox title or email subject ({{variables}} allowed).
    #[serde(default)]
    pub subject: String,
    pub body: String,
}

pub async fn put_template(
    State(cell): State<Arc<Cell>>,
    Authorized(p): Authorized,
    Path((key, channel, locale)): Path<(String, String, String)>,
    Json(req): Json<TemplateBody>,
) -> ApiResult<StatusCode> {
    check_name("key", &key)?;
    check_channel("channel", &channel)?;
    check_locale(&locale)?;
    check_name("category", &req.category)?;
    if req.body.len() > 16 * 1024 || req.subject.len() > 512 {
        return Err(CodedError::invalid("subject ≤ 512 and body ≤ 16384 bytes").into());
    }
    for (field, text) in [("subject", &req.subject), ("body", &req.body)] {
        template::check(text).map_err(|m| CodedError::field(field, m))?;
    }
    let t = Template {
        key,
        channel,
        locale,
        category: req.category,
        subject: req.subject,
        body: req.body,
        updated_at: now_ms(),
        updated_by: p.user_id.clone(),
    };
    cell.db.put_template(&t).await.map_err(CodedError::from)?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn delete_template(
    State(cell): State<Arc<Cell>>,
    _: Authorized,
    Path((key, channel, locale)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    let gone = cell
        .db
        .delete_template(&key, &channel, &locale)
        .await
        .map_err(CodedError::from)?;
    changed(u64::from(gone))
}

#[derive(Serialize, JsonSchema)]
pub struct DeadPage {
    pub items: Vec<Delivery>,
    pub next_cursor: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
pub struct PageQuery {
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

pub async fn dead_letters(
    State(cell): State<Arc<Cell>>,
    _: Authorized,
    Query(q): Query<PageQuery>,
) -> ApiResult<axum::Json<DeadPage>> {
    let limit = cursor::limit(q.limit, 50, 200);
    let after = q.cursor.as_deref().map(cursor::decode).transpose()?;
    let rows = cell
        .db
        .dead_deliveries(after, limit + 1)
        .await
        .map_err(CodedError::from)?;
    let (items, next_cursor) = cursor::page(rows, limit, |d| (d.created_at, &d.id));
    Ok(axum::Json(DeadPage { items, next_cursor }))
}

pub async fn redrive(
    State(cell): State<Arc<Cell>>,
    _: Authorized,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let done = cell
        .db
        .redrive(&id, now_ms())
        .await
        .map_err(CodedError::from)?;
    match done {
        Redrive::Queued => {}
        Redrive::NotDead => {
            return Err(CodedError::not_found("no dead delivery with that id").into());
        }
        Redrive::OneTimeCode => {
            return Err(CodedError::new(
                ErrorCode::FailedPrecondition,
                "a one-time code is never sent again: the user asks for a new one",
            )
            .into());
        }
    }
    cell.notices.wake.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MessageRequest {
    pub to_user_id: String,
    pub title: String,
    pub text: String,
}

#[derive(Serialize, JsonSchema)]
pub struct MessageSent {
    pub event_id: String,
    /// The region of the user's home cell, where the notice was queued.
    pub region: String,
}

/// `POST /v1/cms/messages`: a message to one user, in whichever cell is
/// their home (cell to cell over gRPC). The path names no user, so the
/// router sends it to the operator's own cell, where the permission lives.
pub async fn send_message(
    State(cell): State<Arc<Cell>>,
    _: Authorized,
    Json(req): Json<MessageRequest>,
) -> ApiResult<Response> {
    let user_id = req.to_user_id.trim().to_string();
    let title = req.title.trim();
    let text = req.text.trim();
    if title.is_empty()
        || title.chars().count() > 200
        || text.is_empty()
        || text.chars().count() > 4000
    {
        return Err(CodedError::invalid("title is 1–200 and text 1–4000 characters").into());
    }
    let event_id = uuid::Uuid::now_v7().to_string();
    let payload = serde_json::json!({"title": title, "text": text}).to_string();
    let region = cell
        .deliver_event(&event_id, "message", &user_id, &payload)
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(MessageSent { event_id, region }),
    )
        .into_response())
}

impl Cell {
    /// Queues an event for a user of any cell: here, or in their home cell
    /// over gRPC. The region it went to.
    pub async fn deliver_event(
        &self,
        event_id: &str,
        topic: &str,
        user_id: &str,
        payload: &str,
    ) -> Result<String, CodedError> {
        let local = self.db.user(user_id).await?;
        if local.is_some_and(|u| u.status != "deleted") {
            self.db
                .enqueue_event(event_id, topic, user_id, payload, now_ms())
                .await?;
            self.notices.wake.notify_one();
            return Ok(self.region.clone());
        }
        let home = self
            .replica
            .state()
            .user_region(user_id)
            .filter(|r| *r != self.region)
            .map(String::from)
            .ok_or_else(|| CodedError::not_found("no such user"))?;
        self.identity
            .peers
            .send_notice(&home, event_id, topic, user_id, payload)
            .await
            .map_err(|e| CodedError::new(ErrorCode::CellUnavailable, e))?;
        Ok(home)
    }
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BroadcastRequest {
    /// A template key with at least one template (e.g. `message`).
    pub template_key: String,
    /// The template's variables (text or numbers); `display_name` is each
    /// user's own.
    #[serde(default)]
    pub variables: serde_json::Map<String, serde_json::Value>,
    /// Only users with this role; omitted: every active user of the cell.
    pub role: Option<String>,
}

#[derive(Serialize, JsonSchema)]
pub struct BroadcastAccepted {
    pub broadcast_id: String,
}

/// `POST /v1/cms/broadcasts`: a notice to a segment of this cell's users,
/// queued at `notice.broadcast.per_second`. Every template of the key must
/// render with the variables given, or nothing is queued.
pub async fn broadcast(
    State(cell): State<Arc<Cell>>,
    Authorized(p): Authorized,
    Json(req): Json<BroadcastRequest>,
) -> ApiResult<Response> {
    check_name("template_key", &req.template_key)?;
    let templates = cell
        .db
        .templates_for(&req.template_key)
        .await
        .map_err(CodedError::from)?;
    if templates.is_empty() {
        return Err(CodedError::not_found("no template with that key").into());
    }
    let mut probe = req.variables.clone();
    probe
        .entry("display_name")
        .or_insert_with(|| serde_json::Value::String("x".into()));
    for t in &templates {
        for text in [&t.subject, &t.body] {
            template::render(text, &probe, false).map_err(|m| {
                CodedError::field(
                    "variables",
                    format!("{} {} {}: {m}", t.key, t.channel, t.locale),
                )
            })?;
        }
    }
    if let Some(role) = &req.role
        && !cell.db.role_exists(role).await.map_err(CodedError::from)?
    {
        return Err(CodedError::field("role", "no such role").into());
    }
    let payload = serde_json::Value::Object(req.variables).to_string();
    if payload.len() > 16 * 1024 {
        return Err(CodedError::invalid("variables are at most 16 KiB").into());
    }
    let b = crate::notice::store::Broadcast {
        id: uuid::Uuid::now_v7().to_string(),
        template_key: req.template_key,
        role: req.role,
        created_by: p.user_id.clone(),
        created_at: now_ms(),
        queued: 0,
        done_at: None,
    };
    cell.db
        .create_broadcast(&b, &payload)
        .await
        .map_err(CodedError::from)?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(BroadcastAccepted { broadcast_id: b.id }),
    )
        .into_response())
}

pub async fn list_broadcasts(
    State(cell): State<Arc<Cell>>,
    _: Authorized,
) -> ApiResult<axum::Json<Vec<crate::notice::store::Broadcast>>> {
    Ok(axum::Json(
        cell.db.broadcasts(100).await.map_err(CodedError::from)?,
    ))
}
