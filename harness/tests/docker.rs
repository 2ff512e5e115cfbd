//! The images and the compose deployment on a real Docker engine: build the
//! images, start two regions with `compose up`, use both through the router
//! container, stop and restart one cell, and leave nothing behind.
//!
//! Needs a Docker engine, so it is ignored by `./dev test`; `.ci/run` runs it
//! with `cargo nextest run -p homecell-harness --test docker --run-ignored only`.

use anyhow::{Context, Result, bail};
use homecell_harness::api::Api;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const TAG: &str = "e2e";
const LONG_RUNNING: [&str; 5] = [
    "control-plane",
    "cell-cn-east",
    "cell-eu-west",
    "router",
    "prometheus",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repo")
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// One compose project, taken down with its volumes on drop.
struct Deployment {
    project: String,
    port: u16,
    /// Prometheus's published port.
    prometheus_port: u16,
    compose: Vec<String>,
    /// Compose files on top of deploy/compose.yaml.
    overrides: Vec<&'static str>,
}

impl Deployment {
    fn new() -> Self {
        // The Compose v2 plugin when present, else the standalone v1 tool.
        let compose = if Command::new("docker")
            .args(["compose", "version"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            vec!["docker".into(), "compose".into()]
        } else {
            vec!["docker-compose".into()]
        };
        Self {
            project: format!("homecell-e2e-{}", std::process::id()),
            port: homecell_harness::free_port(),
            prometheus_port: homecell_harness::free_port(),
            compose,
            overrides: Vec::new(),
        }
    }

    /// The deployment with its control plane as three instances over
    /// PostgreSQL (deploy/compose.postgres.yaml), as a project of its own.
    fn postgres() -> Self {
        let mut d = Self::new();
        d.project = format!("homecell-e2e-pg-{}", std::process::id());
        d.overrides = vec!["deploy/compose.postgres.yaml"];
        d
    }

    /// The operator CLI's `status`, as JSON.
    fn status(&self) -> Result<serde_json::Value> {
        let out = self.compose(&[
            "run",
            "--rm",
            "--no-deps",
            "--entrypoint",
            "control-plane",
            "regions",
            "-o",
            "json",
            "status",
        ])?;
        Ok(serde_json::from_str(out.trim())?)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.compose[0]);
        c.args(&self.compose[1..])
            .args(["-p", &self.project, "-f"])
            .arg(repo().join("deploy/compose.yaml"));
        for o in &self.overrides {
            c.arg("-f").arg(repo().join(o));
        }
        c.args(args)
            .env("HOMECELL_IMAGE_TAG", TAG)
            .env("HOMECELL_HTTP_PORT", self.port.to_string())
            .env("HOMECELL_PROMETHEUS_PORT", self.prometheus_port.to_string());
        c
    }

    fn compose(&self, args: &[&str]) -> Result<String> {
        Ok(String::from_utf8_lossy(&run(&mut self.cmd(args))?.stdout).into_owned())
    }

    fn container(&self, service: &str) -> Result<String> {
        let id = self.compose(&["ps", "-q", service])?.trim().to_string();
        if id.is_empty() {
            bail!("no container for {service}");
        }
        Ok(id)
    }

    /// `healthy`, `unhealthy`, `starting`, or the state of a container
    /// without a health check (`exited 0`, …).
    fn health(&self, service: &str) -> Result<String> {
        let id = self.container(service)?;
        let out = run(Command::new("docker").args([
            "inspect",
            "-f",
            "{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}} {{.State.ExitCode}}{{end}}",
            &id,
        ]))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    async fn wait_healthy(&self, services: &[&str], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut waiting = Vec::new();
            for s in services {
                let h = self.health(s).unwrap_or_else(|e| e.to_string());
                if h != "healthy" {
                    waiting.push(format!("{s}: {h}"));
                }
            }
            if waiting.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("not healthy in time: {}", waiting.join(", "));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What is left of the project on the engine.
    fn leftovers(&self) -> Result<Vec<String>> {
        let label = format!("label=com.docker.compose.project={}", self.project);
        let mut left = Vec::new();
        for what in [
            &["ps", "-aq", "--filter"][..],
            &["volume", "ls", "-q", "--filter"][..],
            &["network", "ls", "-q", "--filter"][..],
        ] {
            let out = run(Command::new("docker").args(what).arg(&label))?;
            left.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .map(|l| format!("{} {l}", what[0])),
            );
        }
        Ok(left)
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(out) = self.cmd(&["logs", "--no-color", "--tail", "40"]).output()
        {
            eprintln!("{}", String::from_utf8_lossy(&out.stdout));
        }
        let _ = self.cmd(&["down", "-v", "--timeout", "5"]).output();
    }
}

/// Retries `f` until it answers (the cells publish their signing keys and
/// the router learns the regions a moment after the health checks pass).
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(e.context(what.to_string())),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Registers and signs in `who` in `region` through the router. Each step
/// is waited for on its own: the region must be reachable before anything
/// is sent, and the password is tried once (repeated logins from one
/// address would trip the per-address limit).
async fn sign_up(base: &str, region: &str, who: &str) -> Result<Api> {
    let api = Api::new(base, region);
    eventually(
        &format!("{region} reachable"),
        Duration::from_secs(60),
        || async {
            let r = api.get("/v1/region").await?;
            if r.status != 200 {
                bail!("/v1/region: {} {}", r.status, r.body);
            }
            Ok(())
        },
    )
    .await?;
    eventually(
        &format!("register in {region}"),
        Duration::from_secs(30),
        || async {
            let r = api.register(who, "correct horse battery").await?;
            if r.status != 201 && r.status != 409 {
                bail!("register: {} {}", r.status, r.body);
            }
            Ok(())
        },
    )
    .await?;
    let l = api.login(who, "correct horse battery").await?;
    if l.status != 200 {
        bail!("login in {region}: {} {}", l.status, l.body);
    }
    let api = api.with_token(l.body["access_token"].as_str().context("token")?);
    // The router verifies tokens with the keys cells publish through the
    // control plane; it may learn them a moment after the cell is healthy.
    eventually(
        &format!("/v1/me in {region}"),
        Duration::from_secs(30),
        || async {
            let me = api.get("/v1/me").await?;
            if me.status != 200 || me.body["user"]["home_region"] != region {
                bail!("/v1/me: {} {}", me.status, me.body);
            }
            Ok(())
        },
    )
    .await?;
    Ok(api)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a Docker engine; .ci/run runs it"]
async fn compose_deployment_serves_two_regions_and_survives_a_cell_restart() -> Result<()> {
    // 1. All images from a clean state (the base is reused when present).
    for bin in ["control-plane", "region-router", "cell"] {
        let _ = Command::new("docker")
            .args(["image", "rm", "-f", &format!("homecell/{bin}:{TAG}")])
            .output();
    }
    run(Command::new(repo().join("deploy/build-images")).env("HOMECELL_IMAGE_TAG", TAG))?;

    // 2. Up, and every health check green.
    let d = Deployment::new();
    d.compose(&["up", "-d"])?;
    d.wait_healthy(&LONG_RUNNING, Duration::from_secs(120))
        .await?;
    for one_shot in ["pki", "regions"] {
        assert_eq!(d.health(one_shot)?, "exited 0", "{one_shot}");
    }
    // Each component holds only its own keys: a cell has neither the
    // directory key (the control plane's and routers') nor an operator's.
    let cell_keys = d.compose(&["exec", "-T", "cell-cn-east", "ls", "/etc/homecell/pki"])?;
    let files: Vec<&str> = cell_keys.split_whitespace().collect();
    assert_eq!(
        files,
        [
            "ca.pem",
            "cell.cn-east-key.pem",
            "cell.cn-east.pem",
            "gossip.key"
        ],
        "cell-cn-east's pki"
    );

    // 2b. Gossip runs across the containers: the control plane sees the
    // two cells and the router alive (each advertises its service name).
    eventually(
        "four gossip members alive",
        Duration::from_secs(30),
        || async {
            let v = d.status()?;
            let alive: Vec<String> = v["members"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|m| m["alive"] == true)
                .map(|m| {
                    format!(
                        "{}/{}",
                        m["role"].as_str().unwrap_or(""),
                        m["region"].as_str().unwrap_or("")
                    )
                })
                .collect();
            for want in [
                "control-plane/",
                "cell/cn-east",
                "cell/eu-west",
                "router/cn-east",
            ] {
                if !alive.iter().any(|a| a == want) {
                    bail!("{want} not alive in {alive:?}");
                }
            }
            Ok(())
        },
    )
    .await?;

    // 2c. Prometheus, built from Debian's package, scrapes every component
    // with the alert rules loaded.
    let prometheus = format!("http://127.0.0.1:{}", d.prometheus_port);
    eventually("every target up", Duration::from_secs(60), || async {
        let v: serde_json::Value = reqwest::get(format!("{prometheus}/api/v1/targets"))
            .await?
            .json()
            .await?;
        let targets = v["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let up = targets.iter().filter(|t| t["health"] == "up").count();
        if targets.len() != 4 || up != 4 {
            bail!("{up} of {} targets up: {v}", targets.len());
        }
        Ok(())
    })
    .await?;
    let rules: serde_json::Value = reqwest::get(format!("{prometheus}/api/v1/rules"))
        .await?
        .json()
        .await?;
    let loaded = rules["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .count();
    assert!(loaded >= 12, "alert rules loaded: {rules}");

    // 3. Register, log in and call through the router into both regions.
    let base = d.url();
    let east = sign_up(&base, "cn-east", "east_user").await?;
    let west = sign_up(&base, "eu-west", "west_user").await?;
    // A write in each region that must survive the restart below.
    for (api, name) in [(&east, "East"), (&west, "West")] {
        let profile = api.get("/v1/users/me").await?;
        let etag = profile.header("etag").context("profile ETag")?.to_string();
        let r = api
            .call(
                reqwest::Method::PUT,
                "/v1/users/me",
                Some(json!({"display_name": name})),
                &[("if-match", &etag)],
            )
            .await?;
        assert_eq!(r.status, 200, "{r:?}");
    }

    // 4. One cell stops. It leaves the gossip cluster as it stops, so the
    // router usually marks it down at once; without that, its health checks
    // would within 2–3 s (meanwhile a request may wait out the connect
    // timeout: a stopped container's address answers nothing). Within 5 s of
    // the stop its region is answered at once with 503 problem+json, and the
    // other region serves.
    d.compose(&["stop", "--timeout", "10", "cell-eu-west"])?;
    let stopped = Instant::now();
    let reply = eventually(
        "a fast 503 for eu-west",
        Duration::from_secs(15),
        || async {
            let t = Instant::now();
            let r = west.get("/v1/me").await?;
            if r.status != 503 || t.elapsed() > Duration::from_millis(200) {
                bail!("{} after {:?}", r.status, t.elapsed());
            }
            Ok(r)
        },
    )
    .await?;
    let marked_down = stopped.elapsed();
    eprintln!("eu-west answered 503 at once {marked_down:?} after the stop");
    assert!(
        marked_down < Duration::from_secs(6),
        "marked down after {marked_down:?}"
    );
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json")
    );
    assert!(reply.header("retry-after").is_some());
    for _ in 0..20 {
        let t = Instant::now();
        let again = west.get("/v1/me").await?;
        assert_eq!(again.status, 503);
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "a down region is answered at once, took {:?}",
            t.elapsed()
        );
    }
    assert_eq!(east.get("/v1/me").await?.status, 200);

    // 5. Back, with its data: the user and the session are still there.
    d.compose(&["start", "cell-eu-west"])?;
    d.wait_healthy(&["cell-eu-west"], Duration::from_secs(60))
        .await?;
    eventually("eu-west back", Duration::from_secs(30), || async {
        let r = west.get("/v1/users/me").await?;
        if r.status != 200 || r.body["display_name"] != "West" {
            bail!("{} {}", r.status, r.body);
        }
        Ok(())
    })
    .await?;
    let relogin = Api::new(&base, "eu-west")
        .login("west_user", "correct horse battery")
        .await?;
    assert_eq!(relogin.status, 200, "{relogin:?}");

    // 6. Down with volumes: nothing of the project is left.
    d.compose(&["down", "-v", "--timeout", "10"])?;
    let left = d.leftovers()?;
    assert!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}

/// The same deployment with its control plane as three instances over
/// PostgreSQL: all listed alive, registrations through the router, and
/// still after one instance is killed.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a Docker engine; .ci/run runs it"]
async fn compose_postgres_override_runs_three_control_plane_instances() -> Result<()> {
    // The images (cached layers when the other test built them).
    run(Command::new(repo().join("deploy/build-images")).env("HOMECELL_IMAGE_TAG", TAG))?;
    let p = Deployment::postgres();
    p.compose(&["up", "-d"])?;
    p.wait_healthy(
        &[
            "postgres",
            "control-plane",
            "control-plane-2",
            "control-plane-3",
            "cell-cn-east",
            "cell-eu-west",
            "router",
        ],
        Duration::from_secs(180),
    )
    .await?;
    eventually("three instances alive", Duration::from_secs(30), || async {
        let v = p.status()?;
        let alive = v["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["alive"] == true)
            .count();
        if v["store"] != "postgres" || alive != 3 {
            bail!("{v}");
        }
        Ok(())
    })
    .await?;
    let pg_base = p.url();
    sign_up(&pg_base, "cn-east", "pg_one").await?;
    p.compose(&["kill", "control-plane"])?;
    sign_up(&pg_base, "eu-west", "pg_two").await?;
    let again = Api::new(&pg_base, "cn-east")
        .register("pg_one", "correct horse battery")
        .await?;
    assert_eq!(again.status, 409, "{again:?}");
    p.compose(&["down", "-v", "--timeout", "10"])?;
    let left = p.leftovers()?;
    assert!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}
