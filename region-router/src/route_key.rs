//! Reading routing keys out of a request: user-addressed paths, the fields of
//! small auth bodies, refresh-token prefixes. Pure functions, so the proxy
//! phases stay short and these stay tested. Nothing here logs what it reads.

use homecell_proto::identifier::Identifier;
use homecell_proto::region::validate_region_id;

/// Bodies the router reads to route (login, reset, refresh, register) are
/// capped: anything larger is refused before it reaches a cell.
pub const MAX_ROUTED_BODY: usize = 8 * 1024;

pub use homecell_common::paths::user_in_path;

/// Which auth route this is, if its body carries a routing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyRoute {
    /// login, password reset request and confirm, sign-in code request and
    /// verify: route by `identifier`.
    Identifier,
    /// refresh: route by the refresh token's region prefix.
    Refresh,
    /// register: the `region` preference.
    Register,
    /// a pending registration's verification: the region prefix of its
    /// `registration_id` (the cell that holds it).
    Verification,
}

pub fn body_route(method: &http::Method, path: &str) -> Option<BodyRoute> {
    use http::Method;
    match (method, path) {
        (&Method::POST, "/v1/auth/login") => Some(BodyRoute::Identifier),
        (&Method::POST | &Method::PUT, "/v1/auth/password/reset") => Some(BodyRoute::Identifier),
        (&Method::POST, "/v1/auth/otp" | "/v1/auth/otp/verify") => Some(BodyRoute::Identifier),
        (&Method::POST, "/v1/auth/refresh") => Some(BodyRoute::Refresh),
        (&Method::POST, "/v1/auth/register") => Some(BodyRoute::Register),
        (&Method::POST, "/v1/auth/register/verify") => Some(BodyRoute::Verification),
        _ => None,
    }
}

fn field<'a>(body: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    body.get(name)?.as_str()
}

/// The normalised `kind:value` of the body's identifier (what the directory
/// hashes), if it has a valid one.
pub fn identifier(body: &serde_json::Value) -> Option<String> {
    Identifier::parse(field(body, "identifier")?)
        .ok()
        .map(|i| i.qualified())
}

/// The region a refresh token was issued in (`<region>~<secret>`).
pub fn refresh_region(body: &serde_json::Value) -> Option<String> {
    region_prefix(body, "refresh_token")
}

/// The region holding a pending registration (`<region>~<uuid>`).
pub fn registration_region(body: &serde_json::Value) -> Option<String> {
    region_prefix(body, "registration_id")
}

fn region_prefix(body: &serde_json::Value, name: &str) -> Option<String> {
    let (region, _) = field(body, name)?.split_once('~')?;
    validate_region_id(region).ok()?;
    Some(region.to_string())
}

/// A registration's explicit region preference.
pub fn preferred_region(body: &serde_json::Value) -> Option<String> {
    let r = field(body, "region")?;
    validate_region_id(r).ok()?;
    Some(r.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn user_paths() {
        assert_eq!(user_in_path("/v1/users/0193-ab"), Some("0193-ab"));
        assert_eq!(user_in_path("/v1/users/0193-ab/addresses"), Some("0193-ab"));
        assert_eq!(user_in_path("/v1/cms/users/x1/disable"), Some("x1"));
        assert_eq!(user_in_path("/v1/users/me"), None);
        assert_eq!(user_in_path("/v1/users/me/addresses"), None);
        assert_eq!(user_in_path("/v1/users/"), None);
        assert_eq!(user_in_path("/v1/users/a%2Fb"), None);
        assert_eq!(user_in_path("/v1/region"), None);
    }

    #[test]
    fn body_keys() {
        assert_eq!(
            identifier(&json!({"identifier": " Bob@Example.com "})).as_deref(),
            Some("email:bob@example.com")
        );
        assert_eq!(identifier(&json!({"identifier": 5})), None);
        assert_eq!(identifier(&json!({})), None);
        assert_eq!(
            refresh_region(&json!({"refresh_token": "eu-west~abc"})).as_deref(),
            Some("eu-west")
        );
        assert_eq!(refresh_region(&json!({"refresh_token": "../x~abc"})), None);
        assert_eq!(refresh_region(&json!({"refresh_token": "abc"})), None);
        assert_eq!(
            registration_region(&json!({"registration_id": "eu-west~0193"})).as_deref(),
            Some("eu-west")
        );
        assert_eq!(
            registration_region(&json!({"registration_id": "A B~x"})),
            None
        );
        assert_eq!(
            preferred_region(&json!({"region": "cn-east"})).as_deref(),
            Some("cn-east")
        );
        assert_eq!(preferred_region(&json!({"region": "CN EAST"})), None);
        assert_eq!(
            body_route(&http::Method::POST, "/v1/auth/login"),
            Some(BodyRoute::Identifier)
        );
        assert_eq!(body_route(&http::Method::GET, "/v1/auth/login"), None);
        for path in ["/v1/auth/otp", "/v1/auth/otp/verify"] {
            assert_eq!(
                body_route(&http::Method::POST, path),
                Some(BodyRoute::Identifier),
                "{path}"
            );
        }
    }
}
