//! The gRPC services. Each handler checks who calls (from the verified client
//! certificate), then runs one store transaction off the async runtime.
//!
//! Least privilege: operators may do everything; routers and cells may read
//! regions and config and watch; nobody else gets in.

use crate::store::Store;
use crate::sync::{self, Subscribers};
use crate::{config_ops, regions};
use homecell_common::tls::{PeerIdentity, grpc_peer};
use homecell_proto::control::*;
use homecell_proto::error::CodedError;
use std::sync::Arc;
use tonic::{Request, Response, Status};

#[derive(Clone)]
pub struct ControlPlane {
    pub store: Arc<Store>,
    pub subscribers: Arc<Subscribers>,
    pub directory_key: Arc<crate::directory::DirectoryKey>,
    /// The gossip cluster, when configured.
    pub membership: Option<Arc<homecell_common::gossip::Membership>>,
    /// This instance, as `status` names it.
    pub instance: crate::store::Instance,
}

/// A cell acting for its own region, and nothing else.
pub(crate) fn cell_of<T>(req: &Request<T>, region: &str) -> Result<PeerIdentity, Status> {
    let who = caller(req)?;
    match &who {
        PeerIdentity::Cell { region: r } if r == region => Ok(who),
        _ => Err(Status::permission_denied(format!(
            "{who} may not act for region {region:?}"
        ))),
    }
}

pub(crate) fn caller<T>(req: &Request<T>) -> Result<PeerIdentity, Status> {
    grpc_peer(req)
        .ok_or_else(|| Status::unauthenticated("a Homecell client certificate is required"))
}

pub(crate) fn operator<T>(req: &Request<T>) -> Result<PeerIdentity, Status> {
    let who = caller(req)?;
    match who {
        PeerIdentity::Operator { .. } => Ok(who),
        _ => Err(Status::permission_denied(format!(
            "{who} is not an operator"
        ))),
    }
}

pub(crate) fn reader<T>(req: &Request<T>) -> Result<PeerIdentity, Status> {
    let who = caller(req)?;
    match who {
        PeerIdentity::ControlPlane => Err(Status::permission_denied("not a client identity")),
        _ => Ok(who),
    }
}

impl ControlPlane {
    /// Refuses at once while this instance cannot reach its store (another
    /// instance can), instead of waiting out the database's timeouts.
    fn serving(&self) -> Result<(), Status> {
        if *self.store.healthy().borrow() {
            Ok(())
        } else {
            Err(Status::unavailable(
                "this control-plane instance cannot reach its store; try another",
            ))
        }
    }

    /// Runs a mutation as `actor` on the blocking pool.
    pub(crate) async fn mutate<T: Send + 'static>(
        &self,
        actor: &PeerIdentity,
        f: impl FnOnce(&mut crate::store::Tx<'_>) -> Result<T, CodedError> + Send + 'static,
    ) -> Result<(T, u64), Status> {
        self.serving()?;
        let store = self.store.clone();
        let actor = actor.common_name();
        let started = std::time::Instant::now();
        let out = tokio::task::spawn_blocking(move || store.mutate(&actor, f))
            .await
            .map_err(|e| Status::internal(format!("task failed: {e}")))??;
        crate::metrics::MUTATION_SECONDS.observe(started.elapsed().as_secs_f64());
        Ok(out)
    }

    pub(crate) async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&crate::store::Tx<'_>) -> Result<T, CodedError> + Send + 'static,
    ) -> Result<(T, u64), Status> {
        self.serving()?;
        let store = self.store.clone();
        let out = tokio::task::spawn_blocking(move || store.read(f))
            .await
            .map_err(|e| Status::internal(format!("task failed: {e}")))??;
        Ok(out)
    }
}

