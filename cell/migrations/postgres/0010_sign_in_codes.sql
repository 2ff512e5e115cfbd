-- Sign-in by a one-time code sent to an email address or phone number
-- (POST /v1/auth/otp, then /v1/auth/otp/verify). One live code per user,
-- bound to the client type that asked for it; stored hashed, single use,
-- five guesses, within the same budgets as password resets
-- (cell/src/identity/otp.rs).
CREATE TABLE sign_in_codes (
    id          TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users (id),
    client_type TEXT NOT NULL,
    code_hash   TEXT NOT NULL,
    attempts    BIGINT NOT NULL DEFAULT 0,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    used_at     BIGINT
);
CREATE INDEX sign_in_codes_by_user ON sign_in_codes (user_id, created_at);
-- The upkeep deletes codes past their expiry, used or not.
CREATE INDEX sign_in_codes_by_expiry ON sign_in_codes (expires_at);
-- At most one live code per user, even when two requests race.
CREATE UNIQUE INDEX sign_in_codes_live ON sign_in_codes (user_id) WHERE used_at IS NULL;

INSERT INTO notice_templates (key, channel, locale, category, subject, body, updated_at, updated_by) VALUES
    ('auth.sign_in_code', 'email', 'en', 'security', 'Your sign-in code', 'Your sign-in code is {{code}}. It expires in {{minutes}} minutes. If you did not ask for it, ignore this message.', 0, 'system'),
    ('auth.sign_in_code', 'email', 'zh-CN', 'security', '登录验证码', '您的登录验证码是 {{code}}，{{minutes}} 分钟内有效。如非本人操作，请忽略。', 0, 'system'),
    ('auth.sign_in_code', 'sms', 'en', 'security', '', 'Your sign-in code is {{code}} (valid {{minutes}} minutes).', 0, 'system'),
    ('auth.sign_in_code', 'sms', 'zh-CN', 'security', '', '您的登录验证码：{{code}}，{{minutes}} 分钟内有效。', 0, 'system');
