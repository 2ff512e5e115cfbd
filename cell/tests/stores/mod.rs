//! Each service's store over a test's datastore, as the cell builds them
//! (`db.identity().user(..)`): the suites test the stores, not a service.

#![allow(dead_code)] // each suite uses the stores it needs

use homecell_cell::db::Datastore;
use homecell_cell::identity::store::IdentityStore;
use homecell_cell::money::ledger::Ledger;
use homecell_cell::moving::store::MoveStore;
use homecell_cell::notice::store::NoticeStore;

pub trait Stores {
    fn identity(&self) -> IdentityStore;
    fn notices(&self) -> NoticeStore;
    fn moves(&self) -> MoveStore;
    /// The ledger's per-statement path (no group committer).
    fn ledger(&self) -> Ledger;
}

impl Stores for Datastore {
    fn identity(&self) -> IdentityStore {
        IdentityStore::new(self.clone())
    }
    fn notices(&self) -> NoticeStore {
        NoticeStore::new(self.clone())
    }
    fn moves(&self) -> MoveStore {
        MoveStore::new(self.clone())
    }
    fn ledger(&self) -> Ledger {
        Ledger::per_statement(self.clone())
    }
}
