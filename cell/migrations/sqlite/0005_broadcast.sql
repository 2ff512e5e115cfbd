-- Broadcasts: a notice to a segment (every user of the cell, or a role),
-- fanned out into outbox events a chunk per second. The cursor (the last
-- user id queued) moves in the same transaction as the chunk's events, so a
-- restart resumes where it stopped and never queues a user twice (event ids
-- derive from the broadcast and the user, too).
CREATE TABLE broadcasts (
    id           TEXT PRIMARY KEY NOT NULL,
    template_key TEXT NOT NULL,
    payload      TEXT NOT NULL,
    role         TEXT,           -- NULL: every active user of the cell
    created_by   TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    cursor       TEXT NOT NULL DEFAULT '',
    queued       BIGINT NOT NULL DEFAULT 0,
    done_at      BIGINT
);
CREATE INDEX broadcasts_active ON broadcasts (created_at) WHERE done_at IS NULL;
