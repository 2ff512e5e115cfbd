//! Login identifiers are a wire type shared with the router (which routes
//! logins by them): see `homecell_proto::identifier`.

pub use homecell_proto::identifier::*;
