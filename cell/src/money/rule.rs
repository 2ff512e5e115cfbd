//! The ledger's balance rule, written once: what a transfer does to its two
//! accounts, and when the ledger refuses it.
//!
//! Pure, so both write paths share it, in the same shape: read the
//! balances of every account an operation touches into a `View`, `apply`
//! each move to it, write back what changed. The per-statement path
//! (`ledger.rs`: PostgreSQL, and audited writes) reads them locked
//! (`FOR UPDATE`, in the byte order of their ids, so two transfers touching
//! the same accounts in opposite directions queue instead of deadlocking);
//! the SQLite
//! group committer (`group.rs`) holds them in memory under the writer lock.
//! `tests/ledger_paths.rs` runs random operation sequences through both
//! paths and both backends and holds them to the same answers.

use super::currency::BALANCE_LIMIT;
use super::ledger::{Account, LedgerError, LedgerResult, Move, Phase};
use std::collections::HashMap;

/// An account's four balance columns (TigerBeetle's shape): nothing is
/// ever subtracted from a posted column, so the history adds up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Columns {
    pub debits_pending: i64,
    pub debits_posted: i64,
    pub credits_pending: i64,
    pub credits_posted: i64,
}

impl Columns {
    /// Spendable now: posted credits minus posted and held debits.
    pub fn available(&self) -> i64 {
        self.credits_posted - self.debits_posted - self.debits_pending
    }

    fn plus(self, d: &Columns) -> Self {
        Self {
            debits_pending: self.debits_pending + d.debits_pending,
            debits_posted: self.debits_posted + d.debits_posted,
            credits_pending: self.credits_pending + d.credits_pending,
            credits_posted: self.credits_posted + d.credits_posted,
        }
    }
}

/// What one move changes on one of its accounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delta {
    pub columns: Columns,
    /// The available balance the account must have first (a wallet
    /// spending); zero for everything else.
    pub need: i64,
    /// The move's amount: no column may come within it of `BALANCE_LIMIT`.
    pub amount: i64,
}

/// The two accounts of `m` and what it changes on each, in account-id
/// order (which decides which refusal a move that fails on both sides
/// reports; the rows are locked by the write path, `ledger.rs`).
pub fn deltas(m: &Move) -> [(&Account, Delta); 2] {
    let a = m.amount;
    // Only a wallet's own spending (a transfer or a hold) is checked;
    // system and clearing accounts are the other side of money entering or
    // leaving, and a post or void only moves what a hold already took.
    let spends = m.debit.kind == "wallet" && matches!(m.phase, Phase::Single | Phase::Pending);
    let delta = |[
        debits_pending,
        debits_posted,
        credits_pending,
        credits_posted,
    ]: [i64; 4],
                 need| Delta {
        columns: Columns {
            debits_pending,
            debits_posted,
            credits_pending,
            credits_posted,
        },
        need,
        amount: a,
    };
    let (debit, credit) = match m.phase {
        Phase::Single => ([0, a, 0, 0], [0, 0, 0, a]),
        Phase::Pending => ([a, 0, 0, 0], [0, 0, a, 0]),
        Phase::Post => ([-a, a, 0, 0], [0, 0, -a, a]),
        Phase::Void => ([-a, 0, 0, 0], [0, 0, -a, 0]),
    };
    let pair = [
        (&m.debit, delta(debit, if spends { a } else { 0 })),
        (&m.credit, delta(credit, 0)),
    ];
    if m.debit.id <= m.credit.id {
        pair
    } else {
        [pair[1], pair[0]]
    }
}

