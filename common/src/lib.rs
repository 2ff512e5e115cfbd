//! What every Homecell process shares: internal TLS identities, layered
//! configuration, logging, the admin listener, the shutdown signal, and the
//! replica of the control plane's state that routers and cells run on.

pub mod admin;
pub mod backoff;
pub mod client_addr;
pub mod config;
pub mod directory;
pub mod directory_key;
pub mod failover;
pub mod failpoint;
pub mod gossip;
pub mod hex;
pub mod jwt;
pub mod key_file;
pub mod otel;
pub mod paths;
pub mod process_metrics;
pub mod replica;
pub mod shutdown;
pub mod sliding_limit;
pub mod telemetry;
pub mod tls;
pub mod token_cache;
pub mod trace;
pub mod traced_grpc;
pub mod webhook;