/// Every method the control plane serves (control.proto; a test keeps the
/// two the same): the only names its spans take.
pub const METHODS: &[&str] = &[
    "/homecell.control.v1.RegionService/PublishSigningKeys",
    "/homecell.control.v1.RegionService/AddRegion",
    "/homecell.control.v1.RegionService/UpdateRegion",
    "/homecell.control.v1.RegionService/ListRegions",
    "/homecell.control.v1.RegionService/GetRegion",
    "/homecell.control.v1.ConfigService/SetConfig",
    "/homecell.control.v1.ConfigService/DeleteConfig",
    "/homecell.control.v1.ConfigService/GetConfig",
    "/homecell.control.v1.ConfigService/ListConfig",
    "/homecell.control.v1.ConfigService/ConfigHistory",
    "/homecell.control.v1.ConfigService/RollbackConfig",
    "/homecell.control.v1.DirectoryService/ClaimIdentifier",
    "/homecell.control.v1.DirectoryService/ReleaseIdentifier",
    "/homecell.control.v1.DirectoryService/MoveUser",
    "/homecell.control.v1.DirectoryService/ReassertClaims",
    "/homecell.control.v1.SyncService/Watch",
    "/homecell.control.v1.StatusService/GetStatus",
    "/homecell.control.v1.BackupService/Backup",
    "/homecell.control.v1.MoveService/StartMove",
    "/homecell.control.v1.MoveService/GetMove",
    "/homecell.control.v1.MoveService/CancelMove",
    "/homecell.control.v1.MoveService/ReverseMove",
    "/homecell.control.v1.MoveService/StartBatch",
    "/homecell.control.v1.MoveService/GetBatch",
    "/homecell.control.v1.MoveService/CancelBatch",
    "/homecell.control.v1.MoveService/ListMoves",
    "/homecell.control.v1.MoveService/AdvanceMove",
    "/homecell.control.v1.MoveService/ExtendBatch",
    "/homecell.control.v1.MoveService/CheckMoveIdentifiers",
];

#[tonic::async_trait]
impl region_service_server::RegionService for ControlPlane {
    async fn publish_signing_keys(
        &self,
        req: Request<PublishSigningKeysRequest>,
    ) -> Result<Response<PublishSigningKeysResponse>, Status> {
        let r = req.get_ref();
        let who = cell_of(&req, &r.region)?;
        let PublishSigningKeysRequest { region, keys } = req.into_inner();
        let (_, revision) = self
            .mutate(&who, move |tx| regions::publish_keys(tx, &region, keys))
            .await?;
        Ok(Response::new(PublishSigningKeysResponse { revision }))
    }

    async fn add_region(
        &self,
        req: Request<AddRegionRequest>,
    ) -> Result<Response<AddRegionResponse>, Status> {
        let who = operator(&req)?;
        let region = req
            .into_inner()
            .region
            .ok_or_else(|| Status::invalid_argument("region is required"))?;
        let (region, revision) = self
            .mutate(&who, move |tx| regions::add(tx, region))
            .await?;
        tracing::info!(region = %region.id, revision, actor = %who, "region added");
        Ok(Response::new(AddRegionResponse {
            region: Some(region),
            revision,
        }))
    }

    async fn update_region(
        &self,
        req: Request<UpdateRegionRequest>,
    ) -> Result<Response<UpdateRegionResponse>, Status> {
        let who = operator(&req)?;
        let update = req.into_inner();
        let (region, revision) = self
            .mutate(&who, move |tx| regions::update(tx, update))
            .await?;
        Ok(Response::new(UpdateRegionResponse {
            region: Some(region),
            revision,
        }))
    }

    async fn list_regions(
        &self,
        req: Request<ListRegionsRequest>,
    ) -> Result<Response<ListRegionsResponse>, Status> {
        reader(&req)?;
        let (regions, revision) = self.read(|tx| tx.regions()).await?;
        Ok(Response::new(ListRegionsResponse { regions, revision }))
    }

    async fn get_region(
        &self,
        req: Request<GetRegionRequest>,
    ) -> Result<Response<GetRegionResponse>, Status> {
        reader(&req)?;
        let id = req.into_inner().id;
        let (region, _) = self.read(move |tx| regions::get(tx, &id)).await?;
        Ok(Response::new(GetRegionResponse {
            region: Some(region),
        }))
    }
}

