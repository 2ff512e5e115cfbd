//! Moving users between regions, the cell's side. The control plane's
//! journal (`control-plane/src/moves.rs`) holds every move as a state
//! machine; the source cell runs its steps (`worker.rs`) and the target
//! cell takes the user in (`import`, below):
//!
//! 1. **Freeze** (COPYING): writes aimed at the user wait, then are
//!    refused as retryable (`frozen.rs`), and money in flight lands first.
//! 2. **Copy**: the user's rows (`bundle.rs`: profile, identifiers,
//!    credentials, roles, addresses, preferences, inbox, WeChat bindings,
//!    live sessions, past operations, undispatched events and unsent
//!    deliveries) go to the new home in one `ImportUser`, applied there in
//!    one transaction; then each wallet's balance is held on both sides
//!    (`money/moving.rs`). → COPIED.
//! 3. **Cut-over** (SWITCHED): one revision at the control plane re-homes
//!    the user and every identifier. Routers send the user to the new home
//!    from then on; the old home answers "moved".
//! 4. **Finish** (DONE): the money is posted on both sides, sessions here
//!    end as "moved" (a refresh token that still comes here is sent on),
//!    the account here is anonymised, and the user thaws.
//!
//! Before the cut-over a move can be undone (CANCELLED): the holds are
//! voided, the new home drops the import, the user thaws; nothing else
//! changed. Every step is idempotent, so a crash anywhere resumes from the
//! journal's state.

pub mod bundle;
pub mod frozen;
pub mod store;
pub mod worker;

use crate::money::service::Money;
use crate::peers::Peers;
use bundle::{BUNDLE_VERSION, Bundle};
use homecell_common::replica::Replica;
use homecell_proto::control::move_service_client::MoveServiceClient;
use homecell_proto::control::{CheckMoveIdentifiersRequest, GetMoveRequest, MoveRecord, MoveState};
use homecell_proto::error::{CodedError, ErrorCode};
use std::sync::Arc;
use store::MoveStore;
use tonic::transport::Channel;

/// Unsent notices a bundle may carry: a user has a handful; a sender
/// cannot have this cell send more than this on its word.
const MAX_DELIVERIES: usize = 1_000;

fn internal(e: impl std::fmt::Display) -> CodedError {
    CodedError::new(ErrorCode::Internal, format!("datastore: {e}"))
}

fn denied(msg: impl Into<String>) -> CodedError {
    CodedError::new(ErrorCode::PermissionDenied, msg.into())
}

/// The move service: both ends of a move.
pub struct Moves {
    pub(crate) store: MoveStore,
    /// Users frozen here by a move under way.
    pub frozen: Arc<frozen::Frozen>,
    region: String,
    replica: Arc<Replica>,
    peers: Arc<Peers>,
    money: Arc<Money>,
    /// The control plane, which keeps the journal.
    cp: Channel,
}

impl Moves {
    pub fn new(
        db: crate::db::Datastore,
        region: &str,
        replica: Arc<Replica>,
        peers: Arc<Peers>,
        money: Arc<Money>,
        frozen: Arc<frozen::Frozen>,
        cp: Channel,
    ) -> Self {
        Self {
            store: MoveStore::new(db),
            frozen,
            region: region.to_string(),
            replica,
            peers,
            money,
            cp,
        }
    }

    fn journal(&self) -> MoveServiceClient<Channel> {
        MoveServiceClient::new(self.cp.clone())
    }

