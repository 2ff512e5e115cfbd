//! The move journal: every move of a user between regions is a persisted
//! state machine here, and every batch of them a cursor over the source
//! region's users. Each function runs inside one store transaction.
//!
//! ```text
//! PENDING ─▶ COPYING ─▶ COPIED ─▶ SWITCHED ─▶ DONE
//!    │          │          │
//!    └──────────┴──────────┴─▶ CANCELLED ─▶ (undone)
//! ```
//!
//! A cancel is journaled first: once a move is CANCELLED no cut-over can
//! happen, so the source undoes its steps (voids the holds, thaws the user,
//! has the target drop its copy) knowing the move cannot complete behind
//! it, and then reports it undone. An operator's cancel and the source's
//! own decision (a step that cannot succeed) take the same path.
//!
//! The source cell runs the steps (`cell/src/moving/`) and reports each one
//! with a compare-and-set ([`advance`]); a step that is reported twice
//! answers the same, so a source that crashed after a step and before its
//! report runs the step again (every step is idempotent) and reports it
//! again. The cut-over is one revision: the move's state becomes SWITCHED
//! in the same transaction that re-homes the user and their identifiers in
//! the directory. Before it the user lives at the source, after it at the
//! target; there is no moment when both or neither is the home.
//!
//! The journal's rows are bookkeeping, not replicated state: routers and
//! cells see a move only as the directory change at its cut-over. Cells ask
//! for their region's open moves ([`open_from`]).

use crate::store::Tx;
use homecell_proto::control::{
    AdvanceMoveRequest, ExtendBatchRequest, MoveBatch, MoveRecord, MoveState, RegionStatus,
};
use homecell_proto::error::{CodedError, ErrorCode};

/// Moves started per second when a batch names no rate.
pub const DEFAULT_RATE: u32 = 10;
pub const MAX_RATE: u32 = 1_000;
/// Users a batch extension may name at once.
pub const MAX_EXTEND: usize = 1_000;

fn precondition(msg: impl Into<String>) -> CodedError {
    CodedError::new(ErrorCode::FailedPrecondition, msg.into())
}

fn not_found(what: &str, id: &str) -> CodedError {
    CodedError::not_found(format!("no {what} {id}"))
}

pub fn state_name(s: MoveState) -> &'static str {
    match s {
        MoveState::Unspecified => "unspecified",
        MoveState::Pending => "pending",
        MoveState::Copying => "copying",
        MoveState::Copied => "copied",
        MoveState::Switched => "switched",
        MoveState::Done => "done",
        MoveState::Cancelled => "cancelled",
    }
}

/// A region that exists and takes users.
fn active_region(tx: &Tx<'_>, id: &str) -> Result<(), CodedError> {
    let r = crate::regions::get(tx, id)?;
    if r.status != RegionStatus::Active as i32 {
        return Err(precondition(format!("region {id} does not take users")));
    }
    Ok(())
}

/// Journals a move of `user_id` from its home to `to`.
pub fn start(
    tx: &mut Tx<'_>,
    user_id: &str,
    to: &str,
    reverse_of: &str,
    batch_id: &str,
) -> Result<MoveRecord, CodedError> {
    crate::directory::validate_user_id(user_id)?;
    active_region(tx, to)?;
    let from = tx
        .user_home(user_id)?
        .ok_or_else(|| CodedError::not_found("the directory holds no such user"))?;
    if from == to {
        return Err(precondition(format!("the user already lives in {to}")));
    }
    if let Some(open) = tx.open_move_of(user_id)? {
        return Err(precondition(format!("the user is moving already: {open}")));
    }
    let now = tx.now_unix_ms();
    let record = MoveRecord {
        id: uuid::Uuid::new_v4().to_string(),
        user_id: user_id.to_string(),
        from_region: from,
        to_region: to.to_string(),
        state: MoveState::Pending as i32,
        reverse_of: reverse_of.to_string(),
        batch_id: batch_id.to_string(),
        created_unix_ms: now,
        actor: tx.actor().to_string(),
        ..Default::default()
    };
    tx.put_move(record)
}

pub fn get(tx: &Tx<'_>, id: &str) -> Result<MoveRecord, CodedError> {
    tx.move_record(id)?.ok_or_else(|| not_found("move", id))
}

