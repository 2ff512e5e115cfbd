//! The datastore's error, for every store over it: a write a unique
//! constraint refused (`Conflict`, which callers turn into their own
//! answer), or anything else the database said.

use homecell_proto::error::{CodedError, ErrorCode};

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

/// How a datastore error reaches a client: a conflict as `already_exists`,
/// anything else as `internal` without its detail (logged instead).
impl From<DbError> for CodedError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Conflict => CodedError::new(ErrorCode::AlreadyExists, "already exists"),
            DbError::Db(e) => {
                tracing::error!(error = %e, "datastore failure");
                CodedError::internal("datastore failure")
            }
        }
    }
}