#[tonic::async_trait]
impl config_service_server::ConfigService for ControlPlane {
    async fn set_config(
        &self,
        req: Request<SetConfigRequest>,
    ) -> Result<Response<SetConfigResponse>, Status> {
        let who = operator(&req)?;
        let r = req.into_inner();
        let value = r
            .value
            .ok_or_else(|| Status::invalid_argument("a config value is required"))?;
        let (entry, revision) = self
            .mutate(&who, move |tx| {
                config_ops::set(tx, &r.key, &r.region, value)
            })
            .await?;
        tracing::info!(key = %entry.key, region = %entry.region, revision, actor = %who, "config set");
        Ok(Response::new(SetConfigResponse {
            entry: Some(entry),
            revision,
        }))
    }

    async fn delete_config(
        &self,
        req: Request<DeleteConfigRequest>,
    ) -> Result<Response<DeleteConfigResponse>, Status> {
        let who = operator(&req)?;
        let r = req.into_inner();
        let ((), revision) = self
            .mutate(&who, move |tx| config_ops::delete(tx, &r.key, &r.region))
            .await?;
        Ok(Response::new(DeleteConfigResponse { revision }))
    }

    async fn get_config(
        &self,
        req: Request<GetConfigRequest>,
    ) -> Result<Response<GetConfigResponse>, Status> {
        reader(&req)?;
        let r = req.into_inner();
        let (entry, _) = self
            .read(move |tx| config_ops::get(tx, &r.key, &r.region))
            .await?;
        Ok(Response::new(GetConfigResponse { entry: Some(entry) }))
    }

    async fn list_config(
        &self,
        req: Request<ListConfigRequest>,
    ) -> Result<Response<ListConfigResponse>, Status> {
        reader(&req)?;
        let (entries, revision) = self.read(|tx| tx.config_entries()).await?;
        Ok(Response::new(ListConfigResponse { entries, revision }))
    }

    async fn config_history(
        &self,
        req: Request<ConfigHistoryRequest>,
    ) -> Result<Response<ConfigHistoryResponse>, Status> {
        operator(&req)?;
        let r = req.into_inner();
        if !r.key.is_empty() {
            homecell_proto::config::validate_key(&r.key)?;
        }
        let limit = if r.limit == 0 { 50 } else { r.limit.min(1000) } as usize;
        let store = self.store.clone();
        let entries = tokio::task::spawn_blocking(move || store.config_history(&r.key, limit))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(ConfigHistoryResponse { entries }))
    }

    async fn rollback_config(
        &self,
        req: Request<RollbackConfigRequest>,
    ) -> Result<Response<RollbackConfigResponse>, Status> {
        let who = operator(&req)?;
        let to = req.into_inner().to_revision;
        let (changed_keys, revision) = self
            .mutate(&who, move |tx| config_ops::rollback(tx, to))
            .await?;
        tracing::info!(to, revision, changed_keys, actor = %who, "config rolled back");
        Ok(Response::new(RollbackConfigResponse {
            revision: if changed_keys == 0 { 0 } else { revision },
            changed_keys,
        }))
    }
}

#[tonic::async_trait]
impl sync_service_server::SyncService for ControlPlane {
    type WatchStream = tokio_stream::wrappers::ReceiverStream<Result<WatchResponse, Status>>;

    async fn watch(
        &self,
        req: Request<tonic::Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let who = caller(&req)?;
        let rx = sync::watch(
            self.store.clone(),
            self.subscribers.clone(),
            who,
            req.into_inner(),
        )
        .await?;
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }
}