/// The new home's check of a move's bundle before it imports it: every
/// identifier (WeChat bindings included) must be the moving user's, so a
/// rogue source cell cannot plant another person's identifier in the new
/// home's tables, where it would block or answer for them.
pub fn check_identifiers(
    tx: &Tx<'_>,
    key: &crate::directory::DirectoryKey,
    region: &str,
    id: &str,
    identifiers: &[String],
) -> Result<(), CodedError> {
    let m = get(tx, id)?;
    if m.to_region != region {
        return Err(not_found("move", id));
    }
    if m.state() != MoveState::Copying {
        return Err(CodedError::new(
            ErrorCode::FailedPrecondition,
            "the move is not copying",
        ));
    }
    crate::directory::check_held(tx, key, &m.user_id, identifiers)
}

/// Asks for a move to be undone. A move the source has not started ends at
/// once; one under way is undone by the source, which sees the request
/// before its next step. Past the cut-over, only a reversal brings the user
/// back.
pub fn cancel(tx: &mut Tx<'_>, id: &str) -> Result<MoveRecord, CodedError> {
    let mut m = get(tx, id)?;
    match m.state() {
        MoveState::Cancelled => Ok(m),
        s @ (MoveState::Pending | MoveState::Copying | MoveState::Copied) => {
            m.set_state(MoveState::Cancelled);
            m.cancel_requested = true;
            m.error = "cancelled by an operator".into();
            // Nothing was done yet for a move the source had not started.
            m.undone = s == MoveState::Pending;
            tx.put_move(m)
        }
        s => Err(precondition(format!(
            "the move is {}: past the cut-over, reverse it instead",
            state_name(s)
        ))),
    }
}

/// A new move that brings a finished move's user back, with everything
/// that changed at the new home since.
pub fn reverse(tx: &mut Tx<'_>, id: &str) -> Result<MoveRecord, CodedError> {
    let m = get(tx, id)?;
    if m.state() != MoveState::Done {
        return Err(precondition(format!(
            "the move is {}: only a finished move can be reversed",
            state_name(m.state())
        )));
    }
    if tx.user_home(&m.user_id)?.as_deref() != Some(m.to_region.as_str()) {
        return Err(precondition(format!(
            "the user no longer lives in {}",
            m.to_region
        )));
    }
    start(tx, &m.user_id, &m.from_region, &m.id, &m.batch_id)
}

/// The source cell's report of a step (see the module's diagram).
pub fn advance(
    tx: &mut Tx<'_>,
    key: &crate::directory::DirectoryKey,
    caller_region: &str,
    req: &AdvanceMoveRequest,
) -> Result<MoveRecord, CodedError> {
    let mut m = get(tx, &req.id)?;
    if m.from_region != caller_region {
        return Err(CodedError::new(
            ErrorCode::PermissionDenied,
            "only the move's source cell reports its steps",
        ));
    }
    let (from, to) = (req.from_state(), req.to_state());
    if m.state() != from {
        // Reported again (the answer was lost): the same answer.
        if m.state() == to {
            return Ok(m);
        }
        return Err(precondition(format!(
            "the move is {}, not {}",
            state_name(m.state()),
            state_name(from)
        )));
    }
    if from == to {
        if from == MoveState::Cancelled && req.undone {
            m.undone = true;
        } else {
            m.error = req.error.chars().take(500).collect();
            m.attempts = m.attempts.saturating_add(1);
        }
        return tx.put_move(m);
    }
    use MoveState::*;
    match (from, to) {
        (Pending, Copying) | (Copying, Copied) | (Switched, Done) => {}
        (Pending | Copying | Copied, Cancelled) => m.undone = from == Pending,
        (Copied, Switched) => {
            crate::directory::move_user(
                tx,
                key,
                &m.user_id,
                &m.from_region,
                &m.to_region,
                &req.identifiers,
            )?;
            m.switched_revision = tx.current_revision() + 1;
        }
        _ => {
            return Err(CodedError::invalid(format!(
                "a move does not go from {} to {}",
                state_name(from),
                state_name(to)
            )));
        }
    }
    m.set_state(to);
    if to != Cancelled || !req.error.is_empty() {
        m.error = req.error.chars().take(500).collect();
    }
    tx.put_move(m)
}

