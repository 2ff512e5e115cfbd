-- What the cell samples for /metrics every 15 s (cell/src/gauges.rs)
-- reads indexes, never whole tables: live sessions (ended ones are kept
-- and are most of the table) and the clearing accounts (one per peer
-- region and currency, among one account per wallet).
CREATE INDEX sessions_live ON sessions (expires_at) WHERE revoked_at IS NULL;
CREATE INDEX ledger_accounts_clearing ON ledger_accounts (owner, currency) WHERE kind = 'clearing';
