//! Region rules: what a valid region is and which status moves are allowed.
//! Each function runs inside one store transaction.

use crate::store::Tx;
use homecell_proto::control::{Region, RegionStatus, UpdateRegionRequest};
use homecell_proto::error::{CodedError, ErrorCode};
use homecell_proto::region::{
    normalize_countries, status_name, validate_endpoint, validate_internal_endpoints,
    validate_region_id,
};

pub const DEFAULT_WEIGHT: u32 = 100;
pub const MAX_WEIGHT: u32 = 10_000;

fn validate_display_name(name: &str) -> Result<String, CodedError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
        return Err(CodedError::invalid(
            "display name must be 1-128 printable characters",
        ));
    }
    Ok(name.to_string())
}

fn validate_weight(weight: u32) -> Result<u32, CodedError> {
    if weight > MAX_WEIGHT {
        return Err(CodedError::invalid(format!(
            "weight {weight} is above the maximum {MAX_WEIGHT}"
        )));
    }
    Ok(weight)
}

/// A country routes to one region: refuse one that another live region serves.
fn check_countries_free(tx: &Tx<'_>, region: &Region) -> Result<(), CodedError> {
    for other in tx.regions()? {
        if other.id == region.id || other.status == RegionStatus::Retired as i32 {
            continue;
        }
        if let Some(c) = region
            .countries
            .iter()
            .find(|c| other.countries.contains(c))
        {
            return Err(CodedError::new(
                ErrorCode::AlreadyExists,
                format!("country {c} is already served by region {}", other.id),
            ));
        }
    }
    Ok(())
}

pub fn add(tx: &mut Tx<'_>, r: Region) -> Result<Region, CodedError> {
    validate_region_id(&r.id)?;
    if tx.region(&r.id)?.is_some() {
        return Err(CodedError::new(
            ErrorCode::AlreadyExists,
            format!("region {} already exists", r.id),
        ));
    }
    let status = match RegionStatus::try_from(r.status) {
        Ok(RegionStatus::Unspecified) | Ok(RegionStatus::Active) => RegionStatus::Active,
        Ok(RegionStatus::Draining) => RegionStatus::Draining,
        _ => return Err(CodedError::invalid("a new region is active or draining")),
    };
    let region = Region {
        display_name: validate_display_name(if r.display_name.is_empty() {
            &r.id
        } else {
            &r.display_name
        })?,
        public_endpoint: validate_endpoint("public endpoint", &r.public_endpoint)?,
        internal_endpoint: validate_internal_endpoints(&r.internal_endpoint)?,
        countries: normalize_countries(&r.countries)?,
        status: status as i32,
        weight: validate_weight(if r.weight == 0 {
            DEFAULT_WEIGHT
        } else {
            r.weight
        })?,
        id: r.id,
        revision: 0,
        signing_keys: Vec::new(),
    };
    check_countries_free(tx, &region)?;
    tx.put_region(region)
}

pub fn update(tx: &mut Tx<'_>, u: UpdateRegionRequest) -> Result<Region, CodedError> {
    let current = tx.region(&u.id)?.ok_or_else(|| {
        CodedError::new(
            ErrorCode::UnknownRegion,
            format!("region {:?} does not exist", u.id),
        )
    })?;
    let mut next = current.clone();
    if let Some(name) = &u.display_name {
        next.display_name = validate_display_name(name)?;
    }
    if let Some(e) = &u.public_endpoint {
        next.public_endpoint = validate_endpoint("public endpoint", e)?;
    }
    if let Some(e) = &u.internal_endpoint {
        next.internal_endpoint = validate_internal_endpoints(e)?;
    }
    if u.set_countries {
        next.countries = normalize_countries(&u.countries)?;
    }
    if let Some(w) = u.weight {
        next.weight = validate_weight(w)?;
    }
    let status = RegionStatus::try_from(u.status)
        .map_err(|_| CodedError::invalid(format!("unknown status {}", u.status)))?;
    if status != RegionStatus::Unspecified {
        next.status = status as i32;
    }
    if current.status == RegionStatus::Retired as i32 && next != current {
        return Err(CodedError::new(
            ErrorCode::FailedPrecondition,
            format!("region {} is retired and can no longer change", u.id),
        ));
    }
    if next == current {
        return Ok(current);
    }
    if next.status != RegionStatus::Retired as i32 {
        check_countries_free(tx, &next)?;
    } else {
        check_empty(tx, &next.id)?;
    }
    let status_moved = next.status != current.status;
    let region = tx.put_region(next)?;
    if status_moved {
        tracing::info!(
            region = %region.id,
            from = status_name(RegionStatus::try_from(current.status).unwrap_or_default()),
            to = status_name(RegionStatus::try_from(region.status).unwrap_or_default()),
            "region status changed"
        );
    }
    Ok(region)
}

