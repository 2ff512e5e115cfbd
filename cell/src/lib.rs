//! A Homecell cell: the region's public API (reached through routers, over
//! mTLS) on its own datastore, running on a persisted replica of the control
//! plane's state.

pub mod admin;
pub mod clock;
pub mod config;
pub mod db;
pub use homecell_common::failpoint;
pub mod gauges;
pub mod grpc;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod money;
pub mod moving;
pub mod notice;
pub mod peers;
pub mod server;
pub mod state;

use anyhow::{Context, Result};
use homecell_common::replica::{Replica, WatchTarget};
use homecell_common::{admin as admin_listener, shutdown};
use homecell_proto::control::SubscriberKind;
use std::sync::Arc;
use std::time::Duration;

/// A lazily connected, mTLS channel to the control plane.
pub fn control_plane_channel(
    config: &config::CellConfig,
    tls: &homecell_common::tls::TlsMaterial,
) -> Result<tonic::transport::Channel> {
    // One instance or several: each connection goes to the first that
    // accepts, starting with the one that answered last.
    homecell_common::failover::channel(
        &config.control_plane_endpoints(),
        tls,
        &config.control_plane_name,
        Duration::from_secs(10),
    )
}

/// Runs the cell until SIGINT/SIGTERM.
pub async fn run(config: config::CellConfig) -> Result<()> {
    homecell_common::key_file::create_private_dir(&config.data_dir).context("data_dir")?;
    let tls = config.tls.load()?;
    let replica = Replica::open(&config.data_dir.join("replica.redb"))?;
    let db = db::Datastore::open(&config.database_url()).await?;
    db.claim_region(&config.region).await?;
    let identity_store = identity::store::IdentityStore::new(db.clone());
    let keys =
        identity::keys::Keys::open(&identity_store, &config.region, config.signing_key_seal()?)
            .await?;
    let cp = control_plane_channel(&config, &tls)?;
    let hash_slots = config
        .password_hash_slots
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()) * 2);
    let peers = Arc::new(peers::Peers::new(tls.clone(), replica.clone()));
    let notices = Arc::new(notice::Notices::new(
        &config.region,
        db.clone(),
        replica.clone(),
        config.notice.clone(),
    )?);
    let (kick, kicks) = tokio::sync::mpsc::unbounded_channel();
    let frozen = Arc::new(moving::frozen::Frozen::default());
    let money = Arc::new(money::service::Money {
        region: config.region.clone(),
        ledger: money::ledger::Ledger::new(db.clone()),
        users: identity_store.clone(),
        replica: replica.clone(),
        peers: peers.clone(),
        kick,
        providers: money::provider::Providers::load(&config.payments)?,
        hold_timeout_ms: i64::try_from(config.transfer_hold_timeout_secs.saturating_mul(1000))
            .unwrap_or(i64::MAX),
        withdrawals_via: config.withdrawals_via.clone(),
        withdrawal_timeout_ms: i64::try_from(config.withdrawal_timeout_secs.saturating_mul(1000))
            .unwrap_or(i64::MAX),
        frozen: frozen.clone(),
    });
    let cell = Arc::new(state::Cell {
        region: config.region.clone(),
        datastore: db.backend(),
        replica: replica.clone(),
        identity: identity::service::Identity {
            region: config.region.clone(),
            store: identity_store.clone(),
            hasher: identity::password::Hasher::with_wait(
                hash_slots,
                Duration::from_millis(config.password_hash_wait_ms),
            ),
            keys: keys.clone(),
            replica: replica.clone(),
            cp: homecell_common::traced_grpc::TracedChannel::new(cp.clone()),
            cp_breaker: Default::default(),
            login_limiter: identity::service::IpLimiter::new(
                config.login_attempts_per_ip_per_minute,
            ),
            registration_limiter: identity::service::IpLimiter::new(
                config.registrations_per_ip_per_minute,
            ),
            claim_settle_ms: i64::try_from(
                config
                    .unsettled_claims_release_after_secs
                    .saturating_mul(1000),
            )
            .unwrap_or(i64::MAX),
            peers: peers.clone(),
            tokens: Default::default(),
            frozen: frozen.clone(),
        },
        money: money.clone(),
        notices: notices.clone(),
        moves: Arc::new(moving::Moves::new(
            db.clone(),
            &config.region,
            replica.clone(),
            peers.clone(),
            money.clone(),
            frozen,
            cp.clone(),
        )),
        wechat: config
            .wechat
            .as_ref()
            .map(identity::wechat::Wechat::new)
            .transpose()?,
    });

    let token = shutdown::CancellationToken::new();
    tokio::spawn(shutdown::wait_for_signal(token.clone()));
    tokio::spawn(keys.maintain(identity_store, cp, replica.clone(), token.clone()));
    tokio::spawn(money::saga::run_worker(money, kicks, token.clone()));
    tokio::spawn(notices.clone().relay_announcements(token.clone()));
    tokio::spawn(notices.run(token.clone()));
    tokio::spawn(identity::claims::run(cell.clone(), token.clone()));
    tokio::spawn(identity::reassert::run(cell.clone(), token.clone()));
    tokio::spawn(moving::worker::run(cell.moves.clone(), token.clone()));
    metrics::init();
    tokio::spawn(gauges::run(
        db.clone(),
        (config.ledger_audit_interval_secs > 0)
            .then(|| Duration::from_secs(config.ledger_audit_interval_secs)),
        token.clone(),
    ));
    tokio::spawn(replica.clone().run(
        WatchTarget {
            endpoint: config.control_plane.clone(),
            server_name: config.control_plane_name.clone(),
            tls: tls.clone(),
            kind: SubscriberKind::Cell,
            region: config.region.clone(),
        },
        token.clone(),
    ));

    let ready_replica = replica.clone();
    let ready: admin_listener::ReadyCheck = Arc::new(move || {
        if ready_replica.is_ready() {
            Ok(())
        } else {
            Err("no control-plane snapshot applied yet".into())
        }
    });
    let admin_addr = admin_listener::serve(config.admin_listen, ready, token.clone()).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot bind {}", config.listen))?;
    if let Some(g) = &config.gossip {
        let name = listener.local_addr()?.to_string();
        homecell_common::gossip::start(
            g,
            homecell_common::gossip::Role::Cell,
            &config.region,
            &name,
            token.clone(),
        )
        .await?;
    }
    tracing::info!(
        region = %config.region,
        api = %listener.local_addr()?,
        admin = %admin_addr,
        datastore = cell.datastore,
        replica_revision = replica.state().revision,
        "cell listening"
    );
    server::serve(listener, tls.server_config()?, http::router(cell), token).await?;
    tracing::info!("cell stopped");
    Ok(())
}
