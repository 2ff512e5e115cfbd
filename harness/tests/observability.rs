//! What operators see: every component's `/metrics` is valid Prometheus
//! text (checked by `promtool`, from Debian's `prometheus` package), carries
//! the process and build metrics, and keeps its label sets bounded whatever
//! a client sends.

use homecell_harness::api::Api;
use homecell_harness::{Cluster, standard};
use reqwest::StatusCode;
use std::net::SocketAddr;

type Result<T = ()> = anyhow::Result<T>;

/// Every admin listener in the cluster, with a name for messages.
fn admins(c: &Cluster) -> Vec<(String, SocketAddr)> {
    let mut all = vec![("control-plane".to_string(), c.control_plane.admin)];
    all.extend(
        c.routers
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("router-{i}"), r.admin)),
    );
    all.extend(
        c.cells
            .iter()
            .map(|(region, n)| (format!("cell-{region}"), n.admin)),
    );
    all
}

async fn metrics(c: &Cluster, admin: SocketAddr) -> Result<String> {
    Ok(c.http()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?)
}

/// The sample lines (one per series) of a Prometheus text page.
fn series(text: &str) -> usize {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count()
}

/// `promtool check metrics` reads the page on its standard input: it
/// fails on malformed text and on what the Prometheus naming guide rules
/// out (a counter without `_total`, a missing HELP, a unit in the wrong
/// place).
fn promtool_check(name: &str, text: &str) -> Result {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!("promtool ({e}): install Debian's prometheus package (./dev does)")
        })?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "{name}'s /metrics fails promtool:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn every_component_reports_its_process_and_build_in_valid_metrics() -> Result {
    let c = standard().start().await?;
    // A little traffic, so the request metrics have series to show.
    let api = Api::new(&c.router_url(0), "cn-east");
    let r = api
        .register("watched-user", "correct horse battery")
        .await?;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r = api.login("watched-user", "correct horse battery").await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    for (name, admin) in admins(&c) {
        let text = metrics(&c, admin).await?;
        for family in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_threads",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(family)),
                "{name} lacks {family}"
            );
        }
        let component = name.split_once('-').map_or(name.as_str(), |(c, _)| c);
        let component = match component {
            "control" => "control-plane",
            "router" => "region-router",
            other => other,
        };
        assert!(
            text.lines().any(|l| l.starts_with("homecell_build_info{")
                && l.contains(&format!("component=\"{component}\""))
                && l.ends_with(" 1")),
            "{name} lacks homecell_build_info"
        );
        promtool_check(&name, &text)?;
    }
    let east = metrics(&c, c.cells["cn-east"].admin).await?;
    assert!(
        east.lines().any(|l| l.starts_with(
            "homecell_cell_request_duration_seconds_count{method=\"POST\",route=\"/v1/auth/login\",status=\"200\"}"
        )),
        "the login is counted under its route template"
    );
    Ok(())
}

/// Paths, methods and ids a client chooses never become label values: after
/// one round of hostile requests has made the series they fall under
/// (`unmatched`, `other`, the route templates), a second round of new ones
/// adds none, at the router or at the cell.
#[tokio::test]
async fn hostile_requests_add_no_series() -> Result {
    let c = standard().start().await?;
    let http = c.http();
    let base = c.router_url(0);
    let round = |tag: u32| {
        let http = http.clone();
        let base = base.clone();
        async move {
            for i in 0..40u32 {
                let junk = format!("{tag}x{i}");
                let method = reqwest::Method::from_bytes(format!("M{tag}X{i}").as_bytes())?;
                for (method, path) in [
                    (reqwest::Method::GET, format!("/v1/users/{junk}")),
                    (reqwest::Method::GET, format!("/v1/users/{junk}/addresses")),
                    (reqwest::Method::GET, format!("/nothing/{junk}")),
                    (reqwest::Method::GET, format!("/v1/{junk}")),
                    (method, format!("/v1/users/{junk}")),
                    (reqwest::Method::POST, format!("/v1/auth/login?{junk}=1")),
                ] {
                    http.request(method, format!("{base}{path}"))
                        .header("x-client-type", "app")
                        .header("x-home-region", "cn-east")
                        .header("x-request-id", &junk)
                        .header(
                            "traceparent",
                            format!("00-{:032x}-{:016x}-01", i + 1, i + 1),
                        )
                        .body("{}")
                        .send()
                        .await?;
                }
            }
            anyhow::Ok(())
        }
    };
    round(1).await?;
    let mut before = Vec::new();
    for (name, admin) in admins(&c) {
        before.push((name, series(&metrics(&c, admin).await?)));
    }
    round(2).await?;
    for ((name, n), (_, admin)) in before.into_iter().zip(admins(&c)) {
        let text = metrics(&c, admin).await?;
        assert_eq!(
            series(&text),
            n,
            "{name} grew series on hostile input:\n{}",
            text.lines()
                .filter(|l| l.contains("2x"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(())
}

/// The alert rules load, each alert's unit tests (alerts.test.yml: firing
/// and not firing) pass, and the compose scrape config is valid.
#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() -> Result {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts.test.yml"],
        &["check", "config", "prometheus.compose.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .map_err(|e| anyhow::anyhow!("promtool ({e}): install Debian's prometheus package"))?;
        anyhow::ensure!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
