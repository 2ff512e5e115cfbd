//! `/v1/me`: the app's one-call home screen: the profile, the wallet's
//! balances and the unread count.

use crate::clock::now_ms;
use crate::http::openapi::Route;
use crate::http::{ApiResult, Auth, ClientType};
use crate::state::Cell;
use axum::extract::State;
use homecell_proto::error::CodedError;
use schemars::JsonSchema;
use serde::Serialize;
use std::sync::Arc;

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
        cell.money.balances(&p.user_id),
        cell.notices.unread_count(&p.user_id, now_ms()),
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

/// This area's routes, for the route table (`http/openapi.rs`).
pub fn routes() -> Vec<Route> {
    vec![
        Route::get("/v1/me", me)
            .summary("My profile, wallet balances and unread notice count in one call")
            .returns::<Me>(200),
    ]
}
