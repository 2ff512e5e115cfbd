//! `/v1/notices/*`: the inbox, the notice preferences and the live stream
//! of new items (server-sent events).

use crate::clock::now_ms;
use crate::http::openapi::Route;
use crate::http::{ApiResult, Auth, ClientType, Json, Path, Query, cursor};
use crate::notice::CHANNELS;
use crate::notice::store::InboxItem;
use crate::state::Cell;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use homecell_proto::error::CodedError;
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
        .notices
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
        .notices
        .unread_count(&p.user_id, now_ms())
        .await
        .map_err(CodedError::from)?;
    Ok(axum::Json(UnreadCount { unread }))
}

pub(super) fn changed(n: u64) -> ApiResult<StatusCode> {
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
        .notices
        .mark_inbox(&p.user_id, Some(&id), false, now_ms())
        .await;
    changed(n.map_err(CodedError::from)?)
}

pub async fn read_all(State(cell): State<Arc<Cell>>, Auth(p): Auth) -> ApiResult<StatusCode> {
    cell.notices
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
        .notices
        .mark_inbox(&p.user_id, Some(&id), true, now_ms())
        .await;
    changed(n.map_err(CodedError::from)?)
}

pub async fn delete(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let gone = cell.notices.delete_inbox(&p.user_id, &id).await;
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
        .notices
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

pub(super) fn check_name(field: &str, v: &str) -> Result<(), CodedError> {
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
pub(super) fn check_locale(v: &str) -> Result<(), CodedError> {
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

pub(super) fn check_channel(field: &str, v: &str) -> Result<(), CodedError> {
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
    cell.notices
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

/// This area's routes, for the route table (`http/openapi.rs`).
pub fn routes() -> Vec<Route> {
    vec![
        Route::get("/v1/notices", list)
            .summary("My inbox, newest first (page size depends on the client type)")
            .returns::<InboxPage>(200)
            .query(&["limit", "cursor", "archived"]),
        Route::get("/v1/notices/unread-count", unread_count)
            .summary("How many inbox items are unread")
            .returns::<UnreadCount>(200),
        Route::get("/v1/notices/stream", stream)
            .summary("New inbox items as server-sent events (event: notice)"),
        Route::post("/v1/notices/read-all", read_all)
            .summary("Mark every inbox item read")
            .answers(204),
        Route::post("/v1/notices/{id}/read", read)
            .summary("Mark one inbox item read")
            .answers(204),
        Route::post("/v1/notices/{id}/archive", archive)
            .summary("Archive one inbox item")
            .answers(204),
        Route::delete("/v1/notices/{id}", delete)
            .summary("Delete one inbox item")
            .answers(204),
        Route::get("/v1/notices/preferences", get_preferences)
            .summary("My notice preferences per category and channel")
            .returns::<Preferences>(200),
        Route::put("/v1/notices/preferences", put_preferences)
            .summary("Switch categories on or off per channel (security and money always arrive)")
            .body::<Preferences>()
            .answers(204),
    ]
}
