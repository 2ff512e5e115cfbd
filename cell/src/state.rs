//! What every handler of a cell shares.

use crate::db::Datastore;
use crate::identity::service::Identity;
use homecell_common::replica::Replica;
use std::sync::Arc;

pub struct Cell {
    pub region: String,
    pub db: Datastore,
    pub replica: Arc<Replica>,
    pub identity: Identity,
    pub money: Arc<crate::money::service::Money>,
    pub notices: Arc<crate::notice::Notices>,
    /// WeChat mini-program login, when configured.
    pub wechat: Option<crate::identity::wechat::Wechat>,
}
