//! Transfers between users of different cells: a saga coordinated by the
//! sender's cell.
//!
//! 1. hold in the sender's cell, wallet → clearing:<receiver region>
//!    (`Money::transfer`, with the operation row: `saga_step = hold_peer`);
//! 2. hold in the receiver's cell, clearing:<sender region> → wallet
//!    (`HoldIncoming`);
//! 3. post in the sender's cell: the commit point (`saga_step = post_peer`);
//! 4. post in the receiver's cell (`PostIncoming`), retried until it works.
//!
//! Before step 3 the coordinator may abort: it voids its own hold and then
//! tells the receiver (`VoidIncoming`, retried until it works; a void that
//! arrives before the hold leaves a voided record, so a late hold is
//! refused). Every step's ledger id derives from the transfer id, and every
//! state change is a conditional update of the operation row, so retries,
//! crashes and a second worker (several cell instances over one PostgreSQL)
//! cannot apply anything twice. The step to run next is durable in the row;
//! the worker resumes whatever is due after a restart.

use super::ledger::{
    Account, LedgerError, Move, Operation, Phase, Retarget, SideEffects, StepUpdate,
};
use super::saga_moves::{coordinator_move, hold_move, incoming, participant_move};
use super::service::{Money, received_event};
use crate::clock::now_ms;
use homecell_proto::cell::{IncomingResponse, IncomingTransfer};
use homecell_proto::error::{CodedError, ErrorCode};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Retry delays grow from this, doubling, up to `MAX_BACKOFF_MS`, with
/// jitter so that a recovering peer is not hit by every saga at once.
const BASE_BACKOFF_MS: i64 = 200;
const MAX_BACKOFF_MS: i64 = 10_000;

/// Runs due saga steps: the ones kicked by new transfers at once, the rest
/// (retries, and everything left over by a crash) from a periodic scan.
pub async fn run_worker(
    money: Arc<Money>,
    mut kicks: mpsc::UnboundedReceiver<String>,
    token: CancellationToken,
) {
    let running: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        let due: Vec<String> = tokio::select! {
            _ = token.cancelled() => return,
            Some(id) = kicks.recv() => vec![id],
            _ = tick.tick() => match money.ledger.due_operations(now_ms(), 256).await {
                Ok(ops) => ops.into_iter().map(|o| o.id).collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read due saga steps");
                    continue;
                }
            },
        };
        for id in due {
            if !running.lock().expect("poisoned").insert(id.clone()) {
                continue;
            }
            let (money, running) = (money.clone(), running.clone());
            tokio::spawn(async move {
                if let Err(e) = money.drive(&id).await {
                    tracing::warn!(transfer = %id, error = %e.message, "saga step failed; will retry");
                }
                running.lock().expect("poisoned").remove(&id);
            });
        }
    }
}

/// How a call to the peer cell went.
pub(super) enum PeerAnswer {
    Done,
    Refused(String),
    /// The receiver lives in this region now; nothing was held.
    Moved(String),
    Unreachable(String),
}

/// How many times one transfer follows a receiver who keeps moving before
/// it is given up (voided, the money back with the sender).
const MAX_RETARGETS: i64 = 4;

impl Money {
    pub(super) async fn call_peer(&self, step: &str, op: &Operation) -> PeerAnswer {
        // Holds a window open in the tests: a receiver moving away while
        // a transfer to them is on its way.
        crate::failpoint::pause(&format!("saga.coordinator.before_peer_{step}")).await;
        let peer = op.peer_region.as_deref().unwrap_or_default();
        let req = incoming(op, &self.region);
        match self.peers.incoming(peer, step, req).await {
            Ok(r) if !r.moved_to.is_empty() => PeerAnswer::Moved(r.moved_to),
            Ok(r) if r.refused => PeerAnswer::Refused(r.reason),
            Ok(_) => PeerAnswer::Done,
            Err(e) => PeerAnswer::Unreachable(e),
        }
    }

