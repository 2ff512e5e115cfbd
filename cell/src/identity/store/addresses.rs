//! The identity store's addresses.

use super::IdentityStore;
use crate::db::stmt;

use super::*;
use crate::db::DbResult;

impl IdentityStore {
    pub async fn addresses(&self, user_id: &str) -> DbResult<Vec<Address>> {
        let sql = concat!(
            "SELECT ",
            address_cols!(),
            " FROM addresses WHERE user_id = $1 ORDER BY created_at, id"
        );
        let rows: Vec<Address> = stmt(sql).bind(user_id).fetch_all(&self.db).await?;
        Ok(rows)
    }

    /// Adds an address unless the user has `max` already. The first address
    /// becomes the default. Returns false when at the limit.
    pub async fn add_address(&self, user_id: &str, a: &Address, max: i64) -> DbResult<bool> {
        let mut tx = self.db.begin().await?;
        let added = {
            let (count,): (i64,) = stmt("SELECT COUNT(*) FROM addresses WHERE user_id = $1")
                .bind(user_id)
                .fetch_one(&mut tx)
                .await?;
            if count >= max {
                false
            } else {
                if a.is_default || count == 0 {
                    stmt("UPDATE addresses SET is_default = FALSE WHERE user_id = $1")
                        .bind(user_id)
                        .execute(&mut tx)
                        .await?;
                }
                stmt(concat!(
                    "INSERT INTO addresses (user_id, ",
                    address_cols!(),
                    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
                ))
                .bind(user_id)
                .bind(&a.id)
                .bind(&a.label)
                .bind(&a.recipient)
                .bind(&a.phone)
                .bind(&a.line1)
                .bind(&a.line2)
                .bind(&a.city)
                .bind(&a.state)
                .bind(&a.postal_code)
                .bind(&a.country)
                .bind(a.is_default || count == 0)
                .bind(a.created_at)
                .bind(a.updated_at)
                .execute(&mut tx)
                .await?;
                true
            }
        };
        tx.commit().await?;
        Ok(added)
    }

    pub async fn update_address(&self, user_id: &str, a: &Address) -> DbResult<bool> {
        let mut tx = self.db.begin().await?;
        let changed = {
            let r = stmt("UPDATE addresses SET label = $1, recipient = $2, phone = $3, line1 = $4, line2 = $5, city = $6, state = $7, postal_code = $8, country = $9, \
                             is_default = CASE WHEN $10 THEN TRUE ELSE is_default END, updated_at = $11 WHERE id = $12 AND user_id = $13")
            .bind(&a.label).bind(&a.recipient).bind(&a.phone).bind(&a.line1).bind(&a.line2).bind(&a.city).bind(&a.state)
            .bind(&a.postal_code).bind(&a.country).bind(a.is_default).bind(a.updated_at).bind(&a.id).bind(user_id)
            .execute(&mut tx).await?;
            // Only once the address is known to be the user's: a failed
            // update changes nothing.
            let found = r == 1;
            if found && a.is_default {
                stmt("UPDATE addresses SET is_default = FALSE WHERE user_id = $1 AND id <> $2")
                    .bind(user_id)
                    .bind(&a.id)
                    .execute(&mut tx)
                    .await?;
            }
            found
        };
        tx.commit().await?;
        Ok(changed)
    }

    pub async fn set_default_address(&self, user_id: &str, id: &str, now: i64) -> DbResult<bool> {
        let mut tx = self.db.begin().await?;
        let changed = {
            let (exists,): (i64,) =
                stmt("SELECT COUNT(*) FROM addresses WHERE id = $1 AND user_id = $2")
                    .bind(id)
                    .bind(user_id)
                    .fetch_one(&mut tx)
                    .await?;
            if exists == 1 {
                stmt("UPDATE addresses SET is_default = (id = $1), updated_at = CASE WHEN id = $1 THEN $2 ELSE updated_at END WHERE user_id = $3")
                .bind(id).bind(now).bind(user_id).execute(&mut tx).await?;
            }
            exists == 1
        };
        tx.commit().await?;
        Ok(changed)
    }

    pub async fn delete_address(&self, user_id: &str, id: &str) -> DbResult<bool> {
        let r = stmt("DELETE FROM addresses WHERE id = $1 AND user_id = $2")
            .bind(id)
            .bind(user_id)
            .execute(&self.db)
            .await?;
        Ok(r == 1)
    }
}
