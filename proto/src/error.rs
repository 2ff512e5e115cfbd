//! One error vocabulary, mapped to both HTTP status and gRPC status.
//!
//! Every error a client can see carries a stable `code` (snake_case). Over HTTP
//! it travels as RFC 9457 `application/problem+json`; over gRPC as the status
//! code below with the stable code as the message's first word.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The input is malformed or fails validation.
    InvalidArgument,
    /// Authentication is missing or invalid.
    Unauthenticated,
    /// Wrong identifier or password (or a locked account: the answer is the same).
    InvalidCredentials,
    /// The account is disabled.
    AccountDisabled,
    /// A conditional write came without `If-Match`.
    PreconditionRequired,
    /// The content type is not JSON.
    UnsupportedMediaType,
    /// Authenticated, but not allowed.
    PermissionDenied,
    NotFound,
    /// A unique thing already exists.
    AlreadyExists,
    /// The state does not allow this now (e.g. a retired region).
    FailedPrecondition,
    /// An `If-Match` did not match.
    PreconditionFailed,
    /// The region is draining: try later.
    RegionDraining,
    /// The region is retired.
    RegionRetired,
    /// The request names a region this system does not know.
    UnknownRegion,
    /// The home cell could not be reached.
    CellUnavailable,
    /// The home cell did not answer in time.
    UpstreamTimeout,
    /// The home cell's answer could not be proxied.
    BadGateway,
    /// Not ready yet (no snapshot loaded).
    NotReady,
    /// The body is larger than allowed.
    PayloadTooLarge,
    /// The wallet's available balance does not cover the amount.
    InsufficientFunds,
    /// An `Idempotency-Key` was used before with a different request.
    IdempotencyKeyReused,
    TooManyRequests,
    /// The user this request concerns lives in another region now (the
    /// answer names it; routers replay the request there once).
    UserMoved,
    /// The user is being moved to another region: the write was not
    /// applied; retry after `Retry-After` (it then reaches the new home).
    UserMoving,
    /// The account lives in another region: sign in there (the answer's
    /// `x-home-region` names it). Not replayed by routers: the proof of
    /// identity (a one-time WeChat code) is spent.
    HomeElsewhere,
    /// The session is not fresh enough for this (removing an identifier):
    /// sign in again, then retry.
    RecentSignInRequired,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidArgument => "invalid_argument",
            Self::Unauthenticated => "unauthenticated",
            Self::InvalidCredentials => "invalid_credentials",
            Self::AccountDisabled => "account_disabled",
            Self::PreconditionRequired => "precondition_required",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::PermissionDenied => "permission_denied",
            Self::NotFound => "not_found",
            Self::AlreadyExists => "already_exists",
            Self::FailedPrecondition => "failed_precondition",
            Self::PreconditionFailed => "precondition_failed",
            Self::RegionDraining => "region_draining",
            Self::RegionRetired => "region_retired",
            Self::UnknownRegion => "unknown_region",
            Self::CellUnavailable => "cell_unavailable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::BadGateway => "bad_gateway",
            Self::NotReady => "not_ready",
            Self::PayloadTooLarge => "payload_too_large",
            Self::InsufficientFunds => "insufficient_funds",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::TooManyRequests => "too_many_requests",
            Self::UserMoved => "user_moved",
            Self::UserMoving => "user_moving",
            Self::HomeElsewhere => "home_elsewhere",
            Self::RecentSignInRequired => "recent_sign_in_required",
            Self::Internal => "internal",
        }
    }

    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidArgument => 400,
            Self::Unauthenticated | Self::InvalidCredentials => 401,
            Self::PermissionDenied | Self::AccountDisabled | Self::RecentSignInRequired => 403,
            Self::PreconditionRequired => 428,
            Self::UnsupportedMediaType => 415,
            Self::NotFound | Self::UnknownRegion => 404,
            Self::AlreadyExists | Self::FailedPrecondition | Self::HomeElsewhere => 409,
            Self::PreconditionFailed => 412,
            Self::PayloadTooLarge => 413,
            Self::InsufficientFunds => 409,
            Self::IdempotencyKeyReused => 422,
            Self::TooManyRequests => 429,
            // Misdirected Request: this server is not the one to answer.
            Self::UserMoved => 421,
            Self::Internal => 500,
            Self::BadGateway => 502,
            Self::UpstreamTimeout => 504,
            Self::CellUnavailable
            | Self::RegionDraining
            | Self::RegionRetired
            | Self::NotReady
            | Self::UserMoving => 503,
        }
    }

    pub fn grpc_code(self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::InvalidArgument | Self::PayloadTooLarge | Self::UnsupportedMediaType => {
                Code::InvalidArgument
            }
            Self::Unauthenticated | Self::InvalidCredentials => Code::Unauthenticated,
            Self::PermissionDenied | Self::AccountDisabled | Self::RecentSignInRequired => {
                Code::PermissionDenied
            }
            Self::PreconditionRequired => Code::FailedPrecondition,
            Self::NotFound | Self::UnknownRegion => Code::NotFound,
            Self::AlreadyExists => Code::AlreadyExists,
            Self::FailedPrecondition
            | Self::PreconditionFailed
            | Self::RegionRetired
            | Self::InsufficientFunds
            | Self::IdempotencyKeyReused
            | Self::UserMoved
            | Self::HomeElsewhere => Code::FailedPrecondition,
            Self::TooManyRequests => Code::ResourceExhausted,
            Self::RegionDraining
            | Self::CellUnavailable
            | Self::NotReady
            | Self::BadGateway
            | Self::UserMoving => Code::Unavailable,
            Self::UpstreamTimeout => Code::DeadlineExceeded,
            Self::Internal => Code::Internal,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Self::InvalidArgument => "Invalid request",
            Self::Unauthenticated => "Authentication required",
            Self::InvalidCredentials => "Invalid credentials",
            Self::AccountDisabled => "Account disabled",
            Self::RecentSignInRequired => "Sign in again first",
            Self::PreconditionRequired => "Precondition required",
            Self::UnsupportedMediaType => "Unsupported media type",
            Self::PermissionDenied => "Permission denied",
            Self::NotFound => "Not found",
            Self::AlreadyExists => "Already exists",
            Self::FailedPrecondition => "Not allowed in the current state",
            Self::PreconditionFailed => "Precondition failed",
            Self::RegionDraining => "Region is draining",
            Self::RegionRetired => "Region is retired",
            Self::UnknownRegion => "Unknown region",
            Self::CellUnavailable => "Home cell unavailable",
            Self::UpstreamTimeout => "Home cell timed out",
            Self::BadGateway => "Bad answer from the home cell",
            Self::NotReady => "Not ready",
            Self::PayloadTooLarge => "Payload too large",
            Self::InsufficientFunds => "Insufficient funds",
            Self::IdempotencyKeyReused => "Idempotency key reused with another request",
            Self::TooManyRequests => "Too many requests",
            Self::UserMoved => "The user lives in another region now",
            Self::HomeElsewhere => "The account lives in another region",
            Self::UserMoving => "The user is moving to another region",
            Self::Internal => "Internal error",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// On a `UserMoved` answer: the region the user lives in now (routers replay
/// the request there once).
pub const MOVED_TO_HEADER: &str = "x-homecell-moved-to";

/// On a `HomeElsewhere` answer: the account's home region, in the header
/// every routed answer carries.
pub const HOME_REGION_HEADER: &str = "x-home-region";

/// gRPC metadata on an error that carries `CodedError::home_region` (the
/// control plane's `AlreadyExists` for a claim: the holder's region).
pub const HOME_REGION_METADATA: &str = "x-homecell-home-region";

/// An RFC 9457 problem document with our stable `code` extension.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: String,
    pub status: u16,
    pub code: ErrorCode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// For validation errors: which fields, and what is wrong with each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl Problem {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self {
            type_uri: format!("https://homecell.dev/problems/{}", code.as_str()),
            title: code.title().to_string(),
            status: code.http_status(),
            code,
            detail: Some(detail.into()),
            instance: None,
            errors: Vec::new(),
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a problem always serialises")
    }
}

