-- The money ledger (TigerBeetle's model): accounts with four balance columns,
-- immutable transfers, two-phase holds (pending, then post or void), and the
-- record of every money operation a client asked for, which is both the
-- idempotency record and, for cross-cell transfers, the durable saga state.
-- Amounts are integer minor units (BIGINT); times are unix milliseconds.

CREATE TABLE ledger_accounts (
    -- wallet:<user>:<CUR>, or system:<kind>:<CUR>, or clearing:<peer region>:<CUR>
    id              TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,   -- wallet | deposits | withdrawals | adjustments | fees | clearing
    owner           TEXT,            -- the user id (kept after anonymisation) or the peer region
    currency        TEXT NOT NULL,
    debits_pending  BIGINT NOT NULL DEFAULT 0 CHECK (debits_pending >= 0),
    debits_posted   BIGINT NOT NULL DEFAULT 0 CHECK (debits_posted >= 0),
    credits_pending BIGINT NOT NULL DEFAULT 0 CHECK (credits_pending >= 0),
    credits_posted  BIGINT NOT NULL DEFAULT 0 CHECK (credits_posted >= 0),
    created_at      BIGINT NOT NULL,
    -- The datastore's own backstop for "a wallet never goes negative": the
    -- code checks with a conditional update when funds are held.
    CHECK (kind <> 'wallet' OR credits_posted - debits_posted - debits_pending >= 0)
);
CREATE INDEX ledger_accounts_owner ON ledger_accounts (owner, currency);

CREATE TABLE ledger_transfers (
    id             TEXT PRIMARY KEY,
    operation_id   TEXT NOT NULL,
    debit_account  TEXT NOT NULL REFERENCES ledger_accounts (id),
    credit_account TEXT NOT NULL REFERENCES ledger_accounts (id),
    amount         BIGINT NOT NULL CHECK (amount > 0),
    phase          TEXT NOT NULL CHECK (phase IN ('single', 'pending', 'post', 'void')),
    pending_id     TEXT REFERENCES ledger_transfers (id),
    created_at     BIGINT NOT NULL,
    CHECK (debit_account <> credit_account),
    CHECK ((phase IN ('post', 'void')) = (pending_id IS NOT NULL))
);
CREATE INDEX ledger_transfers_operation ON ledger_transfers (operation_id);
-- A hold is resolved (posted or voided) at most once.
CREATE UNIQUE INDEX ledger_transfers_resolution ON ledger_transfers (pending_id) WHERE pending_id IS NOT NULL;

-- Transfers are facts: a correction is a new transfer, never an edit.
CREATE FUNCTION ledger_transfers_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger transfers are immutable';
END;
$$;
CREATE TRIGGER ledger_transfers_immutable BEFORE UPDATE OR DELETE ON ledger_transfers
    FOR EACH ROW EXECUTE FUNCTION ledger_transfers_immutable();

CREATE TABLE money_operations (
    -- The transfer id: derived from (kind, actor, Idempotency-Key), or the
    -- coordinator's id on the receiving cell of a cross-cell transfer.
    id            TEXT PRIMARY KEY,
    kind          TEXT NOT NULL,   -- transfer | deposit | withdrawal | adjustment
    actor         TEXT NOT NULL,   -- who asked: a user id, provider:<name>, or a peer cell
    request_hash  TEXT NOT NULL,   -- of the canonical request, to refuse a reused key
    state         TEXT NOT NULL,   -- pending | posted | voided | failed
    from_user     TEXT,
    to_user       TEXT,
    peer_region   TEXT,            -- the other cell of a cross-cell transfer
    amount        BIGINT NOT NULL,
    currency      TEXT NOT NULL,
    memo          TEXT,
    error_code    TEXT,            -- a failed outcome, answered again to repeats
    error_detail  TEXT,
    -- Cross-cell saga: the role of this cell and the next step to run.
    saga_role     TEXT,            -- coordinator | participant
    saga_step     TEXT,            -- hold_peer | post_peer | void_peer | done
    attempts      BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);
CREATE INDEX money_operations_from ON money_operations (from_user, created_at, id);
CREATE INDEX money_operations_to ON money_operations (to_user, created_at, id);
CREATE INDEX money_operations_due ON money_operations (next_attempt_at) WHERE saga_step IS NOT NULL AND saga_step <> 'done';
