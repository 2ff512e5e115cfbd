-- The move journal (control-plane/src/moves.rs), as on redb: each move and
-- batch is its protobuf encoding. `open_user` is the user id while the move
-- is open (neither done nor cancelled) and NULL after: the unique index
-- is the index of open moves by user, and keeps one open move per user.
CREATE TABLE cp_moves (
    id TEXT COLLATE "C" PRIMARY KEY,
    open_user TEXT COLLATE "C",
    body BYTEA NOT NULL
);
CREATE UNIQUE INDEX cp_moves_open ON cp_moves (open_user) WHERE open_user IS NOT NULL;
CREATE TABLE cp_move_batches (id TEXT COLLATE "C" PRIMARY KEY, body BYTEA NOT NULL);
