//! The datastore's error, for every store over it: a write a unique
//! constraint refused (`Conflict`, which callers turn into their own
//! answer), or anything else the database said.

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// A unique constraint refused the write.
    #[error("conflict")]
    Conflict,
    #[error("datastore error: {0}")]
    Db(sqlx::Error),
}

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        match e.as_database_error() {
            Some(d) if d.is_unique_violation() => Self::Conflict,
            _ => Self::Db(e),
        }
    }
}

pub type DbResult<T> = Result<T, DbError>;
