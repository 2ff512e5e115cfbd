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

pub(crate) fn validate_user_id(user_id: &str) -> Result<(), CodedError> {
    // No control characters: PostgreSQL's text cannot hold a NUL, and a
    // user id must mean the same on both engines.
    if user_id.is_empty() || user_id.len() > 64 || user_id.chars().any(char::is_control) {
        return Err(CodedError::invalid(
            "user_id must be 1-64 characters, none of them control characters",
        ));
    }
    Ok(())
}

/// Makes a claim, unless it is past `not_after_unix_ms` (0: no deadline)
/// by this instance's clock. Checked here, inside the write transaction:
/// a release the cell sends once the deadline has passed serialises after
/// this check, so a claim that arrives late can no longer land after it.
pub fn claim(
    tx: &mut Tx<'_>,
    key: &DirectoryKey,
    identifier: &str,
    user_id: &str,
    region: &str,
    not_after_unix_ms: u64,
) -> Result<(), CodedError> {
    validate_identifier(identifier)?;
    validate_user_id(user_id)?;
    if not_after_unix_ms != 0
        && crate::store::now_ms() > i64::try_from(not_after_unix_ms).unwrap_or(i64::MAX)
    {
        return Err(CodedError::new(
            ErrorCode::FailedPrecondition,
            "the claim arrived after its deadline",
        ));
    }
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

/// `claim`, and with `replaces` (an identifier of the same user: an email
/// or phone changed) the release of that one, in the same transaction, so
/// one revision: the old identifier is never let go before the new one is
/// held, and no reader sees the user with neither. Releasing what no one
/// holds passes (a swap sent again); one held by another user refuses the
/// whole swap.
pub fn claim_replacing(
    tx: &mut Tx<'_>,
    key: &DirectoryKey,
    identifier: &str,
    replaces: &str,
    user_id: &str,
    region: &str,
    not_after_unix_ms: u64,
) -> Result<(), CodedError> {
    if replaces == identifier {
        return Err(CodedError::invalid("an identifier cannot replace itself"));
    }
    claim(tx, key, identifier, user_id, region, not_after_unix_ms)?;
    if replaces.is_empty() {
        return Ok(());
    }
    release(tx, key, replaces, user_id, region)
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
    check_held(tx, key, user_id, identifiers)?;
    for identifier in identifiers {
        let c = claim_of(tx, key, user_id, identifier)?;
        tx.rehome_claim(c, to)?;
    }
    tx.rehome_user(user_id, to)
}

/// Refused unless `user_id` holds each of its 1–16 `identifiers`: a move's
/// cut-over names them, and its new home checks its bundle against them.
pub fn check_held(
    tx: &Tx<'_>,
    key: &DirectoryKey,
    user_id: &str,
    identifiers: &[String],
) -> Result<(), CodedError> {
    if identifiers.is_empty() || identifiers.len() > 16 {
        return Err(CodedError::invalid(
            "a move names the user's 1-16 identifiers",
        ));
    }
    for identifier in identifiers {
        claim_of(tx, key, user_id, identifier)?;
    }
    Ok(())
}

/// The directory's claim on `identifier`, which `user_id` must hold.
fn claim_of(
    tx: &Tx<'_>,
    key: &DirectoryKey,
    user_id: &str,
    identifier: &str,
) -> Result<IdentifierClaim, CodedError> {
    validate_identifier(identifier)?;
    match tx.claim(&key.hmac(identifier))? {
        Some(c) if c.user_id == user_id => Ok(c),
        _ => Err(CodedError::new(
            ErrorCode::PermissionDenied,
            "an identifier is not held by this user",
        )),
    }
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
/// cell's pass. `last` says the cell has sent every claim it holds: its
/// region's reservations left (claims released since the replica was
/// taken) are dropped.
///
/// Nothing is released by a pass: a claim restored from a backup that its
/// cell no longer holds (released after the backup) stays until an
/// operator releases it. Releasing on one region's word is unsafe while
/// others have not finished (a user moved since is asserted by its new
/// region after its old one said "last").
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
        let before = tx.changes_made();
        match claim(tx, key, identifier, user_id, region, 0) {
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
        if dropped > 0 {
            tracing::info!(
                region,
                dropped,
                "reservations left after the region's claims came back were dropped"
            );
        }
    }
    Ok((restored, conflicting.into_iter().collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Location, Parent, Store};
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
        Store::rebuild(&Location::File(dir.join("s.redb")), 100, parent, |b| {
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

    /// A claim past its deadline is refused and changes nothing; one
    /// within it lands.
    #[test]
    fn a_claim_past_its_deadline_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let k = key();
        let s = rebuilt(dir.path(), |_| Ok(()));
        let now = u64::try_from(crate::store::now_ms()).unwrap();
        let late = s
            .mutate("t", |tx| {
                claim(tx, &k, "email:late@x.test", "u-late", "cn-east", now - 1)
            })
            .unwrap_err();
        assert_eq!(late.code, ErrorCode::FailedPrecondition);
        assert!(s.snapshot().unwrap().claims.is_empty());
        s.mutate("t", |tx| {
            claim(
                tx,
                &k,
                "email:late@x.test",
                "u-late",
                "cn-east",
                now + 60_000,
            )
        })
        .unwrap();
        assert_eq!(s.snapshot().unwrap().claims.len(), 1);
    }

    /// A swap claims the new identifier and releases the old in one
    /// revision; it is refused whole when the new one is someone else's,
    /// and may be sent again.
    #[test]
    fn a_swap_takes_the_new_identifier_and_frees_the_old_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let k = key();
        let s = rebuilt(dir.path(), |_| Ok(()));
        let holders = |s: &Store| -> Vec<(String, String)> {
            let mut v: Vec<_> = s
                .snapshot()
                .unwrap()
                .claims
                .into_iter()
                .map(|c| (c.hmac, c.user_id))
                .collect();
            v.sort();
            v
        };
        let (old, new, taken) = ("email:old@x.test", "email:new@x.test", "email:bob@x.test");
        let (_, first) = s
            .mutate("t", |tx| claim(tx, &k, old, "u-ana", "cn-east", 0))
            .unwrap();
        s.mutate("t", |tx| claim(tx, &k, taken, "u-bob", "cn-east", 0))
            .unwrap();
        // Onto bob's: refused whole, ana keeps the old one.
        let err = s
            .mutate("t", |tx| {
                claim_replacing(tx, &k, taken, old, "u-ana", "cn-east", 0)
            })
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::AlreadyExists);
        let before = holders(&s);
        assert!(before.contains(&(k.hmac(old), "u-ana".into())));
        // Replacing bob's identifier: refused whole, nothing claimed.
        let err = s
            .mutate("t", |tx| {
                claim_replacing(tx, &k, new, taken, "u-ana", "cn-east", 0)
            })
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::PermissionDenied);
        assert_eq!(holders(&s), before);
        // The swap: one revision, and again (a retry) changes nothing.
        let (_, swapped) = s
            .mutate("t", |tx| {
                claim_replacing(tx, &k, new, old, "u-ana", "cn-east", 0)
            })
            .unwrap();
        assert_eq!(swapped, first + 2, "one revision after bob's claim");
        let after = holders(&s);
        assert!(after.contains(&(k.hmac(new), "u-ana".into())));
        assert!(!after.iter().any(|(h, _)| *h == k.hmac(old)));
        s.mutate("t", |tx| {
            claim_replacing(tx, &k, new, old, "u-ana", "cn-east", 0)
        })
        .unwrap();
        assert_eq!(holders(&s), after);
        let err = s
            .mutate("t", |tx| {
                claim_replacing(tx, &k, new, new, "u-ana", "cn-east", 0)
            })
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
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
                claim(tx, &k, "email:alice@x.test", "u-rogue", "cn-east", 0)
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
            claim(tx, &k, "email:gone@x.test", "u-new", "cn-east", 0)
        })
        .unwrap();
        assert_eq!(s.snapshot().unwrap().claims.len(), 3);
    }
}
