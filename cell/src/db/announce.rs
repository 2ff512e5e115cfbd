//! Announcements between the instances of one cell. On PostgreSQL, where a
//! cell runs as several instances over one database, `NOTIFY` carries a
//! message to every instance that `LISTEN`s on its channel. On SQLite a cell
//! is one process, so there is no one else to tell: nothing is sent, and
//! there is nothing to listen to.

use super::{Datastore, DbResult};

/// A subscription to one channel.
pub struct Listener(sqlx::postgres::PgListener);

impl Listener {
    /// The next message's payload. After an error the next call reconnects
    /// (what came meanwhile is missed).
    pub async fn recv(&mut self) -> DbResult<String> {
        Ok(self.0.recv().await?.payload().to_owned())
    }
}

impl Datastore {
    /// Whether other instances may share this datastore.
    pub fn is_shared(&self) -> bool {
        matches!(self, Datastore::Postgres(_))
    }

    /// Sends each payload on `channel`, in one statement; nothing where the
    /// datastore is not shared.
    pub async fn announce(&self, channel: &str, payloads: &[String]) -> DbResult<()> {
        if let Datastore::Postgres(pool) = self {
            sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
                .bind(channel)
                .bind(payloads)
                .execute(pool)
                .await?;
        }
        Ok(())
    }

    /// Subscribes to `channel`; None where the datastore is not shared.
    pub async fn listen(&self, channel: &str) -> Option<DbResult<Listener>> {
        let Datastore::Postgres(pool) = self else {
            return None;
        };
        let listening = async {
            let mut l = sqlx::postgres::PgListener::connect_with(pool).await?;
            l.listen(channel).await?;
            Ok(Listener(l))
        };
        Some(listening.await)
    }
}
