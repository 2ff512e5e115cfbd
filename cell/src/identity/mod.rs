//! The identity service: users, credentials, sessions, tokens, addresses and
//! roles, over the cell's datastore.

mod account;
pub use account::Proof;
pub use register::Registration;
mod breaker;
pub mod claims;
pub mod keys;
mod otp;
pub mod password;
pub mod profile;
mod proof;
pub mod reassert;
mod register;
mod reset;
pub mod roles;
pub mod seal;
pub mod service;
mod sessions;
pub mod store;
pub mod wechat;
