//! Region ids, statuses, endpoints and countries: parsed and validated once,
//! here, so the control plane, the CLI and the router agree on what is valid.

use crate::control::RegionStatus;
use crate::error::CodedError;

/// `[a-z0-9-]`, 2..=32 characters, starting with a letter and not ending in `-`.
pub fn validate_region_id(id: &str) -> Result<(), CodedError> {
    let ok_len = (2..=32).contains(&id.len());
    let ok_chars = id
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_ends = id.starts_with(|c: char| c.is_ascii_lowercase()) && !id.ends_with('-');
    if ok_len && ok_chars && ok_ends {
        Ok(())
    } else {
        Err(CodedError::invalid(format!(
            "region id {id:?} is malformed: use 2-32 characters of [a-z0-9-], starting with a letter"
        )))
    }
}

/// An endpoint is `http(s)://host:port` with nothing after the authority.
/// Returns it normalised (no trailing slash).
pub fn validate_endpoint(what: &str, endpoint: &str) -> Result<String, CodedError> {
    let bad = |why: &str| CodedError::invalid(format!("{what} {endpoint:?} is malformed: {why}"));
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|_| bad("expected http(s)://host:port"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(bad("the scheme must be http or https")),
    }
    let authority = uri.authority().ok_or_else(|| bad("missing host"))?;
    if authority.host().is_empty() {
        return Err(bad("missing host"));
    }
    if authority.port_u16().is_none() {
        return Err(bad("an explicit port is required"));
    }
    if authority.as_str().contains('@') {
        return Err(bad("credentials are not allowed in an endpoint"));
    }
    match uri.path_and_query().map(|p| p.as_str()) {
        None | Some("") | Some("/") => {}
        Some(_) => return Err(bad("no path or query is allowed")),
    }
    Ok(format!(
        "{}://{}",
        uri.scheme_str().unwrap_or("https"),
        authority
    ))
}

/// How many instances one region's internal endpoint may list.
pub const MAX_CELL_INSTANCES: usize = 32;

/// A cell's internal endpoint: one `https://host:port`, or a comma-separated
/// list of them when the cell runs as several instances over one
/// PostgreSQL. (A host name that resolves to several addresses, such as a
/// Kubernetes headless Service, is the other way to name several.) Returns
/// the list normalised: each endpoint validated, duplicates dropped.
pub fn validate_internal_endpoints(list: &str) -> Result<String, CodedError> {
    Ok(validate_endpoint_list("internal endpoint", list)?.join(","))
}

/// A comma-separated list of endpoints (a cell's instances, the control
/// plane's instances): each validated and normalised, duplicates dropped.
pub fn validate_endpoint_list(what: &str, list: &str) -> Result<Vec<String>, CodedError> {
    let mut out: Vec<String> = Vec::new();
    for e in list.split(',') {
        let e = validate_endpoint(what, e.trim())?;
        if !out.contains(&e) {
            out.push(e);
        }
    }
    if out.len() > MAX_CELL_INSTANCES {
        return Err(CodedError::invalid(format!(
            "{what} lists {} instances; at most {MAX_CELL_INSTANCES}",
            out.len()
        )));
    }
    Ok(out)
}

/// The endpoints of a validated comma-separated list (a cell's internal
/// endpoint, the control plane's instances).
pub fn internal_endpoints(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|e| !e.is_empty())
}

/// ISO 3166-1 alpha-2 codes, officially assigned.
const ISO_COUNTRIES: &str = "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW";

/// Normalises (upper case, sorted, deduplicated) and validates country codes.
pub fn normalize_countries<S: AsRef<str>>(countries: &[S]) -> Result<Vec<String>, CodedError> {
    let mut out = Vec::with_capacity(countries.len());
    for c in countries {
        let c = c.as_ref().trim().to_ascii_uppercase();
        if c.len() != 2 || !ISO_COUNTRIES.split(' ').any(|k| k == c) {
            return Err(CodedError::invalid(format!(
                "country {:?} is not an ISO 3166-1 alpha-2 code",
                c
            )));
        }
        out.push(c);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

pub fn status_name(status: RegionStatus) -> &'static str {
    match status {
        RegionStatus::Active => "active",
        RegionStatus::Draining => "draining",
        RegionStatus::Retired => "retired",
        RegionStatus::Unspecified => "unspecified",
    }
}

pub fn parse_status(s: &str) -> Result<RegionStatus, CodedError> {
    match s {
        "active" => Ok(RegionStatus::Active),
        "draining" => Ok(RegionStatus::Draining),
        "retired" => Ok(RegionStatus::Retired),
        _ => Err(CodedError::invalid(format!(
            "status {s:?} is not one of active, draining, retired"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_ids() {
        for ok in ["cn-east", "eu-west", "us1", "ap-south-2"] {
            validate_region_id(ok).unwrap();
        }
        for bad in [
            "",
            "a",
            "CN-east",
            "cn_east",
            "-cn",
            "cn-",
            "1cn",
            &"x".repeat(33),
        ] {
            assert!(validate_region_id(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            validate_endpoint("e", "https://10.0.0.1:8443/").unwrap(),
            "https://10.0.0.1:8443"
        );
        assert_eq!(
            validate_endpoint("e", "http://cell-cn-east:8080").unwrap(),
            "http://cell-cn-east:8080"
        );
        for bad in [
            "cell:8080",
            "ftp://x:1",
            "https://x",
            "https://x:1/path",
            "https://u:p@x:1",
            "",
            "https://:80",
        ] {
            assert!(validate_endpoint("e", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn instance_lists() {
        let list = validate_internal_endpoints("https://a:1/, https://b:2,https://a:1").unwrap();
        assert_eq!(list, "https://a:1,https://b:2");
        assert_eq!(
            internal_endpoints(&list).collect::<Vec<_>>(),
            ["https://a:1", "https://b:2"]
        );
        assert!(validate_internal_endpoints("https://a:1,").is_err());
        assert!(validate_internal_endpoints("https://a:1,cell:2").is_err());
        let many: Vec<String> = (0..=MAX_CELL_INSTANCES)
            .map(|i| format!("https://a:{}", i + 1))
            .collect();
        assert!(validate_internal_endpoints(&many.join(",")).is_err());
    }

    #[test]
    fn countries() {
        assert_eq!(
            normalize_countries(&["cn", "HK", "CN"]).unwrap(),
            vec!["CN", "HK"]
        );
        assert!(normalize_countries(&["XX"]).is_err());
        assert!(normalize_countries(&["CHN"]).is_err());
    }
}