/// A region retires only with no user left in it and none moving in or
/// out: retired is final, and a user homed there would be stranded.
/// Walks the directory's users (a rare operator action; pages keep memory
/// flat).
fn check_empty(tx: &Tx<'_>, id: &str) -> Result<(), CodedError> {
    let mut homed = 0u64;
    let mut after: Option<String> = None;
    loop {
        let page = tx.users_page(after.as_deref(), 10_000)?;
        let Some(last) = page.last() else { break };
        after = Some(last.0.clone());
        homed += page.iter().filter(|(_, region)| region == id).count() as u64;
    }
    let mut moving = 0u64;
    let mut after: Option<String> = None;
    loop {
        let page = tx.open_moves_page(after.as_deref(), 1_000)?;
        let Some(last) = page.last() else { break };
        after = Some(last.user_id.clone());
        moving += page
            .iter()
            .filter(|m| m.from_region == id || m.to_region == id)
            .count() as u64;
    }
    if homed > 0 || moving > 0 {
        return Err(CodedError::new(
            ErrorCode::FailedPrecondition,
            format!(
                "region {id} still homes {homed} users ({moving} moving): evacuate it first (control-plane move evacuate {id} --to <region>)"
            ),
        ));
    }
    Ok(())
}

pub fn get(tx: &Tx<'_>, id: &str) -> Result<Region, CodedError> {
    tx.region(id)?.ok_or_else(|| {
        CodedError::new(
            ErrorCode::UnknownRegion,
            format!("region {id:?} does not exist"),
        )
    })
}

/// Replaces a region's signing key set (a cell publishing its own keys).
pub fn publish_keys(
    tx: &mut Tx<'_>,
    region: &str,
    keys: Vec<homecell_proto::control::SigningKey>,
) -> Result<Region, CodedError> {
    if keys.is_empty() || keys.len() > 8 {
        return Err(CodedError::invalid("publish 1 to 8 signing keys"));
    }
    let prefix = format!("{region}-");
    for (i, k) in keys.iter().enumerate() {
        if k.kid.is_empty() || k.kid.len() > 64 || k.alg != "EdDSA" || k.public_key.len() != 32 {
            return Err(CodedError::invalid(format!(
                "signing key {:?} is malformed: kid 1-64 chars, alg EdDSA, 32-byte public key",
                k.kid
            )));
        }
        // A kid names its region, and one key: a cell that could publish
        // another region's kid would shadow that region's keys at every
        // verifier (the first region holding a kid wins).
        if !k.kid.starts_with(&prefix) {
            return Err(CodedError::new(
                ErrorCode::PermissionDenied,
                format!("signing key {:?} must carry its region: {prefix}…", k.kid),
            ));
        }
        if keys[..i].iter().any(|o| o.kid == k.kid) {
            return Err(CodedError::invalid(format!(
                "signing key {:?} twice",
                k.kid
            )));
        }
    }
    for other in tx.regions()?.iter().filter(|o| o.id != region) {
        if let Some(k) = keys
            .iter()
            .find(|k| other.signing_keys.iter().any(|o| o.kid == k.kid))
        {
            return Err(CodedError::new(
                ErrorCode::PermissionDenied,
                format!("signing key {:?} belongs to region {}", k.kid, other.id),
            ));
        }
    }
    let mut r = get(tx, region)?;
    if r.signing_keys == keys {
        return Ok(r);
    }
    r.signing_keys = keys;
    tx.put_region(r)
}
