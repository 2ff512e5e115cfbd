//! `/v1/wallet/*`, the payment-provider callback and the CMS adjustment:
//! thin HTTP over `money::service`.

use super::permission::Authorized;
use super::{ApiResult, Auth, Json, cursor, json};
use super::{Path, Query};
use crate::http::openapi::Route;
use crate::money::ledger::{HistoryFilter, Operation};
use crate::money::provider::{Deposit, SIGNATURE_HEADER, Signed};
use crate::money::service::{AdjustmentRequest, Outcome, TransferRequest, parse_key};
use crate::state::Cell;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use homecell_proto::error::CodedError;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Serialize, JsonSchema)]
pub struct WalletBalance {
    /// ISO 4217.
    pub currency: String,
    /// Spendable now, in minor units.
    pub available: i64,
    /// Incoming and not yet posted.
    pub pending: i64,
    /// Outgoing and held (a withdrawal or a transfer in flight).
    pub held: i64,
}

impl From<crate::money::ledger::Balance> for WalletBalance {
    fn from(b: crate::money::ledger::Balance) -> Self {
        Self {
            currency: b.currency,
            available: b.available,
            pending: b.pending,
            held: b.held,
        }
    }
}

#[derive(Serialize, JsonSchema)]
pub struct Wallets {
    pub wallets: Vec<WalletBalance>,
}

#[derive(Serialize, JsonSchema)]
pub struct TransferAccepted {
    pub transfer_id: String,
    /// posted (same cell) or pending (cross cell, in flight).
    pub state: String,
}

#[derive(Serialize, JsonSchema)]
pub struct TransferView {
    pub transfer_id: String,
    /// transfer, deposit, withdrawal or adjustment.
    pub kind: String,
    /// pending, posted, voided or failed; a withdrawal whose outcome the
    /// provider has not told in time is reconciling (the money stays held
    /// until the provider says paid or failed).
    pub state: String,
    /// out or in, from the caller's side.
    pub direction: String,
    pub from_user_id: Option<String>,
    pub to_user_id: Option<String>,
    pub amount: i64,
    pub currency: String,
    pub memo: Option<String>,
    /// The other cell's region of a cross-cell transfer.
    pub peer_region: Option<String>,
    /// Why a transfer was voided or refused.
    pub reason: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Serialize, JsonSchema)]
