//! The money service's reads for handlers: a user's wallets and history.

use super::ledger::{Balance, HistoryFilter, LedgerResult, Operation};
use super::service::Money;

impl Money {
    /// A user's operations, newest first, either side (a receiver does not
    /// see what was refused before it reached them).
    pub async fn history(
        &self,
        user_id: &str,
        f: &HistoryFilter<'_>,
    ) -> LedgerResult<Vec<Operation>> {
        self.ledger.history(user_id, f).await
    }

    /// A user's wallets.
    pub async fn balances(&self, user_id: &str) -> LedgerResult<Vec<Balance>> {
        self.ledger.balances(user_id).await
    }
}
