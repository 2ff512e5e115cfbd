//! The cell's gRPC service (`CellService`), which other cells call: session
//! checks, money moving between cells, moves of users, notices. Only cells
//! reach it (`http::require_cell_peer` refuses every other certificate
//! first); each method still checks its own caller.

use crate::state::Cell;
use homecell_common::tls::PeerIdentity;
use homecell_proto::cell::{
    CheckSessionRequest, CheckSessionResponse, DiscardImportRequest, DiscardImportResponse,
    ForwardDepositRequest, ForwardDepositResponse, ImportUserRequest, ImportUserResponse,
    IncomingResponse, IncomingTransfer, SendNoticeRequest, SendNoticeResponse,
    cell_service_server::CellService,
};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The most a forwarded deposit's provider body may hold: what the HTTP
/// API takes from the provider in the first place (`http::MAX_BODY`, which
/// checks that the two agree).
pub const MAX_FORWARDED_BODY: usize = 64 * 1024;

/// The largest move bundle a cell takes (a user's whole history).
pub const MAX_BUNDLE: usize = 16 << 20;

/// The caller's region, when it is another cell.
fn calling_cell<T>(req: &Request<T>) -> Result<String, Status> {
    match req.extensions().get::<PeerIdentity>() {
        Some(PeerIdentity::Cell { region }) => Ok(region.clone()),
        _ => Err(Status::permission_denied(
            "only cells take part in transfers",
        )),
    }
}

fn status(e: homecell_proto::error::CodedError) -> Status {
    Status::new(e.code.grpc_code(), format!("{} {}", e.code, e.message))
}

/// The cell's gRPC service, for other cells.
pub struct CellGrpc(pub Arc<Cell>);

