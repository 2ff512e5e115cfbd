//! Configuration rules: typed values, per-region overrides, rollback.
//! Each function runs inside one store transaction.

use crate::store::Tx;
use homecell_proto::config::{ConfigType, validate_key, validate_value};
use homecell_proto::control::{ConfigEntry, ConfigValue, RegionStatus};
use homecell_proto::error::{CodedError, ErrorCode};

fn check_region(tx: &Tx<'_>, region: &str) -> Result<(), CodedError> {
    if region.is_empty() {
        return Ok(());
    }
    match tx.region(region)? {
        Some(r) if r.status != RegionStatus::Retired as i32 => Ok(()),
        Some(_) => Err(CodedError::new(
            ErrorCode::FailedPrecondition,
            format!("region {region} is retired"),
        )),
        None => Err(CodedError::new(
            ErrorCode::UnknownRegion,
            format!("region {region:?} does not exist"),
        )),
    }
}

pub fn set(
    tx: &mut Tx<'_>,
    key: &str,
    region: &str,
    value: ConfigValue,
) -> Result<ConfigEntry, CodedError> {
    validate_key(key)?;
    check_region(tx, region)?;
    let value = validate_value(key, &value)?;
    // A key keeps one type across its global value and all overrides.
    let ty = ConfigType::of(&value);
    for e in tx.config_entries()? {
        if e.key == key
            && let Some(existing) = e.value.as_ref().and_then(ConfigType::of)
            && Some(existing) != ty
        {
            return Err(CodedError::invalid(format!(
                "config key {key:?} holds {} values",
                existing.name()
            )));
        }
    }
    if let Some(existing) = tx.config(key, region)?
        && existing.value.as_ref() == Some(&value)
    {
        return Ok(existing);
    }
    tx.set_config(ConfigEntry {
        key: key.to_string(),
        region: region.to_string(),
        value: Some(value),
        revision: 0,
    })
}

pub fn delete(tx: &mut Tx<'_>, key: &str, region: &str) -> Result<(), CodedError> {
    validate_key(key)?;
    if tx.config(key, region)?.is_none() {
        return Err(CodedError::not_found(scope_name(key, region)));
    }
    tx.delete_config(key, region)
}

pub fn get(tx: &Tx<'_>, key: &str, region: &str) -> Result<ConfigEntry, CodedError> {
    validate_key(key)?;
    if !region.is_empty() {
        check_region(tx, region)?;
        if let Some(e) = tx.config(key, region)? {
            return Ok(e);
        }
    }
    tx.config(key, "")?
        .ok_or_else(|| CodedError::not_found(scope_name(key, region)))
}

fn scope_name(key: &str, region: &str) -> String {
    if region.is_empty() {
        format!("config key {key:?} is not set")
    } else {
        format!("config key {key:?} is not set for region {region} nor globally")
    }
}

/// Restores every config row to its state at `to_revision`, as one new
/// revision. Returns how many rows changed.
pub fn rollback(tx: &mut Tx<'_>, to_revision: u64) -> Result<u32, CodedError> {
    let current = tx.current_revision();
    if to_revision > current {
        return Err(CodedError::invalid(format!(
            "revision {to_revision} is in the future (current is {current})"
        )));
    }
    let target = tx.config_at(to_revision)?;
    let now = tx.config_entries()?;
    let mut changed = 0;
    for e in &now {
        if !target
            .iter()
            .any(|t| t.key == e.key && t.region == e.region)
        {
            tx.delete_config(&e.key, &e.region)?;
            changed += 1;
        }
    }
    for t in target {
        let same = now
            .iter()
            .any(|e| e.key == t.key && e.region == t.region && e.value == t.value);
        if !same {
            tx.set_config(ConfigEntry {
                key: t.key,
                region: t.region,
                value: t.value,
                revision: 0,
            })?;
            changed += 1;
        }
    }
    Ok(changed)
}
