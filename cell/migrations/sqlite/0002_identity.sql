-- Identity: users, identifiers, credentials, sessions, refresh tokens,
-- password resets, addresses, RBAC, audit, signing keys, and the outbox the
-- notice service drains. Times are unix milliseconds (BIGINT) so one query
-- text serves SQLite and PostgreSQL.

CREATE TABLE users (
    id           TEXT PRIMARY KEY NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('active', 'disabled', 'deleted')),
    display_name TEXT NOT NULL,
    locale       TEXT,
    bio          TEXT,
    avatar_url   TEXT,
    version      BIGINT NOT NULL,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);
CREATE INDEX users_by_created ON users (created_at, id);

CREATE TABLE identifiers (
    kind    TEXT NOT NULL CHECK (kind IN ('email', 'phone', 'username')),
    value   TEXT NOT NULL,
    user_id TEXT NOT NULL REFERENCES users (id),
    PRIMARY KEY (kind, value)
);
CREATE INDEX identifiers_by_user ON identifiers (user_id);

CREATE TABLE credentials (
    user_id       TEXT PRIMARY KEY NOT NULL REFERENCES users (id),
    password_hash TEXT NOT NULL,
    -- Password checks reserved since the last success; reserving is atomic.
    attempts      BIGINT NOT NULL DEFAULT 0,
    locked_until  BIGINT,
    updated_at    BIGINT NOT NULL
);

CREATE TABLE sessions (
    id            TEXT PRIMARY KEY NOT NULL,
    user_id       TEXT NOT NULL REFERENCES users (id),
    client_type   TEXT NOT NULL CHECK (client_type IN ('app', 'web', 'mp', 'cms')),
    created_at    BIGINT NOT NULL,
    last_used_at  BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    revoked_at    BIGINT,
    revoke_reason TEXT
);
-- One active session per user and client type, enforced by the database.
CREATE UNIQUE INDEX sessions_one_active ON sessions (user_id, client_type) WHERE revoked_at IS NULL;

CREATE TABLE refresh_tokens (
    token_hash TEXT PRIMARY KEY NOT NULL,
    session_id TEXT NOT NULL REFERENCES sessions (id),
    created_at BIGINT NOT NULL,
    used_at    BIGINT
);
CREATE INDEX refresh_tokens_by_session ON refresh_tokens (session_id);

CREATE TABLE password_resets (
    id         TEXT PRIMARY KEY NOT NULL,
    user_id    TEXT NOT NULL REFERENCES users (id),
    code_hash  TEXT NOT NULL,
    attempts   BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at    BIGINT
);
CREATE INDEX password_resets_by_user ON password_resets (user_id, created_at);

CREATE TABLE addresses (
    id          TEXT PRIMARY KEY NOT NULL,
    user_id     TEXT NOT NULL REFERENCES users (id),
    label       TEXT,
    recipient   TEXT NOT NULL,
    phone       TEXT,
    line1       TEXT NOT NULL,
    line2       TEXT,
    city        TEXT NOT NULL,
    state       TEXT,
    postal_code TEXT,
    country     TEXT NOT NULL,
    is_default  BOOLEAN NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
CREATE INDEX addresses_by_user ON addresses (user_id, created_at);

CREATE TABLE roles (
    name        TEXT PRIMARY KEY NOT NULL,
    description TEXT NOT NULL
);
CREATE TABLE role_permissions (
    role       TEXT NOT NULL REFERENCES roles (name),
    permission TEXT NOT NULL,
    PRIMARY KEY (role, permission)
);
CREATE TABLE user_roles (
    user_id    TEXT NOT NULL REFERENCES users (id),
    role       TEXT NOT NULL REFERENCES roles (name),
    granted_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, role)
);

CREATE TABLE audit_log (
    id      TEXT PRIMARY KEY NOT NULL,
    at      BIGINT NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    target  TEXT,
    details TEXT NOT NULL
);
CREATE INDEX audit_log_by_at ON audit_log (at, id);

CREATE TABLE signing_keys (
    kid           TEXT PRIMARY KEY NOT NULL,
    private_pkcs8 BLOB NOT NULL,
    public_key    BLOB NOT NULL,
    created_at    BIGINT NOT NULL,
    retired_at    BIGINT
);

CREATE TABLE outbox (
    id           TEXT PRIMARY KEY NOT NULL,
    topic        TEXT NOT NULL,
    user_id      TEXT,
    payload      TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    delivered_at BIGINT
);
CREATE INDEX outbox_pending ON outbox (created_at) WHERE delivered_at IS NULL;

INSERT INTO roles (name, description) VALUES
    ('user', 'Every registered user'),
    ('support', 'Customer support: read and disable accounts'),
    ('admin', 'Administrators: everything');
INSERT INTO role_permissions (role, permission) VALUES
    ('support', 'users:read'),
    ('support', 'users:disable'),
    ('admin', 'users:read'),
    ('admin', 'users:disable'),
    ('admin', 'role:assign'),
    ('admin', 'audit:read'),
    ('admin', 'money:adjust'),
    ('admin', 'templates:write'),
    ('admin', 'broadcast:send'),
    ('admin', 'outbox:manage');
