//! The ledger moves of each step of a transfer between cells (`saga.rs`),
//! on either side. Every id derives from the transfer's id, so a retried
//! step names the same transfer and cannot apply twice.

use super::ledger::{Account, Move, Operation, Phase};
use homecell_proto::cell::IncomingTransfer;

/// Step 1's ledger move at the coordinator.
pub fn hold_move(op: &Operation) -> Move {
    coordinator_move(op, "hold", Phase::Pending)
}

/// The coordinator's live hold: `<id>:hold`, or `<id>:hold.<n>` once the
/// transfer was re-aimed n times at a receiver who moved (`saga.rs`).
pub(super) fn hold_id(op: &Operation) -> String {
    match op.retargets {
        0 => format!("{}:hold", op.id),
        n => format!("{}:hold.{n}", op.id),
    }
}

pub(super) fn coordinator_move(op: &Operation, step: &str, phase: Phase) -> Move {
    let id = match phase {
        Phase::Pending => hold_id(op),
        _ => format!("{}:{step}", op.id),
    };
    Move {
        id,
        operation_id: op.id.clone(),
        debit: Account::wallet(op.from_user.as_deref().unwrap_or_default(), &op.currency),
        credit: Account::clearing(op.peer_region.as_deref().unwrap_or_default(), &op.currency),
        amount: op.amount,
        phase,
        pending_id: (phase != Phase::Pending).then(|| hold_id(op)),
    }
}

pub(super) fn participant_move(op: &Operation, step: &str, phase: Phase) -> Move {
    Move {
        id: format!("{}:in-{step}", op.id),
        operation_id: op.id.clone(),
        debit: Account::clearing(op.peer_region.as_deref().unwrap_or_default(), &op.currency),
        credit: Account::wallet(op.to_user.as_deref().unwrap_or_default(), &op.currency),
        amount: op.amount,
        phase,
        pending_id: (phase != Phase::Pending).then(|| format!("{}:in-hold", op.id)),
    }
}

pub(super) fn incoming(op: &Operation, region: &str) -> IncomingTransfer {
    IncomingTransfer {
        transfer_id: op.id.clone(),
        from_region: region.to_string(),
        from_user: op.from_user.clone().unwrap_or_default(),
        to_user: op.to_user.clone().unwrap_or_default(),
        amount: op.amount,
        currency: op.currency.clone(),
        memo: op.memo.clone().unwrap_or_default(),
    }
}