/// The open moves from `region`, in user id order after `after`.
pub fn open_from(
    tx: &Tx<'_>,
    region: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<MoveRecord>, CodedError> {
    let mut out = Vec::new();
    let mut cursor = after.map(str::to_string);
    // Open moves of every region share the index: walk it in pages.
    loop {
        let page = tx.open_moves_page(cursor.as_deref(), 512)?;
        let Some(last) = page.last() else {
            return Ok(out);
        };
        cursor = Some(last.user_id.clone());
        let full = page.len() < 512;
        out.extend(page.into_iter().filter(|m| m.from_region == region));
        if out.len() >= limit || full {
            out.truncate(limit);
            return Ok(out);
        }
    }
}

/// Every move matching a filter, in id order after `after`.
pub fn list(
    tx: &Tx<'_>,
    keep: impl Fn(&MoveRecord) -> bool,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<MoveRecord>, CodedError> {
    let mut out = Vec::new();
    let mut cursor = after.map(str::to_string);
    loop {
        let page = tx.moves_page(cursor.as_deref(), 1_024)?;
        let Some(last) = page.last() else {
            return Ok(out);
        };
        cursor = Some(last.id.clone());
        let full = page.len() < 1_024;
        out.extend(page.into_iter().filter(&keep));
        if out.len() >= limit || full {
            out.truncate(limit);
            return Ok(out);
        }
    }
}

fn validate_country(c: &str) -> Result<String, CodedError> {
    let c = c.trim().to_ascii_uppercase();
    if c.is_empty() || (c.len() == 2 && c.bytes().all(|b| b.is_ascii_uppercase())) {
        Ok(c)
    } else {
        Err(CodedError::invalid(
            "country must be an ISO 3166 alpha-2 code",
        ))
    }
}

pub fn start_batch(
    tx: &mut Tx<'_>,
    from: &str,
    to: &str,
    country: &str,
    limit: u32,
    rate: u32,
) -> Result<MoveBatch, CodedError> {
    crate::regions::get(tx, from)?;
    active_region(tx, to)?;
    if from == to {
        return Err(CodedError::invalid("from and to are the same region"));
    }
    let rate = match rate {
        0 => DEFAULT_RATE,
        r if r > MAX_RATE => {
            return Err(CodedError::invalid(format!(
                "rate is at most {MAX_RATE} moves per second"
            )));
        }
        r => r,
    };
    let b = MoveBatch {
        id: uuid::Uuid::new_v4().to_string(),
        from_region: from.to_string(),
        to_region: to.to_string(),
        country: validate_country(country)?,
        limit,
        rate_per_sec: rate,
        created_unix_ms: tx.now_unix_ms(),
        actor: tx.actor().to_string(),
        ..Default::default()
    };
    tx.put_batch(b)
}

pub fn get_batch(tx: &Tx<'_>, id: &str) -> Result<MoveBatch, CodedError> {
    tx.batch(id)?.ok_or_else(|| not_found("batch", id))
}

/// Stops a batch: no more moves start, and its moves not yet past the
/// cut-over are cancelled.
pub fn cancel_batch(tx: &mut Tx<'_>, id: &str) -> Result<MoveBatch, CodedError> {
    let mut b = get_batch(tx, id)?;
    for m in open_from(tx, &b.from_region, None, usize::MAX)? {
        if m.batch_id == b.id && m.state() < MoveState::Switched {
            cancel(tx, &m.id)?;
        }
    }
    b.cancel_requested = true;
    tx.put_batch(b)
}

/// Batches the source cell still has users to pick for.
pub fn open_batches_from(tx: &Tx<'_>, region: &str) -> Result<Vec<MoveBatch>, CodedError> {
    Ok(tx
        .batches()?
        .into_iter()
        .filter(|b| b.from_region == region && !b.exhausted && !b.cancel_requested)
        .collect())
}

/// The source cell's next pick of users for a batch: each still homed at
/// the source and not moving gets a move; the cursor moves past them all.
pub fn extend_batch(
    tx: &mut Tx<'_>,
    caller_region: &str,
    req: &ExtendBatchRequest,
) -> Result<MoveBatch, CodedError> {
    let mut b = get_batch(tx, &req.batch_id)?;
    if b.from_region != caller_region {
        return Err(CodedError::new(
            ErrorCode::PermissionDenied,
            "only the batch's source cell picks its users",
        ));
    }
    if b.cancel_requested || b.exhausted {
        return Ok(b);
    }
    if b.cursor != req.cursor {
        return Err(precondition("the batch's cursor has moved"));
    }
    if req.user_ids.len() > MAX_EXTEND {
        return Err(CodedError::invalid(format!(
            "at most {MAX_EXTEND} users at once"
        )));
    }
    let mut last = b.cursor.clone();
    for user in &req.user_ids {
        if *user <= last {
            return Err(CodedError::invalid("users are picked in id order"));
        }
        last = user.clone();
        if b.limit != 0 && b.started >= b.limit {
            break;
        }
        // A user who left meanwhile, or is moving already, is skipped.
        if tx.user_home(user)?.as_deref() != Some(b.from_region.as_str())
            || tx.open_move_of(user)?.is_some()
        {
            continue;
        }
        start(tx, user, &b.to_region, "", &b.id)?;
        b.started += 1;
    }
    b.cursor = last;
    b.exhausted = req.exhausted || (b.limit != 0 && b.started >= b.limit);
    tx.put_batch(b)
}
