//! Calls to other cells over gRPC with mTLS, and the cell's own gRPC service.
//!
//! A token issued by another cell is checked with its home cell: is the
//! session still alive? Live answers are cached for a few seconds, so a
//! logout or a newer login reaches every cell within `SESSION_CACHE_TTL`.

use crate::state::Cell;
use homecell_common::replica::Replica;
use homecell_common::tls::{PeerIdentity, TlsMaterial};
use homecell_proto::cell::{
    CheckSessionRequest, CheckSessionResponse, ForwardDepositRequest, ForwardDepositResponse,
    ImportUserRequest, ImportUserResponse, IncomingResponse, IncomingTransfer, MoveUserOutRequest,
    MoveUserOutResponse, SendNoticeRequest, SendNoticeResponse,
    cell_service_client::CellServiceClient, cell_service_server::CellService,
};
use homecell_proto::region::internal_endpoints;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// How long another cell may rely on "this session is alive".
pub const SESSION_CACHE_TTL: Duration = Duration::from_secs(4);

pub struct Peers {
    tls: TlsMaterial,
    replica: Arc<Replica>,
    channels: Mutex<HashMap<String, (String, Channel)>>,
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

type TracedClient = CellServiceClient<
    tonic::service::interceptor::InterceptedService<
        Channel,
        fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    >,
>;

/// A client whose calls carry the trace context of the request this task
/// serves (W3C `traceparent` in the gRPC metadata), so one trace follows a
/// request from the router across cells.
fn client(ch: Channel) -> TracedClient {
    CellServiceClient::with_interceptor(ch, with_trace)
}

fn with_trace(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    if let Some(t) = homecell_common::trace::TraceParent::current_child()
        && let Ok(v) = t.to_string().parse()
    {
        req.metadata_mut().insert("traceparent", v);
    }
    Ok(req)
}

impl Peers {
    pub fn new(tls: TlsMaterial, replica: Arc<Replica>) -> Self {
        Self {
            tls,
            replica,
            channels: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// A channel to `region`'s cell, rebuilt when its endpoint changes.
    fn channel(&self, region: &str) -> Option<Channel> {
        let endpoint = self
            .replica
            .state()
            .regions
            .get(region)?
            .internal_endpoint
            .clone();
        let mut channels = self.channels.lock().expect("poisoned");
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
                .timeout(Duration::from_secs(2));
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
        match client(ch).check_session(req).await {
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
    pub async fn import_user(
        &self,
        to: &str,
        from: &str,
        user_id: &str,
        bundle: Vec<u8>,
    ) -> Result<(), homecell_proto::error::CodedError> {
        use homecell_proto::error::{CodedError, ErrorCode};
        let ch = self.channel(to).ok_or_else(|| {
            CodedError::new(
                ErrorCode::CellUnavailable,
                format!("region {to} has no cell endpoint"),
            )
        })?;
        let req = ImportUserRequest {
            from_region: from.to_string(),
            user_id: user_id.to_string(),
            bundle,
        };
        client(ch).import_user(req).await.map(|_| ()).map_err(|s| {
            CodedError::new(
                ErrorCode::FailedPrecondition,
                format!("the cell of {to} refused the import: {}", s.message()),
            )
        })
    }
}

/// The caller's region, when it is another cell.
fn calling_cell<T>(req: &Request<T>) -> Result<String, Status> {
    match req.extensions().get::<PeerIdentity>() {
        Some(PeerIdentity::Cell { region }) => Ok(region.clone()),
        _ => Err(Status::permission_denied(
            "only cells take part in transfers",
        )),
    }
}

fn status(e: homecell_proto::error::CodedError) -> Status {
    Status::new(e.code.grpc_code(), format!("{} {}", e.code, e.message))
}

/// The cell's gRPC service, for other cells and routers.
/// Whether a failed call was the other cell's answer, not a failure to
/// reach it.
fn answered(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        InvalidArgument
            | NotFound
            | PermissionDenied
            | Unauthenticated
            | FailedPrecondition
            | OutOfRange
    )
}

pub struct CellGrpc(pub Arc<Cell>);

#[tonic::async_trait]
impl CellService for CellGrpc {
    async fn check_session(
        &self,
        req: Request<CheckSessionRequest>,
    ) -> Result<Response<CheckSessionResponse>, Status> {
        // Cells only: a router forwards client requests with its own
        // certificate, so anything a router may call is reachable from the
        // internet through it.
        match req.extensions().get::<PeerIdentity>() {
            Some(PeerIdentity::Cell { .. }) => {}
            _ => {
                return Err(Status::permission_denied("only cells may check sessions"));
            }
        }
        let r = req.into_inner();
        if r.session_id.len() > 64 || r.user_id.len() > 64 {
            return Err(Status::invalid_argument("ids are at most 64 characters"));
        }
        let alive = self
            .0
            .db
            .session_alive(&r.session_id, &r.user_id, crate::identity::keys::now_ms())
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(CheckSessionResponse { alive }))
    }

    async fn hold_incoming(
        &self,
        req: Request<IncomingTransfer>,
    ) -> Result<Response<IncomingResponse>, Status> {
        let caller = calling_cell(&req)?;
        let r = self.0.money.hold_incoming(&caller, req.get_ref()).await;
        r.map(Response::new).map_err(status)
    }

    async fn post_incoming(
        &self,
        req: Request<IncomingTransfer>,
    ) -> Result<Response<IncomingResponse>, Status> {
        let caller = calling_cell(&req)?;
        let r = self.0.money.post_incoming(&caller, req.get_ref()).await;
        r.map(Response::new).map_err(status)
    }

    async fn send_notice(
        &self,
        req: Request<SendNoticeRequest>,
    ) -> Result<Response<SendNoticeResponse>, Status> {
        calling_cell(&req)?;
        let r = req.into_inner();
        // Other cells may send messages; auth and money events are local.
        if r.topic != "message" {
            return Err(Status::permission_denied("only messages cross cells"));
        }
        if uuid::Uuid::parse_str(&r.event_id).is_err()
            || r.user_id.len() > 64
            || r.payload.len() > 16 * 1024
        {
            return Err(Status::invalid_argument(
                "event_id must be a UUID; payload at most 16 KiB",
            ));
        }
        if !matches!(
            serde_json::from_str(&r.payload),
            Ok(serde_json::Value::Object(_))
        ) {
            return Err(Status::invalid_argument("payload must be a JSON object"));
        }
        let cell = &self.0;
        match cell.db.user(&r.user_id).await {
            Ok(Some(u)) if u.status != "deleted" => {}
            Ok(_) => return Err(Status::not_found("no such user in this region")),
            Err(e) => return Err(Status::internal(e.to_string())),
        }
        cell.db
            .enqueue_event(
                &r.event_id,
                &r.topic,
                &r.user_id,
                &r.payload,
                crate::identity::keys::now_ms(),
            )
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        cell.notices.wake.notify_one();
        Ok(Response::new(SendNoticeResponse {}))
    }

    async fn forward_deposit(
        &self,
        req: Request<ForwardDepositRequest>,
    ) -> Result<Response<ForwardDepositResponse>, Status> {
        let caller = calling_cell(&req)?;
        let r = req.into_inner();
        if caller != r.from_region || caller == self.0.region {
            return Err(Status::permission_denied(format!(
                "cell.{caller} may not forward deposits as {}",
                r.from_region
            )));
        }
        if r.provider.is_empty() || r.provider.len() > 64 {
            return Err(Status::invalid_argument("provider: 1 to 64 characters"));
        }
        if r.body.len() > crate::http::MAX_BODY {
            return Err(Status::invalid_argument("the notification is too large"));
        }
        // Verified here as at the cell it reached: what a cell forwards is
        // only ever what the provider signed, never amounts of its own.
        let now = crate::identity::keys::now_ms() / 1000;
        self.0
            .money
            .providers
            .verify(&r.provider, Some(&r.signature), &r.body, now)
            .map_err(status)?;
        let d: crate::money::provider::Deposit = serde_json::from_slice(&r.body)
            .map_err(|e| Status::invalid_argument(format!("malformed notification: {e}")))?;
        if d.kind != "deposit.succeeded" {
            return Err(Status::invalid_argument("not a deposit"));
        }
        let o = self
            .0
            .money
            .deposit(&r.provider, &d, None)
            .await
            .map_err(status)?;
        Ok(Response::new(ForwardDepositResponse {
            transfer_id: o.op.id,
            state: o.op.state,
        }))
    }

    async fn import_user(
        &self,
        req: Request<ImportUserRequest>,
    ) -> Result<Response<ImportUserResponse>, Status> {
        let caller = calling_cell(&req)?;
        let r = req.into_inner();
        if caller != r.from_region {
            return Err(Status::permission_denied(format!(
                "cell.{caller} may not import for {}",
                r.from_region
            )));
        }
        if r.bundle.len() > 16 << 20 {
            return Err(Status::invalid_argument("a move bundle is at most 16 MiB"));
        }
        self.0
            .import_moved_user(&r.from_region, &r.user_id, &r.bundle)
            .await
            .map_err(status)?;
        Ok(Response::new(ImportUserResponse {}))
    }

    /// Only this cell's own identity (its host, running `cell move-user`)
    /// may move one of its users out.
    async fn move_user_out(
        &self,
        req: Request<MoveUserOutRequest>,
    ) -> Result<Response<MoveUserOutResponse>, Status> {
        match req.extensions().get::<PeerIdentity>() {
            Some(PeerIdentity::Cell { region }) if *region == self.0.region => {}
            _ => {
                return Err(Status::permission_denied(
                    "only this cell's own host may move its users",
                ));
            }
        }
        let r = req.into_inner();
        if r.user_id.is_empty() || r.user_id.len() > 64 {
            return Err(Status::invalid_argument("user_id: 1 to 64 characters"));
        }
        let revision = self
            .0
            .move_user_out(&r.user_id, &r.to_region)
            .await
            .map_err(status)?;
        Ok(Response::new(MoveUserOutResponse { revision }))
    }

    async fn void_incoming(
        &self,
        req: Request<IncomingTransfer>,
    ) -> Result<Response<IncomingResponse>, Status> {
        let caller = calling_cell(&req)?;
        let r = self.0.money.void_incoming(&caller, req.get_ref()).await;
        r.map(Response::new).map_err(status)
    }
}
