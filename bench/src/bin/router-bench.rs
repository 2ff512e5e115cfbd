//! The router against going direct and against nginx, in one run.
//!
//! Starts a real cluster (control plane, two cells, the router) from
//! HOMECELL_BIN_DIR, and nginx (from apt) routing the same requests by an
//! `x-home-region` header map to the same two cells over the same mTLS
//! (nginx presents the router's client certificate and verifies the cell's).
//! Then, for each target in turn, `--connections` keep-alive HTTP/1.1
//! connections send requests back to back for `--seconds`:
//!
//! - `direct`: straight to the cell that owns the request, over mTLS;
//! - `router`: through the region router (plain HTTP in, mTLS out);
//! - `floor`:  through `pingora-floor`, bare Pingora with the router's
//!   connector, workers and request loop and none of its work (routing by
//!   header);
//! - `nginx`:  through nginx (plain HTTP in, mTLS out).
//!
//! Two workloads, half the connections on each region: `header` is
//! `GET /v1/region` routed by `x-home-region`; `token` is
//! `GET /v1/users/me` with a bearer token (the router routes by the
//! verified token; nginx and direct get the header as well).
//!
//! Reports requests/s, p50, p99 and the CPU the proxy process(es) and the
//! two cells spent per request (utime + stime from /proc), every answer
//! checked for 200.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use homecell_bench::cpu;
use homecell_common::tls::{PeerIdentity, TlsPaths};
use homecell_harness::api::Api;
use homecell_harness::{Cluster, Process, start_standard};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Keep-alive connections per run (half on each region).
    #[arg(long, default_value_t = 32)]
    connections: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// How many times to run the three targets, interleaved.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// The nginx binary.
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx: PathBuf,
    /// nginx worker processes.
    #[arg(long, default_value_t = 2)]
    nginx_workers: usize,
    /// The router's worker threads.
    #[arg(long, default_value_t = 2)]
    router_threads: usize,
    /// nginx without the router's edge duties: no request id, no
    /// forwarding headers (what the earlier rows of bench/HISTORY.md ran).
    #[arg(long)]
    nginx_bare: bool,
    /// Offered load in requests/s over all connections (0: as fast as each
    /// connection can go). Requests are timed from when they are sent (the
    /// pacing timer's millisecond slop would otherwise swamp the figures); a
    /// target that falls behind shows it in requests/s instead.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Which targets to run, in this order (one alone is handy under a profiler).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,router,floor,nginx"
    )]
    targets: Vec<String>,
    /// Which workloads to run.
    #[arg(long, value_delimiter = ',', default_value = "header,token")]
    workloads: Vec<String>,
}

/// Where one connection sends its requests.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    /// Some: TLS with this config, presenting the router's certificate.
    tls: Option<(Arc<rustls::ClientConfig>, String)>,
}

#[derive(Clone)]
struct Request {
    path: &'static str,
    region: String,
    token: Option<String>,
}

#[derive(Default)]
struct Outcome {
    ok: u64,
    errors: u64,
    latencies: Vec<Duration>,
}

/// When the next paced request is due (`None`: no pacing).
type Pace = Option<(Instant, Duration)>;

