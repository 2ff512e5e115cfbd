//! The global directory as routers and cells hold it: user id → home region
//! and HMAC(identifier) → home region, for tens of millions of users in a
//! few hundred megabytes with lookups in a microsecond or two.
//!
//! - Keys are 128 bits: a user id (a UUID) or the first half of an HMAC,
//!   parsed, not stored as text; anything else is hashed to 128 bits.
//! - Regions are interned: a row holds a 16-bit index into the region names.
//! - The bulk lives in a **base**: sorted key and region arrays (18 bytes a
//!   row, binary search), built once from a snapshot and shared by every
//!   state that follows it.
//! - Deltas go to an **overlay** (persistent maps, so a new state copies a
//!   path, not the directory) that shadows the base; a removal is a
//!   tombstone. When the overlay grows past a bound it is merged into a new
//!   base, a linear pass.

use imbl::HashMap;
use std::sync::Arc;

/// A region's index in [`Directory::names`].
type RegionIx = u16;

/// The largest index handed out: `u16::MAX` is left free as a marker for
/// those who persist rows (a removed one). More regions than this is far
/// beyond any deployment; the last index is shared rather than overflowing.
const MAX_REGION_IX: usize = RegionIx::MAX as usize - 1;

/// A changed row: its key and its region, or `None` once removed.
pub type OverlayRow = (u128, Option<RegionIx>);

/// The 128-bit key of a user id or an HMAC.
pub fn key(s: &str) -> u128 {
    if let Ok(u) = uuid::Uuid::try_parse(s) {
        return u.as_u128();
    }
    if s.len() >= 32
        && let Some(prefix) = s.get(..32)
        && let Ok(k) = u128::from_str_radix(prefix, 16)
        && prefix.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return k;
    }
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    u128::from_be_bytes(d.as_ref()[..16].try_into().expect("32-byte digest"))
}

/// One sorted table of the base.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Table {
    keys: Box<[u128]>,
    regions: Box<[RegionIx]>,
}

impl Table {
    fn get(&self, k: u128) -> Option<RegionIx> {
        self.keys.binary_search(&k).ok().map(|i| self.regions[i])
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The raw columns, for persisting.
    pub fn columns(&self) -> (&[u128], &[RegionIx]) {
        (&self.keys, &self.regions)
    }

    /// From raw columns; sorts them if they are not (each key once).
    pub fn from_columns(keys: Vec<u128>, regions: Vec<RegionIx>) -> Self {
        debug_assert_eq!(keys.len(), regions.len());
        if keys.is_sorted() {
            return Self {
                keys: keys.into(),
                regions: regions.into(),
            };
        }
        let mut rows: Vec<(u128, RegionIx)> = keys.into_iter().zip(regions).collect();
        rows.sort_unstable_by_key(|r| r.0);
        rows.dedup_by_key(|r| r.0);
        let (keys, regions): (Vec<_>, Vec<_>) = rows.into_iter().unzip();
        Self {
            keys: keys.into(),
            regions: regions.into(),
        }
    }

    /// This table with `overlay` applied (`None` removes).
    fn merged(&self, overlay: &HashMap<u128, Option<RegionIx>>) -> Self {
        let mut changes: Vec<(u128, Option<RegionIx>)> =
            overlay.iter().map(|(k, v)| (*k, *v)).collect();
        changes.sort_unstable_by_key(|c| c.0);
        let mut keys = Vec::with_capacity(self.keys.len() + changes.len());
        let mut regions = Vec::with_capacity(keys.capacity());
        let mut changes = changes.into_iter().peekable();
        for (k, r) in self.keys.iter().zip(self.regions.iter()) {
            while let Some((ck, cr)) = changes.next_if(|c| c.0 < *k) {
                if let Some(cr) = cr {
                    keys.push(ck);
                    regions.push(cr);
                }
            }
            match changes.next_if(|c| c.0 == *k) {
                Some((_, Some(cr))) => {
                    keys.push(*k);
                    regions.push(cr);
                }
                Some((_, None)) => {}
                None => {
                    keys.push(*k);
                    regions.push(*r);
                }
            }
        }
        for (ck, cr) in changes {
            if let Some(cr) = cr {
                keys.push(ck);
                regions.push(cr);
            }
        }
        Self {
            keys: keys.into(),
            regions: regions.into(),
        }
    }
}

/// The bulk of the directory: immutable, shared between states.
#[derive(Debug, Default, PartialEq)]
pub struct Base {
    pub users: Table,
    pub claims: Table,
}

/// Overlay rows past which the overlay is merged into a new base.
const OVERLAY_LIMIT: usize = 65_536;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Directory {
    names: Arc<Vec<String>>,
    base: Arc<Base>,
    users: HashMap<u128, Option<RegionIx>>,
    claims: HashMap<u128, Option<RegionIx>>,
}

impl Directory {
    pub fn new(names: Vec<String>, base: Base) -> Self {
        Self {
            names: Arc::new(names),
            base: Arc::new(base),
            ..Default::default()
        }
    }

