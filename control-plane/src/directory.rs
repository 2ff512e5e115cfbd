//! The global directory: which user holds each identifier, stored only as
//! HMAC-SHA256(normalised identifier) under a key held by the control plane
//! (and, for routing logins, the routers). Runs inside store transactions.

use crate::store::Tx;
pub use homecell_common::directory_key::DirectoryKey;
use homecell_proto::control::IdentifierClaim;
use homecell_proto::error::{CodedError, ErrorCode};

/// A normalised identifier is `<kind>:<value>`; the cell normalises.
fn validate_identifier(identifier: &str) -> Result<(), CodedError> {
    let ok = identifier.len() <= 330
        && ["email:", "phone:", "username:", "wechat:"]
            .iter()
            .any(|p| identifier.strip_prefix(p).is_some_and(|v| !v.is_empty()));
    if ok {
        Ok(())
    } else {
        Err(CodedError::invalid(
            "identifier must be email:…, phone:…, username:… or wechat:…",
        ))
    }
}

fn validate_user_id(user_id: &str) -> Result<(), CodedError> {
    if user_id.is_empty() || user_id.len() > 64 {
        return Err(CodedError::invalid("user_id must be 1-64 characters"));
    }
    Ok(())
}

pub fn claim(
    tx: &mut Tx<'_>,
    key: &DirectoryKey,
    identifier: &str,
    user_id: &str,
    region: &str,
) -> Result<(), CodedError> {
    validate_identifier(identifier)?;
    validate_user_id(user_id)?;
    crate::regions::get(tx, region)?;
    // A claim homes its user in the claiming region: for a user homed
    // elsewhere it would be a move without MoveUser's checks (a rogue cell
    // re-homing another region's users to itself).
    if let Some(home) = tx.user_home(user_id)?
        && home != region
    {
        return Err(CodedError::new(
            ErrorCode::PermissionDenied,
            "this user is homed in another region",
        ));
    }
    let hmac = key.hmac(identifier);
    match tx.claim(&hmac)? {
        Some(c) if c.user_id == user_id && c.region == region => Ok(()),
        // The holder's region goes to the claiming cell, which decides
        // whether its caller may learn it (wechat.rs).
        Some(c) => Err(CodedError {
            home_region: Some(c.region),
            ..CodedError::new(ErrorCode::AlreadyExists, "identifier is already registered")
        }),
        None => tx.put_claim(IdentifierClaim {
            hmac,
            user_id: user_id.to_string(),
            region: region.to_string(),
        }),
    }
}

/// Releases a claim held by `user_id`; releasing what is not held is a no-op.
pub fn release(
    tx: &mut Tx<'_>,
    key: &DirectoryKey,
    identifier: &str,
    user_id: &str,
    region: &str,
) -> Result<(), CodedError> {
    validate_identifier(identifier)?;
    validate_user_id(user_id)?;
    let hmac = key.hmac(identifier);
    match tx.claim(&hmac)? {
        Some(c) if c.user_id == user_id && c.region == region => tx.delete_claim(&hmac),
        Some(_) => Err(CodedError::new(
            ErrorCode::PermissionDenied,
            "identifier is held by another user",
        )),
        None => Ok(()),
    }
}

/// The directory's part of a move: the user and each of its identifiers go
/// from `from` to `to`, in this one transaction.
pub fn move_user(
    tx: &mut Tx<'_>,
    key: &DirectoryKey,
    user_id: &str,
    from: &str,
    to: &str,
    identifiers: &[String],
) -> Result<(), CodedError> {
    validate_user_id(user_id)?;
    if from == to {
        return Err(CodedError::invalid(
            "from_region and to_region are the same",
        ));
    }
    let target = crate::regions::get(tx, to)?;
    if target.status != homecell_proto::control::RegionStatus::Active as i32 {
        return Err(CodedError::new(
            ErrorCode::FailedPrecondition,
            format!("region {to} does not take users"),
        ));
    }
    if tx.user_home(user_id)?.as_deref() != Some(from) {
        return Err(CodedError::new(
            ErrorCode::FailedPrecondition,
            format!("the user is not homed in {from}"),
        ));
    }
    if identifiers.is_empty() || identifiers.len() > 16 {
        return Err(CodedError::invalid(
            "a move names the user's 1-16 identifiers",
        ));
    }
    for identifier in identifiers {
        validate_identifier(identifier)?;
        let hmac = key.hmac(identifier);
        match tx.claim(&hmac)? {
            Some(c) if c.user_id == user_id => tx.rehome_claim(c, to)?,
            _ => {
                return Err(CodedError::new(
                    ErrorCode::PermissionDenied,
                    "an identifier is not held by this user",
                ));
            }
        }
    }
    tx.rehome_user(user_id, to)
}

/// Claims per ReassertClaims call.
pub const REASSERT_BATCH: usize = 1_000;

/// A cell's claims asserted again after a restore or recovery: each is
/// made as [`claim`] makes it, for `region` only. Returns how many the
/// directory did not hold, and the users one of whose identifiers is held
/// by another user (or who are homed elsewhere): those are never taken
/// over, only reported.
pub fn reassert(
    tx: &mut Tx<'_>,
    key: &DirectoryKey,
    region: &str,
    claims: &[(String, String)],
) -> Result<(u32, Vec<String>), CodedError> {
    if claims.len() > REASSERT_BATCH {
        return Err(CodedError::invalid(format!(
            "at most {REASSERT_BATCH} claims per call"
        )));
    }
    crate::regions::get(tx, region)?;
    let mut restored = 0;
    let mut conflicting = Vec::new();
    for (identifier, user_id) in claims {
        let before = tx.changes_made();
        match claim(tx, key, identifier, user_id, region) {
            Ok(()) if tx.changes_made() == before => continue,
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.code,
                    ErrorCode::AlreadyExists | ErrorCode::PermissionDenied
                ) =>
            {
                if !conflicting.contains(user_id) {
                    conflicting.push(user_id.clone());
                }
                continue;
            }
            Err(e) => return Err(e),
        }
        restored += 1;
    }
    Ok((restored, conflicting))
}
