//! Commands an operator runs on the cell host, against the cell's datastore.

use crate::clock::now_ms;
use crate::config::CellConfig;
use crate::db::Datastore;
use crate::db::audit::AuditEntry;
use crate::identity::store::IdentityStore;
use anyhow::{Result, anyhow, bail};
use homecell_proto::identifier::Identifier;

async fn open(config: &CellConfig) -> Result<Datastore> {
    let db = Datastore::open(&config.database_url()).await?;
    db.claim_region(&config.region).await?;
    Ok(db)
}

pub async fn rotate_keys(config: &CellConfig) -> Result<()> {
    let db = IdentityStore::new(open(config).await?);
    let seal = config.signing_key_seal()?;
    let kid = crate::identity::keys::rotate(&db, &config.region, seal.as_ref()).await?;
    println!("new signing key {kid}; running cells switch to it within seconds");
    Ok(())
}

pub async fn grant_role(config: &CellConfig, identifier: &str, role: &str) -> Result<()> {
    let db = IdentityStore::new(open(config).await?);
    let id = Identifier::parse(identifier).map_err(|m| anyhow!("identifier: {m}"))?;
    let user_id = db
        .user_by_identifier(id.kind.as_str(), &id.value)
        .await?
        .ok_or_else(|| anyhow!("no user with that identifier in region {}", config.region))?;
    if !db.role_exists(role).await? {
        bail!("no role {role:?} (built in: user, support, admin; others from GET /v1/cms/roles)");
    }
    let audit = AuditEntry {
        at: now_ms(),
        actor: "host-operator",
        action: "role.grant",
        target: Some(&user_id),
        details: serde_json::json!({ "role": role }).to_string(),
    };
    let changed = db.set_role(&user_id, role, true, &audit).await?;
    println!(
        "{} role {role} for user {user_id}",
        if changed { "granted" } else { "already had" }
    );
    Ok(())
}

/// Audits the ledgers of the given datastores (see `money::audit`).
pub async fn audit(urls: &[String]) -> Result<crate::money::audit::Report> {
    let mut stores = Vec::new();
    for url in urls {
        stores.push(Datastore::open(url).await?);
    }
    Ok(crate::money::audit::audit(&stores).await?)
}
