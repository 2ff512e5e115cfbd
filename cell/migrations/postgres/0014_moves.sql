-- Moves of users between regions (cell/src/moving/).

-- A user frozen here while a move copies them to another region: writes
-- aimed at them wait, then are refused as retryable, until the move cuts
-- over or is undone.
CREATE TABLE user_moves (
    user_id   TEXT PRIMARY KEY NOT NULL,
    move_id   TEXT NOT NULL,
    to_region TEXT NOT NULL,
    frozen_at BIGINT NOT NULL
);

-- A session a move brought here: the region that issued its tokens, and
-- when it arrived. Tokens that region signed stay good here for one
-- access-token lifetime after the move.
ALTER TABLE sessions ADD COLUMN moved_from TEXT;
ALTER TABLE sessions ADD COLUMN moved_at BIGINT;

-- A user's past operations a move copied here (the move's id): history
-- and idempotency records only, never applied to this ledger; an undone
-- move deletes them.
ALTER TABLE money_operations ADD COLUMN imported_by TEXT;
CREATE INDEX money_operations_imported ON money_operations (imported_by) WHERE imported_by IS NOT NULL;
