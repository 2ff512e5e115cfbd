//! Which cell a request goes to, or why it goes nowhere. Pure: `routing.rs`
//! gathers a request's routing keys (the I/O: directory lookups, the token,
//! a small body, GeoIP) into `Keys`, and `choose` carries the whole
//! precedence, most specific first:
//! 1. a user-addressed path (`/v1/users/{id}…`): that user's home, from the
//!    directory;
//! 2. a bearer token: its user's home in the directory, else its
//!    home-region claim (the directory changes when a user moves, the token
//!    does not);
//! 3. login and reset: the identifier's home, from the directory (by HMAC);
//! 4. refresh: the region prefix of the refresh token;
//! 5. registration: an explicit preference (the body's `region`, else
//!    `x-home-region`) for an active region, else the active region that
//!    lists the client's country, else the default;
//! 6. `x-home-region` (only without a token);
//! 7. the router's default region.
//!
//! `admit` then says whether that region's cell takes the request.

use crate::routes::{RouteTable, Upstream};
use homecell_proto::ErrorCode;
use homecell_proto::control::RegionStatus;
use homecell_proto::region::validate_region_id;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub detail: String,
    /// Seconds, for `Retry-After`.
    pub retry_after: Option<u64>,
}

impl Refusal {
    pub fn new(code: ErrorCode, detail: String, retry_after: Option<u64>) -> Self {
        Self {
            code,
            detail,
            retry_after,
        }
    }
}

/// Why a request went where it went (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    UserPath,
    Token,
    Identifier,
    Refresh,
    Registration,
    Verification,
    Header,
    Default,
}

impl Basis {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UserPath => "user_path",
            Self::Token => "token",
            Self::Identifier => "identifier",
            Self::Refresh => "refresh",
            Self::Registration => "registration",
            Self::Verification => "verification",
            Self::Header => "header",
            Self::Default => "default",
        }
    }
}

/// What a request's body says about its home (read only for the routes
/// that carry a routing key, and only when no path or token decides).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyKey {
    /// Login or reset: the identifier's home, if the directory knows it.
    Identifier(Option<String>),
    /// Refresh: the region prefix of the refresh token, if well formed.
    Refresh(Option<String>),
    /// A pending registration's verification: the region prefix of its id.
    Verification(Option<String>),
    /// Registration: the body's `region`, and the client's country (GeoIP).
    Register {
        preference: Option<String>,
        country: Option<String>,
    },
}

/// A request's routing keys, as `routing.rs` gathered them (borrowed from
/// the replica's state and the request, so gathering allocates nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keys<'a> {
    /// The home of the user the path names, if the directory knows them.
    pub path_user: Option<&'a str>,
    /// A verified token: (its home-region claim, its user's home in the
    /// directory if known).
    pub token: Option<(&'a str, Option<&'a str>)>,
    pub body: Option<BodyKey>,
    /// A valid `x-home-region`.
    pub header: Option<&'a str>,
}

impl Keys<'_> {
    /// Whether a body key could still decide: reading a body costs, so it is
    /// read only when neither the path nor a token has.
    pub fn body_can_decide(&self) -> bool {
        self.path_user.is_none() && self.token.is_none()
    }
}

/// Where `choose` sends a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub region: String,
    pub basis: Basis,
    /// A registration (a draining region refuses it).
    pub registration: bool,
}

/// The precedence of routing keys (see the top of this file).
pub fn choose(keys: &Keys<'_>, table: &RouteTable) -> Choice {
    let to = |region: &str, basis| Choice {
        region: region.to_string(),
        basis,
        registration: false,
    };
    if let Some(home) = keys.path_user {
        return to(home, Basis::UserPath);
    }
    if let Some((claim, directory)) = keys.token {
        return to(directory.unwrap_or(claim), Basis::Token);
    }
    match &keys.body {
        Some(BodyKey::Identifier(Some(home))) => return to(home, Basis::Identifier),
        // An identifier the directory does not know: the header still
        // helps a user registered a moment ago (the directory lags), but
        // only a region that answers like any home. A header naming an
        // unknown or retired region would otherwise be refused for unknown
        // identifiers alone, and the refusal would tell which exist.
        Some(BodyKey::Identifier(None)) => {
            return match keys.header.filter(|h| {
                table
                    .regions
                    .get(*h)
                    .is_some_and(|u| u.status != RegionStatus::Retired)
            }) {
                Some(h) => to(h, Basis::Header),
                None => to(&table.default_region, Basis::Default),
            };
        }
        Some(BodyKey::Refresh(Some(home))) => return to(home, Basis::Refresh),
        // Finishing a registration creates a user: a draining region
        // refuses it as it refuses a registration.
        Some(BodyKey::Verification(Some(home))) => {
            return Choice {
                registration: true,
                ..to(home, Basis::Verification)
            };
        }
        Some(BodyKey::Register {
            preference,
            country,
        }) => {
            let preference = preference.as_deref().or(keys.header);
            return Choice {
                registration: true,
                ..to(
                    &registration_region(table, preference, country.as_deref()),
                    Basis::Registration,
                )
            };
        }
        _ => {}
    }
    match keys.header {
        Some(h) => to(h, Basis::Header),
        None => to(&table.default_region, Basis::Default),
    }
}

