//! Facts about public API paths that routers and cells both act on.

/// Every path of the public API, as templates (`{name}` is one non-empty
/// segment). A router answers any other path itself, with 404: what a cell
/// serves besides (its gRPC service, for other cells) is never reachable
/// through a router. The cell's route table (`cell/src/http/openapi.rs`)
/// must list exactly these (tested there).
pub const PUBLIC_PATHS: &[&str] = &[
    "/.well-known/jwks.json",
    "/v1/auth/login",
    "/v1/auth/logout",
    "/v1/auth/password",
    "/v1/auth/password/reset",
    "/v1/auth/refresh",
    "/v1/auth/register",
    "/v1/auth/sessions",
    "/v1/auth/sessions/revoke-others",
    "/v1/auth/sessions/{sid}",
    "/v1/auth/wechat",
    "/v1/cms/audit",
    "/v1/cms/broadcasts",
    "/v1/cms/messages",
    "/v1/cms/outbox/dead",
    "/v1/cms/outbox/dead/{id}/redrive",
    "/v1/cms/templates",
    "/v1/cms/templates/{key}/{channel}/{locale}",
    "/v1/cms/users",
    "/v1/cms/users/{id}",
    "/v1/cms/users/{id}/disable",
    "/v1/cms/users/{id}/enable",
    "/v1/cms/users/{id}/roles/{role}",
    "/v1/cms/users/{id}/wallet/adjustments",
    "/v1/me",
    "/v1/notices",
    "/v1/notices/preferences",
    "/v1/notices/read-all",
    "/v1/notices/stream",
    "/v1/notices/unread-count",
    "/v1/notices/{id}",
    "/v1/notices/{id}/archive",
    "/v1/notices/{id}/read",
    "/v1/openapi.json",
    "/v1/payments/{provider}/callback",
    "/v1/region",
    "/v1/users/me",
    "/v1/users/me/addresses",
    "/v1/users/me/addresses/{id}",
    "/v1/users/me/addresses/{id}/default",
    "/v1/users/{id}",
    "/v1/wallet",
    "/v1/wallet/transfers",
    "/v1/wallet/transfers/{id}",
    "/v1/wallet/withdrawals",
];

/// Whether `path` is one of the public API's.
pub fn is_public(path: &str) -> bool {
    template(path).is_some()
}

/// The public route `path` is one of (`/v1/users/{id}`): what logs name,
/// since the path itself can carry ids and client-chosen text.
pub fn template(path: &str) -> Option<&'static str> {
    PUBLIC_PATHS.iter().copied().find(|t| matches(t, path))
}

fn matches(template: &str, path: &str) -> bool {
    let (mut t, mut p) = (template.split('/'), path.split('/'));
    loop {
        match (t.next(), p.next()) {
            (None, None) => return true,
            (Some(want), Some(got)) if want.starts_with('{') => {
                if got.is_empty() {
                    return false;
                }
            }
            (Some(want), Some(got)) if want == got => {}
            _ => return false,
        }
    }
}

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

#[cfg(test)]
mod public_path_tests {
    use super::*;

    #[test]
    fn only_the_public_api_is_public() {
        for p in [
            "/v1/region",
            "/v1/users/me",
            "/v1/users/0193-ab",
            "/v1/cms/templates/welcome/email/zh-CN",
            "/v1/payments/testpay/callback",
        ] {
            assert!(is_public(p), "{p}");
        }
        assert_eq!(
            template("/v1/auth/sessions/0193-ab"),
            Some("/v1/auth/sessions/{sid}")
        );
        assert_eq!(template("/v1/users/me"), Some("/v1/users/me"));
        for p in [
            "/homecell.cell.v1.CellService/CheckSession",
            "/homecell.control.v1.DirectoryService/ClaimIdentifier",
            "/",
            "",
            "/v1",
            "/v1/users/",
            "/v1/users/me/",
            "/v1/users//addresses",
            "/v1/region/x",
            "/metrics",
            "/v1/cms/templates/welcome/email",
        ] {
            assert!(!is_public(p), "{p}");
        }
    }
}
