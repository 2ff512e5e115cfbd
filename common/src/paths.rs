//! Facts about public API paths that routers and cells both act on.

/// The user a path is about: `/v1/users/{id}…` (not `me`) and
/// `/v1/cms/users/{id}…`. Routers route these to that user's home; cells
/// answer "moved" for a user homed elsewhere.
pub fn user_in_path(path: &str) -> Option<&str> {
    let rest = path
        .strip_prefix("/v1/users/")
        .or_else(|| path.strip_prefix("/v1/cms/users/"))?;
    let id = rest.split('/').next()?;
    let valid = !id.is_empty()
        && id != "me"
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    valid.then_some(id)
}
