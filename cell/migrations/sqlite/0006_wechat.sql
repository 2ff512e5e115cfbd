-- WeChat mini-program accounts: an openid (per mini-program) bound to a user.
-- The openid is also claimed in the global directory as "wechat:<openid>",
-- so it belongs to one region.
CREATE TABLE wechat_bindings (
    openid     TEXT PRIMARY KEY NOT NULL,
    user_id    TEXT NOT NULL REFERENCES users (id),
    created_at BIGINT NOT NULL
);
CREATE INDEX wechat_bindings_by_user ON wechat_bindings (user_id);
