//! What the load generators share.

pub mod cpu;
