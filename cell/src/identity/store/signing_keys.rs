//! The identity store's the token signing keys.

use super::IdentityStore;
use crate::db::stmt;

use super::*;
use crate::db::DbResult;

impl IdentityStore {
    /// Replaces a key's stored form, if it is still `was` (another instance
    /// may have sealed it first); whether it did.
    pub async fn reseal_signing_key(&self, kid: &str, was: &[u8], now: &[u8]) -> DbResult<bool> {
        let n = stmt(
            "UPDATE signing_keys SET private_pkcs8 = $1 WHERE kid = $2 AND private_pkcs8 = $3",
        )
        .bind(now)
        .bind(kid)
        .bind(was)
        .execute(&self.db)
        .await?;
        Ok(n == 1)
    }

    pub async fn signing_keys(&self) -> DbResult<Vec<SigningKeyRow>> {
        stmt(
            "SELECT kid, private_pkcs8, public_key, created_at, retired_at FROM signing_keys ORDER BY created_at")
            .fetch_all(&self.db).await
    }

    /// Adds a key and retires every other active one, together.
    pub async fn rotate_signing_key(&self, row: &SigningKeyRow) -> DbResult<()> {
        let mut tx = self.db.begin().await?;
        stmt("UPDATE signing_keys SET retired_at = $1 WHERE retired_at IS NULL")
            .bind(row.created_at)
            .execute(&mut tx)
            .await?;
        stmt("INSERT INTO signing_keys (kid, private_pkcs8, public_key, created_at) VALUES ($1, $2, $3, $4)")
            .bind(&row.kid).bind(&row.private_pkcs8).bind(&row.public_key).bind(row.created_at).execute(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Drops keys retired before `before` (their tokens have all expired).
    pub async fn drop_retired_keys(&self, before: i64) -> DbResult<u64> {
        let r = stmt("DELETE FROM signing_keys WHERE retired_at IS NOT NULL AND retired_at < $1")
            .bind(before)
            .execute(&self.db)
            .await?;
        Ok(r)
    }
}
