//! The operator CLI: each subcommand is one gRPC call to a running control
//! plane, authenticated with the operator's client certificate. Human tables
//! by default, `--output json` for scripts. Errors are one line and a
//! non-zero exit; validation happens at the server, so the CLI cannot write
//! anything the server would refuse.
//!
//! Why one file of this length: a flat list of subcommands, each a gRPC call
//! and its table; a file per subcommand would only scatter them.

use anyhow::{Context, Result, anyhow};
use clap::{Args, Subcommand, ValueEnum};
use homecell_common::tls::{PeerIdentity, TlsPaths};
use homecell_proto::config::{ConfigType, format_value, known_type, parse_value};
use homecell_proto::control::*;
use homecell_proto::region::{parse_status, status_name};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::Channel;

#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub enum Output {
    #[default]
    Table,
    Json,
}

/// How the CLI reaches and authenticates to the control plane.
#[derive(Debug, Args, Clone)]
pub struct Connection {
    /// The control plane's gRPC endpoint, or a comma-separated list of its
    /// instances (the first that answers is used).
    #[arg(
        long,
        global = true,
        env = "HOMECELL_CONTROL_PLANE",
        default_value = "https://127.0.0.1:7443"
    )]
    pub endpoint: String,
    /// A PKI directory holding ca.pem and operator.<name>.pem/-key.pem.
    #[arg(long, global = true, env = "HOMECELL_PKI_DIR")]
    pub pki_dir: Option<PathBuf>,
    /// The operator name whose certificate to use from --pki-dir.
    #[arg(
        long,
        global = true,
        env = "HOMECELL_OPERATOR",
        default_value = "admin"
    )]
    pub operator: String,
    /// CA certificate (with --tls-cert and --tls-key, instead of --pki-dir).
    #[arg(long = "tls-ca", global = true, env = "HOMECELL_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Operator certificate (instead of --pki-dir).
    #[arg(long = "tls-cert", global = true, env = "HOMECELL_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Operator key (instead of --pki-dir).
    #[arg(long = "tls-key", global = true, env = "HOMECELL_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The name in the control plane's certificate.
    #[arg(long, global = true, default_value = "control-plane")]
    pub server_name: String,
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

impl Connection {
    fn tls_paths(&self) -> Result<TlsPaths> {
        match (&self.tls_ca, &self.tls_cert, &self.tls_key, &self.pki_dir) {
            (Some(ca), Some(cert), Some(key), _) => Ok(TlsPaths {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }),
            (_, _, _, Some(dir)) => Ok(TlsPaths::in_dir(
                dir,
                &PeerIdentity::Operator {
                    name: self.operator.clone(),
                },
            )),
            _ => Err(anyhow!(
                "no operator credentials: pass --pki-dir (or HOMECELL_PKI_DIR), or --tls-ca, --tls-cert and --tls-key"
            )),
        }
    }

