//! Starts real Homecell processes (the built binaries) with their own data
//! directories and ports, for end-to-end tests, benchmarks and the local dev
//! cluster. Every process logs to `<root>/logs/<name>.log`; every process is
//! killed when its handle drops, so a failing test leaves nothing running.

pub mod api;
mod cluster;
mod config_files;
pub mod netns;
pub mod otlp;
pub mod postgres;
mod process;
pub mod provider;
pub mod relay;
pub mod smtp;
pub mod wait;

pub use cluster::{
    CellInstance, CellNode, CliOutput, Cluster, ControlPlaneNode, Ports, RouterNode, Standard,
    standard, start_standard,
};
pub use process::{Binaries, Process, free_port};
