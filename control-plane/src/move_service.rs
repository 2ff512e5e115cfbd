//! The move journal's gRPC service (`MoveService`): operators start,
//! watch, cancel and reverse moves and batches; a source cell lists its
//! region's open moves and reports their steps, and a target checks a
//! bundle's identifiers before it imports it. The rules are in
//! `moves.rs`; this layer checks who calls.

use crate::grpc::{ControlPlane, caller, operator};
use crate::moves;
use homecell_common::tls::PeerIdentity;
use homecell_proto::control::move_service_server::MoveService;
use homecell_proto::control::*;
use tonic::{Request, Response, Status};

/// Moves per ListMoves page.
const MAX_PAGE: usize = 1_000;

/// The region a cell acts for, or None for an operator; anyone else is
/// refused.
fn cell_or_operator<T>(req: &Request<T>) -> Result<(PeerIdentity, Option<String>), Status> {
    let who = caller(req)?;
    match &who {
        PeerIdentity::Operator { .. } => Ok((who, None)),
        PeerIdentity::Cell { region } => {
            let r = region.clone();
            Ok((who, Some(r)))
        }
        _ => Err(Status::permission_denied(format!(
            "{who} may not read or drive moves"
        ))),
    }
}

#[tonic::async_trait]
impl MoveService for ControlPlane {
    async fn start_move(
        &self,
        req: Request<StartMoveRequest>,
    ) -> Result<Response<StartMoveResponse>, Status> {
        let who = operator(&req)?;
        let r = req.into_inner();
        let (m, _) = self
            .mutate(&who, move |tx| {
                moves::start(tx, &r.user_id, &r.to_region, "", "")
            })
            .await?;
        tracing::info!(r#move = %m.id, from = %m.from_region, to = %m.to_region, actor = %who, "move started");
        Ok(Response::new(StartMoveResponse { r#move: Some(m) }))
    }

    async fn get_move(
        &self,
        req: Request<GetMoveRequest>,
    ) -> Result<Response<GetMoveResponse>, Status> {
        let (_, region) = cell_or_operator(&req)?;
        let id = req.into_inner().id;
        let (m, _) = self.read(move |tx| moves::get(tx, &id)).await?;
        // A cell sees the moves it takes part in.
        if let Some(region) = region
            && region != m.from_region
            && region != m.to_region
        {
            return Err(Status::not_found("no such move"));
        }
        Ok(Response::new(GetMoveResponse { r#move: Some(m) }))
    }

    async fn cancel_move(
        &self,
        req: Request<CancelMoveRequest>,
    ) -> Result<Response<CancelMoveResponse>, Status> {
        let who = operator(&req)?;
        let id = req.into_inner().id;
        let (m, _) = self.mutate(&who, move |tx| moves::cancel(tx, &id)).await?;
        tracing::info!(r#move = %m.id, actor = %who, "move cancel asked");
        Ok(Response::new(CancelMoveResponse { r#move: Some(m) }))
    }

    async fn reverse_move(
        &self,
        req: Request<ReverseMoveRequest>,
    ) -> Result<Response<ReverseMoveResponse>, Status> {
        let who = operator(&req)?;
        let id = req.into_inner().id;
        let (m, _) = self.mutate(&who, move |tx| moves::reverse(tx, &id)).await?;
        tracing::info!(r#move = %m.id, reverses = %m.reverse_of, actor = %who, "move reversal started");
        Ok(Response::new(ReverseMoveResponse { r#move: Some(m) }))
    }

    async fn start_batch(
        &self,
        req: Request<StartBatchRequest>,
    ) -> Result<Response<StartBatchResponse>, Status> {
        let who = operator(&req)?;
        let r = req.into_inner();
        let (b, _) = self
            .mutate(&who, move |tx| {
                moves::start_batch(
                    tx,
                    &r.from_region,
                    &r.to_region,
                    &r.country,
                    r.limit,
                    r.rate_per_sec,
                )
            })
            .await?;
        tracing::info!(batch = %b.id, from = %b.from_region, to = %b.to_region, actor = %who, "move batch started");
        Ok(Response::new(StartBatchResponse { batch: Some(b) }))
    }

    async fn get_batch(
        &self,
        req: Request<GetBatchRequest>,
    ) -> Result<Response<GetBatchResponse>, Status> {
        operator(&req)?;
        let id = req.into_inner().id;
        let ((batch, states), _) = self
            .read(move |tx| {
                let b = moves::get_batch(tx, &id)?;
                let mut states = std::collections::HashMap::new();
                // The batch's own moves; its reversals carry its id too.
                let own = |m: &MoveRecord| m.batch_id == b.id && m.reverse_of.is_empty();
                for m in moves::list(tx, own, None, usize::MAX)? {
                    *states
                        .entry(moves::state_name(m.state()).to_string())
                        .or_insert(0u32) += 1;
                }
                Ok((b, states))
            })
            .await?;
        Ok(Response::new(GetBatchResponse {
            batch: Some(batch),
            states,
        }))
    }

    async fn cancel_batch(
        &self,
        req: Request<CancelBatchRequest>,
    ) -> Result<Response<CancelBatchResponse>, Status> {
        let who = operator(&req)?;
        let id = req.into_inner().id;
        let (b, _) = self
            .mutate(&who, move |tx| moves::cancel_batch(tx, &id))
            .await?;
        tracing::info!(batch = %b.id, actor = %who, "move batch cancelled");
        Ok(Response::new(CancelBatchResponse { batch: Some(b) }))
    }

    async fn list_moves(
        &self,
        req: Request<ListMovesRequest>,
    ) -> Result<Response<ListMovesResponse>, Status> {
        let (_, region) = cell_or_operator(&req)?;
        let r = req.into_inner();
        if let Some(region) = &region
            && *region != r.from_region
        {
            return Err(Status::permission_denied(
                "a cell lists its own region's moves only",
            ));
        }
        let limit = match r.limit as usize {
            0 => MAX_PAGE,
            n => n.min(MAX_PAGE),
        };
        let ((moves, batches), _) = self
            .read(move |tx| {
                let after = (!r.after.is_empty()).then_some(r.after.as_str());
                let moves = if r.open_only && !r.from_region.is_empty() {
                    moves::open_from(tx, &r.from_region, after, limit)?
                } else {
                    let keep = |m: &MoveRecord| {
                        (r.from_region.is_empty() || m.from_region == r.from_region)
                            && (r.batch_id.is_empty() || m.batch_id == r.batch_id)
                            && (!r.open_only || crate::store::move_is_open(m))
                    };
                    moves::list(tx, keep, after, limit)?
                };
                let batches = if r.from_region.is_empty() {
                    Vec::new()
                } else {
                    moves::open_batches_from(tx, &r.from_region)?
                };
                Ok((moves, batches))
            })
            .await?;
        Ok(Response::new(ListMovesResponse { moves, batches }))
    }

    async fn advance_move(
        &self,
        req: Request<AdvanceMoveRequest>,
    ) -> Result<Response<AdvanceMoveResponse>, Status> {
        let who = caller(&req)?;
        let PeerIdentity::Cell { region } = &who else {
            return Err(Status::permission_denied(
                "only a source cell reports steps",
            ));
        };
        let region = region.clone();
        let r = req.into_inner();
        let key = self.directory_key.clone();
        let (m, revision) = self
            .mutate(&who, move |tx| moves::advance(tx, &key, &region, &r))
            .await?;
        // Crash tests: the step is committed, its answer never sent.
        homecell_common::failpoint::hit(&format!("move.cp.after_{}", moves::state_name(m.state())));
        if m.state() == MoveState::Switched {
            tracing::info!(r#move = %m.id, revision, "move cut over");
        }
        Ok(Response::new(AdvanceMoveResponse {
            r#move: Some(m),
            revision,
        }))
    }

    async fn extend_batch(
        &self,
        req: Request<ExtendBatchRequest>,
    ) -> Result<Response<ExtendBatchResponse>, Status> {
        let who = caller(&req)?;
        let PeerIdentity::Cell { region } = &who else {
            return Err(Status::permission_denied("only a source cell picks users"));
        };
        let region = region.clone();
        let r = req.into_inner();
        let (b, _) = self
            .mutate(&who, move |tx| moves::extend_batch(tx, &region, &r))
            .await?;
        Ok(Response::new(ExtendBatchResponse { batch: Some(b) }))
    }

    async fn check_move_identifiers(
        &self,
        req: Request<CheckMoveIdentifiersRequest>,
    ) -> Result<Response<CheckMoveIdentifiersResponse>, Status> {
        let who = caller(&req)?;
        let PeerIdentity::Cell { region } = who else {
            return Err(Status::permission_denied(
                "only a move's new home checks its bundle",
            ));
        };
        let r = req.into_inner();
        let key = self.directory_key.clone();
        self.read(move |tx| moves::check_identifiers(tx, &key, &region, &r.id, &r.identifiers))
            .await?;
        Ok(Response::new(CheckMoveIdentifiersResponse {}))
    }
}
