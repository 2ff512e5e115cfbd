//! The floor under the router: a bare Pingora proxy with the router's
//! connector (its client certificate and CA) and worker model (one
//! single-threaded service per worker on a SO_REUSEPORT port), routing by
//! `x-home-region` from a fixed map. No tokens, directory, request ids,
//! traces, metrics or logs. `router-bench` runs it beside the router and
//! nginx: what separates it from the router is the router's own work; what
//! separates it from nginx is Pingora's.
//!
//! ```sh
//! pingora-floor --listen 127.0.0.1:8090 --threads 2 --ca ca.pem \
//!   --cert router.pem --key router-key.pem --cell cn-east=127.0.0.1:9443
//! ```

use async_trait::async_trait;
use clap::Parser;
use pingora::prelude::*;
use pingora::upstreams::peer::HttpPeer;
use std::collections::HashMap;
use std::net::SocketAddr;

/// The router's allocator, so the floor differs from it in work only.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long)]
    ca: String,
    #[arg(long)]
    cert: String,
    #[arg(long)]
    key: String,
    /// `region=ip:port`, repeated; the first is the default.
    #[arg(long = "cell", required = true)]
    cells: Vec<String>,
}

#[derive(Clone)]
struct Floor {
    cells: HashMap<String, SocketAddr>,
    default: String,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let region = session
            .req_header()
            .headers
            .get("x-home-region")
            .and_then(|v| v.to_str().ok())
            .filter(|r| self.cells.contains_key(*r))
            .unwrap_or(&self.default)
            .to_string();
        let addr = self.cells[&region];
        Ok(Box::new(HttpPeer::new(
            addr,
            true,
            format!("cell.{region}"),
        )))
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut cells = HashMap::new();
    let mut default = None;
    for c in &args.cells {
        let (region, addr) = c
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--cell {c}: want region=ip:port"))?;
        cells.insert(region.to_string(), addr.parse()?);
        default.get_or_insert_with(|| region.to_string());
    }
    let floor = Floor {
        cells,
        default: default.expect("at least one cell"),
    };
    let conf = pingora::server::configuration::ServerConf {
        threads: 1,
        work_stealing: false,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let mut server = pingora::server::Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    for _ in 0..args.threads {
        let mut options =
            pingora::connectors::ConnectorOptions::from_server_conf(&server.configuration);
        options.ca_file = Some(args.ca.clone());
        options.cert_key_file = Some((args.cert.clone(), args.key.clone()));
        let mut proxy =
            pingora::proxy::ProxyServiceBuilder::new(&server.configuration, floor.clone())
                .client_options(options)
                .build();
        proxy.threads = Some(1);
        let mut sock = pingora::listeners::TcpSocketOptions::default();
        sock.so_reuseport = Some(true);
        proxy.add_tcp_with_settings(&args.listen.to_string(), sock);
        server.add_service(proxy);
    }
    server.run(pingora::server::RunArgs::default());
    Ok(())
}
