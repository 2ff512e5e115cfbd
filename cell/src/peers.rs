//! Calls to other cells over gRPC with mTLS (the cell's own gRPC service,
//! which answers them, is `grpc.rs`).
//!
//! A token issued by another cell is checked with its home cell: is the
//! session still alive? Live answers are cached for a few seconds, so a
//! logout or a newer login reaches every cell within `SESSION_CACHE_TTL`.

use homecell_common::replica::Replica;
use homecell_common::tls::TlsMaterial;
use homecell_proto::cell::{
    CheckSessionRequest, ForwardDepositRequest, ImportUserRequest, IncomingResponse,
    IncomingTransfer, SendNoticeRequest, cell_service_client::CellServiceClient,
};
use homecell_proto::region::internal_endpoints;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// How long another cell may rely on "this session is alive".
pub const SESSION_CACHE_TTL: Duration = Duration::from_secs(4);

pub struct Peers {
    tls: TlsMaterial,
    replica: Arc<Replica>,
    channels: Mutex<HashMap<String, (String, Channel)>>,
    /// The same, for calls that carry a user's whole data (a move's
    /// import): a longer deadline than the 2 s of every other call.
    bulk_channels: Mutex<HashMap<String, (String, Channel)>>,
    /// Home cells' answers by (session, user): keyed by both, so a token
    /// that pairs a live session id with another user (a cell's key
    /// stolen) never borrows that session's answer.
    sessions: Mutex<HashMap<(String, String), (bool, Instant)>>,
}

/// What the home cell said about a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    Alive,
    Ended,
    /// The home cell could not be asked.
    Unknown,
}

type TracedClient = CellServiceClient<homecell_common::traced_grpc::TracedChannel>;

/// A client whose calls carry the trace context of the request this task
/// serves (W3C `traceparent` in the gRPC metadata), so one trace follows a
/// request from the router across cells.
fn client(ch: Channel) -> TracedClient {
    CellServiceClient::new(homecell_common::traced_grpc::TracedChannel::new(ch))
        .max_encoding_message_size(crate::grpc::MAX_BUNDLE + 64 * 1024)
}