#[tonic::async_trait]
impl status_service_server::StatusService for ControlPlane {
    async fn get_status(
        &self,
        req: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        operator(&req)?;
        let me = &self.instance;
        let shared = self.store.engine() == "postgres";
        // On a shared store, the other instances' subscribers are known
        // from the rows they persist, and whether those instances live.
        let (instances, stored) = if shared {
            let instances = self
                .store
                .instances()
                .await
                .map_err(|e| Status::unavailable(format!("cannot read the store: {e}")))?;
            let store = self.store.clone();
            let stored = tokio::task::spawn_blocking(move || store.subscribers())
                .await
                .map_err(|e| Status::internal(format!("task failed: {e}")))??;
            (instances, stored)
        } else {
            (Vec::new(), Vec::new())
        };
        let alive: std::collections::HashSet<&str> = instances
            .iter()
            .filter(|(_, alive)| *alive)
            .map(|(i, _)| i.id.as_str())
            .collect();
        let subscribers = self.subscribers.merged(stored, shared.then_some(&alive));
        let mut instances: Vec<ControlPlaneInstance> = instances
            .iter()
            .map(|(i, alive)| ControlPlaneInstance {
                id: i.id.clone(),
                endpoint: i.endpoint.clone(),
                started_unix_ms: i.started_unix_ms,
                seen_unix_ms: i.seen_unix_ms,
                revision: i.revision,
                alive: *alive,
            })
            .collect();
        if instances.is_empty() {
            instances.push(ControlPlaneInstance {
                id: me.id.clone(),
                endpoint: me.endpoint.clone(),
                started_unix_ms: me.started_unix_ms,
                seen_unix_ms: crate::store::now_ms(),
                revision: self.store.revision(),
                alive: true,
            });
        }
        Ok(Response::new(GetStatusResponse {
            revision: self.store.revision(),
            epoch: self.store.epoch(),
            store: self.store.engine().into(),
            instances,
            instance: me.id.clone(),
            subscribers,
            members: self
                .membership
                .iter()
                .flat_map(|m| m.members())
                .map(|m| GossipMember {
                    addr: m.id.addr.to_string(),
                    role: m.id.role.as_str().into(),
                    region: m.id.region,
                    name: m.id.name,
                    alive: m.alive,
                    since_unix_ms: m
                        .since
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as i64),
                })
                .collect(),
        }))
    }
}

#[tonic::async_trait]
impl directory_service_server::DirectoryService for ControlPlane {
    async fn claim_identifier(
        &self,
        req: Request<ClaimIdentifierRequest>,
    ) -> Result<Response<ClaimIdentifierResponse>, Status> {
        let who = cell_of(&req, &req.get_ref().region)?;
        let r = req.into_inner();
        let key = self.directory_key.clone();
        let claimed = self
            .mutate(&who, move |tx| {
                crate::directory::claim_replacing(
                    tx,
                    &key,
                    &r.identifier,
                    &r.replaces,
                    &r.user_id,
                    &r.region,
                    r.not_after_unix_ms,
                )
            })
            .await;
        crate::metrics::count_claim(&claimed);
        let ((), revision) = claimed?;
        Ok(Response::new(ClaimIdentifierResponse { revision }))
    }

    async fn release_identifier(
        &self,
        req: Request<ReleaseIdentifierRequest>,
    ) -> Result<Response<ReleaseIdentifierResponse>, Status> {
        let who = cell_of(&req, &req.get_ref().region)?;
        let r = req.into_inner();
        let key = self.directory_key.clone();
        let ((), revision) = self
            .mutate(&who, move |tx| {
                crate::directory::release(tx, &key, &r.identifier, &r.user_id, &r.region)
            })
            .await?;
        Ok(Response::new(ReleaseIdentifierResponse { revision }))
    }

    async fn move_user(
        &self,
        req: Request<MoveUserRequest>,
    ) -> Result<Response<MoveUserResponse>, Status> {
        let who = cell_of(&req, &req.get_ref().from_region)?;
        let r = req.into_inner();
        let what = format!("{} from {} to {}", r.user_id, r.from_region, r.to_region);
        let key = self.directory_key.clone();
        let ((), revision) = self
            .mutate(&who, move |tx| {
                crate::directory::move_user(
                    tx,
                    &key,
                    &r.user_id,
                    &r.from_region,
                    &r.to_region,
                    &r.identifiers,
                )
            })
            .await?;
        tracing::info!(revision, "user {what}: re-homed in the directory");
        Ok(Response::new(MoveUserResponse { revision }))
    }

