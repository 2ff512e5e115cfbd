//! The source cell's side of moves: each second it reloads the users frozen
//! here, asks the journal for this region's open moves and batches, runs
//! each move's steps as far as they go, and starts a batch's next moves at
//! its rate. Everything it does is idempotent and reported to the journal
//! with a compare-and-set, so several instances of one cell, or one that
//! restarted mid-step, cannot do a step twice in effect.

use super::Moves;
use super::frozen::RELOAD;
use crate::clock::now_ms;
use crate::money::moving::MoneyStep;
use crate::peers::PeerRefusal;
use homecell_proto::cell::{DiscardImportRequest, ImportUserRequest};
use homecell_proto::control::{
    AdvanceMoveRequest, ExtendBatchRequest, ListMovesRequest, MoveBatch, MoveRecord, MoveState,
};
use homecell_proto::error::{CodedError, ErrorCode};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Moves one instance runs at once.
const CONCURRENT: usize = 128;
/// How long a move waits, before it freezes its user, for their money in
/// flight to land; then it is undone (a withdrawal awaiting its provider
/// may take hours).
const MAX_WAIT: Duration = Duration::from_secs(600);
/// How long a frozen user's money in flight (started just before the
/// freeze) may take to land before the move is undone.
const DRAIN: Duration = Duration::from_secs(10);
/// How long the finish waits for the money to post at the new home before
/// it leaves the move for the next pass.
const SETTLE: Duration = Duration::from_secs(5);

/// How long a move may keep its user frozen waiting for the new home (a
/// target that does not answer) before it is undone, so that nobody stays
/// unable to write for long because another region is down
/// (`move.freeze_limit`, 1 s to 10 min).
const FREEZE_LIMIT_MS: i64 = 30_000;

/// A step that must wait while its user is frozen: past the freeze limit
/// the move is undone instead.
fn frozen_too_long(frozen_at: i64, limit_ms: i64, stop: Stop) -> Stop {
    match stop {
        Stop::Later(why) if now_ms() - frozen_at > limit_ms => {
            Stop::Undo(format!("the new home kept the user frozen too long: {why}"))
        }
        other => other,
    }
}

/// How a pass over one move ended.
enum Pass {
    /// It went as far as it can (maybe to its end).
    Progressed,
    /// It waits for something: try it again after a while.
    Waiting,
}

/// Why a step stopped.
enum Stop {
    /// Try again on a later pass (and say why in the journal).
    Later(String),
    /// The move cannot go on: undo it.
    Undo(String),
    /// Something else (the datastore, the journal): try again later.
    Err(CodedError),
}

impl From<CodedError> for Stop {
    fn from(e: CodedError) -> Self {
        Stop::Err(e)
    }
}

impl From<PeerRefusal> for Stop {
    fn from(e: PeerRefusal) -> Self {
        match e {
            PeerRefusal::Unreachable(m) => Stop::Later(m),
            PeerRefusal::Refused(m) => Stop::Undo(m),
        }
    }
}

fn db(e: crate::db::DbError) -> Stop {
    Stop::Err(super::internal(e))
}

/// Open moves asked of the journal per pass.
const PAGE: u32 = 1_000;
/// The longest a move that keeps waiting (for money in flight, for a
/// target that is down) is left between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Moves to leave alone until a time: each one's next try after a step
/// that must be tried again later, backing off (1 s, 2 s, 4 s, … 30 s), so
/// that a thousand waiting moves neither hold the worker nor write to the
/// journal every second; jittered, so that those waiting on one outage do
/// not all come back at once. Only moves whose user is not frozen back off.
#[derive(Default)]
struct Backoff(Mutex<HashMap<String, (tokio::time::Instant, u32)>>);

impl Backoff {
    fn due(&self, id: &str) -> bool {
        let map = self.0.lock().expect("poisoned");
        map.get(id)
            .is_none_or(|(at, _)| *at <= tokio::time::Instant::now())
    }

