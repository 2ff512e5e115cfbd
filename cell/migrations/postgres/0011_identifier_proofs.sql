-- Proof that an email address or phone number belongs to whoever asked,
-- before it is claimed in the global directory (cell/src/identity/proof.rs):
-- a registration's (purpose 'register', for a user not created yet) or a
-- signed-in user's new identifier ('change'). Until the code comes back
-- nothing is claimed, so a stranger's registration never blocks the
-- owner; the row expires by itself. Stored hashed, single use, five
-- guesses, within the identifier's code budgets.
CREATE TABLE identifier_proofs (
    id            TEXT PRIMARY KEY,
    purpose       TEXT NOT NULL CHECK (purpose IN ('register', 'change')),
    user_id       TEXT NOT NULL,   -- the user to be created, or the one changing
    kind          TEXT NOT NULL CHECK (kind IN ('email', 'phone')),
    value         TEXT NOT NULL,
    password_hash TEXT,            -- a registration's
    display_name  TEXT,            -- a registration's
    code_hash     TEXT NOT NULL,
    attempts      BIGINT NOT NULL DEFAULT 0,
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    used_at       BIGINT
);
CREATE INDEX identifier_proofs_by_user ON identifier_proofs (user_id);
-- One change under way per user, even when two requests race.
CREATE UNIQUE INDEX identifier_proofs_live_change ON identifier_proofs (user_id)
    WHERE purpose = 'change' AND used_at IS NULL;
-- The upkeep deletes proofs past their expiry, used or not.
CREATE INDEX identifier_proofs_by_expiry ON identifier_proofs (expires_at);

-- A claim that replaces another of the same user (an identifier change):
-- the control plane swaps them in one revision, and a change left
-- unsettled is swapped back, or finished when the old one is gone
-- (cell/src/identity/claims.rs).
ALTER TABLE pending_claims ADD COLUMN replaces TEXT;

INSERT INTO notice_templates (key, channel, locale, category, subject, body, updated_at, updated_by) VALUES
    ('auth.identifier_code', 'email', 'en', 'security', 'Your verification code', 'Your verification code is {{code}}. It expires in {{minutes}} minutes. If you did not ask for it, ignore this message: nothing is registered without it.', 0, 'system'),
    ('auth.identifier_code', 'email', 'zh-CN', 'security', '验证码', '您的验证码是 {{code}}，{{minutes}} 分钟内有效。如非本人操作，请忽略，未经验证不会登记此地址。', 0, 'system'),
    ('auth.identifier_code', 'sms', 'en', 'security', '', 'Your verification code is {{code}} (valid {{minutes}} minutes).', 0, 'system'),
    ('auth.identifier_code', 'sms', 'zh-CN', 'security', '', '您的验证码：{{code}}，{{minutes}} 分钟内有效。', 0, 'system'),
    ('auth.identifier_changed', 'email', 'en', 'security', 'Your email address was changed', 'This address is no longer the email of your account. If you did not change it, contact support now.', 0, 'system'),
    ('auth.identifier_changed', 'email', 'zh-CN', 'security', '您的邮箱已更换', '此邮箱已不再是您账号的邮箱。如非本人操作，请立即联系客服。', 0, 'system'),
    ('auth.identifier_changed', 'sms', 'en', 'security', '', 'This number is no longer the phone of your account. If you did not change it, contact support now.', 0, 'system'),
    ('auth.identifier_changed', 'sms', 'zh-CN', 'security', '', '此号码已不再是您账号的手机号。如非本人操作，请立即联系客服。', 0, 'system');