/// One keep-alive connection sending `req` until `deadline`.
async fn connection(
    target: Target,
    req: Request,
    deadline: Instant,
    every: Option<Duration>,
) -> Outcome {
    let mut o = Outcome::default();
    let mut pace: Pace = every.map(|e| (Instant::now(), e));
    while Instant::now() < deadline {
        // A connection that breaks is counted and replaced.
        if let Err(e) = drive(&target, &req, deadline, &mut o, &mut pace).await {
            o.errors += 1;
            if o.errors < 3 {
                eprintln!("connection to {}: {e:#}", target.addr);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    o
}

async fn drive(
    target: &Target,
    req: &Request,
    deadline: Instant,
    o: &mut Outcome,
    pace: &mut Pace,
) -> Result<()> {
    let tcp = tokio::net::TcpStream::connect(target.addr).await?;
    tcp.set_nodelay(true)?;
    match &target.tls {
        Some((config, name)) => {
            let name = rustls::pki_types::ServerName::try_from(name.clone())?;
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await?;
            send_loop(TokioIo::new(tls), req, deadline, o, pace).await
        }
        None => send_loop(TokioIo::new(tcp), req, deadline, o, pace).await,
    }
}

async fn send_loop<IO>(
    io: IO,
    req: &Request,
    deadline: Instant,
    o: &mut Outcome,
    pace: &mut Pace,
) -> Result<()>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    let driver = tokio::spawn(conn);
    let result = async {
        while Instant::now() < deadline {
            let mut r = hyper::Request::get(req.path)
                .header("host", "bench")
                .header("x-home-region", &req.region)
                .header("x-client-type", "app");
            if let Some(t) = &req.token {
                r = r.header("authorization", format!("Bearer {t}"));
            }
            // A server may close a keep-alive connection between requests;
            // that is a reconnect, not a failed request.
            if sender.ready().await.is_err() {
                return Ok(());
            }
            if let Some((due, every)) = pace {
                tokio::time::sleep_until((*due).into()).await;
                *due += *every;
            }
            let t = Instant::now();
            let resp = sender.send_request(r.body(Empty::<Bytes>::new())?).await?;
            let status = resp.status();
            resp.into_body().collect().await?;
            if status == 200 {
                o.ok += 1;
                o.latencies.push(t.elapsed());
            } else {
                o.errors += 1;
            }
        }
        Ok(())
    }
    .await;
    driver.abort();
    result
}

struct RunResult {
    rps: f64,
    p50: Duration,
    p99: Duration,
    errors: u64,
    cpu_us_per_req: Option<f64>,
    /// What the two cells spent per request: on shared cores, a proxy
    /// that makes the cells work harder lowers everyone's rate.
    cells_us_per_req: f64,
}

async fn run(
    targets: &[(Target, Request)],
    connections: usize,
    seconds: u64,
    rate: u64,
    proxy_pids: &[u32],
    cell_pids: &[u32],
) -> RunResult {
    let every = (rate > 0).then(|| Duration::from_secs_f64(connections as f64 / rate as f64));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let cpu_before = cpu::seconds(proxy_pids);
    let cells_before = cpu::seconds(cell_pids);
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|i| {
            let (target, req) = targets[i % targets.len()].clone();
            tokio::spawn(connection(target, req, deadline, every))
        })
        .collect();
    let mut all = Outcome::default();
    for t in tasks {
        if let Ok(o) = t.await {
            all.ok += o.ok;
            all.errors += o.errors;
            all.latencies.extend(o.latencies);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu::seconds(proxy_pids) - cpu_before;
    let cells = cpu::seconds(cell_pids) - cells_before;
    all.latencies.sort();
    let pct = |p: f64| {
        let l = &all.latencies;
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    RunResult {
        rps: all.ok as f64 / secs,
        p50: pct(0.50),
        p99: pct(0.99),
        errors: all.errors,
        cpu_us_per_req: (!proxy_pids.is_empty() && all.ok > 0).then(|| cpu * 1e6 / all.ok as f64),
        cells_us_per_req: cells * 1e6 / all.ok.max(1) as f64,
    }
}

/// nginx routing by `x-home-region` to the two cells over mTLS, with
/// keep-alive upstream connections, no access log (as the router runs with
/// RUST_LOG=warn), and unless `duties` is false the router's request id
/// and forwarding headers.
fn nginx_config(
    dir: &Path,
    listen: SocketAddr,
    cells: &[(String, SocketAddr)],
    tls: &TlsPaths,
    workers: usize,
    duties: bool,
) -> String {
    let upstreams: String = cells
        .iter()
        .map(|(region, addr)| {
            format!(
                "  upstream cell_{u} {{ server {addr}; keepalive 128; }}\n",
                u = region.replace('-', "_")
            )
        })
        .collect();
    let map_cell: String = cells
        .iter()
        .map(|(region, _)| format!("    {region} cell_{};\n", region.replace('-', "_")))
        .collect();
    let map_name: String = cells
        .iter()
        .map(|(region, _)| format!("    {region} cell.{region};\n"))
        .collect();
    // What the router does to every request besides routing it: the
    // client's request id or a new one, and the forwarding headers. (It
    // also starts a span of the caller's trace in `traceparent`, which
    // nginx cannot without a module.) The cells echo the request id and
    // name their region on every answer.
    let (duty_map, duty_headers) = if duties {
        (
            "  map $http_x_request_id $req_id {\n    \"\" $request_id;\n    default $http_x_request_id;\n  }\n",
            "      proxy_set_header X-Request-Id $req_id;\n      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n      proxy_set_header X-Forwarded-Proto $scheme;\n",
        )
    } else {
        ("", "")
    };
    let default = cells[0].0.replace('-', "_");
    let default_name = &cells[0].0;
    format!(
        r#"worker_processes {workers};
pid {pid};
error_log {err} warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {tmp};
  proxy_temp_path {tmp};
{upstreams}{duty_map}  map $http_x_home_region $cell {{
    default cell_{default};
{map_cell}  }}
  map $http_x_home_region $cell_name {{
    default cell.{default_name};
{map_name}  }}
  server {{
    listen {listen};
    location / {{
      proxy_pass https://$cell;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
{duty_headers}      proxy_ssl_certificate {cert};
      proxy_ssl_certificate_key {key};
      proxy_ssl_trusted_certificate {ca};
      proxy_ssl_verify on;
      proxy_ssl_server_name on;
      proxy_ssl_name $cell_name;
      proxy_ssl_session_reuse on;
    }}
  }}
}}
"#,
        pid = dir.join("nginx.pid").display(),
        err = dir.join("error.log").display(),
        tmp = dir.join("tmp").display(),
        cert = tls.cert.display(),
        key = tls.key.display(),
        ca = tls.ca.display(),
    )
}

/// nginx routing the bench's requests to the two cells (`nginx_config`):
/// its process, the pids to count CPU over (master and workers) and its
/// address.
async fn start_nginx(
    cluster: &Cluster,
    args: &Args,
    cells: &[(String, SocketAddr)],
    router_tls: &TlsPaths,
) -> Result<(Process, Vec<u32>, SocketAddr)> {
    let nginx_dir = cluster.root.join("nginx");
    std::fs::create_dir_all(nginx_dir.join("tmp"))?;
    let nginx_addr: SocketAddr = format!("127.0.0.1:{}", homecell_harness::free_port()).parse()?;
    let conf = nginx_dir.join("nginx.conf");
    std::fs::write(
        &conf,
        nginx_config(
            &nginx_dir,
            nginx_addr,
            cells,
            router_tls,
            args.nginx_workers,
            !args.nginx_bare,
        ),
    )?;
    let mut nginx_cmd = Command::new(&args.nginx);
    nginx_cmd
        .arg("-p")
        .arg(&nginx_dir)
        .arg("-c")
        .arg(&conf)
        .args(["-g", "daemon off;"]);
    let nginx = Process::spawn("nginx", nginx_cmd, &cluster.root.join("logs"))
        .with_context(|| format!("cannot start {}", args.nginx.display()))?;
    cluster
        .wait_http_ok(
            &format!("http://{nginx_addr}/v1/region"),
            Duration::from_secs(10),
            "nginx",
        )
        .await?;
    let pids = cpu::with_children(nginx.pid());
    Ok((nginx, pids, nginx_addr))
}

/// The floor: bare Pingora with the router's connector (pingora-floor.rs).
async fn start_floor(
    cluster: &Cluster,
    cells: &[(String, SocketAddr)],
    router_tls: &TlsPaths,
) -> Result<(Process, SocketAddr)> {
    let floor_bin = homecell_harness::Binaries::locate()?.path("pingora-floor");
    let floor_addr: SocketAddr = format!("127.0.0.1:{}", homecell_harness::free_port()).parse()?;
    let mut floor_cmd = Command::new(&floor_bin);
    floor_cmd
        .arg("--listen")
        .arg(floor_addr.to_string())
        .args(["--threads", "2", "--ca"])
        .arg(&router_tls.ca)
        .arg("--cert")
        .arg(&router_tls.cert)
        .arg("--key")
        .arg(&router_tls.key);
    for (region, addr) in cells {
        floor_cmd.arg("--cell").arg(format!("{region}={addr}"));
    }
    let floor = Process::spawn("pingora-floor", floor_cmd, &cluster.root.join("logs"))
        .with_context(|| {
            format!(
                "cannot start {} (build the bench binaries)",
                floor_bin.display()
            )
        })?;
    cluster
        .wait_http_ok(
            &format!("http://{floor_addr}/v1/region"),
            Duration::from_secs(10),
            "pingora-floor",
        )
        .await?;
    Ok((floor, floor_addr))
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut cluster = Cluster::temp()?;
    cluster.router_threads = args.router_threads;
    start_standard(&mut cluster).await?;
    cluster
        .wait_signing_keys(Duration::from_secs(30))
        .await
        .context("signing keys")?;
    let regions = ["cn-east", "eu-west"];
    let router_url = cluster.router_url(0);
    let router_addr = cluster.routers[0].listen;
    let router_pid = cluster.routers[0]
        .process
        .as_ref()
        .map(Process::pid)
        .context("router process")?;

    // One signed-in user per region, for the token workload.
    let mut tokens = Vec::new();
    for region in regions {
        let api = Api::new(&router_url, region);
        let who = format!("bench-{region}@example.com");
        let r = api.register(&who, "correct horse battery").await?;
        if r.status != 201 {
            bail!("register in {region}: {r:?}");
        }
        let (api, _) = api.signed_in(&who, "correct horse battery").await?;
        tokens.push(api.token.context("token")?);
    }

    let router_tls = TlsPaths::in_dir(
        &cluster.pki_dir,
        &PeerIdentity::Router {
            region: "cn-east".into(),
        },
    );
    // The router's identity: what the cell requires of its callers.
    let tls = router_tls.load()?.client_config()?;
    let cells: Vec<(String, SocketAddr)> = regions
        .iter()
        .map(|r| (r.to_string(), cluster.cells[*r].api))
        .collect();
    let cell_pids: Vec<u32> = regions
        .iter()
        .filter_map(|r| cluster.cells[*r].process.as_ref().map(Process::pid))
        .collect();

    // nginx and the floor beside them, when they are measured.
    let wants = |t: &str| args.targets.iter().any(|x| x == t);
    let nginx = if wants("nginx") {
        Some(start_nginx(&cluster, &args, &cells, &router_tls).await?)
    } else {
        None
    };
    let nginx_pids = nginx
        .as_ref()
        .map(|(_, pids, _)| pids.clone())
        .unwrap_or_default();
    let floor = if wants("floor") {
        Some(start_floor(&cluster, &cells, &router_tls).await?)
    } else {
        None
    };

    let plain = |addr| Target { addr, tls: None };
    let requests = |path: &'static str, with_token: bool| -> Vec<Request> {
        regions
            .iter()
            .zip(&tokens)
            .map(|(region, token)| Request {
                path,
                region: region.to_string(),
                token: with_token.then(|| token.clone()),
            })
            .collect()
    };

    println!(
        "{} connections, {} s per run, {} rounds, offered load {}; router pid {router_pid}, nginx pids {nginx_pids:?}",
        args.connections,
        args.seconds,
        args.rounds,
        if args.rate > 0 {
            format!("{} req/s", args.rate)
        } else {
            "unpaced".into()
        }
    );
    println!(
        "| workload | target | requests/s | p50 ms | p99 ms | proxy CPU µs/request | cells CPU µs/request | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for workload in args.workloads.iter().map(String::as_str) {
        let reqs = match workload {
            "header" => requests("/v1/region", false),
            "token" => requests("/v1/users/me", true),
            other => bail!("unknown workload {other}: want header or token"),
        };
        for _ in 0..args.rounds {
            for target in args.targets.iter().map(String::as_str) {
                let (pairs, pids): (Vec<(Target, Request)>, Vec<u32>) = match target {
                    "direct" => (
                        reqs.iter()
                            .zip(&cells)
                            .map(|(r, (region, addr))| {
                                let t = Target {
                                    addr: *addr,
                                    tls: Some((tls.clone(), format!("cell.{region}"))),
                                };
                                (t, r.clone())
                            })
                            .collect(),
                        vec![],
                    ),
                    "router" => (
                        reqs.iter()
                            .map(|r| (plain(router_addr), r.clone()))
                            .collect(),
                        vec![router_pid],
                    ),
                    "floor" => (
                        reqs.iter()
                            .map(|r| (plain(floor.as_ref().expect("started").1), r.clone()))
                            .collect(),
                        vec![floor.as_ref().expect("started").0.pid()],
                    ),
                    "nginx" => (
                        reqs.iter()
                            .map(|r| (plain(nginx.as_ref().expect("started").2), r.clone()))
                            .collect(),
                        nginx_pids.clone(),
                    ),
                    other => bail!("unknown target {other}: want direct, router, floor or nginx"),
                };
                let r = run(
                    &pairs,
                    args.connections,
                    args.seconds,
                    args.rate,
                    &pids,
                    &cell_pids,
                )
                .await;
                println!(
                    "| {workload} | {target} | {:.0} | {} | {} | {} | {:.0} | {} |",
                    r.rps,
                    ms(r.p50),
                    ms(r.p99),
                    r.cpu_us_per_req
                        .map_or_else(|| "—".into(), |c| format!("{c:.0}")),
                    r.cells_us_per_req,
                    r.errors
                );
            }
        }
    }
    if let Some((mut p, ..)) = nginx {
        p.terminate(Duration::from_secs(5));
    }
    if let Some((mut p, _)) = floor {
        p.terminate(Duration::from_secs(5));
    }
    // The router stops as an operator stops it, not killed: a router built
    // to record a profile (deploy/build-router-pgo) writes it as it exits.
    if let Some(p) = cluster.routers[0].process.as_mut()
        && !p.terminate(Duration::from_secs(10))
    {
        bail!("the router did not stop within 10 s of SIGTERM");
    }
    Ok(())
}
