//! Money: a double-entry ledger per cell (`ledger`), the operations clients
//! ask for (`service`), transfers between cells (`saga`), payment providers
//! (`provider`), withdrawals (`withdrawal`) and the audit that proves conservation (`audit`).

pub mod audit;
pub mod currency;
pub mod group;
pub mod ledger;
pub mod moving;
mod per_statement;
pub mod provider;
pub mod reads;
pub mod rule;
pub mod saga;
pub mod saga_moves;
pub mod service;
pub mod withdrawal;