    /// The home region of a user.
    pub fn user_region(&self, user_id: &str) -> Option<&str> {
        self.find(&self.users, &self.base.users, key(user_id))
    }

    /// The home region of the identifier whose HMAC (hex) this is.
    pub fn claim_region(&self, hmac: &str) -> Option<&str> {
        self.find(&self.claims, &self.base.claims, key(hmac))
    }

    fn find(
        &self,
        overlay: &HashMap<u128, Option<RegionIx>>,
        base: &Table,
        k: u128,
    ) -> Option<&str> {
        let ix = match overlay.get(&k) {
            Some(v) => *v,
            None => base.get(k),
        }?;
        self.names.get(usize::from(ix)).map(String::as_str)
    }

    /// The index of `region`, interning it if new.
    pub fn intern(&mut self, region: &str) -> RegionIx {
        if let Some(i) = self.names.iter().position(|n| n == region) {
            return i as RegionIx;
        }
        let names = Arc::make_mut(&mut self.names);
        names.push(region.to_string());
        (names.len() - 1).min(MAX_REGION_IX) as RegionIx
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn set_user(&mut self, user_id: &str, region: &str) {
        let ix = self.intern(region);
        self.users.insert(key(user_id), Some(ix));
    }

    pub fn remove_user(&mut self, user_id: &str) {
        self.users.insert(key(user_id), None);
    }

    pub fn set_claim(&mut self, hmac: &str, region: &str) {
        let ix = self.intern(region);
        self.claims.insert(key(hmac), Some(ix));
    }

    pub fn remove_claim(&mut self, hmac: &str) {
        self.claims.insert(key(hmac), None);
    }

    /// Rows in the overlay (changes since the base was built).
    pub fn overlay_len(&self) -> usize {
        self.users.len() + self.claims.len()
    }

    /// Whether the overlay should be merged into the base.
    pub fn wants_compaction(&self) -> bool {
        self.overlay_len() > OVERLAY_LIMIT.max(self.base.users.len() / 8)
    }

    /// The same directory with the overlay merged into a new base.
    pub fn compacted(&self) -> Self {
        Self {
            names: self.names.clone(),
            base: Arc::new(Base {
                users: self.base.users.merged(&self.users),
                claims: self.base.claims.merged(&self.claims),
            }),
            users: HashMap::new(),
            claims: HashMap::new(),
        }
    }

    /// Whether both hold the same base (no compaction between them).
    pub fn shares_base(&self, other: &Directory) -> bool {
        Arc::ptr_eq(&self.base, &other.base)
    }

    pub fn base(&self) -> &Base {
        &self.base
    }

    /// The overlay rows, for persisting: (key, region index or removed).
    pub fn overlay(&self) -> (Vec<OverlayRow>, Vec<OverlayRow>) {
        let rows = |m: &HashMap<u128, Option<RegionIx>>| m.iter().map(|(k, v)| (*k, *v)).collect();
        (rows(&self.users), rows(&self.claims))
    }

    /// Loads persisted overlay rows.
    pub fn with_overlay(
        mut self,
        users: impl IntoIterator<Item = OverlayRow>,
        claims: impl IntoIterator<Item = OverlayRow>,
    ) -> Self {
        self.users.extend(users);
        self.claims.extend(claims);
        self
    }

    /// Users and claims, overlay included (a full count; for metrics and tests).
    pub fn counts(&self) -> (usize, usize) {
        let count = |overlay: &HashMap<u128, Option<RegionIx>>, base: &Table| {
            let mut n = base.len();
            for (k, v) in overlay {
                match (base.get(*k).is_some(), v.is_some()) {
                    (false, true) => n += 1,
                    (true, false) => n -= 1,
                    _ => {}
                }
            }
            n
        };
        (
            count(&self.users, &self.base.users),
            count(&self.claims, &self.base.claims),
        )
    }
}

/// Builds a base from a snapshot's parts, which arrive in key order.
#[derive(Default)]
pub struct Builder {
    names: Vec<String>,
    users: (Vec<u128>, Vec<RegionIx>),
    claims: (Vec<u128>, Vec<RegionIx>),
}

impl Builder {
    pub fn with_capacity(users: usize, claims: usize) -> Self {
        // The totals only size the first allocation; a corrupt one must not
        // make it huge (past this the columns grow as rows arrive).
        let users = users.min(1 << 25);
        let claims = claims.min(1 << 25);
        Self {
            names: Vec::new(),
            users: (Vec::with_capacity(users), Vec::with_capacity(users)),
            claims: (Vec::with_capacity(claims), Vec::with_capacity(claims)),
        }
    }