/// The rule: the columns after `delta`, or why the ledger refuses it.
/// A spending wallet must hold `need` available, and no column may pass
/// `BALANCE_LIMIT` (checked before the add, against the move's amount,
/// so no sum can overflow).
pub fn check(before: Columns, delta: &Delta) -> LedgerResult<Columns> {
    let limit = BALANCE_LIMIT - delta.amount;
    let funded = delta.need == 0 || before.available() >= delta.need;
    if !funded {
        return Err(LedgerError::InsufficientFunds);
    }
    if before.debits_pending + before.debits_posted > limit
        || before.credits_pending + before.credits_posted > limit
    {
        return Err(LedgerError::Overflow);
    }
    let after = before.plus(&delta.columns);
    // Only a hold's own resolution takes from a pending column, and it
    // resolves once: a column going below zero is a broken ledger.
    if after.debits_pending < 0 || after.credits_pending < 0 {
        return Err(LedgerError::Invariant(
            "a pending balance would go below zero".into(),
        ));
    }
    Ok(after)
}

/// The balances of the accounts a write touches, by account id; an
/// account not there yet starts at zero.
pub type View = HashMap<String, Columns>;

/// Applies `m` to `view`, or refuses it and leaves `view` as it was. A
/// move takes a positive amount between two different accounts; the two
/// are judged one after the other, the second on what the move left of the
/// first.
pub fn apply(view: &mut View, m: &Move) -> LedgerResult<()> {
    if m.amount <= 0 || m.debit.id == m.credit.id {
        return Err(LedgerError::Invariant(format!(
            "{} must move a positive amount between two accounts",
            m.id
        )));
    }
    let [(first, d1), (second, d2)] = deltas(m);
    let prior = view.get(&first.id).copied();
    view.insert(first.id.clone(), check(prior.unwrap_or_default(), &d1)?);
    let other = view.get(&second.id).copied().unwrap_or_default();
    match check(other, &d2) {
        Ok(after) => {
            view.insert(second.id.clone(), after);
            Ok(())
        }
        Err(e) => {
            match prior {
                Some(c) => view.insert(first.id.clone(), c),
                None => view.remove(&first.id),
            };
            Err(e)
        }
    }
}

