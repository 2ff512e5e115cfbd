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
        Some(c) if c.user_id == user_id && c.region == region => tx.mark_asserted(&hmac),
        // The holder's region goes to the claiming cell, which decides
        // whether its caller may learn it (wechat.rs).
        Some(c) => Err(CodedError {
            home_region: Some(c.region),
            ..CodedError::new(ErrorCode::AlreadyExists, "identifier is already registered")
        }),
        None => {
            // A recovered store holds only reservations until the owning
            // region asserts its claims again: another region is refused,
            // as if the claim were there.
            match tx.reservation(&hmac)? {
                Some(owner) if owner != region => {
                    return Err(CodedError {
                        home_region: Some(owner),
                        ..CodedError::new(
                            ErrorCode::AlreadyExists,
                            "identifier is already registered",
                        )
                    });
                }
                Some(_) => tx.unreserve(&hmac)?,
                None => {}
            }
            tx.mark_asserted(&hmac)?;
            tx.put_claim(IdentifierClaim {
                hmac,
                user_id: user_id.to_string(),
                region: region.to_string(),
            })
        }
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
            Some(c) if c.user_id == user_id => {
                // Held by the new region now, whether or not either cell
                // has asserted it since a rebuild.
                tx.mark_asserted(&hmac)?;
                tx.rehome_claim(c, to)?
            }
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
///
/// A claim that is malformed, or held by another user, or whose user is
/// homed elsewhere is reported and skipped: one bad row never stops a
/// cell's pass. `last` says the cell has sent every claim it holds: what
/// the store still has of its region beyond that (reservations of a
/// recovered store, claims a backup brought back) was released since, and
/// is released now.
pub fn reassert(
    tx: &mut Tx<'_>,
    key: &DirectoryKey,
    region: &str,
    claims: &[(String, String)],
    last: bool,
) -> Result<(u32, Vec<String>), CodedError> {
    crate::regions::get(tx, region)?;
    let mut restored = 0;
    let mut conflicting = std::collections::BTreeSet::new();
    for (identifier, user_id) in claims {
        // The same user, homed elsewhere in the restored store: it moved
        // here after the backup. Its old region's last batch hands the
        // claim over, unless that region still holds the user.
        if let Some(c) = tx.claim(&key.hmac(identifier))?
            && c.user_id == *user_id
            && c.region != region
        {
            tx.defer_rehome(&c.hmac, region)?;
            continue;
        }
        let before = tx.changes_made();
        match claim(tx, key, identifier, user_id, region) {
            Ok(()) if tx.changes_made() == before => {}
            Ok(()) => restored += 1,
            Err(e)
                if matches!(
                    e.code,
                    ErrorCode::AlreadyExists
                        | ErrorCode::PermissionDenied
                        | ErrorCode::InvalidArgument
                ) =>
            {
                conflicting.insert(user_id.clone());
            }
            Err(e) => return Err(e),
        }
    }
    if last {
        let dropped = tx.drop_reservations(region)?;
        let released = tx.release_unasserted(region)?;
        if dropped > 0 || released > 0 {
            tracing::info!(
                region,
                dropped,
                released,
                "what the region's cell no longer holds was released after its claims came back"
            );
        }
    }
    Ok((restored, conflicting.into_iter().collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Parent, Store};
    use homecell_proto::control::{Region, RegionStatus};

    fn key() -> DirectoryKey {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        DirectoryKey::create_if_missing(&f).unwrap();
        DirectoryKey::load(&f).unwrap()
    }

    fn region(id: &str) -> Region {
        Region {
            id: id.into(),
            status: RegionStatus::Active as i32,
            ..Default::default()
        }
    }

    /// A store restored with the regions cn-east and eu-west, and `fill`.
    fn rebuilt(
        dir: &std::path::Path,
        fill: impl FnOnce(&mut crate::store::Rebuilder<'_>) -> anyhow::Result<()>,
    ) -> Store {
        let parent = Parent {
            epoch: 7,
            revision: 10,
        };
        Store::rebuild(&dir.join("s.redb"), 100, parent, |b| {
            b.region(&region("cn-east"))?;
            b.region(&region("eu-west"))?;
            fill(b)
        })
        .unwrap()
    }

    /// One ReassertClaims batch of (identifier, user) for `region`.
    fn batch(
        s: &Store,
        k: &DirectoryKey,
        region: &str,
        claims: &[(&str, &str)],
        last: bool,
    ) -> (u32, Vec<String>) {
        let claims: Vec<(String, String)> = claims
            .iter()
            .map(|(i, u)| (i.to_string(), u.to_string()))
            .collect();
        s.mutate("t", |tx| reassert(tx, k, region, &claims, last))
            .unwrap()
            .0
    }

    /// A recovered store reserves each claim's prefix for its region: no
    /// other region (a rogue cell) takes the identifier before its owner
    /// asserts it again, and the owner's last batch drops what is left.
    #[test]
    fn reservations_hold_identifiers_for_their_region_until_it_reasserts() {
        let dir = tempfile::tempdir().unwrap();
        let k = key();
        let [alice, bob, gone] = [
            "email:alice@x.test",
            "email:bob@x.test",
            "email:gone@x.test",
        ]
        .map(|i| crate::store::hmac_prefix(&k.hmac(i)).unwrap());
        let s = rebuilt(dir.path(), |b| {
            b.reserve(alice, "eu-west")?;
            b.reserve(bob, "eu-west")?;
            b.reserve(gone, "eu-west")?;
            Ok(())
        });
        // cn-east (a rogue, or a stranger registering) cannot take alice.
        let err = s
            .mutate("t", |tx| {
                claim(tx, &k, "email:alice@x.test", "u-rogue", "cn-east")
            })
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::AlreadyExists);
        let rogue = batch(&s, &k, "cn-east", &[("email:bob@x.test", "u-rogue")], true);
        assert_eq!(rogue, (0, vec!["u-rogue".to_string()]));
        // eu-west asserts its claims; its last batch drops the leftover.
        let out = batch(
            &s,
            &k,
            "eu-west",
            &[
                ("email:alice@x.test", "u-alice"),
                ("email:bob@x.test", "u-bob"),
                ("not-an-identifier", "u-bad"),
            ],
            true,
        );
        assert_eq!(
            out,
            (2, vec!["u-bad".to_string()]),
            "a bad row is reported, not fatal"
        );
        // gone@ was released meanwhile: free again, for anyone.
        s.mutate("t", |tx| {
            claim(tx, &k, "email:gone@x.test", "u-new", "cn-east")
        })
        .unwrap();
        assert_eq!(s.snapshot().unwrap().claims.len(), 3);
    }

    /// A restored store brings back claims released after the backup; the
    /// owning region's last batch releases those it did not assert, and
    /// keeps what it asserted, what was claimed or moved in since, and
    /// every other region's.
    #[test]
    fn a_regions_last_batch_releases_what_it_no_longer_holds() {
        let dir = tempfile::tempdir().unwrap();
        let k = key();
        let c = |i: &str, user: &str, region: &str| IdentifierClaim {
            hmac: k.hmac(i),
            user_id: user.into(),
            region: region.into(),
        };
        let s = rebuilt(dir.path(), |b| {
            b.claim(&c("email:kept@x.test", "u-kept", "eu-west"))?;
            b.claim(&c("email:deleted@x.test", "u-deleted", "eu-west"))?;
            b.claim(&c("email:moved@x.test", "u-moved", "cn-east"))?;
            b.claim(&c("email:other@x.test", "u-other", "cn-east"))?;
            // Moved to eu-west after the backup: the backup homes it in
            // cn-east, whose cell no longer holds it.
            b.claim(&c("email:went@x.test", "u-went", "cn-east"))?;
            Ok(())
        });
        // Since the restore: a registration, and a move into eu-west.
        s.mutate("t", |tx| {
            claim(tx, &k, "email:new@x.test", "u-new", "eu-west")
        })
        .unwrap();
        s.mutate("t", |tx| {
            move_user(
                tx,
                &k,
                "u-moved",
                "cn-east",
                "eu-west",
                &["email:moved@x.test".into()],
            )
        })
        .unwrap();
        // Batches that change nothing still count: kept's, then the last
        // one, empty, in calls of their own.
        let (restored, _) = batch(&s, &k, "eu-west", &[("email:kept@x.test", "u-kept")], false);
        assert_eq!(restored, 0, "kept was there already");
        batch(&s, &k, "eu-west", &[], true);
        // eu-west asserts the user that moved in after the backup: deferred
        // until cn-east's last batch, which no longer holds it.
        let (_, conflicts) = batch(&s, &k, "eu-west", &[("email:went@x.test", "u-went")], true);
        assert!(conflicts.is_empty());
        batch(
            &s,
            &k,
            "cn-east",
            &[("email:other@x.test", "u-other")],
            true,
        );
        let snap = s.snapshot().unwrap();
        let mut held: Vec<(&str, &str)> = snap
            .claims
            .iter()
            .map(|c| (c.user_id.as_str(), c.region.as_str()))
            .collect();
        held.sort();
        assert_eq!(
            held,
            [
                ("u-kept", "eu-west"),
                ("u-moved", "eu-west"),
                ("u-new", "eu-west"),
                ("u-other", "cn-east"),
                ("u-went", "eu-west"),
            ]
        );
        assert!(
            snap.users
                .iter()
                .any(|u| u.user_id == "u-went" && u.region == "eu-west")
        );
        assert!(
            !snap.users.iter().any(|u| u.user_id == "u-deleted"),
            "its last claim gone, the user leaves the directory"
        );
    }
}
