//! `/v1/cms/*`: the back office, one file per area. Every route needs a
//! `cms` client token and a named permission, checked against the roles in
//! the datastore now (not the roles in the token), so a revoked role stops
//! working at once. Each route names its permission in the route table (`openapi.rs`); the
//! layer in `permission.rs` checks it before a handler runs.

pub mod audit;
pub mod broadcasts;
pub mod messages;
pub mod outbox;
pub mod roles;
pub mod templates;
pub mod users;

/// The back office's routes, for the route table (`http/openapi.rs`).
pub fn routes() -> Vec<crate::http::openapi::Route> {
    [
        users::routes(),
        roles::routes(),
        audit::routes(),
        templates::routes(),
        outbox::routes(),
        messages::routes(),
        broadcasts::routes(),
    ]
    .into_iter()
    .flatten()
    .collect()
}
