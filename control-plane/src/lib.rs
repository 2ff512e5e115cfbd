//! The Homecell control plane: the authoritative region metadata and
//! configuration in one redb file, a revisioned change log that routers and
//! cells replicate through `Watch`, and the operator CLI.

pub mod backup;
pub mod backup_cli;
pub mod cli;
pub mod config_ops;
pub mod directory;
pub mod grpc;
pub mod metrics;
pub mod move_cli;
pub mod move_service;
pub mod moves;
pub mod regions;
pub mod serve;
pub mod store;
pub mod sync;
