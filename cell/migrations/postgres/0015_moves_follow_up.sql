-- A transfer between cells whose receiver moved away before the hold
-- reached them: how many times the sender's cell re-aimed it at the
-- receiver's new home (cell/src/money/saga.rs, `follow_receiver`). Its
-- live hold is `<id>:hold` at 0 and `<id>:hold.<n>` after n re-aims.
ALTER TABLE money_operations ADD COLUMN retargets BIGINT NOT NULL DEFAULT 0;

-- A user a move is bringing here, until the directory homes them here
-- (cell/src/moving/): their copied notices wait in the outbox and
-- deliveries meanwhile, so an undone move sends nothing twice.
CREATE TABLE user_arrivals (
    user_id    TEXT PRIMARY KEY NOT NULL,
    move_id    TEXT NOT NULL,
    arrived_at BIGINT NOT NULL
);
