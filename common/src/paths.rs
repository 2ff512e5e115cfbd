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
    "/v1/auth/otp",
    "/v1/auth/otp/verify",
    "/v1/auth/password",
    "/v1/auth/password/reset",
    "/v1/auth/refresh",
    "/v1/auth/register",
    "/v1/auth/register/verify",
    "/v1/auth/sessions",
    "/v1/auth/sessions/revoke-others",
    "/v1/auth/sessions/{sid}",
    "/v1/auth/wechat",
    "/v1/cms/audit",
    "/v1/cms/broadcasts",
    "/v1/cms/messages",
    "/v1/cms/outbox/dead",
    "/v1/cms/outbox/dead/{id}/redrive",
    "/v1/cms/permissions",
    "/v1/cms/roles",
    "/v1/cms/roles/{name}",
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
    "/v1/users/me/identifiers",
    "/v1/users/me/identifiers/verify",
    "/v1/users/me/identifiers/{kind}",
    "/v1/users/{id}",
    "/v1/wallet",
    "/v1/wallet/transfers",
    "/v1/wallet/transfers/{id}",
    "/v1/wallet/withdrawals",
];

/// The public route `path` is one of (`/v1/users/{id}`), None for a path
/// outside the public API: what routers admit and what logs name,
/// since the path itself can carry ids and client-chosen text. Every
/// request at the router asks, so the path is split once and compared with
/// templates split beforehand, of its own length only.
pub fn template(path: &str) -> Option<&'static str> {
    let mut segments = [""; MAX_SEGMENTS];
    let mut n = 0;
    for s in path.split('/') {
        *segments.get_mut(n)? = s;
        n += 1;
    }
    let segments = &segments[..n];
    SPLIT
        .iter()
        .filter(|(_, t)| t.len() == n)
        .find(|(_, t)| {
            t.iter()
                .zip(segments)
                .all(|(want, got)| match want.strip_prefix('{') {
                    Some(_) => !got.is_empty(),
                    None => want == got,
                })
        })
        .map(|(t, _)| *t)
}

/// More segments than any public path has ("" before the first `/`
/// counts).
const MAX_SEGMENTS: usize = 8;

static SPLIT: std::sync::LazyLock<Vec<(&'static str, Vec<&'static str>)>> =
    std::sync::LazyLock::new(|| {
        PUBLIC_PATHS
            .iter()
            .map(|t| (*t, t.split('/').collect()))
            .collect()
    });

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

/// A request's method as labels and span attributes name it: one HTTP
/// defines, or `_OTHER` (the OpenTelemetry conventions' word), so a
/// client's made-up method never becomes a series or an attribute.
pub fn method_name(m: &tonic::codegen::http::Method) -> &'static str {
    use tonic::codegen::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "_OTHER",
    }
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
            assert!(template(p).is_some(), "{p}");
        }
        assert_eq!(
            template("/v1/auth/sessions/0193-ab"),
            Some("/v1/auth/sessions/{sid}")
        );
        assert_eq!(template("/v1/users/me"), Some("/v1/users/me"));
        assert!(
            PUBLIC_PATHS
                .iter()
                .all(|t| t.split('/').count() < MAX_SEGMENTS)
        );
        assert_eq!(template("/a/b/c/d/e/f/g/h/i"), None);
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
            assert_eq!(template(p), None, "{p}");
        }
    }
}
