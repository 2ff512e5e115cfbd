//! The identity service: users, credentials, sessions, tokens, addresses and
//! roles, over the cell's datastore.

pub mod claims;
pub mod identifier;
pub mod keys;
pub mod password;
pub mod profile;
pub mod seal;
pub mod service;
pub mod store;
pub mod wechat;
