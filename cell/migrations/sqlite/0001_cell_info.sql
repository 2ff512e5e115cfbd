-- Which region this datastore belongs to: a cell refuses to open another
-- region's data.
CREATE TABLE cell_info (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
