-- Roles are data an admin edits in the back office (/v1/cms/roles). The
-- built-in ones (user, support, admin) stay, and keep the permissions the
-- system needs (cell/src/identity/roles.rs). role:edit and users:delete
-- are new; the admin holds every permission.
ALTER TABLE roles ADD COLUMN builtin BOOLEAN NOT NULL DEFAULT FALSE;
UPDATE roles SET builtin = TRUE WHERE name IN ('user', 'support', 'admin');
INSERT INTO role_permissions (role, permission) VALUES
    ('admin', 'role:edit'),
    ('admin', 'users:delete')
    ON CONFLICT DO NOTHING;
-- Deleting a custom role removes its grants.
CREATE INDEX IF NOT EXISTS user_roles_by_role ON user_roles (role);
