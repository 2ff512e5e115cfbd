//! What every handler of a cell shares: the services, never their tables.

use crate::clock::now_ms;
use crate::identity::service::Identity;
use homecell_common::replica::Replica;
use homecell_proto::error::{CodedError, ErrorCode};
use std::sync::Arc;

pub struct Cell {
    pub region: String,
    /// `sqlite` or `postgres`, for `/v1/region` and the start log.
    pub datastore: &'static str,
    pub replica: Arc<Replica>,
    pub identity: Identity,
    pub money: Arc<crate::money::service::Money>,
    pub notices: Arc<crate::notice::Notices>,
    /// Moving users out and in (spans every service's tables).
    pub moves: Arc<crate::moving::Moves>,
    /// WeChat mini-program login, when configured.
    pub wechat: Option<crate::identity::wechat::Wechat>,
}

impl Cell {
    /// Queues an event for a user of any cell: here, or in their home cell
    /// over gRPC. The region it went to.
    pub async fn deliver_event(
        &self,
        event_id: &str,
        topic: &str,
        user_id: &str,
        payload: &str,
    ) -> Result<String, CodedError> {
        // The directory first: a row here may be a user who moved away,
        // or one arriving by a move that has not cut over.
        let elsewhere = self
            .replica
            .state()
            .user_region(user_id)
            .is_some_and(|r| r != self.region);
        let local = self.identity.user_row(user_id).await?;
        if !elsewhere && local.is_some_and(|u| u.status != "deleted") {
            // A user being moved: the event would stay behind.
            if self.moves.frozen.contains(user_id) {
                self.moves.frozen.wait(user_id).await?;
                return Err(CodedError::new(
                    ErrorCode::UserMoving,
                    "the user just moved; send it again",
                )
                .retry_after(1));
            }
            self.notices
                .enqueue_event(event_id, topic, user_id, payload, now_ms())
                .await?;
            self.notices.wake.notify_one();
            return Ok(self.region.clone());
        }
        let home = self
            .replica
            .state()
            .user_region(user_id)
            .filter(|r| *r != self.region)
            .map(String::from)
            .ok_or_else(|| CodedError::not_found("no such user"))?;
        self.identity
            .peers
            .send_notice(&home, event_id, topic, user_id, payload)
            .await
            .map_err(|e| CodedError::new(ErrorCode::CellUnavailable, e))?;
        Ok(home)
    }
}

impl AsRef<Identity> for Cell {
    fn as_ref(&self) -> &Identity {
        &self.identity
    }
}
