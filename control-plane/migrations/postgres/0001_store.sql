-- The control plane's store on PostgreSQL: the same tables as the redb
-- engine's (control-plane/src/store/redb_tables.rs). Messages are stored as
-- their protobuf encoding, as on redb; the directory's claims and users are
-- columns. Text keys use the "C" collation, so key order is byte order on
-- both engines (snapshot and backup pages walk by key). A config row key
-- holds a NUL (key, NUL, region), which PostgreSQL text cannot: BYTEA.

CREATE TABLE cp_meta (
    key TEXT COLLATE "C" PRIMARY KEY,
    -- A u64, stored bit for bit (the epoch is random and may read negative).
    value BIGINT NOT NULL
);
-- Every mutation locks this row first: mutations from every instance are
-- serialised through it, so revisions come from the database, with no gap
-- and in commit order.
INSERT INTO cp_meta (key, value) VALUES ('revision', 0);

CREATE TABLE cp_regions (id TEXT COLLATE "C" PRIMARY KEY, body BYTEA NOT NULL);
CREATE TABLE cp_config (row_key BYTEA PRIMARY KEY, body BYTEA NOT NULL);
CREATE TABLE cp_config_history (
    revision BIGINT NOT NULL,
    row_key BYTEA NOT NULL,
    body BYTEA NOT NULL,
    PRIMARY KEY (revision, row_key)
);
CREATE TABLE cp_changes (revision BIGINT PRIMARY KEY, body BYTEA NOT NULL);
CREATE TABLE cp_subscribers (
    node_id TEXT COLLATE "C" PRIMARY KEY,
    body BYTEA NOT NULL,
    -- The report's time: a later report from another instance wins.
    contact_unix_ms BIGINT NOT NULL
);
CREATE TABLE cp_claims (
    hmac TEXT COLLATE "C" PRIMARY KEY,
    user_id TEXT COLLATE "C" NOT NULL,
    region TEXT COLLATE "C" NOT NULL
);
CREATE TABLE cp_users (
    user_id TEXT COLLATE "C" PRIMARY KEY,
    region TEXT COLLATE "C" NOT NULL,
    claims INTEGER NOT NULL
);
-- A recovered store's reservations: 32 hex digits of HMAC prefix → region.
CREATE TABLE cp_reserved (prefix TEXT COLLATE "C" PRIMARY KEY, region TEXT COLLATE "C" NOT NULL);
CREATE INDEX cp_reserved_region ON cp_reserved (region);
-- The instances serving this store, as each last reported itself.
CREATE TABLE cp_instances (
    id TEXT COLLATE "C" PRIMARY KEY,
    endpoint TEXT NOT NULL,
    started_unix_ms BIGINT NOT NULL,
    seen_unix_ms BIGINT NOT NULL,
    revision BIGINT NOT NULL
);