/// An error with its stable code and a one-line, user-safe message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CodedError {
    pub code: ErrorCode,
    pub message: String,
    /// Field-level detail for validation errors.
    pub fields: Vec<FieldError>,
    /// For `UserMoved`: the user's home region now.
    pub moved_to: Option<String>,
    /// For `HomeElsewhere`: the account's home region; for a claim the
    /// control plane refuses, the holder's (gRPC metadata between them).
    pub home_region: Option<String>,
    /// For `TooManyRequests`: seconds until a retry may succeed
    /// (`Retry-After`).
    pub retry_after: Option<u64>,
}

impl CodedError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            fields: Vec::new(),
            moved_to: None,
            home_region: None,
            retry_after: None,
        }
    }

    /// The user lives in `region` now.
    pub fn moved(region: &str) -> Self {
        Self {
            moved_to: Some(region.to_string()),
            ..Self::new(
                ErrorCode::UserMoved,
                format!("this user's home is region {region} now"),
            )
        }
    }

    /// The account lives in `region`; the caller must go there itself.
    pub fn home_elsewhere(region: &str, message: impl Into<String>) -> Self {
        Self {
            home_region: Some(region.to_string()),
            ..Self::new(ErrorCode::HomeElsewhere, message)
        }
    }

    /// Tells the caller when to retry (`Retry-After`, in seconds).
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// A validation error naming the fields at fault.
    pub fn fields(fields: Vec<FieldError>) -> Self {
        let names: Vec<&str> = fields.iter().map(|f| f.field.as_str()).collect();
        let message = format!("invalid fields: {}", names.join(", "));
        Self {
            code: ErrorCode::InvalidArgument,
            message,
            fields,
            moved_to: None,
            home_region: None,
            retry_after: None,
        }
    }

    /// A validation error for one field.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::fields(vec![FieldError {
            field: field.into(),
            message: message.into(),
        }])
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

