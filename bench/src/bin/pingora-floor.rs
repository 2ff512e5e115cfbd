//! The floor under the router: bare Pingora with the router's connector
//! (its client certificate and CA) and worker model (one service of
//! single-threaded workers on one socket), routing by `x-home-region` from a
//! fixed map, one request at a time over Pingora's server session and pooled
//! client sessions as the router's loop does (`region-router/src/edge.rs`;
//! body-less requests only, answers read whole). No tokens, directory,
//! request ids, traces, metrics or logs. `router-bench` runs it beside the
//! router and nginx: what separates it from the router is the router's own
//! work; what separates it from nginx is Pingora's.
//!
//! It keeps Pingora's own connection pool, whose idle watchers run on a
//! random worker (the router keeps idle connections per worker instead), so
//! as a floor it is a little pessimistic. pingora-proxy's `ProxyHttp`, which
//! the router used before its own loop, was measured as a second mode until
//! the router left it; bench/HISTORY.md keeps those numbers.
//!
//! ```sh
//! pingora-floor --listen 127.0.0.1:8090 --threads 2 --ca ca.pem \
//!   --cert router.pem --key router-key.pem --cell cn-east=127.0.0.1:9443
//! ```

use async_trait::async_trait;
use clap::Parser;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::prelude::*;
use pingora::protocols::http::{HttpTask, ServerSession};
use pingora::server::ShutdownWatch;
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

impl Floor {
    fn peer(&self, req: &pingora::http::RequestHeader) -> HttpPeer {
        let region = req
            .headers
            .get("x-home-region")
            .and_then(|v| v.to_str().ok())
            .filter(|r| self.cells.contains_key(*r))
            .unwrap_or(&self.default);
        HttpPeer::new(self.cells[region], true, format!("cell.{region}"))
    }
}

/// Read a request, send it to the cell on a pooled
/// connection, pass the answer back, give the connection back.
struct Sessions {
    floor: Floor,
    conn: pingora::connectors::http::v1::Connector,
}

impl Sessions {
    async fn exchange(&self, session: &mut ServerSession) -> Result<()> {
        let peer = self.floor.peer(session.req_header());
        let (mut up, _reused) = self.conn.get_http_session(&peer).await?;
        up.write_request_header(Box::new(session.req_header().clone()))
            .await?;
        up.read_response().await?;
        let resp = up
            .resp_header()
            .ok_or_else(|| Error::explain(ErrorType::InvalidHTTPHeader, "no answer"))?
            .clone();
        let mut tasks = vec![HttpTask::Header(Box::new(resp), up.is_body_done())];
        let mut done = up.is_body_done();
        while !done {
            let chunk = up.read_body_bytes().await?;
            done = chunk.is_none() || up.is_body_done();
            tasks.push(HttpTask::Body(chunk, done));
        }
        session.response_duplex_vec(tasks).await?;
        self.conn.release_http_session(up, &peer, None).await;
        Ok(())
    }
}

#[async_trait]
impl HttpServerApp for Sessions {
    async fn process_new_http(
        self: &std::sync::Arc<Self>,
        mut session: ServerSession,
        _shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        if !session.read_request().await.ok()? {
            return None;
        }
        self.exchange(&mut session).await.ok()?;
        let settings = HttpPersistentSettings::for_session(&session);
        let stream = session.finish().await.ok()??;
        Some(ReusedHttpStream::from_reusable_stream(stream, settings))
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
    let mut options =
        pingora::connectors::ConnectorOptions::from_server_conf(&server.configuration);
    options.ca_file = Some(args.ca.clone());
    options.cert_key_file = Some((args.cert.clone(), args.key.clone()));
    let app = Sessions {
        floor,
        conn: pingora::connectors::http::v1::Connector::new(Some(options)),
    };
    // One service of `threads` single-threaded workers on one socket, as the
    // router runs: Pingora hands each connection to one of them.
    let mut svc = pingora::services::listening::Service::new("floor".into(), app);
    svc.threads = Some(args.threads);
    svc.add_tcp(&args.listen.to_string());
    server.add_service(svc);
    server.run(pingora::server::RunArgs::default());
    Ok(())
}
