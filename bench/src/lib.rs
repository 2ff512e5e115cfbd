//! What the load generators share.

pub mod cpu;
pub mod load;
