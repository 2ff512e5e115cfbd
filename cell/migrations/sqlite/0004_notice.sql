-- The notice service: templates, per-user preferences, the inbox, and one
-- delivery row per (event, channel), which is the retry queue and, once a
-- delivery has failed too often, the dead-letter queue. Events come from the
-- outbox (written in the same transaction as what caused them).

CREATE TABLE notice_templates (
    key        TEXT NOT NULL,    -- e.g. auth.password_reset
    channel    TEXT NOT NULL CHECK (channel IN ('inbox', 'email', 'sms')),
    locale     TEXT NOT NULL,    -- zh-CN, en, …
    category   TEXT NOT NULL,    -- security, money, account, message, marketing
    subject    TEXT NOT NULL,    -- the inbox title, the email subject; unused for SMS
    body       TEXT NOT NULL,    -- {{variable}} placeholders
    updated_at BIGINT NOT NULL,
    updated_by TEXT NOT NULL,
    PRIMARY KEY (key, channel, locale)
);

CREATE TABLE notice_preferences (
    user_id  TEXT NOT NULL,
    category TEXT NOT NULL,
    channel  TEXT NOT NULL,
    enabled  BOOLEAN NOT NULL,
    PRIMARY KEY (user_id, category, channel)
);

CREATE TABLE inbox (
    id          TEXT PRIMARY KEY NOT NULL,
    user_id     TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    category    TEXT NOT NULL,
    title       TEXT NOT NULL,
    body        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    read_at     BIGINT,
    archived_at BIGINT,
    expires_at  BIGINT NOT NULL,
    UNIQUE (user_id, event_id)
);
CREATE INDEX inbox_by_user ON inbox (user_id, created_at, id);
CREATE INDEX inbox_expiry ON inbox (expires_at);

CREATE TABLE deliveries (
    id              TEXT PRIMARY KEY NOT NULL,
    event_id        TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    channel         TEXT NOT NULL CHECK (channel IN ('email', 'sms')),
    recipient       TEXT NOT NULL,
    subject         TEXT NOT NULL,
    body            TEXT NOT NULL,   -- emptied once sent: codes do not linger
    html            TEXT,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'dead')),
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_error      TEXT,
    provider        TEXT,            -- who finally took it
    created_at      BIGINT NOT NULL,
    sent_at         BIGINT,
    UNIQUE (event_id, channel)
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX deliveries_dead ON deliveries (created_at, id) WHERE state = 'dead';

-- The built-in templates, in English and Simplified Chinese. Operators
-- change them through the CMS; a missing variable is an error at render.
INSERT INTO notice_templates (key, channel, locale, category, subject, body, updated_at, updated_by) VALUES
    ('auth.password_reset', 'email', 'en', 'security', 'Your password reset code', 'Your code is {{code}}. It expires in 15 minutes. If you did not ask for it, ignore this message.', 0, 'system'),
    ('auth.password_reset', 'email', 'zh-CN', 'security', '密码重置验证码', '您的验证码是 {{code}}，15 分钟内有效。如非本人操作，请忽略。', 0, 'system'),
    ('auth.password_reset', 'sms', 'en', 'security', '', 'Your password reset code is {{code}} (valid 15 minutes).', 0, 'system'),
    ('auth.password_reset', 'sms', 'zh-CN', 'security', '', '您的密码重置验证码：{{code}}，15 分钟内有效。', 0, 'system'),
    ('auth.new_login', 'inbox', 'en', 'security', 'New sign-in', 'Your account signed in on a new {{client_type}} client.', 0, 'system'),
    ('auth.new_login', 'inbox', 'zh-CN', 'security', '新设备登录', '您的账号在新的 {{client_type}} 客户端登录。', 0, 'system'),
    ('auth.new_login', 'email', 'en', 'security', 'New sign-in to your account', 'Your account signed in on a new {{client_type}} client. If this was not you, reset your password.', 0, 'system'),
    ('auth.new_login', 'email', 'zh-CN', 'security', '账号新登录提醒', '您的账号在新的 {{client_type}} 客户端登录。如非本人操作，请重置密码。', 0, 'system'),
    ('user.welcome', 'inbox', 'en', 'account', 'Welcome', 'Welcome, {{display_name}}!', 0, 'system'),
    ('user.welcome', 'inbox', 'zh-CN', 'account', '欢迎', '欢迎您，{{display_name}}！', 0, 'system'),
    ('user.welcome', 'email', 'en', 'account', 'Welcome', 'Welcome, {{display_name}}! Your account is ready.', 0, 'system'),
    ('user.welcome', 'email', 'zh-CN', 'account', '欢迎加入', '欢迎您，{{display_name}}！您的账号已开通。', 0, 'system'),
    ('money.received', 'inbox', 'en', 'money', 'Money received', 'You received {{amount}} {{currency}}.', 0, 'system'),
    ('money.received', 'inbox', 'zh-CN', 'money', '收款通知', '您收到 {{amount}} {{currency}}。', 0, 'system'),
    ('money.deposited', 'inbox', 'en', 'money', 'Deposit received', 'Your deposit of {{amount}} {{currency}} has arrived.', 0, 'system'),
    ('money.deposited', 'inbox', 'zh-CN', 'money', '充值到账', '您充值的 {{amount}} {{currency}} 已到账。', 0, 'system'),
    ('money.withdrawn', 'inbox', 'en', 'money', 'Withdrawal paid', 'Your withdrawal of {{amount}} {{currency}} has been paid out.', 0, 'system'),
    ('money.withdrawn', 'inbox', 'zh-CN', 'money', '提现成功', '您提现的 {{amount}} {{currency}} 已支付。', 0, 'system'),
    ('message', 'inbox', 'en', 'message', '{{title}}', '{{text}}', 0, 'system'),
    ('message', 'inbox', 'zh-CN', 'message', '{{title}}', '{{text}}', 0, 'system');