impl Peers {
    pub fn new(tls: TlsMaterial, replica: Arc<Replica>) -> Self {
        Self {
            tls,
            replica,
            channels: Mutex::new(HashMap::new()),
            bulk_channels: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// A channel to `region`'s cell, rebuilt when its endpoint changes.
    fn channel(&self, region: &str) -> Option<Channel> {
        self.channel_in(&self.channels, region, Duration::from_secs(2))
    }

    /// [`Self::channel`] with a deadline of a minute, for bulk calls.
    fn bulk_channel(&self, region: &str) -> Option<Channel> {
        self.channel_in(&self.bulk_channels, region, Duration::from_secs(60))
    }

    fn channel_in(
        &self,
        cache: &Mutex<HashMap<String, (String, Channel)>>,
        region: &str,
        deadline: Duration,
    ) -> Option<Channel> {
        let endpoint = self
            .replica
            .state()
            .regions
            .get(region)?
            .internal_endpoint
            .clone();
        let mut channels = cache.lock().expect("poisoned");
        if let Some((ep, ch)) = channels.get(region)
            && *ep == endpoint
        {
            return Some(ch.clone());
        }
        let sni = format!("cell.{region}");
        let mut endpoints = Vec::new();
        for e in internal_endpoints(&endpoint) {
            let e = tonic::transport::Endpoint::from_shared(e.to_string())
                .ok()?
                .tls_config(self.tls.tonic_client(&sni))
                .ok()?
                .connect_timeout(Duration::from_secs(1))
                .timeout(deadline);
            endpoints.push(e);
        }
        // A cell of several instances: calls are spread over the ones that
        // connect (each call is idempotent, so a retry may land on another).
        let ch = match endpoints.len() {
            0 => return None,
            1 => endpoints.pop()?.connect_lazy(),
            _ => Channel::balance_list(endpoints.into_iter()),
        };
        channels.insert(region.to_string(), (endpoint, ch.clone()));
        Some(ch)
    }

    pub async fn session_state(&self, home: &str, sid: &str, user_id: &str) -> SessionState {
        let key = (sid.to_string(), user_id.to_string());
        if let Some((alive, at)) = self.sessions.lock().expect("poisoned").get(&key).copied() {
            // An ended session never comes back; a live one is re-asked soon.
            if !alive {
                return SessionState::Ended;
            }
            if at.elapsed() < SESSION_CACHE_TTL {
                return SessionState::Alive;
            }
        }
        let Some(ch) = self.channel(home) else {
            return SessionState::Unknown;
        };
        let req = CheckSessionRequest {
            session_id: sid.to_string(),
            user_id: user_id.to_string(),
        };
        // Boxed: this future is part of every authenticated request's
        // (the session check sits in the extractor), and a tonic call's
        // state is kilobytes that every request would otherwise move.
        match Box::pin(client(ch).check_session(req)).await {
            Ok(r) => {
                let alive = r.get_ref().alive;
                let mut cache = self.sessions.lock().expect("poisoned");
                if cache.len() > 100_000 {
                    cache.retain(|_, (alive, at)| {
                        !*alive && at.elapsed() < Duration::from_secs(900)
                    });
                }
                cache.insert(key, (alive, Instant::now()));
                if alive {
                    SessionState::Alive
                } else {
                    SessionState::Ended
                }
            }
            // The home cell answered, and not "alive": the token is not
            // good (a malformed id, a refused caller). Only a home that
            // cannot be reached leaves the signature to decide.
            Err(e) if answered(e.code()) => {
                tracing::warn!(home, error = %e.message(), "the home cell refused a session check");
                SessionState::Ended
            }
            Err(e) => {
                tracing::warn!(home, error = %e.message(), "cannot check a session with its home cell");
                SessionState::Unknown
            }
        }
    }
}

impl Peers {
    /// One step of a cross-cell transfer at the receiver's cell: `hold`,
    /// `post` or `void`. An error is a transport or server failure, worth a
    /// retry; a definitive refusal comes back as `refused`.
    pub async fn incoming(
        &self,
        region: &str,
        step: &str,
        req: IncomingTransfer,
    ) -> Result<IncomingResponse, String> {
        let ch = self
            .channel(region)
            .ok_or_else(|| format!("region {region} has no usable endpoint"))?;
        let mut client = client(ch);
        let r = match step {
            "hold" => client.hold_incoming(req).await,
            "post" => client.post_incoming(req).await,
            _ => client.void_incoming(req).await,
        };
        r.map(tonic::Response::into_inner)
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    }
}

impl Peers {
    /// Queues a notice at `region`'s cell.
    pub async fn send_notice(
        &self,
        region: &str,
        event_id: &str,
        topic: &str,
        user_id: &str,
        payload: &str,
    ) -> Result<(), String> {
        let ch = self
            .channel(region)
            .ok_or_else(|| format!("region {region} has no usable endpoint"))?;
        let req = SendNoticeRequest {
            event_id: event_id.into(),
            topic: topic.into(),
            user_id: user_id.into(),
            payload: payload.into(),
        };
        client(ch)
            .send_notice(req)
            .await
            .map(|_| ())
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    }
}

impl Peers {
    /// Books a verified deposit at the user's home cell: (transfer id, state)
    /// or the home's refusal as a coded error.
    pub async fn forward_deposit(
        &self,
        region: &str,
        req: ForwardDepositRequest,
    ) -> Result<(String, String), homecell_proto::error::CodedError> {
        use homecell_proto::error::{CodedError, ErrorCode};
        let ch = self.channel(region).ok_or_else(|| {
            CodedError::new(
                ErrorCode::CellUnavailable,
                "the user's home cell has no endpoint",
            )
        })?;
        match client(ch).forward_deposit(req).await {
            Ok(r) => {
                let r = r.into_inner();
                Ok((r.transfer_id, r.state))
            }
            // Our own coded errors travel as "<code> <message>".
            Err(s) => {
                let (code, msg) = s.message().split_once(' ').unwrap_or(("", s.message()));
                let code = serde_json::from_value(serde_json::Value::String(code.into()))
                    .unwrap_or(ErrorCode::CellUnavailable);
                Err(CodedError::new(code, msg.to_string()))
            }
        }
    }
}

impl Peers {
    /// Pushes a moving user's bundle to the new home's cell.
    pub async fn import_user(&self, to: &str, req: ImportUserRequest) -> Result<(), PeerRefusal> {
        let ch = self
            .bulk_channel(to)
            .ok_or_else(|| PeerRefusal::Unreachable(format!("region {to} has no cell endpoint")))?;
        client(ch)
            .import_user(req)
            .await
            .map(drop)
            .map_err(|s| PeerRefusal::from_status(to, "import", &s))
    }

    /// Asks the new home to drop an import (a move undone).
    pub async fn discard_import(
        &self,
        to: &str,
        req: homecell_proto::cell::DiscardImportRequest,
    ) -> Result<(), PeerRefusal> {
        let ch = self
            .channel(to)
            .ok_or_else(|| PeerRefusal::Unreachable(format!("region {to} has no cell endpoint")))?;
        client(ch)
            .discard_import(req)
            .await
            .map(drop)
            .map_err(|s| PeerRefusal::from_status(to, "discard", &s))
    }
}

/// Why another cell did not do what a move asked.
#[derive(Debug)]
pub enum PeerRefusal {
    /// It could not be asked, or could not answer now: ask again later.
    Unreachable(String),
    /// It said no, for good.
    Refused(String),
}

impl PeerRefusal {
    fn from_status(to: &str, what: &str, s: &tonic::Status) -> Self {
        let msg = format!("the cell of {to} could not {what}: {}", s.message());
        if answered(s.code()) {
            Self::Refused(msg)
        } else {
            Self::Unreachable(msg)
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Self::Unreachable(m) | Self::Refused(m) => m,
        }
    }
}

/// Whether a failed call was the other cell's answer, not a failure to
/// reach it.
fn answered(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        InvalidArgument
            | NotFound
            | AlreadyExists
            | PermissionDenied
            | Unauthenticated
            | FailedPrecondition
            | OutOfRange
    )
}
