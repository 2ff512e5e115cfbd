-- Indexes the query planner asked for (cell/tests/plans): at production
-- sizes these statements read a whole table.
-- A login asks which client types the user has signed in on before (the
-- "new sign-in" notice); the unique index on active sessions is partial.
CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions (user_id, client_type);
-- Deleting an account erases its deliveries (they hold an address).
CREATE INDEX IF NOT EXISTS deliveries_by_user ON deliveries (user_id);
