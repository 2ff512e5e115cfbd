//! Which cell a request goes to, or why it goes nowhere. Pure: the proxy
//! phases call it with what they read from the request.
//!
//! For now the routing key is the `x-home-region` header, else the default
//! region (the token, directory and GeoIP keys come with the routing issue).

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
    fn new(code: ErrorCode, detail: String, retry_after: Option<u64>) -> Self {
        Self {
            code,
            detail,
            retry_after,
        }
    }
}

/// Seconds a client should wait before retrying a region whose cell is down.
pub const CELL_DOWN_RETRY_AFTER: u64 = 5;

pub fn decide(
    table: &RouteTable,
    home_region_header: Option<&str>,
) -> Result<Arc<Upstream>, Refusal> {
    let region = match home_region_header {
        Some(r) => {
            let r = r.trim();
            validate_region_id(r).map_err(|e| {
                Refusal::new(
                    ErrorCode::InvalidArgument,
                    format!("x-home-region: {}", e.message),
                    None,
                )
            })?;
            r
        }
        None => table.default_region.as_str(),
    };
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
        RegionStatus::Draining => Err(Refusal::new(
            ErrorCode::RegionDraining,
            format!("region {region} is draining; try again later"),
            Some(table.draining_retry_after.as_secs().max(1)),
        )),
        _ if up.addrs.is_empty() => Err(Refusal::new(
            ErrorCode::CellUnavailable,
            format!("the cell of region {region} cannot be resolved"),
            Some(CELL_DOWN_RETRY_AFTER),
        )),
        _ => Ok(up.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use homecell_common::replica::ReplicaState;
    use homecell_proto::control::Region;
    use std::time::Duration;

    async fn table() -> RouteTable {
        let mut s = ReplicaState {
            revision: 1,
            ..Default::default()
        };
        for (id, status, ep) in [
            ("cn-east", RegionStatus::Active, "https://127.0.0.1:1"),
            ("eu-west", RegionStatus::Draining, "https://127.0.0.1:2"),
            ("us-old", RegionStatus::Retired, "https://127.0.0.1:3"),
        ] {
            s.regions.insert(
                id.into(),
                Region {
                    id: id.into(),
                    status: status as i32,
                    internal_endpoint: ep.into(),
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

    #[tokio::test]
    async fn routes_by_header_else_default() {
        let t = table().await;
        assert_eq!(decide(&t, None).unwrap().region, "cn-east");
        assert_eq!(decide(&t, Some("cn-east")).unwrap().sni, "cell.cn-east");
    }

    #[tokio::test]
    async fn refuses_with_the_right_code() {
        let t = table().await;
        let r = decide(&t, Some("eu-west")).unwrap_err();
        assert_eq!(
            (r.code, r.retry_after),
            (ErrorCode::RegionDraining, Some(30))
        );
        assert_eq!(
            decide(&t, Some("us-old")).unwrap_err().code,
            ErrorCode::RegionRetired
        );
        assert_eq!(
            decide(&t, Some("ap-nowhere")).unwrap_err().code,
            ErrorCode::UnknownRegion
        );
        assert_eq!(
            decide(&t, Some("../etc")).unwrap_err().code,
            ErrorCode::InvalidArgument
        );
    }
}
