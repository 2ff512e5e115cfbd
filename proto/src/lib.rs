//! Contracts every Homecell component shares: the generated gRPC code, and the
//! small wire types around it (region ids, config values, the error vocabulary).
//! Domain types stay private to the crates that own them.

pub mod config;
pub mod error;
pub mod identifier;
pub mod region;

/// Generated from `proto/homecell/control/v1/control.proto`.
pub mod control {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("homecell.control.v1");
}

/// Generated from `proto/homecell/cell/v1/cell.proto`.
pub mod cell {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("homecell.cell.v1");
}

pub use error::{ErrorCode, Problem};