    fn intern(&mut self, region: &str) -> RegionIx {
        match self.names.iter().position(|n| n == region) {
            Some(i) => i as RegionIx,
            None => {
                self.names.push(region.to_string());
                (self.names.len() - 1).min(MAX_REGION_IX) as RegionIx
            }
        }
    }

    pub fn user(&mut self, user_id: &str, region: &str) {
        let ix = self.intern(region);
        self.users.0.push(key(user_id));
        self.users.1.push(ix);
    }

    pub fn claim(&mut self, hmac: &str, region: &str) {
        let ix = self.intern(region);
        self.claims.0.push(key(hmac));
        self.claims.1.push(ix);
    }

    pub fn build(self) -> Directory {
        Directory::new(
            self.names,
            Base {
                users: Table::from_columns(self.users.0, self.users.1),
                claims: Table::from_columns(self.claims.0, self.claims.1),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(n: u32) -> String {
        uuid::Uuid::from_u128(u128::from(n) << 64 | 0x7000).to_string()
    }

    #[test]
    fn keys_parse_uuids_and_hmacs_and_hash_the_rest() {
        let u = uuid::Uuid::now_v7();
        assert_eq!(key(&u.to_string()), u.as_u128());
        let hmac = "00112233445566778899aabbccddeeff".repeat(2);
        assert_eq!(key(&hmac), 0x00112233445566778899aabbccddeeff);
        assert_ne!(key("u1"), key("u2"));
        assert_eq!(key("u1"), key("u1"));
    }

    #[test]
    fn overlay_shadows_the_base_and_compaction_keeps_the_answers() {
        let mut b = Builder::with_capacity(3, 0);
        for n in 0..3 {
            b.user(&uid(n), if n == 0 { "cn-east" } else { "eu-west" });
        }
        b.claim(&"ab".repeat(32), "cn-east");
        let mut d = b.build();
        assert_eq!(d.user_region(&uid(0)), Some("cn-east"));
        assert_eq!(d.user_region(&uid(9)), None);
        d.set_user(&uid(1), "us-west"); // moved
        d.remove_user(&uid(2));
        d.set_user(&uid(9), "cn-east");
        d.set_user("not-a-uuid", "eu-west");
        d.remove_claim(&"ab".repeat(32));
        d.set_claim(&"cd".repeat(32), "eu-west");
        let check = |d: &Directory| {
            assert_eq!(d.user_region(&uid(0)), Some("cn-east"));
            assert_eq!(d.user_region(&uid(1)), Some("us-west"));
            assert_eq!(d.user_region(&uid(2)), None);
            assert_eq!(d.user_region(&uid(9)), Some("cn-east"));
            assert_eq!(d.user_region("not-a-uuid"), Some("eu-west"));
            assert_eq!(d.claim_region(&"ab".repeat(32)), None);
            assert_eq!(d.claim_region(&"cd".repeat(32)), Some("eu-west"));
            assert_eq!(d.counts(), (4, 1));
        };
        check(&d);
        let c = d.compacted();
        assert_eq!(c.overlay_len(), 0);
        check(&c);
        assert!(c.base().users.keys.is_sorted());
    }

    #[test]
    fn unsorted_columns_are_sorted() {
        let t = Table::from_columns(vec![5, 1, 3], vec![0, 1, 2]);
        assert_eq!(t.get(1), Some(1));
        assert_eq!(t.get(3), Some(2));
        assert_eq!(t.get(5), Some(0));
        assert_eq!(t.get(4), None);
    }
}
