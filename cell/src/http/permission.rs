//! Routes that name a permission in the route table
//! (`openapi::Access::Permission`) are guarded by a layer the table itself
//! applies (`http::router`), so a handler cannot forget the check and the
//! table is the one place a route's permission is written. The layer wants
//! a `cms` client session whose user holds the permission now (read from
//! the datastore, not the token, so a revoked role stops working at once),
//! and hands the handler the caller as `Authorized`.

use super::{ApiError, Auth};
use crate::identity::service::Principal;
use crate::state::Cell;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use homecell_proto::error::{CodedError, ErrorCode};
use std::sync::Arc;

/// The caller of a route that names a permission, authorised by the layer.
pub struct Authorized(pub Principal);

impl FromRequestParts<Arc<Cell>> for Authorized {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &Arc<Cell>) -> Result<Self, ApiError> {
        // Only the layer puts it there: a handler that asks for it on a
        // route without a permission is a bug, answered as one.
        parts
            .extensions
            .remove::<Principal>()
            .map(Self)
            .ok_or_else(|| {
                CodedError::new(ErrorCode::Internal, "the route names no permission").into()
            })
    }
}

/// The layer: authenticate, then check the client and the permission.
pub async fn require(
    State((cell, permission)): State<(Arc<Cell>, &'static str)>,
    req: Request,
    next: Next,
) -> Response {
    let (mut parts, body) = req.into_parts();
    let p = match Auth::from_request_parts(&mut parts, &cell).await {
        Ok(Auth(p)) => p,
        Err(e) => return e.into_response(),
    };
    if p.client_type != "cms" {
        return ApiError(CodedError::new(
            ErrorCode::PermissionDenied,
            "CMS routes need a cms client session",
        ))
        .into_response();
    }
    if let Err(e) = cell.identity.require(&p, permission).await {
        return ApiError(e).into_response();
    }
    parts.extensions.insert(p);
    next.run(Request::from_parts(parts, body)).await
}