    fn later(&self, id: &str) {
        let mut map = self.0.lock().expect("poisoned");
        let tries = map.get(id).map_or(0, |(_, n)| n + 1);
        let max = MAX_BACKOFF.as_millis() as i64;
        let wait = homecell_common::backoff::jittered_ms(i64::from(tries), 1_000, max);
        let at = tokio::time::Instant::now() + Duration::from_millis(wait as u64);
        map.insert(id.to_string(), (at, tries));
    }

    fn clear(&self, id: &str) {
        self.0.lock().expect("poisoned").remove(id);
    }

    /// Forgets moves that are no longer open.
    fn keep(&self, open: &HashSet<&str>) {
        self.0
            .lock()
            .expect("poisoned")
            .retain(|id, _| open.contains(id.as_str()));
    }
}

/// The order a pass runs open moves in: those past the point of no return
/// or being undone first (their users are frozen, or their money held),
/// then the ones furthest along.
fn urgency(m: &MoveRecord) -> u8 {
    match m.state() {
        MoveState::Switched | MoveState::Cancelled => 0,
        MoveState::Copied => 1,
        MoveState::Copying => 2,
        _ => 3,
    }
}

pub async fn run(moves: Arc<Moves>, token: CancellationToken) {
    let running: Arc<Mutex<HashSet<String>>> = Arc::default();
    let backoff: Arc<Backoff> = Arc::default();
    // Where the next pass's page starts: more than a page of open moves is
    // walked page by page, so none waits behind a page of slow ones.
    let mut after = String::new();
    // The open moves seen on the pages of this walk, and when it began.
    let mut cycle: HashSet<String> = HashSet::new();
    let mut cycle_started = now_ms();
    let mut batches = Pacer::default();
    let mut tick = tokio::time::interval(RELOAD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        match moves.store.frozen().await {
            Ok(rows) => moves
                .frozen
                .replace(rows.into_iter().map(|(u, _, to, _)| (u, to)).collect()),
            Err(e) => tracing::warn!(error = %e, "cannot read the users frozen by moves"),
        }
        moves.settle_arrivals().await;
        // A walk starts before its first page is asked for: a move frozen
        // later may be missing from pages read before.
        if after.is_empty() {
            cycle_started = now_ms();
        }
        let open = moves
            .journal()
            .list_moves(ListMovesRequest {
                from_region: moves.region.clone(),
                open_only: true,
                after: after.clone(),
                limit: PAGE,
                ..Default::default()
            })
            .await;
        let mut open = match open {
            Ok(r) => r.into_inner(),
            Err(s) => {
                tracing::debug!(error = %s.message(), "cannot list this region's moves");
                continue;
            }
        };
        cycle.extend(
            open.moves
                .iter()
                .filter(|m| m.state() != MoveState::Done)
                .map(|m| m.id.clone()),
        );
        after = match open.moves.last() {
            Some(last) if open.moves.len() == PAGE as usize => last.user_id.clone(),
            _ => String::new(),
        };
        if after.is_empty() {
            // Every page seen: a freeze older than this walk whose move
            // was on none of its pages (finished or undone by another
            // instance, or left by a crash between steps) thaws.
            moves.thaw_stale(&cycle, cycle_started).await;
            backoff.keep(&cycle.iter().map(String::as_str).collect());
            cycle.clear();
        }
        open.moves.sort_by_key(urgency);
        for m in open.moves {
            if running.lock().expect("poisoned").len() >= CONCURRENT {
                break;
            }
            if !backoff.due(&m.id) || !running.lock().expect("poisoned").insert(m.id.clone()) {
                continue;
            }
            let (moves, running, backoff) = (moves.clone(), running.clone(), backoff.clone());
            tokio::spawn(async move {
                let (id, user) = (m.id.clone(), m.user_id.clone());
                match moves.drive(m).await {
                    // A frozen user's move is tried every pass: they wait.
                    Pass::Waiting if !moves.frozen.contains(&user) => backoff.later(&id),
                    _ => backoff.clear(&id),
                }
                running.lock().expect("poisoned").remove(&id);
            });
        }
        for b in open.batches {
            batches.pace(&moves, b).await;
        }
    }
}