    /// A connection to the first of the endpoints that answers.
    pub(crate) async fn channel(&self) -> Result<Channel> {
        let tls = self.tls_paths()?.load()?;
        let endpoints = homecell_proto::region::validate_endpoint_list("endpoint", &self.endpoint)
            .map_err(|e| anyhow!("{}", e.message))?;
        let mut failures = Vec::new();
        for endpoint in &endpoints {
            let connected = tonic::transport::Endpoint::from_shared(endpoint.clone())?
                .tls_config(tls.tonic_client(&self.server_name))?
                .connect_timeout(Duration::from_secs(3))
                .timeout(Duration::from_secs(10))
                .connect()
                .await;
            match connected {
                Ok(channel) => return Ok(channel),
                Err(e) => failures.push(format!("{endpoint}: {}", source_chain(&e))),
            }
        }
        Err(anyhow!(
            "cannot reach the control plane at {}",
            failures.join("; ")
        ))
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[derive(Debug, Subcommand)]
pub enum RegionCmd {
    /// Register a new region.
    Add {
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        public_endpoint: String,
        #[arg(long)]
        internal_endpoint: String,
        /// Comma-separated ISO 3166-1 alpha-2 codes.
        #[arg(long, value_delimiter = ',')]
        countries: Vec<String>,
        #[arg(long)]
        weight: Option<u32>,
    },
    /// Change fields of a region; unset flags keep their value.
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        public_endpoint: Option<String>,
        #[arg(long)]
        internal_endpoint: Option<String>,
        /// Replaces the list; pass an empty string to clear it.
        #[arg(long, value_delimiter = ',')]
        countries: Option<Vec<String>>,
        #[arg(long)]
        weight: Option<u32>,
        /// active, draining or retired.
        #[arg(long)]
        status: Option<String>,
    },
    List,
    Show {
        id: String,
    },
    /// Stop new registrations; routers answer 503 + Retry-After.
    Drain {
        id: String,
    },
    /// Return a draining region to service.
    Activate {
        id: String,
    },
    /// Take a region out for good.
    Retire {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Set a key globally, or for one region with --region.
    Set {
        key: String,
        value: String,
        /// string, int, bool, duration or json. Defaults to the key's known or current type.
        #[arg(long = "type")]
        ty: Option<String>,
        #[arg(long, default_value = "")]
        region: String,
    },
    /// The value in force (the region's override, else the global value).
    Get {
        key: String,
        #[arg(long, default_value = "")]
        region: String,
    },
    /// Remove a global value or a region's override.
    Unset {
        key: String,
        #[arg(long, default_value = "")]
        region: String,
    },
    List,
    /// Past values, newest first.
    History {
        key: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Restore every key to its state at a revision (as a new revision).
    Rollback {
        #[arg(long)]
        to: u64,
    },
}

pub async fn region(conn: &Connection, cmd: RegionCmd) -> Result<()> {
    let mut client = region_service_client::RegionServiceClient::new(conn.channel().await?);
    let status_change = |id: String, s: RegionStatus| UpdateRegionRequest {
        id,
        status: s as i32,
        ..Default::default()
    };
    let target_status = match &cmd {
        RegionCmd::Drain { .. } => Some(RegionStatus::Draining),
        RegionCmd::Activate { .. } => Some(RegionStatus::Active),
        RegionCmd::Retire { .. } => Some(RegionStatus::Retired),
        _ => None,
    };
    let (region, revision) = match cmd {
        RegionCmd::Add {
            id,
            name,
            public_endpoint,
            internal_endpoint,
            countries,
            weight,
        } => {
            let r = client
                .add_region(AddRegionRequest {
                    region: Some(Region {
                        display_name: name.unwrap_or_default(),
                        id,
                        public_endpoint,
                        internal_endpoint,
                        countries: countries.into_iter().filter(|c| !c.is_empty()).collect(),
                        weight: weight.unwrap_or(0),
                        ..Default::default()
                    }),
                })
                .await?
                .into_inner();
            (r.region, r.revision)
        }
        RegionCmd::Update {
            id,
            name,
            public_endpoint,
            internal_endpoint,
            countries,
            weight,
            status,
        } => {
            let status = status.as_deref().map(parse_status).transpose()?;
            let r = client
                .update_region(UpdateRegionRequest {
                    id,
                    display_name: name,
                    public_endpoint,
                    internal_endpoint,
                    set_countries: countries.is_some(),
                    countries: countries
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|c| !c.is_empty())
                        .collect(),
                    weight,
                    status: status.unwrap_or(RegionStatus::Unspecified) as i32,
                })
                .await?
                .into_inner();
            (r.region, r.revision)
        }
        RegionCmd::Drain { id } | RegionCmd::Activate { id } | RegionCmd::Retire { id } => {
            let r = client
                .update_region(status_change(id, target_status.expect("a status command")))
                .await?
                .into_inner();
            (r.region, r.revision)
        }
        RegionCmd::List => {
            let r = client
                .list_regions(ListRegionsRequest {})
                .await?
                .into_inner();
            match conn.output {
                Output::Json => print_json(&json!({
                    "revision": r.revision,
                    "regions": r.regions.iter().map(region_json).collect::<Vec<_>>(),
                })),
                Output::Table => print_table(
                    &[
                        "ID",
                        "NAME",
                        "STATUS",
                        "WEIGHT",
                        "COUNTRIES",
                        "INTERNAL ENDPOINT",
                        "PUBLIC ENDPOINT",
                    ],
                    r.regions
                        .iter()
                        .map(|g| {
                            vec![
                                g.id.clone(),
                                g.display_name.clone(),
                                status_name(g.status()).to_string(),
                                g.weight.to_string(),
                                g.countries.join(","),
                                g.internal_endpoint.clone(),
                                g.public_endpoint.clone(),
                            ]
                        })
                        .collect(),
                ),
            }
            return Ok(());
        }
        RegionCmd::Show { id } => {
            let r = client
                .get_region(GetRegionRequest { id })
                .await?
                .into_inner();
            (r.region, 0)
        }
    };
    let region = region.context("the server answered without a region")?;
    match conn.output {
        Output::Json => {
            let mut v = region_json(&region);
            if revision > 0 {
                v["committed_revision"] = json!(revision);
            }
            print_json(&v)
        }
        Output::Table => {
            print_pairs(&[
                ("id", region.id.clone()),
                ("name", region.display_name.clone()),
                ("status", status_name(region.status()).to_string()),
                ("weight", region.weight.to_string()),
                ("countries", region.countries.join(",")),
                ("public endpoint", region.public_endpoint.clone()),
                ("internal endpoint", region.internal_endpoint.clone()),
                ("revision", region.revision.to_string()),
            ]);
        }
    }
    Ok(())
}

pub async fn config(conn: &Connection, cmd: ConfigCmd) -> Result<()> {
    let mut client = config_service_client::ConfigServiceClient::new(conn.channel().await?);
    match cmd {
        ConfigCmd::Set {
            key,
            value,
            ty,
            region,
        } => {
            let ty = match ty {
                Some(t) => ConfigType::parse(&t)?,
                None => match known_type(&key) {
                    Some(t) => t,
                    None => existing_type(&mut client, &key).await?.ok_or_else(|| {
                        anyhow!("config key {key:?} is new: say its type with --type (string, int, bool, duration, json)")
                    })?,
                },
            };
            let value = parse_value(ty, &value)?;
            let r = client
                .set_config(SetConfigRequest {
                    key,
                    region,
                    value: Some(value),
                })
                .await?
                .into_inner();
            let e = r.entry.context("no entry in the answer")?;
            match conn.output {
                Output::Json => {
                    print_json(&json!({"entry": entry_json(&e), "revision": r.revision}))
                }
                Output::Table => println!(
                    "{} = {} (revision {})",
                    scope(&e.key, &e.region),
                    format_value(&e.value.clone().unwrap_or_default()),
                    e.revision
                ),
            }
        }
        ConfigCmd::Get { key, region } => {
            let e = client
                .get_config(GetConfigRequest { key, region })
                .await?
                .into_inner()
                .entry
                .context("no entry in the answer")?;
            match conn.output {
                Output::Json => print_json(&entry_json(&e)),
                Output::Table => println!("{}", format_value(&e.value.clone().unwrap_or_default())),
            }
        }
        ConfigCmd::Unset { key, region } => {
            let r = client
                .delete_config(DeleteConfigRequest {
                    key: key.clone(),
                    region: region.clone(),
                })
                .await?
                .into_inner();
            match conn.output {
                Output::Json => print_json(&json!({"revision": r.revision})),
                Output::Table => {
                    println!("unset {} (revision {})", scope(&key, &region), r.revision)
                }
            }
        }
        ConfigCmd::List => {
            let r = client.list_config(ListConfigRequest {}).await?.into_inner();
            match conn.output {
                Output::Json => print_json(&json!({
                    "revision": r.revision,
                    "entries": r.entries.iter().map(entry_json).collect::<Vec<_>>(),
                })),
                Output::Table => print_table(
                    &["KEY", "REGION", "TYPE", "VALUE", "REVISION"],
                    r.entries
                        .iter()
                        .map(|e| {
                            let v = e.value.clone().unwrap_or_default();
                            vec![
                                e.key.clone(),
                                if e.region.is_empty() {
                                    "(global)".into()
                                } else {
                                    e.region.clone()
                                },
                                ConfigType::of(&v)
                                    .map(|t| t.name())
                                    .unwrap_or("")
                                    .to_string(),
                                format_value(&v),
                                e.revision.to_string(),
                            ]
                        })
                        .collect(),
                ),
            }
        }
        ConfigCmd::History { key, limit } => {
            let r = client
                .config_history(ConfigHistoryRequest {
                    key: key.unwrap_or_default(),
                    limit,
                })
                .await?
                .into_inner();
            match conn.output {
                Output::Json => print_json(&json!({
                    "entries": r.entries.iter().map(|h| json!({
                        "key": h.key, "region": h.region, "revision": h.revision,
                        "deleted": h.deleted, "actor": h.actor, "at_unix_ms": h.at_unix_ms,
                        "value": h.value.as_ref().map(format_value),
                    })).collect::<Vec<_>>(),
                })),
                Output::Table => print_table(
                    &["REVISION", "KEY", "REGION", "VALUE", "ACTOR"],
                    r.entries
                        .iter()
                        .map(|h| {
                            vec![
                                h.revision.to_string(),
                                h.key.clone(),
                                if h.region.is_empty() {
                                    "(global)".into()
                                } else {
                                    h.region.clone()
                                },
                                if h.deleted {
                                    "(unset)".into()
                                } else {
                                    format_value(&h.value.clone().unwrap_or_default())
                                },
                                h.actor.clone(),
                            ]
                        })
                        .collect(),
                ),
            }
        }
        ConfigCmd::Rollback { to } => {
            let r = client
                .rollback_config(RollbackConfigRequest { to_revision: to })
                .await?
                .into_inner();
            match conn.output {
                Output::Json => {
                    print_json(&json!({"revision": r.revision, "changed_keys": r.changed_keys}))
                }
                Output::Table if r.changed_keys == 0 => {
                    println!("config already matches revision {to}; nothing written")
                }
                Output::Table => println!(
                    "restored {} key(s) to revision {to} (now revision {})",
                    r.changed_keys, r.revision
                ),
            }
        }
    }
    Ok(())
}

async fn existing_type(
    client: &mut config_service_client::ConfigServiceClient<Channel>,
    key: &str,
) -> Result<Option<ConfigType>> {
    let all = client.list_config(ListConfigRequest {}).await?.into_inner();
    Ok(all
        .entries
        .iter()
        .find(|e| e.key == key)
        .and_then(|e| e.value.as_ref().and_then(ConfigType::of)))
}

pub async fn status(conn: &Connection) -> Result<()> {
    let mut client = status_service_client::StatusServiceClient::new(conn.channel().await?);
    let r = client.get_status(GetStatusRequest {}).await?.into_inner();
    let now = crate::store::now_ms();
    match conn.output {
        Output::Json => print_json(&json!({
            "revision": r.revision,
            "epoch": format!("{:016x}", r.epoch),
            "store": r.store,
            "instance": r.instance,
            "instances": r.instances.iter().map(|i| json!({
                "id": i.id,
                "endpoint": i.endpoint,
                "started_unix_ms": i.started_unix_ms,
                "seen_unix_ms": i.seen_unix_ms,
                "revision": i.revision,
                "alive": i.alive,
            })).collect::<Vec<_>>(),
            "subscribers": r.subscribers.iter().map(|s| json!({
                "instance": s.instance,
                "node_id": s.node_id,
                "kind": kind_name(s.kind()),
                "region": s.region,
                "applied_revision": s.applied_revision,
                "last_contact_unix_ms": s.last_contact_unix_ms,
                "connected": s.connected,
                "last_error": s.last_error,
                "identity": s.peer_identity,
                "epoch": format!("{:016x}", s.epoch),
                "conflict": s.conflict,
            })).collect::<Vec<_>>(),
            "members": r.members.iter().map(|m| json!({
                "addr": m.addr,
                "role": m.role,
                "region": m.region,
                "name": m.name,
                "alive": m.alive,
                "since_unix_ms": m.since_unix_ms,
            })).collect::<Vec<_>>(),
        })),
        Output::Table => {
            println!(
                "control plane at revision {} (epoch {:016x}), store {}, answered by {}",
                r.revision, r.epoch, r.store, r.instance
            );
            print_table(
                &["INSTANCE", "ENDPOINT", "ALIVE", "REVISION", "LAST SEEN"],
                r.instances
                    .iter()
                    .map(|i| {
                        let ago = Duration::from_millis(
                            (now - i.seen_unix_ms).max(0) as u64 / 1000 * 1000,
                        );
                        vec![
                            i.id.clone(),
                            i.endpoint.clone(),
                            if i.alive { "yes".into() } else { "no".into() },
                            i.revision.to_string(),
                            format!("{} ago", humantime::format_duration(ago)),
                        ]
                    })
                    .collect(),
            );
            println!();
            print_table(
                &[
                    "KIND",
                    "REGION",
                    "NODE",
                    "APPLIED",
                    "CONNECTED",
                    "INSTANCE",
                    "LAST CONTACT",
                    "LAST ERROR",
                ],
                r.subscribers
                    .iter()
                    .map(|s| {
                        let ago = Duration::from_millis(
                            (now - s.last_contact_unix_ms).max(0) as u64 / 1000 * 1000,
                        );
                        vec![
                            kind_name(s.kind()).to_string(),
                            s.region.clone(),
                            s.node_id.clone(),
                            s.applied_revision.to_string(),
                            if s.connected {
                                "yes".into()
                            } else {
                                "no".into()
                            },
                            s.instance.clone(),
                            format!("{} ago", humantime::format_duration(ago)),
                            if s.conflict.is_empty() {
                                s.last_error.clone()
                            } else {
                                format!("CONFLICT: {}", s.conflict)
                            },
                        ]
                    })
                    .collect(),
            );
            if !r.members.is_empty() {
                println!();
                println!("gossip members");
                print_table(
                    &["ROLE", "REGION", "NAME", "ADDRESS", "STATE"],
                    r.members
                        .iter()
                        .map(|m| {
                            vec![
                                m.role.clone(),
                                m.region.clone(),
                                m.name.clone(),
                                m.addr.clone(),
                                if m.alive { "alive" } else { "down" }.to_string(),
                            ]
                        })
                        .collect(),
                );
            }
        }
    }
    Ok(())
}

fn kind_name(k: SubscriberKind) -> &'static str {
    match k {
        SubscriberKind::Router => "router",
        SubscriberKind::Cell => "cell",
        SubscriberKind::Unspecified => "unknown",
    }
}

fn scope(key: &str, region: &str) -> String {
    if region.is_empty() {
        key.to_string()
    } else {
        format!("{key} [{region}]")
    }
}

fn region_json(r: &Region) -> Value {
    json!({
        "id": r.id,
        "display_name": r.display_name,
        "public_endpoint": r.public_endpoint,
        "internal_endpoint": r.internal_endpoint,
        "countries": r.countries,
        "status": status_name(r.status()),
        "weight": r.weight,
        "revision": r.revision,
        "signing_keys": r.signing_keys.iter().map(|k| json!({
            "kid": k.kid,
            "alg": k.alg,
            "retired": k.retired_unix_ms != 0,
        })).collect::<Vec<_>>(),
    })
}

fn entry_json(e: &ConfigEntry) -> Value {
    let v = e.value.clone().unwrap_or_default();
    json!({
        "key": e.key,
        "region": e.region,
        "type": ConfigType::of(&v).map(|t| t.name()),
        "value": format_value(&v),
        "revision": e.revision,
    })
}

pub(crate) fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub(crate) fn print_pairs(rows: &[(&str, String)]) {
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        println!("{k:<w$}  {v}");
    }
}

pub(crate) fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

/// Renders a CLI failure as one line: gRPC statuses by their message.
pub fn one_line(e: &anyhow::Error) -> String {
    if let Some(s) = e.downcast_ref::<tonic::Status>() {
        let msg = s.message().lines().next().unwrap_or("");
        return match s.code() {
            tonic::Code::Unavailable => format!("control plane unavailable: {msg}"),
            _ => msg.to_string(),
        };
    }
    format!("{e:#}").replace('\n', " ")
}
