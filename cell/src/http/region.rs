//! `GET /v1/region`: this cell's region and the control-plane revision its
//! replica holds.

use super::ApiResult;
use crate::http::openapi::Route;
use crate::state::Cell;
use axum::extract::State;
use homecell_proto::error::{CodedError, ErrorCode};
use homecell_proto::region::status_name;
use schemars::JsonSchema;
use serde::Serialize;
use std::sync::Arc;

#[derive(Serialize, JsonSchema)]
pub struct RegionInfo {
    pub region: String,
    pub display_name: String,
    pub status: String,
    pub countries: Vec<String>,
    pub config_revision: u64,
    pub datastore: String,
}

pub async fn region(State(cell): State<Arc<Cell>>) -> ApiResult<axum::Json<RegionInfo>> {
    let state = cell.replica.state();
    let Some(region) = state.regions.get(&cell.region) else {
        return Err(CodedError::new(
            ErrorCode::NotReady,
            format!("region {} is not in this cell's replica yet", cell.region),
        )
        .into());
    };
    Ok(axum::Json(RegionInfo {
        region: region.id.clone(),
        display_name: region.display_name.clone(),
        status: status_name(region.status()).into(),
        countries: region.countries.clone(),
        config_revision: state.revision,
        datastore: cell.datastore.into(),
    }))
}

/// This area's routes, for the route table (`http/openapi.rs`).
pub fn routes() -> Vec<Route> {
    vec![
        Route::get("/v1/region", region)
            .summary("This cell's region and replicated config revision")
            .public()
            .returns::<RegionInfo>(200),
    ]
}