impl Moves {
    /// Users a move brought here whom the directory now homes here: their
    /// notices, held since the copy, go out from now on.
    async fn settle_arrivals(&self) {
        let Ok(users) = self.store.arrivals().await else {
            return;
        };
        let state = self.replica.state();
        for user in users {
            if state.user_region(&user) == Some(self.region.as_str()) {
                let _ = self.store.arrived(&user).await;
            }
        }
    }

    /// Thaws users frozen by moves that are not among `open` (the open
    /// moves of a walk over every page), once frozen since before the walk
    /// began and for 10 s at least: a move that froze its user later may
    /// be on a page read before.
    async fn thaw_stale(&self, open: &HashSet<String>, walk_started: i64) {
        let Ok(rows) = self.store.frozen().await else {
            return;
        };
        let before = walk_started.min(now_ms() - 10_000);
        for (user, move_id, _, frozen_at) in rows {
            if !open.contains(&move_id) && frozen_at < before {
                tracing::warn!(r#move = %move_id, "a freeze outlived its move; thawing");
                if self.store.thaw(&user, &move_id).await.is_ok() {
                    self.frozen.remove(&user);
                }
            }
        }
    }

    /// Reports a step to the journal; the move as it stands after.
    async fn advance(
        &self,
        m: &MoveRecord,
        to: MoveState,
        error: &str,
        identifiers: Vec<String>,
    ) -> Result<MoveRecord, CodedError> {
        self.report(AdvanceMoveRequest {
            id: m.id.clone(),
            from_state: m.state,
            to_state: to as i32,
            error: error.to_string(),
            identifiers,
            undone: false,
        })
        .await
    }

    async fn report(&self, req: AdvanceMoveRequest) -> Result<MoveRecord, CodedError> {
        self.journal()
            .advance_move(req)
            .await
            .map(|r| r.into_inner().r#move.unwrap_or_default())
            .map_err(|s| {
                let code = match s.code() {
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                        ErrorCode::CellUnavailable
                    }
                    _ => ErrorCode::FailedPrecondition,
                };
                CodedError::new(code, s.message().to_string())
            })
    }

    /// The journal's current word on a move.
    async fn refetch(&self, m: &MoveRecord) -> Result<MoveRecord, CodedError> {
        self.journal_move(&m.id).await
    }

    /// Runs a move's steps as far as they go now.
    async fn drive(&self, mut m: MoveRecord) -> Pass {
        loop {
            let moved_on = |next: &MoveRecord, m: &MoveRecord| {
                next.state != m.state || next.undone != m.undone
            };
            match self.step(&m).await {
                Ok(next) if moved_on(&next, &m) => m = next,
                Ok(_) => return Pass::Progressed,
                Err(Stop::Later(why)) => {
                    tracing::info!(r#move = %m.id, why, "move step will be tried again");
                    // A cancelled move keeps the reason it was cancelled
                    // for; its undo's retries are in the log.
                    if m.state() != MoveState::Cancelled {
                        let _ = self.advance(&m, m.state(), &why, vec![]).await;
                    }
                    return Pass::Waiting;
                }
                Err(Stop::Undo(why)) => {
                    tracing::warn!(r#move = %m.id, why, "move cannot go on and could not be undone yet");
                    return Pass::Waiting;
                }
                Err(Stop::Err(e)) => {
                    // Refused by the journal (a cancel, or another instance
                    // got there first), or a failure here: go on from what
                    // the journal holds now, if that changed.
                    tracing::warn!(r#move = %m.id, error = %e.message, "move step failed; will retry");
                    match self.refetch(&m).await {
                        Ok(now) if moved_on(&now, &m) => m = now,
                        _ => return Pass::Waiting,
                    }
                }
            }
        }
    }

    /// The next step of a move, from the state the journal holds.
    async fn step(&self, m: &MoveRecord) -> Result<MoveRecord, Stop> {
        match m.state() {
            MoveState::Pending => Ok(self.advance(m, MoveState::Copying, "", vec![]).await?),
            MoveState::Copying => match self.copy(m).await {
                Ok(()) => Ok(self.advance(m, MoveState::Copied, "", vec![]).await?),
                Err(Stop::Undo(why)) => self.cancel(m, &why).await,
                Err(e) => Err(e),
            },
            MoveState::Copied => {
                let ids = self
                    .store
                    .qualified_identifiers(&m.user_id)
                    .await
                    .map_err(db)?;
                if ids.is_empty() || ids.len() > 16 {
                    return self
                        .cancel(m, "a move carries a user with 1 to 16 identifiers")
                        .await;
                }
                crate::failpoint::hit("move.source.before_switch");
                match self.advance(m, MoveState::Switched, "", ids).await {
                    Ok(next) => Ok(next),
                    // Refused: if the journal still holds the move here, the
                    // cut-over itself cannot happen (the target stopped
                    // taking users, say): undo it.
                    Err(e) => match self.refetch(m).await {
                        Ok(now) if now.state == m.state && e.code != ErrorCode::CellUnavailable => {
                            self.cancel(m, &format!("the cut-over was refused: {}", e.message))
                                .await
                        }
                        _ => Err(Stop::Err(e)),
                    },
                }
            }
            MoveState::Switched => {
                self.finish(m).await?;
                Ok(self.advance(m, MoveState::Done, "", vec![]).await?)
            }
            MoveState::Cancelled if !m.undone => self.undo(m).await,
            MoveState::Done | MoveState::Cancelled | MoveState::Unspecified => Ok(m.clone()),
        }
    }

    /// Journals the move cancelled (so no cut-over can follow), for the
    /// undo to run next.
    async fn cancel(&self, m: &MoveRecord, why: &str) -> Result<MoveRecord, Stop> {
        tracing::warn!(r#move = %m.id, why, "move cannot go on; undoing it");
        Ok(self.advance(m, MoveState::Cancelled, why, vec![]).await?)
    }

    /// Step 1 and 2 at the source: freeze, let money in flight land, copy,
    /// and hold the balances on both sides.
    async fn copy(&self, m: &MoveRecord) -> Result<(), Stop> {
        // Money of the user's on its way (a transfer between cells, a
        // withdrawal awaiting its provider) completes before the move
        // starts: the move waits for it with the user not frozen, so they
        // notice nothing meanwhile, and is undone only after MAX_WAIT.
        // (A move resumed after a crash, its user frozen already, goes on
        // to the check below.)
        if !self.frozen.contains(&m.user_id)
            && self
                .store
                .money_in_flight(&m.user_id, &m.id)
                .await
                .map_err(db)?
        {
            if now_ms() - m.created_unix_ms >= MAX_WAIT.as_millis() as i64 {
                return Err(Stop::Undo(
                    "money of the user's stayed in flight (a transfer or withdrawal) for ten minutes; move them once it lands".into(),
                ));
            }
            return Err(Stop::Later(
                "waiting for money of the user's in flight (a transfer or withdrawal) to land"
                    .into(),
            ));
        }
        let frozen_at = self
            .store
            .freeze(&m.user_id, &m.id, &m.to_region, now_ms())
            .await
            .map_err(db)?;
        self.frozen.insert(&m.user_id, &m.to_region);
        // Every instance of this cell has reloaded the set since.
        let settled_at = frozen_at + RELOAD.as_millis() as i64 + 250;
        let wait = settled_at - now_ms();
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait as u64)).await;
        }
        crate::failpoint::hit("move.source.after_freeze");
        let limit = self
            .replica
            .state()
            .config_ms("move.freeze_limit", &self.region, FREEZE_LIMIT_MS)
            .clamp(1_000, 600_000);
        let deadline = tokio::time::Instant::now() + DRAIN;
        while self
            .store
            .money_in_flight(&m.user_id, &m.id)
            .await
            .map_err(db)?
        {
            if tokio::time::Instant::now() >= deadline {
                return Err(Stop::Undo(
                    "money of the user's is still in flight (a transfer or withdrawal); move them once it lands".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let Some(bundle) = self.store.export(&m.user_id, now_ms()).await.map_err(db)? else {
            return Err(Stop::Undo("no such user here".into()));
        };
        let json = serde_json::to_vec(&bundle).map_err(|e| Stop::Err(super::internal(e)))?;
        self.peers
            .import_user(
                &m.to_region,
                ImportUserRequest {
                    from_region: self.region.clone(),
                    user_id: m.user_id.clone(),
                    bundle: json,
                    move_id: m.id.clone(),
                },
            )
            .await
            .map_err(|e| frozen_too_long(frozen_at, limit, e.into()))?;
        crate::failpoint::hit("move.source.after_import");
        crate::failpoint::pause("move.source.after_import").await;
        match self
            .money
            .hold_for_move(&m.id, &m.user_id, &m.to_region)
            .await?
        {
            MoneyStep::Done => {}
            MoneyStep::Refused(why) => return Err(Stop::Undo(why)),
            MoneyStep::Later(why) => {
                return Err(frozen_too_long(frozen_at, limit, Stop::Later(why)));
            }
        }
        // Cancelled meanwhile (another instance may have undone the move
        // already, before these holds existed): void them here, so none is
        // left behind. An undo that starts later voids them itself.
        if self.refetch(m).await?.state() != MoveState::Copying {
            self.money.void_for_move(&m.id, &m.user_id).await?;
            return Err(Stop::Later("the move was cancelled meanwhile".into()));
        }
        crate::failpoint::hit("move.source.after_money_hold");
        Ok(())
    }

    /// Step 4 at the source, after the cut-over.
    async fn finish(&self, m: &MoveRecord) -> Result<(), Stop> {
        // This cell answers "moved" for the user once its replica has the
        // cut-over: wait for it (bounded), so nothing lands here after.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.replica.state().revision < m.switched_revision
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.money.post_for_move(&m.id, &m.user_id).await?;
        crate::failpoint::hit("move.source.after_post");
        self.money
            .sweep_after_move(&m.id, &m.user_id, &m.to_region)
            .await?;
        let deadline = tokio::time::Instant::now() + SETTLE;
        while !self.money.move_money_settled(&m.id, &m.user_id).await? {
            if tokio::time::Instant::now() >= deadline {
                return Err(Stop::Later(
                    "the money is not yet posted at the new home".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Money of the user's that is still undecided (a withdrawal its
        // provider has not settled) would come back to a wallet no one
        // holds: the erasure waits for it, and the sweep then takes it.
        if self
            .store
            .money_in_flight(&m.user_id, &m.id)
            .await
            .map_err(db)?
        {
            return Err(Stop::Later(
                "money of the user's is still undecided at the old home".into(),
            ));
        }
        self.store
            .erase_moved(&m.user_id, now_ms())
            .await
            .map_err(db)?;
        crate::failpoint::hit("move.source.after_erase");
        self.store.thaw(&m.user_id, &m.id).await.map_err(db)?;
        self.frozen.remove(&m.user_id);
        tracing::info!(r#move = %m.id, to = %m.to_region, "user moved out");
        Ok(())
    }

    /// Undoes a cancelled move and reports it undone: the holds voided
    /// (the saga worker tells the target), the user thawed, the target's
    /// copy dropped.
    async fn undo(&self, m: &MoveRecord) -> Result<MoveRecord, Stop> {
        self.money.void_for_move(&m.id, &m.user_id).await?;
        self.store.thaw(&m.user_id, &m.id).await.map_err(db)?;
        self.frozen.remove(&m.user_id);
        self.peers
            .discard_import(
                &m.to_region,
                DiscardImportRequest {
                    from_region: self.region.clone(),
                    user_id: m.user_id.clone(),
                    move_id: m.id.clone(),
                },
            )
            .await
            .map_err(|e| Stop::Later(e.message().to_string()))?;
        tracing::info!(r#move = %m.id, why = %m.error, "move undone");
        Ok(self
            .report(AdvanceMoveRequest {
                id: m.id.clone(),
                from_state: MoveState::Cancelled as i32,
                to_state: MoveState::Cancelled as i32,
                undone: true,
                ..Default::default()
            })
            .await?)
    }
}

/// Starts each batch's moves at its rate: every pass picks as many users
/// as the time since the last pick allows.
#[derive(Default)]
struct Pacer {
    /// Batch id → when its last pick was.
    last: HashMap<String, tokio::time::Instant>,
}

impl Pacer {
    async fn pace(&mut self, moves: &Moves, b: MoveBatch) {
        let now = tokio::time::Instant::now();
        let since = self
            .last
            .get(&b.id)
            .map_or(RELOAD, |t| now.duration_since(*t));
        let want = (since.as_secs_f64() * f64::from(b.rate_per_sec.max(1))).round() as i64;
        let want = want.clamp(1, 1_000);
        let want = if b.limit != 0 {
            want.min(i64::from(b.limit.saturating_sub(b.started)))
        } else {
            want
        };
        let users = match moves
            .store
            .users_after(&b.cursor, &b.country, want.max(1))
            .await
        {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(batch = %b.id, error = %e, "cannot pick a batch's users");
                return;
            }
        };
        let exhausted = (users.len() as i64) < want;
        let picked = moves
            .journal()
            .extend_batch(ExtendBatchRequest {
                batch_id: b.id.clone(),
                cursor: b.cursor.clone(),
                user_ids: users,
                exhausted,
            })
            .await;
        match picked {
            Ok(_) => {
                self.last.insert(b.id, now);
            }
            Err(s) => tracing::debug!(batch = %b.id, error = %s.message(), "batch pick not taken"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_move_backs_off_longer_each_time_until_it_moves_on() {
        let b = Backoff::default();
        assert!(b.due("m"));
        b.later("m");
        assert!(!b.due("m"), "left alone after a wait");
        for _ in 0..4 {
            b.later("m");
        }
        let (at, tries) = b.0.lock().expect("poisoned")["m"];
        assert_eq!(tries, 4);
        // The fifth wait is 8 to 16 s (jittered).
        assert!(
            at - tokio::time::Instant::now() >= Duration::from_secs(7),
            "backs off"
        );
        for _ in 0..10 {
            b.later("m");
        }
        let (at, _) = b.0.lock().expect("poisoned")["m"];
        assert!(at - tokio::time::Instant::now() <= MAX_BACKOFF);
        b.clear("m");
        assert!(b.due("m"), "tried at once after it moved on");
        b.later("gone");
        b.keep(&HashSet::from(["m"]));
        assert!(b.due("gone"), "forgotten once not open");
    }

    #[test]
    fn moves_past_the_cut_over_or_being_undone_run_first() {
        let at = |state: MoveState| MoveRecord {
            state: state as i32,
            ..Default::default()
        };
        let mut open = [
            at(MoveState::Pending),
            at(MoveState::Copying),
            at(MoveState::Cancelled),
            at(MoveState::Copied),
            at(MoveState::Switched),
        ];
        open.sort_by_key(urgency);
        let order: Vec<MoveState> = open.iter().map(MoveRecord::state).collect();
        assert_eq!(
            order,
            [
                MoveState::Cancelled,
                MoveState::Switched,
                MoveState::Copied,
                MoveState::Copying,
                MoveState::Pending
            ]
        );
    }
}