#[tonic::async_trait]
impl CellService for CellGrpc {
    async fn check_session(
        &self,
        req: Request<CheckSessionRequest>,
    ) -> Result<Response<CheckSessionResponse>, Status> {
        // Cells only: a router forwards client requests with its own
        // certificate, so anything a router may call is reachable from the
        // internet through it.
        match req.extensions().get::<PeerIdentity>() {
            Some(PeerIdentity::Cell { .. }) => {}
            _ => {
                return Err(Status::permission_denied("only cells may check sessions"));
            }
        }
        let r = req.into_inner();
        if r.session_id.len() > 64 || r.user_id.len() > 64 {
            return Err(Status::invalid_argument("ids are at most 64 characters"));
        }
        let alive = self
            .0
            .identity
            .session_alive(&r.session_id, &r.user_id, crate::clock::now_ms())
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(CheckSessionResponse { alive }))
    }

    async fn hold_incoming(
        &self,
        req: Request<IncomingTransfer>,
    ) -> Result<Response<IncomingResponse>, Status> {
        let caller = calling_cell(&req)?;
        // A receiver being moved: refused as retryable, so the sender's
        // saga asks again (after the cut-over, of the new home's cell).
        self.0
            .moves
            .frozen
            .wait(&req.get_ref().to_user)
            .await
            .map_err(status)?;
        let r = self.0.money.hold_incoming(&caller, req.get_ref()).await;
        r.map(Response::new).map_err(status)
    }

    async fn post_incoming(
        &self,
        req: Request<IncomingTransfer>,
    ) -> Result<Response<IncomingResponse>, Status> {
        let caller = calling_cell(&req)?;
        let r = self.0.money.post_incoming(&caller, req.get_ref()).await;
        r.map(Response::new).map_err(status)
    }

    async fn send_notice(
        &self,
        req: Request<SendNoticeRequest>,
    ) -> Result<Response<SendNoticeResponse>, Status> {
        calling_cell(&req)?;
        let r = req.into_inner();
        // Other cells may send messages; auth and money events are local.
        if r.topic != "message" {
            return Err(Status::permission_denied("only messages cross cells"));
        }
        self.0.moves.frozen.wait(&r.user_id).await.map_err(status)?;
        if uuid::Uuid::parse_str(&r.event_id).is_err()
            || r.user_id.len() > 64
            || r.payload.len() > 16 * 1024
        {
            return Err(Status::invalid_argument(
                "event_id must be a UUID; payload at most 16 KiB",
            ));
        }
        if !matches!(
            serde_json::from_str(&r.payload),
            Ok(serde_json::Value::Object(_))
        ) {
            return Err(Status::invalid_argument("payload must be a JSON object"));
        }
        let cell = &self.0;
        // A user who lives elsewhere now (moved): the sender asks again,
        // of the home its directory names.
        if let Some(home) = cell.replica.state().user_region(&r.user_id)
            && home != cell.region
        {
            return Err(Status::failed_precondition(format!(
                "the user lives in {home} now"
            )));
        }
        match cell.identity.user_row(&r.user_id).await {
            Ok(Some(u)) if u.status != "deleted" => {}
            Ok(_) => return Err(Status::not_found("no such user in this region")),
            Err(e) => return Err(Status::internal(e.to_string())),
        }
        cell.notices
            .enqueue_event(
                &r.event_id,
                &r.topic,
                &r.user_id,
                &r.payload,
                crate::clock::now_ms(),
            )
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        cell.notices.wake.notify_one();
        Ok(Response::new(SendNoticeResponse {}))
    }

    async fn forward_deposit(
        &self,
        req: Request<ForwardDepositRequest>,
    ) -> Result<Response<ForwardDepositResponse>, Status> {
        let caller = calling_cell(&req)?;
        let r = req.into_inner();
        if caller != r.from_region || caller == self.0.region {
            return Err(Status::permission_denied(format!(
                "cell.{caller} may not forward deposits as {}",
                r.from_region
            )));
        }
        if r.provider.is_empty() || r.provider.len() > 64 {
            return Err(Status::invalid_argument("provider: 1 to 64 characters"));
        }
        if r.body.len() > MAX_FORWARDED_BODY {
            return Err(Status::invalid_argument("the notification is too large"));
        }
        // Verified here as at the cell it reached: what a cell forwards is
        // only ever what the provider signed, never amounts of its own.
        let now = crate::clock::now_ms() / 1000;
        self.0
            .money
            .providers
            .verify(&r.provider, Some(&r.signature), &r.body, now)
            .map_err(status)?;
        let d: crate::money::provider::Deposit = serde_json::from_slice(&r.body)
            .map_err(|e| Status::invalid_argument(format!("malformed notification: {e}")))?;
        if d.kind != "deposit.succeeded" {
            return Err(Status::invalid_argument("not a deposit"));
        }
        let result = self.0.money.deposit(&r.provider, &d, None).await;
        let o = crate::metrics::count_money("deposit", result).map_err(status)?;
        Ok(Response::new(ForwardDepositResponse {
            transfer_id: o.op.id,
            state: o.op.state,
        }))
    }

    async fn import_user(
        &self,
        req: Request<ImportUserRequest>,
    ) -> Result<Response<ImportUserResponse>, Status> {
        let caller = calling_cell(&req)?;
        let r = req.into_inner();
        if caller != r.from_region {
            return Err(Status::permission_denied(format!(
                "cell.{caller} may not import for {}",
                r.from_region
            )));
        }
        if r.bundle.len() > MAX_BUNDLE {
            return Err(Status::invalid_argument("a move bundle is at most 16 MiB"));
        }
        self.0
            .moves
            .import(&r.from_region, &r.user_id, &r.move_id, &r.bundle)
            .await
            .map_err(status)?;
        Ok(Response::new(ImportUserResponse {}))
    }

    async fn discard_import(
        &self,
        req: Request<DiscardImportRequest>,
    ) -> Result<Response<DiscardImportResponse>, Status> {
        let caller = calling_cell(&req)?;
        let r = req.into_inner();
        if caller != r.from_region {
            return Err(Status::permission_denied(format!(
                "cell.{caller} may not discard for {}",
                r.from_region
            )));
        }
        self.0
            .moves
            .discard(&r.from_region, &r.user_id, &r.move_id)
            .await
            .map_err(status)?;
        Ok(Response::new(DiscardImportResponse {}))
    }

    async fn void_incoming(
        &self,
        req: Request<IncomingTransfer>,
    ) -> Result<Response<IncomingResponse>, Status> {
        let caller = calling_cell(&req)?;
        let r = self.0.money.void_incoming(&caller, req.get_ref()).await;
        r.map(Response::new).map_err(status)
    }
}