impl From<CodedError> for tonic::Status {
    fn from(e: CodedError) -> Self {
        let mut status = tonic::Status::new(e.code.grpc_code(), e.message);
        if let Some(v) = e.home_region.and_then(|r| r.parse().ok()) {
            status.metadata_mut().insert(HOME_REGION_METADATA, v);
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_home_region_travels_as_grpc_metadata() {
        let e = CodedError {
            home_region: Some("cn-east".into()),
            ..CodedError::new(ErrorCode::AlreadyExists, "taken")
        };
        let s = tonic::Status::from(e);
        assert_eq!(s.code(), tonic::Code::AlreadyExists);
        assert_eq!(
            s.metadata()
                .get(HOME_REGION_METADATA)
                .map(|v| v.to_str().unwrap()),
            Some("cn-east")
        );
        let plain = tonic::Status::from(CodedError::new(ErrorCode::AlreadyExists, "taken"));
        assert!(plain.metadata().get(HOME_REGION_METADATA).is_none());
    }

    #[test]
    fn problem_serialises_with_stable_code() {
        let p = Problem::new(ErrorCode::RegionDraining, "eu-west is draining");
        let v: serde_json::Value = serde_json::from_slice(&p.to_json()).unwrap();
        assert_eq!(v["code"], "region_draining");
        assert_eq!(v["status"], 503);
        assert_eq!(v["type"], "https://homecell.dev/problems/region_draining");
    }

    #[test]
    fn codes_round_trip_through_serde() {
        for code in [ErrorCode::UnknownRegion, ErrorCode::CellUnavailable] {
            let s = serde_json::to_string(&code).unwrap();
            assert_eq!(s, format!("\"{}\"", code.as_str()));
        }
    }
}