/// Seconds a client should wait before retrying a region whose cell is down.
pub const CELL_DOWN_RETRY_AFTER: u64 = 5;

/// The region named by an `x-home-region` header, validated.
pub fn header_region(value: &str) -> Result<String, Refusal> {
    let r = value.trim();
    validate_region_id(r).map_err(|e| {
        Refusal::new(
            ErrorCode::InvalidArgument,
            format!("x-home-region: {}", e.message),
            None,
        )
    })?;
    Ok(r.to_string())
}

/// Where a registration goes: an explicit preference if that region is
/// active; else the active region that lists the client's country; else the
/// default.
pub fn registration_region(
    table: &RouteTable,
    preference: Option<&str>,
    country: Option<&str>,
) -> String {
    if let Some(up) = preference.and_then(|p| table.regions.get(p))
        && up.status == RegionStatus::Active
    {
        return up.region.clone();
    }
    if let Some(c) = country
        && let Some(up) = table
            .regions
            .values()
            .find(|u| u.status == RegionStatus::Active && u.countries.iter().any(|x| x == c))
    {
        return up.region.clone();
    }
    table.default_region.clone()
}

/// Admits a request to `region`'s cell, or says why not. A draining region
/// keeps serving its users but takes no registrations.
pub fn admit(
    table: &RouteTable,
    health: &crate::health::Health,
    region: &str,
    registration: bool,
) -> Result<Arc<Upstream>, Refusal> {
    let Some(up) = table.regions.get(region) else {
        return Err(Refusal::new(
            ErrorCode::UnknownRegion,
            format!("region {region} is not known here"),
            None,
        ));
    };
    match up.status {
        RegionStatus::Retired => Err(Refusal::new(
            ErrorCode::RegionRetired,
            format!("region {region} is retired"),
            None,
        )),
        RegionStatus::Draining if registration => Err(Refusal::new(
            ErrorCode::RegionDraining,
            format!("region {region} is draining and takes no new registrations; try again later"),
            Some(table.draining_retry_after.as_secs().max(1)),
        )),
        _ if up.addrs.is_empty() => Err(Refusal::new(
            ErrorCode::CellUnavailable,
            format!("the cell of region {region} cannot be resolved"),
            Some(CELL_DOWN_RETRY_AFTER),
        )),
        _ if health.region_down_by_gossip(region) || !up.addrs.iter().any(|a| health.is_up(a)) => {
            Err(Refusal::new(
                ErrorCode::CellUnavailable,
                format!("the cell of region {region} is down"),
                Some(CELL_DOWN_RETRY_AFTER),
            ))
        }
        _ => Ok(up.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use homecell_common::replica::ReplicaState;
    use homecell_proto::control::Region;
    use std::time::Duration;

    /// A table of `(id, status, country)` regions (no country: ""), each at
    /// an endpoint of its own, cn-east the default.
    async fn table_of(regions: &[(&str, RegionStatus, &str)]) -> RouteTable {
        let mut s = ReplicaState {
            revision: 1,
            ..Default::default()
        };
        for (i, (id, status, country)) in regions.iter().enumerate() {
            s.regions.insert(
                id.to_string(),
                Region {
                    id: id.to_string(),
                    status: *status as i32,
                    internal_endpoint: format!("https://127.0.0.1:{}", i + 1),
                    countries: [country]
                        .iter()
                        .filter(|c| !c.is_empty())
                        .map(|c| c.to_string())
                        .collect(),
                    ..Default::default()
                },
            );
        }
        crate::routes::build(
            &s,
            "cn-east",
            Duration::from_secs(30),
            &RouteTable::default(),
        )
        .await
    }

    async fn table() -> RouteTable {
        table_of(&[
            ("cn-east", RegionStatus::Active, ""),
            ("eu-west", RegionStatus::Draining, ""),
            ("us-old", RegionStatus::Retired, ""),
        ])
        .await
    }

    /// The default table: cn-east active (and the default), eu-west
    /// draining, us-old retired.
    fn keys() -> Keys<'static> {
        Keys::default()
    }

    fn some(s: &str) -> Option<&str> {
        Some(s)
    }

    fn register(preference: Option<&str>, country: Option<&str>) -> Option<BodyKey> {
        Some(BodyKey::Register {
            preference: preference.map(String::from),
            country: country.map(String::from),
        })
    }

    fn chose(keys: &Keys<'_>, t: &RouteTable) -> (String, Basis, bool) {
        let c = choose(keys, t);
        (c.region, c.basis, c.registration)
    }

    #[tokio::test]
    async fn step_1_a_user_in_the_path_wins_over_everything() {
        let t = table().await;
        let k = Keys {
            path_user: some("eu-west"),
            token: Some(("cn-east", some("us-old"))),
            body: register(Some("cn-east"), None),
            header: some("cn-east"),
        };
        assert_eq!(chose(&k, &t), ("eu-west".into(), Basis::UserPath, false));
        assert!(!k.body_can_decide());
    }

    #[tokio::test]
    async fn step_2_a_token_goes_to_its_users_home_and_the_directory_wins_the_tie() {
        let t = table().await;
        let mut k = Keys {
            token: Some(("cn-east", None)),
            body: Some(BodyKey::Identifier(Some("eu-west".into()))),
            header: some("eu-west"),
            ..keys()
        };
        assert_eq!(chose(&k, &t), ("cn-east".into(), Basis::Token, false));
        // A user who moved: the directory knows, the token's claim does not.
        k.token = Some(("cn-east", some("eu-west")));
        assert_eq!(chose(&k, &t), ("eu-west".into(), Basis::Token, false));
        assert!(!k.body_can_decide());
        // A registration sent with a token is routed by the token, and is
        // not a registration to refuse at a draining region.
        k.body = register(None, None);
        assert_eq!(chose(&k, &t), ("eu-west".into(), Basis::Token, false));
    }

    #[tokio::test]
    async fn step_3_an_identifier_goes_home_and_an_unknown_one_falls_through() {
        let t = table().await;
        let mut k = Keys {
            body: Some(BodyKey::Identifier(Some("eu-west".into()))),
            header: some("us-old"),
            ..keys()
        };
        assert!(k.body_can_decide());
        assert_eq!(chose(&k, &t), ("eu-west".into(), Basis::Identifier, false));
        // An unknown identifier goes by a header only to a region that
        // answers as a home would: not a retired or unknown one, whose
        // refusal would tell unknown identifiers from known ones.
        k.body = Some(BodyKey::Identifier(None));
        assert_eq!(chose(&k, &t), ("cn-east".into(), Basis::Default, false));
        k.header = some("nowhere");
        assert_eq!(chose(&k, &t), ("cn-east".into(), Basis::Default, false));
        k.header = some("eu-west");
        assert_eq!(chose(&k, &t), ("eu-west".into(), Basis::Header, false));
        k.header = None;
        assert_eq!(chose(&k, &t), ("cn-east".into(), Basis::Default, false));
    }

    #[tokio::test]
    async fn step_4_a_refresh_token_names_its_region() {
        let t = table().await;
        let mut k = Keys {
            body: Some(BodyKey::Refresh(Some("eu-west".into()))),
            header: some("us-old"),
            ..keys()
        };
        assert_eq!(chose(&k, &t), ("eu-west".into(), Basis::Refresh, false));
        k.body = Some(BodyKey::Refresh(None));
        assert_eq!(chose(&k, &t), ("us-old".into(), Basis::Header, false));
    }

    #[tokio::test]
    async fn step_5_registration_prefers_the_body_then_the_header_then_the_country_then_the_default()
     {
        // Three active regions, so each step picks a region no other would.
        let t = table_of(&[
            ("cn-east", RegionStatus::Active, "CN"),
            ("ap-south", RegionStatus::Active, "IN"),
            ("eu-north", RegionStatus::Active, "SE"),
        ])
        .await;
        let mut k = Keys {
            body: register(Some("ap-south"), Some("SE")),
            header: some("eu-north"),
            ..keys()
        };
        let registration = |r: &str| (r.to_string(), Basis::Registration, true);
        assert_eq!(chose(&k, &t), registration("ap-south"));
        k.body = register(None, Some("IN"));
        assert_eq!(chose(&k, &t), registration("eu-north"));
        k.header = None;
        assert_eq!(chose(&k, &t), registration("ap-south"));
        k.body = register(None, None);
        assert_eq!(chose(&k, &t), registration("cn-east"));
        // A draining region named as the preference takes none.
        let t = table().await;
        k.header = some("eu-west");
        assert_eq!(chose(&k, &t), registration("cn-east"));
    }

    #[tokio::test]
    async fn step_6_and_7_the_header_then_the_default() {
        let t = table().await;
        let mut k = Keys {
            header: some("eu-west"),
            ..keys()
        };
        assert_eq!(chose(&k, &t), ("eu-west".into(), Basis::Header, false));
        k.header = None;
        assert_eq!(chose(&k, &t), ("cn-east".into(), Basis::Default, false));
    }

    /// A region whose cells gossip has seen go down is refused at once,
    /// though its address passes the active checks; it is served again
    /// when a cell comes back.
    #[tokio::test]
    async fn gossip_takes_a_region_down_and_back() {
        use homecell_common::gossip::OwnedNotification::{MemberDown, MemberUp};
        use homecell_common::gossip::{Membership, NodeId, Role};
        let t = table().await;
        let node = |port: u16, role: Role| NodeId {
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            role,
            region: "cn-east".into(),
            name: format!("n{port}"),
            bump: 1,
        };
        let m = std::sync::Arc::new(Membership::new(node(1, Role::Router)));
        let health = crate::health::Health::default();
        health.follow_gossip(m.clone());
        m.record(MemberUp(node(2, Role::Cell)));
        assert!(admit(&t, &health, "cn-east", false).is_ok());
        m.record(MemberDown(node(2, Role::Cell)));
        let r = admit(&t, &health, "cn-east", false).unwrap_err();
        assert_eq!(
            (r.code, r.retry_after),
            (ErrorCode::CellUnavailable, Some(CELL_DOWN_RETRY_AFTER))
        );
        // A probe of ours that started before the cell went down proves
        // nothing; one that started after it does, and wins over gossip.
        let before = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        health.reached(["cn-east"], before);
        assert!(admit(&t, &health, "cn-east", false).is_err());
        health.reached(
            ["cn-east"],
            std::time::SystemTime::now() + std::time::Duration::from_millis(1),
        );
        assert!(admit(&t, &health, "cn-east", false).is_ok());
        // A cell gossip sees come back clears it as well.
        let health = crate::health::Health::default();
        health.follow_gossip(m.clone());
        assert!(admit(&t, &health, "cn-east", false).is_err());
        m.record(MemberUp(node(3, Role::Cell)));
        assert!(admit(&t, &health, "cn-east", false).is_ok());
    }

    #[tokio::test]
    async fn admits_and_refuses_with_the_right_code() {
        let t = table().await;
        assert_eq!(
            admit(&t, &crate::health::Health::default(), "cn-east", false)
                .unwrap()
                .sni,
            "cell.cn-east"
        );
        // Draining: existing users are served, registrations are not.
        assert_eq!(
            admit(&t, &crate::health::Health::default(), "eu-west", false)
                .unwrap()
                .region,
            "eu-west"
        );
        let r = admit(&t, &crate::health::Health::default(), "eu-west", true).unwrap_err();
        assert_eq!(
            (r.code, r.retry_after),
            (ErrorCode::RegionDraining, Some(30))
        );
        assert_eq!(
            admit(&t, &crate::health::Health::default(), "us-old", false)
                .unwrap_err()
                .code,
            ErrorCode::RegionRetired
        );
        assert_eq!(
            admit(&t, &crate::health::Health::default(), "ap-nowhere", false)
                .unwrap_err()
                .code,
            ErrorCode::UnknownRegion
        );
        assert_eq!(
            header_region("../etc").unwrap_err().code,
            ErrorCode::InvalidArgument
        );
    }

    #[tokio::test]
    async fn registration_honours_only_active_preferences() {
        let t = table().await;
        assert_eq!(registration_region(&t, Some("cn-east"), None), "cn-east");
        assert_eq!(
            registration_region(&t, Some("eu-west"), None),
            "cn-east",
            "draining"
        );
        assert_eq!(
            registration_region(&t, Some("us-old"), None),
            "cn-east",
            "retired"
        );
        assert_eq!(registration_region(&t, Some("nowhere"), None), "cn-east");
        assert_eq!(registration_region(&t, None, None), "cn-east");
    }

    #[tokio::test]
    async fn registration_follows_the_country_to_an_active_region() {
        let t = table_of(&[
            ("cn-east", RegionStatus::Active, "CN"),
            ("ap-south", RegionStatus::Active, "IN"),
            ("eu-west", RegionStatus::Draining, "GB"),
        ])
        .await;
        assert_eq!(registration_region(&t, None, Some("IN")), "ap-south");
        assert_eq!(
            registration_region(&t, Some("cn-east"), Some("IN")),
            "cn-east",
            "a preference wins"
        );
        assert_eq!(
            registration_region(&t, None, Some("GB")),
            "cn-east",
            "draining regions take none"
        );
        assert_eq!(registration_region(&t, None, Some("BR")), "cn-east");
    }
}