/// A post or void must resolve a hold with exactly its accounts and amount.
pub fn resolves(m: &Move, hold: Option<(&str, &str, i64)>) -> LedgerResult<()> {
    let Some(pending) = &m.pending_id else {
        return Ok(());
    };
    if hold == Some((m.debit.id.as_str(), m.credit.id.as_str(), m.amount)) {
        Ok(())
    } else {
        Err(LedgerError::Invariant(format!(
            "{} does not match hold {pending}",
            m.id
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(dp: i64, dq: i64, cp: i64, cq: i64) -> Columns {
        Columns {
            debits_pending: dp,
            debits_posted: dq,
            credits_pending: cp,
            credits_posted: cq,
        }
    }

    fn wallet_to_wallet(phase: Phase, amount: i64) -> Move {
        Move {
            phase,
            pending_id: matches!(phase, Phase::Post | Phase::Void).then(|| "h".into()),
            ..Move::single(
                "op",
                Account::wallet("b", "CNY"),
                Account::wallet("a", "CNY"),
                amount,
            )
        }
    }

    #[test]
    fn deltas_come_in_account_id_order() {
        let m = wallet_to_wallet(Phase::Single, 5);
        let [(first, _), (second, _)] = deltas(&m);
        assert_eq!(first.id, "wallet:a:CNY");
        assert_eq!(second.id, "wallet:b:CNY");
    }

    #[test]
    fn a_wallet_spends_only_what_is_available() {
        let m = wallet_to_wallet(Phase::Single, 5);
        let debit = deltas(&m)[1].1;
        assert_eq!(debit.need, 5);
        assert_eq!(check(cols(0, 0, 0, 5), &debit).unwrap(), cols(0, 5, 0, 5));
        // Held money is not available.
        assert!(matches!(
            check(cols(1, 0, 0, 5), &debit),
            Err(LedgerError::InsufficientFunds)
        ));
        // Pending credits are not available either.
        assert!(matches!(
            check(cols(0, 0, 9, 4), &debit),
            Err(LedgerError::InsufficientFunds)
        ));
    }

    #[test]
    fn system_accounts_may_go_negative() {
        let m = Move::single(
            "op",
            Account::system("deposits", "CNY"),
            Account::wallet("a", "CNY"),
            7,
        );
        let [(system, debit), (_, credit)] = deltas(&m);
        assert_eq!(system.id, "system:deposits:CNY");
        assert_eq!(debit.need, 0);
        assert_eq!(check(Columns::default(), &debit).unwrap(), cols(0, 7, 0, 0));
        assert_eq!(
            check(Columns::default(), &credit).unwrap(),
            cols(0, 0, 0, 7)
        );
    }

    #[test]
    fn resolving_a_hold_needs_no_funds_and_moves_it() {
        let post = wallet_to_wallet(Phase::Post, 5);
        let [(_, credit), (_, debit)] = deltas(&post);
        assert_eq!(debit.need, 0);
        assert_eq!(check(cols(5, 0, 0, 5), &debit).unwrap(), cols(0, 5, 0, 5));
        assert_eq!(check(cols(0, 0, 5, 0), &credit).unwrap(), cols(0, 0, 0, 5));
        let void = wallet_to_wallet(Phase::Void, 5);
        let debit = deltas(&void)[1].1;
        assert_eq!(check(cols(5, 0, 0, 5), &debit).unwrap(), cols(0, 0, 0, 5));
    }

    #[test]
    fn no_column_passes_the_limit() {
        let m = Move::single(
            "op",
            Account::system("deposits", "CNY"),
            Account::wallet("a", "CNY"),
            10,
        );
        let credit = deltas(&m)[1].1;
        let at = BALANCE_LIMIT - 10;
        assert!(check(cols(0, 0, 0, at), &credit).is_ok());
        assert!(matches!(
            check(cols(0, 0, 1, at), &credit),
            Err(LedgerError::Overflow)
        ));
    }

    #[test]
    fn a_refused_move_leaves_the_view_as_it_was() {
        // b's wallet (second in lock order) cannot pay: a's side, applied
        // first, is undone.
        let m = wallet_to_wallet(Phase::Single, 5);
        let mut view = View::from([("wallet:b:CNY".to_string(), cols(0, 0, 0, 4))]);
        let was = view.clone();
        assert!(matches!(
            apply(&mut view, &m),
            Err(LedgerError::InsufficientFunds)
        ));
        assert_eq!(view, was);
        view.insert("wallet:b:CNY".into(), cols(0, 0, 0, 5));
        apply(&mut view, &m).unwrap();
        assert_eq!(view["wallet:a:CNY"], cols(0, 0, 0, 5));
        assert_eq!(view["wallet:b:CNY"], cols(0, 5, 0, 5));
    }

    #[test]
    fn a_move_needs_an_amount_and_two_accounts() {
        let mut view = View::new();
        let mut m = wallet_to_wallet(Phase::Single, 0);
        assert!(matches!(
            apply(&mut view, &m),
            Err(LedgerError::Invariant(_))
        ));
        m.amount = 5;
        m.credit = m.debit.clone();
        assert!(matches!(
            apply(&mut view, &m),
            Err(LedgerError::Invariant(_))
        ));
        assert!(view.is_empty());
    }

    #[test]
    fn a_resolution_matches_its_hold_exactly() {
        let m = wallet_to_wallet(Phase::Post, 5);
        assert!(resolves(&m, Some(("wallet:b:CNY", "wallet:a:CNY", 5))).is_ok());
        for wrong in [
            None,
            Some(("wallet:b:CNY", "wallet:a:CNY", 4)),
            Some(("wallet:a:CNY", "wallet:b:CNY", 5)),
        ] {
            assert!(matches!(
                resolves(&m, wrong),
                Err(LedgerError::Invariant(_))
            ));
        }
        assert!(resolves(&wallet_to_wallet(Phase::Single, 5), None).is_ok());
    }
}
