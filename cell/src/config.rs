//! The cell's configuration: a TOML file, `HOMECELL_CELL_*` overrides, then
//! `validate()`.

use anyhow::{Context, Result, bail};
use homecell_common::telemetry::LogFormat;
use homecell_common::tls::TlsPaths;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellConfig {
    /// The region this cell serves, e.g. `cn-east`.
    pub region: String,
    /// Holds the replica of the control plane's state and, by default, the
    /// SQLite datastore.
    pub data_dir: PathBuf,
    /// `sqlite:<path>` or `postgres://…`; default `sqlite:<data_dir>/cell.db`.
    #[serde(default)]
    pub database_url: Option<String>,
    /// The key that seals the token signing keys in the datastore (32 bytes
    /// as hex; `control-plane pki seal-key`); every instance of the cell
    /// reads the same file. Default on SQLite: `<data_dir>/signing-keys.seal`,
    /// made at first start. On PostgreSQL it is required, unless
    /// `allow_unsealed_keys` says otherwise.
    #[serde(default)]
    pub signing_key_seal_file: Option<PathBuf>,
    /// Lets a PostgreSQL cell store its signing keys unsealed (without
    /// `signing_key_seal_file`). Off: such a cell refuses to start, since a
    /// dump of its database could then sign tokens.
    #[serde(default)]
    pub allow_unsealed_keys: bool,
    /// Lets provider endpoints (payouts, SMS, WeChat) be plain `http://`.
    /// Off: each must be `https://`, since their answers decide money and
    /// logins. For local test providers only.
    #[serde(default)]
    pub allow_http_providers: bool,
    /// The internal API (HTTP/1.1 and h2 over mTLS) that routers and cells call.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Plain HTTP: /healthz, /ready, /metrics.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// The control plane's gRPC endpoint, or a comma-separated list of its
    /// instances: calls are spread over those that answer, and the replica
    /// moves to the next when its stream breaks.
    pub control_plane: String,
    #[serde(default = "default_cp_name")]
    pub control_plane_name: String,
    #[serde(default)]
    pub log_format: LogFormat,
    /// Spans exported over OTLP (`[tracing] otlp_endpoint`); off by default.
    #[serde(default)]
    pub tracing: homecell_common::otel::TracingConfig,
    /// Logins, reset requests and reset confirmations allowed per client
    /// address (IPv6 per /64) per minute.
    #[serde(default = "default_login_rate")]
    pub login_attempts_per_ip_per_minute: u32,
    /// Registrations allowed per client address (IPv6 per /64) per minute.
    #[serde(default = "default_registration_rate")]
    pub registrations_per_ip_per_minute: u32,
    /// A directory claim this cell made and never settled (a crash between
    /// the claim and the user's insert, a control plane that timed out, a
    /// failed release) is released once it is this old. At least 10: a
    /// claim may land until its 5 s deadline, by clocks that may differ.
    #[serde(default = "default_claim_settle")]
    pub unsettled_claims_release_after_secs: u64,
    /// How often the cell audits its own ledger for `/metrics`
    /// (`homecell_cell_ledger_audit_ok`); 0 never. The audit reads every
    /// ledger row in one snapshot (on PostgreSQL, vacuum waits for it), so
    /// keep it hours apart on a large ledger. Default 6 h.
    #[serde(default = "default_audit_interval")]
    pub ledger_audit_interval_secs: u64,
    /// Password hashes (argon2id, 19 MiB each) that may run at once; the
    /// rest wait up to `password_hash_wait_ms`, then get 429. Default: two
    /// per core.
    #[serde(default)]
    pub password_hash_slots: Option<usize>,
    /// How long a password check or hash waits for a slot before its
    /// caller gets 429.
    #[serde(default = "default_hash_wait")]
    pub password_hash_wait_ms: u64,
    /// Payment providers whose signed callbacks credit wallets, by name
    /// (`[payments.<name>]`, the `{provider}` in the callback path).
    #[serde(default)]
    pub payments: std::collections::BTreeMap<String, crate::money::provider::ProviderConfig>,
    /// How long a cross-cell transfer may wait for the receiver's cell to
    /// place its hold before the sender's cell voids it.
    #[serde(default = "default_hold_timeout")]
    pub transfer_hold_timeout_secs: u64,
    /// The `[payments.<name>]` provider that pays withdrawals out; it needs
    /// a `payout_url`. Without it, withdrawals are refused.
    #[serde(default)]
    pub withdrawals_via: Option<String>,
    /// How long a payout may stay undecided before the withdrawal is marked
    /// `reconciling` (the money stays held, and the provider is asked until
    /// it says paid or failed; never voided on "unknown").
    #[serde(default = "default_withdrawal_timeout")]
    pub withdrawal_timeout_secs: u64,
    /// WeChat mini-program login (`[wechat]`); without it, 409 at
    /// `/v1/auth/wechat`.
    #[serde(default)]
    pub wechat: Option<crate::identity::wechat::WechatConfig>,
    /// Email, SMS and inbox settings (`[notice]`).
    #[serde(default)]
    pub notice: crate::notice::NoticeConfig,
    pub tls: TlsPaths,
    /// Membership gossip with routers and the control plane; without it,
    /// routers rely on their active health checks alone.
    #[serde(default)]
    pub gossip: Option<homecell_common::gossip::GossipConfig>,
}