    /// Runs the coordinator's steps of one transfer as far as they go now.
    pub async fn drive(&self, id: &str) -> Result<(), CodedError> {
        loop {
            let Some(op) = self.ledger.operation(id).await? else {
                return Ok(());
            };
            match op.saga_role.as_deref() {
                Some("coordinator") => {}
                Some("payout") if op.saga_step.as_deref() != Some("done") => {
                    return self.drive_payout(&op).await;
                }
                _ => return Ok(()),
            }
            let now = now_ms();
            let step = op.saga_step.clone().unwrap_or_default();
            let (state, at) = (op.state.as_str(), Some(step.as_str()));
            match step.as_str() {
                "hold_peer" => match self.call_peer("hold", &op).await {
                    PeerAnswer::Done => {
                        crate::failpoint::hit("saga.coordinator.after_peer_hold");
                        let to = StepUpdate {
                            state: "pending",
                            saga_step: Some("post_peer"),
                            ..Default::default()
                        };
                        let post = coordinator_move(&op, "post", Phase::Post);
                        self.ledger
                            .advance(id, (state, at), &to, &[post], &SideEffects::default(), now)
                            .await?;
                        crate::failpoint::hit("saga.coordinator.after_post");
                    }
                    PeerAnswer::Refused(reason) => self.abort(&op, &reason, now).await?,
                    PeerAnswer::Moved(home) => {
                        if !self.follow_receiver(&op, &home, now).await? {
                            return Ok(());
                        }
                    }
                    // A move's money is never given up for a slow peer: it
                    // belongs at the new home (money/moving.rs).
                    PeerAnswer::Unreachable(e)
                        if now - op.created_at > self.hold_timeout_ms && op.kind != "move" =>
                    {
                        self.abort(&op, &format!("receiver's cell unreachable: {e}"), now)
                            .await?
                    }
                    PeerAnswer::Unreachable(e) => return self.retry_later(&op, &e, now).await,
                },
                "post_peer" | "void_peer" => {
                    let (call, final_state) = if step == "post_peer" {
                        ("post", "posted")
                    } else {
                        ("void", "voided")
                    };
                    match self.call_peer(call, &op).await {
                        PeerAnswer::Done => {
                            let to = StepUpdate {
                                state: final_state,
                                saga_step: Some("done"),
                                ..Default::default()
                            };
                            self.ledger
                                .advance(id, (state, at), &to, &[], &SideEffects::default(), now)
                                .await?;
                            return Ok(());
                        }
                        // After the commit point there is no way back: keep
                        // asking, and say so loudly.
                        PeerAnswer::Refused(e)
                        | PeerAnswer::Moved(e)
                        | PeerAnswer::Unreachable(e) => {
                            return self.retry_later(&op, &e, now).await;
                        }
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    /// Voids the coordinator's hold (only possible before the commit point,
    /// which the conditional update guarantees) and moves on to telling the
    /// receiver's cell.
    async fn abort(&self, op: &Operation, reason: &str, now: i64) -> Result<(), CodedError> {
        tracing::info!(transfer = %op.id, reason, "cross-cell transfer voided");
        let to = StepUpdate {
            state: "voided",
            saga_step: Some("void_peer"),
            error_code: Some(ErrorCode::FailedPrecondition.as_str()),
            error_detail: Some(reason),
        };
        let void = coordinator_move(op, "void", Phase::Void);
        self.ledger
            .advance(
                &op.id,
                ("pending", Some("hold_peer")),
                &to,
                &[void],
                &SideEffects::default(),
                now,
            )
            .await?;
        Ok(())
    }

    /// The receiver's cell answered that they moved to `home` before the
    /// hold reached them (a move between regions cut over; that cell held
    /// nothing). The transfer follows them, as a deposit does: in one
    /// transaction the hold on the sender's wallet is released and taken
    /// again towards `home`'s clearing account, and step 1 runs again there.
    /// A receiver who moved to this very cell gets the money at once, as in
    /// a transfer within a cell. The answer alone steers nothing: the move
    /// must be in this cell's own directory too, so a rogue cell cannot
    /// send money elsewhere; until it is, the step waits (and is voided
    /// after the usual hold timeout). True when the step should run again.
    async fn follow_receiver(
        &self,
        op: &Operation,
        home: &str,
        now: i64,
    ) -> Result<bool, CodedError> {
        if op.kind != "transfer" || op.retargets >= MAX_RETARGETS {
            self.abort(
                op,
                "the receiver moved to another region; send it again",
                now,
            )
            .await?;
            return Ok(true);
        }
        let to_user = op.to_user.as_deref().unwrap_or_default();
        let ours = self.replica.state().user_region(to_user).map(String::from);
        if ours.as_deref() != Some(home) || op.peer_region.as_deref() == Some(home) {
            if now - op.created_at > self.hold_timeout_ms {
                self.abort(op, "the receiver's home region is not known", now)
                    .await?;
                return Ok(true);
            }
            let why = format!(
                "the receiver's cell says they moved to {home}; the directory here does not say so yet"
            );
            self.retry_later(op, &why, now).await?;
            return Ok(false);
        }
        let n = op.retargets + 1;
        let unhold = Move {
            id: format!("{}:unhold.{n}", op.id),
            ..coordinator_move(op, "unhold", Phase::Void)
        };
        let (to, moves, side) = if home == self.region {
            if !matches!(self.users.user(to_user).await?, Some(u) if u.status == "active") {
                self.abort(op, "no such receiver", now).await?;
                return Ok(true);
            }
            let from_user = op.from_user.as_deref().unwrap_or_default();
            let pay = Move::single(
                &op.id,
                Account::wallet(from_user, &op.currency),
                Account::wallet(to_user, &op.currency),
                op.amount,
            );
            let side = SideEffects {
                event: Some(received_event(op)),
                audit: None,
            };
            let to = Retarget {
                peer_region: None,
                state: "posted",
                saga_step: "done",
            };
            (to, vec![unhold, pay], side)
        } else {
            let next = Operation {
                peer_region: Some(home.to_string()),
                retargets: n,
                ..op.clone()
            };
            let to = Retarget {
                peer_region: Some(home),
                state: "pending",
                saga_step: "hold_peer",
            };
            (to, vec![unhold, hold_move(&next)], SideEffects::default())
        };
        tracing::info!(transfer = %op.id, from = ?op.peer_region, to = home, "transfer follows its receiver to their new region");
        self.ledger.retarget(op, &to, &moves, &side, now).await?;
        Ok(true)
    }

    pub(super) async fn retry_later(
        &self,
        op: &Operation,
        error: &str,
        now: i64,
    ) -> Result<(), CodedError> {
        let delay =
            homecell_common::backoff::jittered_ms(op.attempts, BASE_BACKOFF_MS, MAX_BACKOFF_MS);
        if op.attempts >= 5 {
            tracing::warn!(transfer = %op.id, step = ?op.saga_step, attempts = op.attempts, error, "saga step keeps failing");
        }
        self.ledger.reschedule(&op.id, now + delay, now).await?;
        Ok(())
    }

    // ------------------------------------------------------------ participant

    /// Checks an incoming step against the caller's certificate and what is
    /// stored; the operation as this cell records it.
    fn incoming_op(&self, caller: &str, t: &IncomingTransfer) -> Result<Operation, CodedError> {
        if caller != t.from_region {
            return Err(CodedError::new(
                ErrorCode::PermissionDenied,
                "from_region does not match the caller's certificate",
            ));
        }
        if t.from_region == self.region {
            return Err(CodedError::invalid("a cell does not transfer to itself"));
        }
        super::currency::validate(t.amount, &t.currency)
            .map_err(|(f, m)| CodedError::invalid(format!("{f}: {m}")))?;
        uuid::Uuid::parse_str(&t.transfer_id)
            .map_err(|_| CodedError::invalid("transfer_id must be a UUID"))?;
        if t.to_user.is_empty() || t.to_user.len() > 64 || t.from_user.len() > 64 {
            return Err(CodedError::invalid("user ids are 1 to 64 characters"));
        }
        let now = now_ms();
        // A user's own money following them to this region (money/moving.rs).
        let kind = if t.from_user == t.to_user {
            "move"
        } else {
            "transfer"
        };
        Ok(Operation {
            id: t.transfer_id.clone(),
            kind: kind.into(),
            actor: format!("cell:{}", t.from_region),
            request_hash: super::service::derive_id(
                "incoming",
                &t.from_region,
                &format!(
                    "{}\0{}\0{}\0{}",
                    t.from_user, t.to_user, t.amount, t.currency
                ),
            ),
            state: "pending".into(),
            from_user: Some(t.from_user.clone()),
            to_user: Some(t.to_user.clone()),
            peer_region: Some(t.from_region.clone()),
            amount: t.amount,
            currency: t.currency.clone(),
            memo: Some(t.memo.chars().take(super::service::MAX_MEMO).collect())
                .filter(|m: &String| !m.is_empty()),
            saga_role: Some("participant".into()),
            created_at: now,
            updated_at: now,
            ..Default::default()
        })
    }

    fn answer(op: &Operation) -> IncomingResponse {
        let state = match op.state.as_str() {
            "pending" => "held",
            s => s,
        };
        IncomingResponse {
            state: state.into(),
            refused: op.state == "voided" || op.state == "failed",
            reason: op.error_detail.clone().unwrap_or_default(),
            moved_to: String::new(),
        }
    }

    /// The stored record of an incoming transfer, if it is the same one.
    async fn stored_incoming(&self, want: &Operation) -> Result<Option<Operation>, CodedError> {
        match self.ledger.operation(&want.id).await? {
            Some(op) if op.request_hash != want.request_hash => Err(CodedError::invalid(
                "this transfer id was used for another transfer",
            )),
            other => Ok(other),
        }
    }

    /// Step 2 at the receiver's cell.
    pub async fn hold_incoming(
        &self,
        caller: &str,
        t: &IncomingTransfer,
    ) -> Result<IncomingResponse, CodedError> {
        let op = self.incoming_op(caller, t)?;
        if let Some(stored) = self.stored_incoming(&op).await? {
            return Ok(Self::answer(&stored));
        }
        let receiver_ok =
            matches!(self.users.user(&t.to_user).await?, Some(u) if u.status == "active");
        // A receiver who moved away: nothing is held or stored, and the
        // answer names the new home; the sender's cell re-aims the transfer
        // there (`follow_receiver`). A user's own money following a move
        // arrives before the directory names this cell, so is not asked.
        if !receiver_ok && op.kind == "transfer" {
            let home = self
                .replica
                .state()
                .user_region(&t.to_user)
                .map(String::from);
            if let Some(home) = home.filter(|h| *h != self.region) {
                // Refused as well: a coordinator that does not know
                // `moved_to` voids, rather than taking it for a hold.
                return Ok(IncomingResponse {
                    state: "moved".into(),
                    refused: true,
                    reason: format!("the receiver lives in {home} now"),
                    moved_to: home,
                });
            }
        }
        let result = if receiver_ok {
            let hold = participant_move(&op, "hold", Phase::Pending);
            self.ledger
                .execute(&op, &[hold], &SideEffects::default())
                .await
        } else {
            let mut refused = op.clone();
            refused.state = "failed".into();
            refused.error_code = Some(ErrorCode::NotFound.as_str().into());
            refused.error_detail = Some("no such receiver in this region".into());
            self.ledger
                .execute(&refused, &[], &SideEffects::default())
                .await
        };
        match result {
            Ok(()) | Err(LedgerError::Exists) => {}
            Err(e) => return Err(e.into()),
        }
        crate::failpoint::hit("saga.participant.after_hold");
        let stored = self
            .stored_incoming(&op)
            .await?
            .ok_or_else(|| CodedError::internal("incoming transfer vanished"))?;
        Ok(Self::answer(&stored))
    }

    /// Step 4 at the receiver's cell: the money becomes the receiver's.
    pub async fn post_incoming(
        &self,
        caller: &str,
        t: &IncomingTransfer,
    ) -> Result<IncomingResponse, CodedError> {
        let op = self.incoming_op(caller, t)?;
        let stored = self
            .stored_incoming(&op)
            .await?
            .ok_or_else(|| CodedError::not_found("no hold for this transfer"))?;
        if stored.state == "pending" {
            let post = participant_move(&stored, "post", Phase::Post);
            let to = StepUpdate {
                state: "posted",
                ..Default::default()
            };
            let side = SideEffects {
                event: (stored.kind != "move").then(|| received_event(&stored)),
                audit: None,
            };
            self.ledger
                .advance(&op.id, ("pending", None), &to, &[post], &side, now_ms())
                .await?;
            crate::failpoint::hit("saga.participant.after_post");
        }
        let stored = self
            .stored_incoming(&op)
            .await?
            .ok_or_else(|| CodedError::internal("incoming transfer vanished"))?;
        match stored.state.as_str() {
            "posted" => Ok(Self::answer(&stored)),
            other => Err(CodedError::new(
                ErrorCode::FailedPrecondition,
                format!("transfer is {other} here and cannot be posted"),
            )),
        }
    }

    /// Abort at the receiver's cell: void the hold, or record the void first.
    pub async fn void_incoming(
        &self,
        caller: &str,
        t: &IncomingTransfer,
    ) -> Result<IncomingResponse, CodedError> {
        let op = self.incoming_op(caller, t)?;
        let now = now_ms();
        let stored = match self.stored_incoming(&op).await? {
            Some(s) => s,
            None => {
                let mut tombstone = op.clone();
                tombstone.state = "voided".into();
                tombstone.error_detail = Some("voided by the sender's cell".into());
                match self
                    .ledger
                    .execute(&tombstone, &[], &SideEffects::default())
                    .await
                {
                    Ok(()) | Err(LedgerError::Exists) => {}
                    Err(e) => return Err(e.into()),
                }
                self.stored_incoming(&op)
                    .await?
                    .ok_or_else(|| CodedError::internal("incoming transfer vanished"))?
            }
        };
        if stored.state == "pending" {
            let void = participant_move(&stored, "void", Phase::Void);
            let to = StepUpdate {
                state: "voided",
                error_detail: Some("voided by the sender's cell"),
                ..Default::default()
            };
            self.ledger
                .advance(
                    &op.id,
                    ("pending", None),
                    &to,
                    &[void],
                    &SideEffects::default(),
                    now,
                )
                .await?;
        }
        let stored = self
            .stored_incoming(&op)
            .await?
            .ok_or_else(|| CodedError::internal("incoming transfer vanished"))?;
        match stored.state.as_str() {
            "voided" | "failed" => Ok(IncomingResponse {
                state: "voided".into(),
                refused: false,
                reason: String::new(),
                moved_to: String::new(),
            }),
            other => Err(CodedError::new(
                ErrorCode::FailedPrecondition,
                format!("transfer is {other} here and cannot be voided"),
            )),
        }
    }
}