    async fn reassert_claims(
        &self,
        req: Request<ReassertClaimsRequest>,
    ) -> Result<Response<ReassertClaimsResponse>, Status> {
        let who = cell_of(&req, &req.get_ref().region)?;
        let r = req.into_inner();
        // Checked before the write lock is taken.
        if r.claims.len() > crate::directory::REASSERT_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {} claims per call",
                crate::directory::REASSERT_BATCH
            )));
        }
        if r.claims.iter().any(|c| c.region != r.region) {
            return Err(Status::permission_denied(
                "a cell asserts claims for its own region only",
            ));
        }
        if self.store.parent().is_none() {
            return Err(Status::failed_precondition(
                "this store was never restored or recovered: there is nothing to assert again",
            ));
        }
        if r.epoch != self.store.epoch() {
            return Err(Status::failed_precondition(
                "the pass is for another epoch: the store was rebuilt since; start over",
            ));
        }
        let claims: Vec<(String, String)> = r
            .claims
            .into_iter()
            .map(|c| (c.identifier, c.user_id))
            .collect();
        let key = self.directory_key.clone();
        let (region, last) = (r.region, r.last);
        let ((restored, conflicting_users), revision) = self
            .mutate(&who, move |tx| {
                crate::directory::reassert(tx, &key, &region, &claims, last)
            })
            .await?;
        if restored > 0 || !conflicting_users.is_empty() {
            tracing::info!(restored, conflicts = conflicting_users.len(), actor = %who, "claims asserted again");
        }
        Ok(Response::new(ReassertClaimsResponse {
            revision,
            restored,
            conflicting_users,
        }))
    }
}

/// Backup records per gRPC message: a few hundred KB, far under the 4 MiB
/// limit.
const BACKUP_CHUNK_RECORDS: usize = 2_000;

#[tonic::async_trait]
impl backup_service_server::BackupService for ControlPlane {
    type BackupStream = tokio_stream::wrappers::ReceiverStream<Result<BackupChunk, Status>>;

    /// Streams the store from one read transaction, a chunk at a time, at
    /// the pace the operator's CLI reads: memory stays flat and mutations go
    /// on meanwhile.
    async fn backup(
        &self,
        req: Request<BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let who = operator(&req)?;
        tracing::info!(actor = %who, revision = self.store.revision(), "backup started");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let store = self.store.clone();
        let permit =
            self.store.stream_permit().await.ok_or_else(|| {
                Status::unavailable("too many snapshots and backups at once; retry")
            })?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut chunk = Vec::with_capacity(BACKUP_CHUNK_RECORDS);
            let mut open = true;
            let read = store.export(|record| {
                chunk.push(record);
                if chunk.len() == BACKUP_CHUNK_RECORDS {
                    let records = std::mem::take(&mut chunk);
                    open = crate::sync::send_within(&tx, Ok(BackupChunk { records }), sync::STALL);
                }
                open
            });
            match read {
                Ok(()) if open && !chunk.is_empty() => {
                    crate::sync::send_within(&tx, Ok(BackupChunk { records: chunk }), sync::STALL);
                }
                Ok(()) => {}
                Err(e) => {
                    crate::sync::send_within(&tx, Err(e.into()), sync::STALL);
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_method_list_is_the_services() {
        let proto = include_str!("../../proto/proto/homecell/control/v1/control.proto");
        let mut service = None;
        let mut want = Vec::new();
        for line in proto.lines().map(str::trim) {
            if let Some(s) = line.strip_prefix("service ") {
                service = s.split_whitespace().next();
            } else if let (Some(s), Some(rpc)) = (service, line.strip_prefix("rpc ")) {
                let method = rpc.split('(').next().unwrap_or_default().trim();
                want.push(format!("/homecell.control.v1.{s}/{method}"));
            }
        }
        let mut have: Vec<String> = super::METHODS.iter().map(|m| m.to_string()).collect();
        want.sort();
        have.sort();
        assert_eq!(have, want);
    }
}