fn default_listen() -> SocketAddr {
    "127.0.0.1:9443".parse().expect("valid")
}
fn default_admin_listen() -> SocketAddr {
    "127.0.0.1:9080".parse().expect("valid")
}
fn default_audit_interval() -> u64 {
    6 * 3600
}
fn default_login_rate() -> u32 {
    30
}
fn default_hash_wait() -> u64 {
    5000
}
fn default_claim_settle() -> u64 {
    60
}
fn default_registration_rate() -> u32 {
    10
}
fn default_hold_timeout() -> u64 {
    60
}
fn default_withdrawal_timeout() -> u64 {
    600
}
fn default_cp_name() -> String {
    "control-plane".into()
}

impl CellConfig {
    pub fn load(file: Option<&Path>) -> Result<Self> {
        let c: Self = homecell_common::config::load(
            file,
            homecell_common::config::process_env(),
            "HOMECELL_CELL_",
        )?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        self.tracing.validate()?;
        homecell_proto::region::validate_region_id(&self.region).context("region")?;
        homecell_proto::region::validate_endpoint_list("control_plane", &self.control_plane)
            .context("control_plane")?;
        if let Some(url) = &self.database_url
            && !(url.starts_with("sqlite:")
                || url.starts_with("postgres://")
                || url.starts_with("postgresql://"))
        {
            bail!("database_url must start with sqlite: or postgres://");
        }
        if !self.database_url().starts_with("sqlite:")
            && self.signing_key_seal_file.is_none()
            && !self.allow_unsealed_keys
        {
            bail!(
                "a PostgreSQL cell needs signing_key_seal_file (control-plane pki seal-key), or allow_unsealed_keys = true to store its signing keys unsealed"
            );
        }
        if self.unsettled_claims_release_after_secs < crate::identity::claims::MIN_SETTLE_SECS {
            bail!(
                "unsettled_claims_release_after_secs must be at least {}: a claim may land until {} s after it was sent",
                crate::identity::claims::MIN_SETTLE_SECS,
                crate::identity::claims::CLAIM_WAIT.as_secs()
            );
        }
        if self.listen == self.admin_listen && self.listen.port() != 0 {
            bail!("listen and admin_listen must differ");
        }
        self.tls.load().context("tls")?;
        if let Some(g) = &self.gossip {
            g.validate().context("gossip")?;
        }
        self.notice.validate()?;
        if let Some(w) = &self.wechat {
            crate::identity::wechat::Wechat::new(w)?;
        }
        if !self.allow_http_providers {
            let payouts = self.payments.iter().filter_map(|(name, p)| {
                Some((
                    format!("payments.{name}.payout_url"),
                    p.payout_url.as_deref()?,
                ))
            });
            let sms = self
                .notice
                .sms
                .iter()
                .map(|p| (format!("notice.sms {}: url", p.name), p.url.as_str()));
            let wechat = self
                .wechat
                .iter()
                .map(|w| ("wechat.base_url".to_string(), w.base_url.as_str()));
            for (what, url) in payouts.chain(sms).chain(wechat) {
                if !url.starts_with("https://") {
                    bail!(
                        "{what} must be https:// (allow_http_providers = true lets a local test provider use http://)"
                    );
                }
            }
        }
        let providers = crate::money::provider::Providers::load(&self.payments)?;
        if let Some(p) = &self.withdrawals_via
            && !providers.pays_out(p)
        {
            bail!("withdrawals_via = {p:?} names no [payments.{p}] with a payout_url");
        }
        Ok(())
    }

    /// The seal for the signing keys (see `signing_key_seal_file`).
    pub fn signing_key_seal(&self) -> anyhow::Result<Option<crate::identity::seal::Seal>> {
        use crate::identity::seal::Seal;
        match &self.signing_key_seal_file {
            Some(path) => Seal::load(path).map(Some),
            // SQLite is one instance's own file: its seal can live beside it.
            None if self.database_url().starts_with("sqlite:") => {
                Seal::create_if_missing(&self.data_dir.join("signing-keys.seal")).map(Some)
            }
            None if self.allow_unsealed_keys => {
                tracing::warn!(
                    "no signing_key_seal_file: token signing keys are stored unsealed in PostgreSQL (allow_unsealed_keys)"
                );
                Ok(None)
            }
            None => anyhow::bail!(
                "a PostgreSQL cell needs signing_key_seal_file (control-plane pki seal-key), or allow_unsealed_keys = true to store its signing keys unsealed"
            ),
        }
    }

    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite:{}", self.data_dir.join("cell.db").display()))
    }
}

impl CellConfig {
    /// The control plane's instances, as configured (validated at load).
    pub fn control_plane_endpoints(&self) -> Vec<String> {
        homecell_proto::region::validate_endpoint_list("control_plane", &self.control_plane)
            .unwrap_or_default()
    }
}
