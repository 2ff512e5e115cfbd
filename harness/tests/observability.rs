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

/// Every panel of the Grafana dashboard (deploy/grafana) asks a real
/// Prometheus, scraping a running cluster under a little load of every
/// kind, a valid query that returns series; the region variable finds the
/// regions.
#[tokio::test]
async fn every_dashboard_panel_returns_series_from_a_running_cluster() -> Result {
    const SECRET: &str = "whsec-observability-test-secret-01";
    let c = standard()
        .cell_config(&format!("[payments.testpay]\nsecret = {SECRET:?}\n"))
        .start()
        .await?;

    // Prometheus, scraping every component each second with the labels
    // of deploy/prometheus/prometheus.compose.yml.
    let mut config = String::from("global:\n  scrape_interval: 1s\nscrape_configs:\n");
    config.push_str(&format!(
        "  - job_name: homecell-control-plane\n    static_configs:\n      - targets: [\"{}\"]\n",
        c.control_plane.admin
    ));
    config.push_str("  - job_name: homecell-router\n    static_configs:\n");
    for r in &c.routers {
        config.push_str(&format!(
            "      - targets: [\"{}\"]\n        labels:\n          router_region: {}\n",
            r.admin, r.region
        ));
    }
    config.push_str("  - job_name: homecell-cell\n    static_configs:\n");
    for (region, n) in &c.cells {
        config.push_str(&format!(
            "      - targets: [\"{}\"]\n        labels:\n          region: {region}\n",
            n.admin
        ));
    }
    let dir = c.root.join("prometheus");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("prometheus.yml"), config)?;
    let port = homecell_harness::free_port();
    let _prometheus = tokio::process::Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log"))?)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow::anyhow!("prometheus ({e}): install Debian's prometheus package"))?;
    let prom = format!("http://127.0.0.1:{port}");
    let query = |q: String| {
        let http = c.http();
        let prom = prom.clone();
        async move {
            let r: serde_json::Value = http
                .get(format!("{prom}/api/v1/query"))
                .query(&[("query", q)])
                .send()
                .await?
                .json()
                .await?;
            anyhow::Ok(r)
        }
    };

    // A little of everything: registrations, sign-ins right and wrong,
    // authenticated reads (token cache hits), a deposit, transfers within
    // a cell and across cells (clearing balances).
    let cn = Api::new(&c.router_url(0), "cn-east");
    let eu = Api::new(&c.router_url(0), "eu-west");
    let pw = "correct horse battery";
    for (api, name) in [(&cn, "alice-obs"), (&cn, "bob-obs"), (&eu, "carol-obs")] {
        let r = api.register(name, pw).await?;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    }
    c.wait_applied(c.revision()?, 3, std::time::Duration::from_secs(10))
        .await?;
    let (alice, a) = cn.signed_in("alice-obs", pw).await?;
    let (_, b) = cn.signed_in("bob-obs", pw).await?;
    let (_, carol) = eu.signed_in("carol-obs", pw).await?;
    let id = |v: &serde_json::Value| v["user_id"].as_str().unwrap_or_default().to_string();
    let r = cn
        .provider_deposit("testpay", SECRET, "evt-obs-1", &id(&a), 100_000)
        .await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut round = 0;
    loop {
        round += 1;
        for (i, to) in [id(&b), id(&carol)].into_iter().enumerate() {
            let body = serde_json::json!({"to_user_id": to, "amount": 10, "currency": "CNY"});
            let r = alice
                .transfer(&format!("00000000-0000-4000-800{i}-{round:012}"), body)
                .await?;
            assert!(r.status.is_success(), "{}", r.body);
        }
        for _ in 0..5 {
            alice.get("/v1/users/me").await?;
        }
        let _ = cn.login("alice-obs", "wrong password").await?;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        // Until every target is up and has been scraped through the load,
        // and the samplers (every 5 s and 15 s) have run twice.
        let up = query("sum(up)".into()).await.ok();
        let all_up = up
            .as_ref()
            .and_then(|r| r["data"]["result"][0]["value"][1].as_str())
            == Some(&(1 + c.routers.len() + c.cells.len()).to_string());
        if all_up && round >= 40 {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "Prometheus never scraped every target: {up:?}"
        );
    }

    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/grafana/dashboards/homecell.json"),
    )?)?;
    let mut failed = Vec::new();
    let mut asked = 0;
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_default()
                .replace("$region", ".+")
                .replace("$__rate_interval", "15s");
            asked += 1;
            let r = query(expr.clone()).await?;
            let n = r["data"]["result"].as_array().map_or(0, Vec::len);
            if r["status"] != "success" || n == 0 {
                failed.push(format!("{}: {expr}: {r}", panel["title"]));
            }
        }
    }
    assert!(asked >= 30, "only {asked} queries");
    assert!(
        failed.is_empty(),
        "panels without series:\n{}",
        failed.join("\n")
    );
    let regions: serde_json::Value = c
        .http()
        .get(format!("{prom}/api/v1/label/region/values"))
        .query(&[("match[]", "homecell_router_requests_total")])
        .send()
        .await?
        .json()
        .await?;
    for region in c.cells.keys() {
        assert!(
            regions["data"]
                .as_array()
                .is_some_and(|v| v.iter().any(|r| r == region.as_str())),
            "the region variable lacks {region}: {regions}"
        );
    }
    Ok(())
}

/// A component's log, written to a file (not a terminal), is one JSON
/// object per line with no colour codes; an access line carries the
/// timestamp, level, target and the request's trace and request ids.
#[tokio::test]
async fn logs_off_a_terminal_are_json_lines_without_colour() -> Result {
    let c = standard().start().await?;
    let api = Api::new(&c.router_url(0), "cn-east");
    let r = api
        .call(
            reqwest::Method::GET,
            "/v1/region",
            None,
            &[("x-request-id", "req-logs-1")],
        )
        .await?;
    assert_eq!(r.status, StatusCode::OK);
    let path = c.root.join("logs/cell-cn-east.log");
    let mut access = None;
    for _ in 0..50 {
        let text = std::fs::read_to_string(&path)?;
        assert!(
            !text.contains('\u{1b}'),
            "colour codes in {}",
            path.display()
        );
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| anyhow::anyhow!("not JSON ({e}): {line}"))?;
            if v["target"] == "access" && v["span"]["request_id"] == "req-logs-1" {
                access = Some(v);
            }
        }
        if access.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let access = access.ok_or_else(|| anyhow::anyhow!("no access line for the request"))?;
    for field in ["timestamp", "level", "target"] {
        assert!(access.get(field).is_some(), "{field} in {access}");
    }
    assert_eq!(access["span"]["trace_id"].as_str().map(str::len), Some(32));
    assert_eq!(access["route"], "/v1/region");
    Ok(())
}