pub struct TransferPage {
    pub items: Vec<TransferView>,
    pub next_cursor: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
pub struct HistoryQuery {
    pub limit: Option<i64>,
    pub cursor: Option<String>,
    pub kind: Option<String>,
    pub state: Option<String>,
    pub currency: Option<String>,
}

fn view(op: Operation, me: &str) -> TransferView {
    TransferView {
        direction: if op.from_user.as_deref() == Some(me) {
            "out"
        } else {
            "in"
        }
        .into(),
        transfer_id: op.id,
        kind: op.kind,
        state: op.state,
        from_user_id: op.from_user,
        to_user_id: op.to_user,
        amount: op.amount,
        currency: op.currency,
        memo: op.memo,
        peer_region: op.peer_region,
        reason: op.error_detail,
        created_at: op.created_at,
        updated_at: op.updated_at,
    }
}

fn accepted(o: Outcome) -> Response {
    let status = if o.in_flight {
        StatusCode::ACCEPTED
    } else {
        StatusCode::CREATED
    };
    json(
        status,
        &TransferAccepted {
            transfer_id: o.op.id,
            state: o.op.state,
        },
    )
}

fn idempotency_key(h: &HeaderMap) -> Result<String, CodedError> {
    parse_key(h.get("idempotency-key").and_then(|v| v.to_str().ok()))
}

pub async fn balances(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
) -> ApiResult<axum::Json<Wallets>> {
    let rows = cell
        .money
        .balances(&p.user_id)
        .await
        .map_err(CodedError::from)?;
    Ok(axum::Json(Wallets {
        wallets: rows.into_iter().map(WalletBalance::from).collect(),
    }))
}

pub async fn transfer(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
    headers: HeaderMap,
    Json(req): Json<TransferRequest>,
) -> ApiResult<Response> {
    let key = idempotency_key(&headers)?;
    let result = cell.money.transfer(&p, &key, &req).await;
    Ok(accepted(crate::metrics::count_money("transfer", result)?))
}

pub async fn withdraw(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
    headers: HeaderMap,
    Json(req): Json<crate::money::withdrawal::WithdrawalRequest>,
) -> ApiResult<Response> {
    let key = idempotency_key(&headers)?;
    let result = cell.money.withdraw(&p, &key, &req).await;
    Ok(accepted(crate::metrics::count_money("withdrawal", result)?))
}

pub async fn history(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
    Query(q): Query<HistoryQuery>,
) -> ApiResult<axum::Json<TransferPage>> {
    let limit = cursor::limit(q.limit, 20, 100);
    let after = q.cursor.as_deref().map(cursor::decode).transpose()?;
    let filter = HistoryFilter {
        kind: q.kind.as_deref(),
        state: q.state.as_deref(),
        currency: q.currency.as_deref(),
        after,
        limit: limit + 1,
    };
    let rows = cell
        .money
        .history(&p.user_id, &filter)
        .await
        .map_err(CodedError::from)?;
    let (ops, next_cursor) = cursor::page(rows, limit, |o| (o.created_at, &o.id));
    Ok(axum::Json(TransferPage {
        items: ops.into_iter().map(|o| view(o, &p.user_id)).collect(),
        next_cursor,
    }))
}

pub async fn get_transfer(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<TransferView>> {
    let op = cell.money.get(&p, &id).await?;
    Ok(axum::Json(view(op, &p.user_id)))
}

/// A payment provider's signed notification. The raw body is what was
/// signed, so it is verified before it is parsed.
pub async fn provider_callback(
    State(cell): State<Arc<Cell>>,
    Path(provider): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let signature = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok());
    let now = crate::clock::now_ms() / 1000;
    cell.money
        .providers
        .verify(&provider, signature, &body, now)?;
    let signed = Signed {
        body: body.clone(),
        signature: signature.unwrap_or_default().to_string(),
    };
    let de = &mut serde_json::Deserializer::from_slice(&body);
    let deposit: Deposit = serde_path_to_error::deserialize(de)
        .map_err(|e| CodedError::invalid(format!("malformed notification: {e}")))?;
    if deposit.kind != "deposit.succeeded" {
        // Acknowledged so the provider stops resending; nothing to book.
        return Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "ignored": deposit.kind }),
        ));
    }
    let result = cell.money.deposit(&provider, &deposit, Some(&signed)).await;
    let o = crate::metrics::count_money("deposit", result)?;
    Ok(json(
        StatusCode::OK,
        &TransferAccepted {
            transfer_id: o.op.id,
            state: o.op.state,
        },
    ))
}

pub async fn adjust(
    State(cell): State<Arc<Cell>>,
    Authorized(p): Authorized,
    Path(user_id): Path<String>,
    headers: HeaderMap,
    Json(req): Json<AdjustmentRequest>,
) -> ApiResult<Response> {
    let key = idempotency_key(&headers)?;
    let result = cell.money.adjust(&p, &user_id, &key, &req).await;
    Ok(accepted(crate::metrics::count_money("adjustment", result)?))
}

/// This area's routes, for the route table (`http/openapi.rs`).
pub fn routes() -> Vec<Route> {
    vec![
        Route::get("/v1/wallet", balances)
            .summary("My balances per currency")
            .returns::<Wallets>(200),
        Route::post("/v1/wallet/transfers", transfer)
            .summary("Send money to a user of any region (header Idempotency-Key: a UUID)")
            .body::<crate::money::service::TransferRequest>()
            .returns::<TransferAccepted>(201),
        Route::get("/v1/wallet/transfers", history)
            .summary("My money operations, newest first")
            .returns::<TransferPage>(200)
            .query(&["limit", "cursor", "kind", "state", "currency"]),
        Route::get("/v1/wallet/transfers/{id}", get_transfer)
            .summary("One of my money operations, with its state")
            .returns::<TransferView>(200),
        Route::post("/v1/wallet/withdrawals", withdraw)
            .summary("Withdraw to the payment provider (header Idempotency-Key); 202 while the payout runs")
            .body::<crate::money::withdrawal::WithdrawalRequest>()
            .returns::<TransferAccepted>(202),
        Route::post("/v1/payments/{provider}/callback", provider_callback)
            .summary("A payment provider's signed deposit notification (x-homecell-signature)")
            .public()
            .body::<crate::money::provider::Deposit>()
            .returns::<TransferAccepted>(200),
        Route::post("/v1/cms/users/{id}/wallet/adjustments", adjust)
            .summary("Credit or debit a wallet, with a reason (header Idempotency-Key)")
            .permission("money:adjust")
            .body::<crate::money::service::AdjustmentRequest>()
            .returns::<TransferAccepted>(201),
    ]
}
