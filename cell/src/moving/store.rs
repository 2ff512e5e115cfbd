//! The move's store: a user's rows in every service's tables, as a move
//! freezes, reads, writes and erases them. It is the one store that spans
//! every service's tables of one user; each step is one transaction.

use super::bundle::{BUNDLE_VERSION, Bundle, DeliveryRow};
use crate::db::{Datastore, DbResult, stmt};
use crate::identity::store::{IdentityStore, address_cols, user_cols};
use crate::money::ledger::{Operation, op_cols};

#[derive(Clone, Debug)]
pub struct MoveStore {
    db: Datastore,
    /// Erasing a user who moved away is identity's anonymisation.
    identity: IdentityStore,
}

/// A user frozen here: (user id, move id, target region, frozen at).
pub type FrozenRow = (String, String, String, i64);

impl MoveStore {
    pub fn new(db: Datastore) -> Self {
        let identity = IdentityStore::new(db.clone());
        Self { db, identity }
    }

    /// Freezes a user for a move; returns when it was frozen (the first
    /// time, for a freeze repeated after a crash).
    pub async fn freeze(&self, user_id: &str, move_id: &str, to: &str, now: i64) -> DbResult<i64> {
        // A row of another move is a leftover (the journal holds one open
        // move per user): this move takes it over, with its own time.
        stmt("INSERT INTO user_moves (user_id, move_id, to_region, frozen_at) VALUES ($1, $2, $3, $4) \
              ON CONFLICT (user_id) DO UPDATE SET move_id = excluded.move_id, to_region = excluded.to_region, \
              frozen_at = excluded.frozen_at WHERE user_moves.move_id <> excluded.move_id")
            .bind(user_id)
            .bind(move_id)
            .bind(to)
            .bind(now)
            .execute(&self.db)
            .await?;
        stmt("SELECT frozen_at FROM user_moves WHERE user_id = $1")
            .bind(user_id)
            .scalar(&self.db)
            .await
    }

    pub async fn thaw(&self, user_id: &str, move_id: &str) -> DbResult<()> {
        stmt("DELETE FROM user_moves WHERE user_id = $1 AND move_id = $2")
            .bind(user_id)
            .bind(move_id)
            .execute(&self.db)
            .await?;
        Ok(())
    }

    /// Every user frozen here (a handful: the moves under way).
    pub async fn frozen(&self) -> DbResult<Vec<FrozenRow>> {
        stmt("SELECT user_id, move_id, to_region, frozen_at FROM user_moves ORDER BY user_id")
            .fetch_all(&self.db)
            .await
    }

    /// Whether anything of the user's money is still on its way: an
    /// operation of theirs not yet final (a transfer between cells either
    /// way, a withdrawal awaiting or reconciling its provider, another
    /// move's money).
    /// Every hold on a wallet belongs to one. This move's own operations
    /// are not counted: a move resumed after a crash finds its holds in
    /// place.
    pub async fn money_in_flight(&self, user_id: &str, move_id: &str) -> DbResult<bool> {
        let ops: i64 = stmt(
            "SELECT COUNT(*) FROM (\
               SELECT id FROM money_operations WHERE from_user = $1 AND state NOT IN ('posted', 'voided', 'failed') AND actor <> $2 \
               UNION SELECT id FROM money_operations WHERE to_user = $1 AND state NOT IN ('posted', 'voided', 'failed') AND actor <> $2) AS open",
        )
        .bind(user_id)
        .bind(format!("move:{move_id}"))
        .scalar(&self.db)
        .await?;
        Ok(ops > 0)
    }