    /// The journal's word on a move this cell takes part in.
    async fn journal_move(&self, id: &str) -> Result<MoveRecord, CodedError> {
        self.journal()
            .get_move(GetMoveRequest { id: id.to_string() })
            .await
            .map(|r| r.into_inner().r#move.unwrap_or_default())
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => denied("the journal holds no such move"),
                _ => CodedError::new(
                    ErrorCode::CellUnavailable,
                    format!("cannot ask the control plane: {}", s.message()),
                ),
            })
    }

    /// Checks that the journal names this move, from `from` to here, for
    /// this user.
    async fn check_journal(
        &self,
        move_id: &str,
        from: &str,
        user_id: &str,
    ) -> Result<MoveRecord, CodedError> {
        let m = self.journal_move(move_id).await?;
        if m.user_id != user_id || m.from_region != from || m.to_region != self.region {
            return Err(denied("the journal's move is another one"));
        }
        Ok(m)
    }

    /// The new home's side of step 2: checks the bundle, the journal and
    /// the directory, then applies it in one transaction.
    pub async fn import(
        &self,
        from: &str,
        user_id: &str,
        move_id: &str,
        bundle: &[u8],
    ) -> Result<(), CodedError> {
        // Only the user's current home may push it here, for a move the
        // journal holds and has not cut over: checked before the bundle is
        // even read.
        if self.replica.state().user_region(user_id) != Some(from) {
            return Err(denied(format!(
                "the directory does not home this user in {from}"
            )));
        }
        let m = self.check_journal(move_id, from, user_id).await?;
        if m.state() != MoveState::Copying {
            return Err(CodedError::new(
                ErrorCode::FailedPrecondition,
                "the move is not copying",
            ));
        }
        let mut b: Bundle = serde_json::from_slice(bundle)
            .map_err(|e| CodedError::invalid(format!("move bundle: {e}")))?;
        if b.version != BUNDLE_VERSION {
            return Err(CodedError::invalid(format!(
                "move bundle version {} (this cell reads {BUNDLE_VERSION})",
                b.version
            )));
        }
        if b.user.0 != user_id {
            return Err(CodedError::invalid("the bundle is for another user"));
        }
        self.check_bundle(&mut b, user_id)?;
        self.check_identifiers(move_id, b.qualified_identifiers())
            .await?;
        let now = crate::clock::now_ms();
        match self.store.import(&b, from, move_id, now).await {
            Ok(dropped) => {
                crate::failpoint::hit("move.target.after_import");
                // Cancelled while this import ran (and maybe discarded
                // before it committed): drop it again, so no copy of a user
                // who does not live here stays behind.
                if self.journal_move(move_id).await?.state() == MoveState::Cancelled {
                    self.store
                        .discard(user_id, move_id, crate::clock::now_ms())
                        .await
                        .map_err(internal)?;
                    return Err(CodedError::new(
                        ErrorCode::FailedPrecondition,
                        "the move was cancelled",
                    ));
                }
                if dropped > 0 {
                    tracing::warn!(
                        user_id,
                        roles = dropped,
                        "moved user's roles not granted here; grant them again with cell grant-role"
                    );
                }
                tracing::info!(user_id, from, r#move = move_id, "moving user imported");
                Ok(())
            }
            Err(crate::db::DbError::Conflict) => Err(CodedError::new(
                ErrorCode::AlreadyExists,
                "an identifier of the user belongs to another user here",
            )),
            Err(e) => Err(internal(e)),
        }
    }

    /// What a sending cell may not put in a bundle, whatever it signs:
    /// a refresh token of a session that is not the user's own (it would
    /// open someone else's session here), or another user's records. Past
    /// operations are kept only when final, and only those whose other
    /// side lives elsewhere (this cell holds its own users' records; a
    /// sender must not write into their history or their idempotency keys).
    fn check_bundle(&self, b: &mut Bundle, user_id: &str) -> Result<(), CodedError> {
        if b.user.1 != "active" {
            return Err(CodedError::invalid("a moving user is active"));
        }
        // Every identifier in the form this cell would have stored it: the
        // directory takes any string a cell claims, so only the normal
        // form is an address this cell would send to.
        for (kind, value) in &b.identifiers {
            let normal = homecell_proto::identifier::Identifier::parse(value)
                .is_ok_and(|id| id.kind.as_str() == kind && id.value == *value);
            if !normal {
                return Err(CodedError::invalid(
                    "an identifier of the bundle is not in normal form",
                ));
            }
        }
        if b.deliveries.len() > MAX_DELIVERIES {
            return Err(CodedError::invalid(format!(
                "more than {MAX_DELIVERIES} unsent notices; move the user once they are sent"
            )));
        }
        // Notices go only to the user's own addresses (the identifiers
        // the journal checks): a sender cannot have this cell mail or text
        // anyone else. Undispatched events with a code or about one
        // address (resets, sign-in codes, identifier proofs) stay behind:
        // their codes do not travel, and the user asks again.
        let own: std::collections::HashSet<(&str, &str)> = b
            .identifiers
            .iter()
            .filter_map(|(kind, value)| match kind.as_str() {
                "email" => Some(("email", value.as_str())),
                "phone" => Some(("sms", value.as_str())),
                _ => None,
            })
            .collect();
        b.deliveries
            .retain(|d| own.contains(&(d.channel.as_str(), d.recipient.as_str())));
        b.outbox
            .retain(|e| !crate::notice::ADDRESSED.contains(&e.1.as_str()));
        // A session lasts no longer here than one made here would.
        let latest = crate::clock::now_ms() + crate::identity::service::SESSION_TTL_MS;
        for s in &mut b.sessions {
            s.4 = s.4.min(latest);
        }
        let sessions: std::collections::HashSet<&str> =
            b.sessions.iter().map(|s| s.0.as_str()).collect();
        if b.refresh_tokens
            .iter()
            .any(|r| !sessions.contains(r.1.as_str()))
        {
            return Err(CodedError::invalid(
                "a refresh token of the bundle is not of its sessions",
            ));
        }
        let state = self.replica.state();
        b.operations.retain(|op| {
            let final_state = matches!(op.state.as_str(), "posted" | "voided" | "failed");
            let other = match (op.from_user.as_deref(), op.to_user.as_deref()) {
                (Some(f), Some(t)) if f == user_id => Some(t),
                (Some(f), Some(t)) if t == user_id => Some(f),
                (Some(f), None) if f == user_id => None,
                (None, Some(t)) if t == user_id => None,
                _ => return false,
            };
            let other_here = other.is_some_and(|o| {
                o != user_id && state.user_region(o) == Some(self.region.as_str())
            });
            final_state && !other_here
        });
        Ok(())
    }

    /// Asks the journal whether every identifier of the bundle (WeChat
    /// bindings included) is the moving user's: a source that signs a
    /// bundle is trusted with its user's rows, not with anyone else's
    /// identifiers, which would block or answer for them here.
    async fn check_identifiers(
        &self,
        move_id: &str,
        identifiers: Vec<String>,
    ) -> Result<(), CodedError> {
        let req = CheckMoveIdentifiersRequest {
            id: move_id.to_string(),
            identifiers,
        };
        match self.journal().check_move_identifiers(req).await {
            Ok(_) => Ok(()),
            Err(s) => Err(match s.code() {
                tonic::Code::PermissionDenied | tonic::Code::InvalidArgument => {
                    denied(format!("the bundle's identifiers: {}", s.message()))
                }
                tonic::Code::FailedPrecondition | tonic::Code::NotFound => {
                    CodedError::new(ErrorCode::FailedPrecondition, s.message().to_string())
                }
                _ => CodedError::new(
                    ErrorCode::CellUnavailable,
                    format!("cannot ask the control plane: {}", s.message()),
                ),
            }),
        }
    }

    /// The new home's side of an undone move: what the import brought goes,
    /// unless the user lives here (the move cut over after all).
    pub async fn discard(
        &self,
        from: &str,
        user_id: &str,
        move_id: &str,
    ) -> Result<(), CodedError> {
        if self.replica.state().user_region(user_id) == Some(self.region.as_str()) {
            return Err(CodedError::new(
                ErrorCode::FailedPrecondition,
                "the user lives here: the move cut over",
            ));
        }
        let m = self.check_journal(move_id, from, user_id).await?;
        if m.state() != MoveState::Cancelled {
            return Err(CodedError::new(
                ErrorCode::FailedPrecondition,
                "the journal does not hold the move cancelled",
            ));
        }
        self.store
            .discard(user_id, move_id, crate::clock::now_ms())
            .await
            .map_err(internal)?;
        tracing::info!(
            user_id,
            from,
            r#move = move_id,
            "undone move's import discarded"
        );
        Ok(())
    }

    /// The user a refresh token's session belongs to.
    pub async fn refresh_user(&self, refresh_hash: &str) -> Option<String> {
        self.store.refresh_user(refresh_hash).await.ok()?
    }

    /// A refresh token of a session a move ended here: the error that sends
    /// the client to the user's new home.
    pub async fn moved_session(&self, refresh_hash: &str) -> Option<CodedError> {
        let user = self.store.moved_session_user(refresh_hash).await.ok()??;
        let state = self.replica.state();
        let home = state.user_region(&user).filter(|h| *h != self.region)?;
        Some(CodedError::moved(home))
    }
}
