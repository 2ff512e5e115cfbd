-- Identity under attack (docs/SECURITY.md).

-- Password-reset budgets, across every code: codes issued in the current
-- hour window and wrong guesses in the current day window. Keyed by
-- `user:<id>` for an account, or `id:<sha256 of the identifier>` for an
-- identifier no account holds, so unknown identifiers are answered (and
-- refused) exactly as known ones are.
CREATE TABLE reset_budgets (
    key          TEXT PRIMARY KEY NOT NULL,
    issue_window BIGINT NOT NULL,
    issued       BIGINT NOT NULL,
    guess_window BIGINT NOT NULL,
    guesses      BIGINT NOT NULL
);

-- Idempotent refresh rotation: a token that was rotated remembers the
-- hash of its successor and the salt that, with the token itself, derives
-- the successor again, so a retry within the grace window gets the same
-- pair. Neither is useful without the presented token.
ALTER TABLE refresh_tokens ADD COLUMN successor_hash TEXT;
ALTER TABLE refresh_tokens ADD COLUMN successor_salt TEXT;

-- Directory claims this cell made and has not settled: written before the
-- control plane is asked, removed in the transaction that creates the user
-- (`pending`), or once the control plane released the claim
-- (`releasing`). What stays behind (a crash between claim and insert, a
-- control plane that timed out, a failed release) is released by the
-- cell's reconciliation, so an identifier is never blocked for good.
CREATE TABLE pending_claims (
    identifier TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('pending', 'releasing')),
    created_at BIGINT NOT NULL,
    PRIMARY KEY (identifier, user_id)
);