    /// The user's rows, read in one transaction; None for no such user.
    pub async fn export(&self, id: &str, now: i64) -> DbResult<Option<Bundle>> {
        let mut tx = self.db.begin().await?;
        let user = stmt(concat!(
            "SELECT ",
            user_cols!(),
            " FROM users WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut tx)
        .await?;
        let Some(user) = user else {
            tx.commit().await?;
            return Ok(None);
        };
        let sessions: Vec<super::bundle::SessionRow> = stmt("SELECT id, client_type, created_at, last_used_at, expires_at FROM sessions WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > $2 ORDER BY id")
            .bind(id).bind(now).fetch_all(&mut tx).await?;
        let mut refresh_tokens = Vec::new();
        for s in &sessions {
            let rows: Vec<super::bundle::RefreshRow> = stmt("SELECT token_hash, session_id, created_at, used_at, successor_hash, successor_salt FROM refresh_tokens WHERE session_id = $1 ORDER BY token_hash")
                .bind(&s.0).fetch_all(&mut tx).await?;
            refresh_tokens.extend(rows);
        }
        let bundle = Bundle {
            version: BUNDLE_VERSION,
            user,
            identifiers: stmt("SELECT kind, value FROM identifiers WHERE user_id = $1 ORDER BY kind, value")
                .bind(id).fetch_all(&mut tx).await?,
            password_hash: stmt("SELECT password_hash FROM credentials WHERE user_id = $1")
                .bind(id).scalar_optional(&mut tx).await?,
            addresses: stmt(concat!("SELECT ", address_cols!(), " FROM addresses WHERE user_id = $1 ORDER BY created_at, id"))
                .bind(id).fetch_all(&mut tx).await?,
            roles: stmt("SELECT role, granted_at FROM user_roles WHERE user_id = $1 ORDER BY role")
                .bind(id).fetch_all(&mut tx).await?,
            preferences: stmt("SELECT category, channel, enabled FROM notice_preferences WHERE user_id = $1 ORDER BY category, channel")
                .bind(id).fetch_all(&mut tx).await?,
            inbox: stmt("SELECT id, event_id, category, title, body, created_at, read_at, archived_at, expires_at FROM inbox WHERE user_id = $1 ORDER BY created_at, id")
                .bind(id).fetch_all(&mut tx).await?,
            wechat: stmt("SELECT openid, created_at FROM wechat_bindings WHERE user_id = $1 ORDER BY openid")
                .bind(id).fetch_all(&mut tx).await?,
            sessions,
            refresh_tokens,
            operations: stmt(concat!(
                "SELECT ", op_cols!(), " FROM (\
                   SELECT * FROM money_operations WHERE from_user = $1 \
                   UNION SELECT * FROM money_operations WHERE to_user = $1) AS mine \
                 WHERE kind <> 'move' ORDER BY created_at, id"))
                .bind(id).fetch_all(&mut tx).await?,
            outbox: stmt("SELECT id, topic, payload, created_at, traceparent FROM outbox WHERE user_id = $1 AND delivered_at IS NULL ORDER BY created_at, id")
                .bind(id).fetch_all(&mut tx).await?,
            deliveries: stmt("SELECT id, event_id, channel, recipient, subject, body, html, attempts, next_attempt_at, created_at FROM deliveries WHERE user_id = $1 AND state = 'pending' ORDER BY created_at, id")
                .bind(id).fetch_all(&mut tx).await?,
        };
        tx.commit().await?;
        Ok(Some(bundle))
    }

    /// Writes a moving user's rows in one transaction, replacing whatever
    /// an earlier import (or an earlier stay in this region) left.
    /// Returns how many roles were not granted here.
    pub async fn import(&self, b: &Bundle, from: &str, move_id: &str, now: i64) -> DbResult<usize> {
        let id = &b.user.0;
        let mut tx = self.db.begin().await?;
        for sql in [
            "DELETE FROM identifiers WHERE user_id = $1",
            "DELETE FROM credentials WHERE user_id = $1",
            "DELETE FROM addresses WHERE user_id = $1",
            "DELETE FROM user_roles WHERE user_id = $1",
            "DELETE FROM notice_preferences WHERE user_id = $1",
            "DELETE FROM inbox WHERE user_id = $1",
            "DELETE FROM wechat_bindings WHERE user_id = $1",
            "DELETE FROM password_resets WHERE user_id = $1",
            "DELETE FROM sign_in_codes WHERE user_id = $1",
            "DELETE FROM refresh_tokens WHERE session_id IN (SELECT id FROM sessions WHERE user_id = $1)",
            "DELETE FROM sessions WHERE user_id = $1",
            "DELETE FROM outbox WHERE user_id = $1 AND delivered_at IS NULL",
            "DELETE FROM deliveries WHERE user_id = $1 AND state = 'pending'",
        ] {
            stmt(sql).bind(id).execute(&mut tx).await?;
        }
        let u = &b.user;
        stmt("INSERT INTO users (id, status, display_name, locale, bio, avatar_url, version, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
              ON CONFLICT (id) DO UPDATE SET status = excluded.status, display_name = excluded.display_name, locale = excluded.locale, bio = excluded.bio, \
              avatar_url = excluded.avatar_url, version = excluded.version, created_at = excluded.created_at, updated_at = excluded.updated_at")
            .bind(&u.0).bind(&u.1).bind(&u.2).bind(&u.3).bind(&u.4).bind(&u.5).bind(u.6).bind(u.7).bind(u.8)
            .execute(&mut tx).await?;
        for (kind, value) in &b.identifiers {
            stmt("INSERT INTO identifiers (kind, value, user_id) VALUES ($1, $2, $3)")
                .bind(kind)
                .bind(value)
                .bind(id)
                .execute(&mut tx)
                .await?;
        }
        if let Some(hash) = &b.password_hash {
            stmt("INSERT INTO credentials (user_id, password_hash, attempts, updated_at) VALUES ($1, $2, 0, $3)")
                .bind(id).bind(hash).bind(u.8).execute(&mut tx).await?;
        }
        for a in &b.addresses {
            stmt("INSERT INTO addresses (id, user_id, label, recipient, phone, line1, line2, city, state, postal_code, country, is_default, created_at, updated_at) \
                  VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)")
                .bind(&a.0).bind(id).bind(&a.1).bind(&a.2).bind(&a.3).bind(&a.4).bind(&a.5).bind(&a.6).bind(&a.7).bind(&a.8).bind(&a.9).bind(a.10).bind(a.11).bind(a.12)
                .execute(&mut tx).await?;
        }
        // Only the built-in roles that grant no permission here (`user`)
        // come along: a role with CMS permissions is a grant of the region
        // that gave it, and a cell whose certificate was stolen must not
        // mint an admin in another region by importing one. Not a custom
        // role that is empty now either: a sending cell could seed its
        // users into one an admin fills later.
        let mut dropped = 0;
        for (role, at) in &b.roles {
            let granted = stmt("INSERT INTO user_roles (user_id, role, granted_at) SELECT $1, name, $3 FROM roles \
                                WHERE name = $2 AND builtin AND NOT EXISTS (SELECT 1 FROM role_permissions p WHERE p.role = roles.name)")
                .bind(id).bind(role).bind(at).execute(&mut tx).await?;
            dropped += usize::from(granted == 0);
        }
        for (category, channel, enabled) in &b.preferences {
            stmt("INSERT INTO notice_preferences (user_id, category, channel, enabled) VALUES ($1, $2, $3, $4)")
                .bind(id).bind(category).bind(channel).bind(enabled).execute(&mut tx).await?;
        }
        for m in &b.inbox {
            stmt("INSERT INTO inbox (id, user_id, event_id, category, title, body, created_at, read_at, archived_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)")
                .bind(&m.0).bind(id).bind(&m.1).bind(&m.2).bind(&m.3).bind(&m.4).bind(m.5).bind(m.6).bind(m.7).bind(m.8)
                .execute(&mut tx).await?;
        }
        for (openid, at) in &b.wechat {
            stmt("INSERT INTO wechat_bindings (openid, user_id, created_at) VALUES ($1, $2, $3)")
                .bind(openid)
                .bind(id)
                .bind(at)
                .execute(&mut tx)
                .await?;
        }
        // Sessions stay signed in: the same ids and refresh-token hashes,
        // marked with the region whose tokens they honour for a while.
        for s in &b.sessions {
            stmt("INSERT INTO sessions (id, user_id, client_type, created_at, last_used_at, expires_at, moved_from, moved_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
                .bind(&s.0).bind(id).bind(&s.1).bind(s.2).bind(s.3).bind(s.4).bind(from).bind(now)
                .execute(&mut tx).await?;
        }
        for r in &b.refresh_tokens {
            stmt("INSERT INTO refresh_tokens (token_hash, session_id, created_at, used_at, successor_hash, successor_salt) VALUES ($1, $2, $3, $4, $5, $6)")
                .bind(&r.0).bind(&r.1).bind(r.2).bind(r.3).bind(&r.4).bind(&r.5)
                .execute(&mut tx).await?;
        }
        // Past operations, as history and idempotency records: never
        // driven here (no saga step), and one this cell holds already (the
        // other side of a transfer between the two) is kept as it is.
        for op in &b.operations {
            let mut op: Operation = op.clone();
            op.saga_step = op.saga_step.map(|_| "done".to_string());
            op.next_attempt_at = None;
            op.bind_columns(stmt(concat!(
                "INSERT INTO money_operations (", op_cols!(), ", imported_by) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21) \
                 ON CONFLICT (id) DO NOTHING")))
                .bind(move_id)
                .execute(&mut tx)
                .await?;
        }
        // Undispatched events and unsent deliveries go out from here now.
        for e in &b.outbox {
            stmt("INSERT INTO outbox (id, topic, user_id, payload, created_at, traceparent) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING")
                .bind(&e.0).bind(&e.1).bind(id).bind(&e.2).bind(e.3).bind(&e.4)
                .execute(&mut tx).await?;
        }
        for d in &b.deliveries {
            let DeliveryRow {
                id: did,
                event_id,
                channel,
                recipient,
                subject,
                body,
                html,
                attempts,
                next_attempt_at,
                created_at,
            } = d;
            stmt("INSERT INTO deliveries (id, event_id, user_id, channel, recipient, subject, body, html, state, attempts, next_attempt_at, created_at) \
                  VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', $9, $10, $11) ON CONFLICT DO NOTHING")
                .bind(did).bind(event_id).bind(id).bind(channel).bind(recipient).bind(subject).bind(body).bind(html).bind(attempts).bind(next_attempt_at).bind(created_at)
                .execute(&mut tx).await?;
        }
        // Their notices wait here until the directory homes them here.
        stmt("INSERT INTO user_arrivals (user_id, move_id, arrived_at) VALUES ($1, $2, $3) \
              ON CONFLICT (user_id) DO UPDATE SET move_id = excluded.move_id, arrived_at = excluded.arrived_at")
            .bind(id)
            .bind(move_id)
            .bind(now)
            .execute(&mut tx)
            .await?;
        tx.commit().await?;
        Ok(dropped)
    }

    /// Users a move is bringing here, not yet homed here by the directory.
    pub async fn arrivals(&self) -> DbResult<Vec<String>> {
        let rows: Vec<(String,)> = stmt("SELECT user_id FROM user_arrivals ORDER BY user_id")
            .fetch_all(&self.db)
            .await?;
        Ok(rows.into_iter().map(|(u,)| u).collect())
    }

    /// A user the directory now homes here: their notices go out.
    pub async fn arrived(&self, user_id: &str) -> DbResult<()> {
        stmt("DELETE FROM user_arrivals WHERE user_id = $1")
            .bind(user_id)
            .execute(&self.db)
            .await?;
        Ok(())
    }

    /// At the old home, after the cut-over: its sessions end as "moved"
    /// (a refresh token that comes here is answered with the new home),
    /// then the account is anonymised as a deletion would, without
    /// releasing its directory claims (they moved with the user). Ledger
    /// rows stay under the user id. Repeatable.
    pub async fn erase_moved(&self, id: &str, now: i64) -> DbResult<()> {
        stmt("UPDATE sessions SET revoked_at = $1, revoke_reason = 'moved' WHERE user_id = $2 AND revoked_at IS NULL")
            .bind(now)
            .bind(id)
            .execute(&self.db)
            .await?;
        self.identity
            .anonymise_user(id, &format!("moved-{id}"), now, None, false)
            .await
            .map(drop)
    }

    /// At the new home, for a move undone before its cut-over: what the
    /// import brought is erased (the user does not live here), and the
    /// past operations it copied are deleted.
    pub async fn discard(&self, id: &str, move_id: &str, now: i64) -> DbResult<()> {
        stmt("DELETE FROM money_operations WHERE imported_by = $1")
            .bind(move_id)
            .execute(&self.db)
            .await?;
        self.arrived(id).await?;
        self.erase_moved(id, now).await
    }

    /// Whether the user has a row here that is not erased.
    pub async fn lives_here(&self, id: &str) -> DbResult<bool> {
        let status: Option<String> = stmt("SELECT status FROM users WHERE id = $1")
            .bind(id)
            .scalar_optional(&self.db)
            .await?;
        Ok(status.is_some_and(|s| s != "deleted"))
    }

    /// The user's directory identifiers (`kind:value`), as the cut-over
    /// names them.
    pub async fn qualified_identifiers(&self, id: &str) -> DbResult<Vec<String>> {
        let mut ids: Vec<(String, String)> =
            stmt("SELECT kind, value FROM identifiers WHERE user_id = $1 ORDER BY kind, value")
                .bind(id)
                .fetch_all(&self.db)
                .await?;
        let openids: Vec<String> =
            stmt("SELECT openid FROM wechat_bindings WHERE user_id = $1 ORDER BY openid")
                .bind(id)
                .scalars(&self.db)
                .await?;
        ids.extend(openids.into_iter().map(|o| ("wechat".to_string(), o)));
        Ok(ids.into_iter().map(|(k, v)| format!("{k}:{v}")).collect())
    }

    /// A batch's next users: live accounts in id order after `after`,
    /// with a default address in `country` when one is given.
    pub async fn users_after(
        &self,
        after: &str,
        country: &str,
        limit: i64,
    ) -> DbResult<Vec<String>> {
        if country.is_empty() {
            stmt("SELECT id FROM users WHERE id > $1 AND status <> 'deleted' ORDER BY id LIMIT $2")
                .bind(after)
                .bind(limit)
                .scalars(&self.db)
                .await
        } else {
            stmt("SELECT u.id FROM users u WHERE u.id > $1 AND u.status <> 'deleted' \
                  AND EXISTS (SELECT 1 FROM addresses a WHERE a.user_id = u.id AND a.is_default AND a.country = $2) \
                  ORDER BY u.id LIMIT $3")
                .bind(after)
                .bind(country)
                .bind(limit)
                .scalars(&self.db)
                .await
        }
    }

    /// The user a refresh token's session belongs to.
    pub async fn refresh_user(&self, refresh_hash: &str) -> DbResult<Option<String>> {
        stmt("SELECT s.user_id FROM refresh_tokens r JOIN sessions s ON s.id = r.session_id WHERE r.token_hash = $1")
            .bind(refresh_hash)
            .scalar_optional(&self.db)
            .await
    }

    /// The user a session belongs to, when a move ended it here.
    pub async fn moved_session_user(&self, refresh_hash: &str) -> DbResult<Option<String>> {
        stmt("SELECT s.user_id FROM refresh_tokens r JOIN sessions s ON s.id = r.session_id WHERE r.token_hash = $1 AND s.revoke_reason = 'moved'")
            .bind(refresh_hash)
            .scalar_optional(&self.db)
            .await
    }
}
