//! End-to-end tests of the foundation: real control plane, cells and router
//! processes on free ports with temp dirs, talking gRPC and HTTP over mTLS.

use homecell_harness::{Cluster, standard};
use std::time::{Duration, Instant};

type Result<T = ()> = anyhow::Result<T>;

async fn get_region(c: &Cluster, header: Option<&str>) -> Result<reqwest::Response> {
    let mut req = c.http().get(format!("{}/v1/region", c.router_url(0)));
    if let Some(h) = header {
        req = req.header("x-home-region", h);
    }
    Ok(req.send().await?)
}

async fn problem_code(resp: reqwest::Response) -> Result<(u16, String, Option<String>)> {
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert_eq!(ct, "application/problem+json", "status {status}");
    let retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let body: serde_json::Value = resp.json().await?;
    Ok((
        status,
        body["code"].as_str().unwrap_or("").to_string(),
        retry,
    ))
}

#[tokio::test]
async fn routes_by_header_to_each_regions_cell() -> Result {
    let c = standard().start().await?;

    for region in ["cn-east", "eu-west"] {
        let resp = get_region(&c, Some(region)).await?;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-home-region"], region);
        assert!(resp.headers().contains_key("x-request-id"));
        let body: serde_json::Value = resp.json().await?;
        assert_eq!(body["region"], region, "answered by the wrong cell");
        assert!(body["config_revision"].as_u64().unwrap() >= 2);
    }
    // No header: the router's default region.
    let body: serde_json::Value = get_region(&c, None).await?.json().await?;
    assert_eq!(body["region"], "cn-east");

    // A client's request id is kept; a hostile one is replaced.
    let resp = c
        .http()
        .get(format!("{}/v1/region", c.router_url(0)))
        .header("x-request-id", "abc-123")
        .send()
        .await?;
    assert_eq!(resp.headers()["x-request-id"], "abc-123");

    let (status, code, _) = problem_code(get_region(&c, Some("ap-nowhere")).await?).await?;
    assert_eq!((status, code.as_str()), (404, "unknown_region"));
    let (status, code, _) = problem_code(get_region(&c, Some("Not A Region")).await?).await?;
    assert_eq!((status, code.as_str()), (400, "invalid_argument"));
    Ok(())
}

#[tokio::test]
async fn a_new_region_reaches_router_and_cells_within_a_second() -> Result {
    let mut c = standard().start().await?;
    let (status, code, _) = problem_code(get_region(&c, Some("ap-south")).await?).await?;
    assert_eq!((status, code.as_str()), (404, "unknown_region"));

    let started = Instant::now();
    let revision = c.add_region("ap-south", "IN")?;
    // Every subscriber (two cells and the router) ACKs the new revision…
    let took = c.wait_applied(revision, 3, Duration::from_secs(5)).await?;
    assert!(took < Duration::from_secs(1), "subscribers took {took:?}");
    // …and the router now knows the region: its cell is not running, so the
    // answer is a fast 503, no longer a 404.
    let before = Instant::now();
    let (status, code, retry) = problem_code(get_region(&c, Some("ap-south")).await?).await?;
    assert_eq!((status, code.as_str()), (503, "cell_unavailable"));
    assert!(retry.is_some());
    assert!(
        before.elapsed() < Duration::from_secs(1),
        "a down cell must not hang"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    Ok(())
}

#[tokio::test]
async fn config_change_is_applied_and_acked_by_every_subscriber() -> Result {
    let c = standard().start().await?;
    let out = c.cli_ok(&[
        "-o",
        "json",
        "config",
        "set",
        "auth.lockout.max_failures",
        "7",
    ])?;
    let revision = out.json()?["revision"].as_u64().expect("revision");
    c.wait_applied(revision, 3, Duration::from_secs(5)).await?;

    let status = c.cli_ok(&["status"])?.stdout;
    assert!(
        status.contains(&format!("control plane at revision {revision}")),
        "{status}"
    );
    let connected = status
        .lines()
        .filter(|l| (l.starts_with("router") || l.starts_with("cell")) && l.contains(" yes "))
        .count();
    assert_eq!(connected, 3, "{status}");

    // The cells' local copies hold the new revision.
    for region in ["cn-east", "eu-west"] {
        let body: serde_json::Value = get_region(&c, Some(region)).await?.json().await?;
        assert_eq!(body["config_revision"], revision);
    }

    // History and rollback.
    let r2 = c.cli_ok(&[
        "-o",
        "json",
        "config",
        "set",
        "auth.lockout.max_failures",
        "9",
        "--region",
        "eu-west",
    ])?;
    let r2 = r2.json()?["revision"].as_u64().unwrap();
    assert_eq!(
        c.cli_ok(&[
            "config",
            "get",
            "auth.lockout.max_failures",
            "--region",
            "eu-west"
        ])?
        .stdout
        .trim(),
        "9"
    );
    assert_eq!(
        c.cli_ok(&[
            "config",
            "get",
            "auth.lockout.max_failures",
            "--region",
            "cn-east"
        ])?
        .stdout
        .trim(),
        "7"
    );
    let history = c
        .cli_ok(&[
            "-o",
            "json",
            "config",
            "history",
            "auth.lockout.max_failures",
        ])?
        .json()?;
    assert_eq!(history["entries"].as_array().unwrap().len(), 2);
    let rb = c
        .cli_ok(&[
            "-o",
            "json",
            "config",
            "rollback",
            "--to",
            &revision.to_string(),
        ])?
        .json()?;
    let r3 = rb["revision"].as_u64().unwrap();
    assert!(r3 > r2);
    assert_eq!(
        c.cli_ok(&[
            "config",
            "get",
            "auth.lockout.max_failures",
            "--region",
            "eu-west"
        ])?
        .stdout
        .trim(),
        "7"
    );
    c.wait_applied(r3, 3, Duration::from_secs(5)).await?;
    Ok(())
}

#[tokio::test]
async fn draining_regions_take_no_registrations_and_retired_ones_get_503() -> Result {
    let c = standard().start().await?;
    c.cli_ok(&["config", "set", "router.draining.retry_after", "45s"])?;
    let out = c.cli_ok(&["-o", "json", "region", "drain", "eu-west"])?;
    let rev = out.json()?["committed_revision"].as_u64().unwrap();
    c.wait_applied(rev, 3, Duration::from_secs(5)).await?;
    // Its existing users are still served…
    assert_eq!(get_region(&c, Some("eu-west")).await?.status(), 200);
    // …but a registration that prefers it lands in an active region.
    let reg = |pref: &'static str| {
        c.http()
            .post(format!("{}/v1/auth/register", c.router_url(0)))
            .json(&serde_json::json!({"identifier": format!("drain-{pref}"), "password": "correct horse battery", "region": pref}))
            .send()
    };
    let r = reg("eu-west").await?;
    assert_eq!(r.status(), 201);
    let body: serde_json::Value = r.json().await?;
    assert_eq!(body["home_region"], "cn-east");
    // With the default region draining too, registrations get 503 + Retry-After.
    let out = c.cli_ok(&["-o", "json", "region", "drain", "cn-east"])?;
    let rev = out.json()?["committed_revision"].as_u64().unwrap();
    c.wait_applied(rev, 3, Duration::from_secs(5)).await?;
    let (status, code, retry) = problem_code(reg("cn-east").await?).await?;
    assert_eq!(
        (status, code.as_str(), retry.as_deref()),
        (503, "region_draining", Some("45"))
    );
    c.cli_ok(&["region", "activate", "cn-east"])?;

    let out = c.cli_ok(&["-o", "json", "region", "retire", "eu-west"])?;
    let rev = out.json()?["committed_revision"].as_u64().unwrap();
    c.wait_applied(rev, 3, Duration::from_secs(5)).await?;
    let (status, code, _) = problem_code(get_region(&c, Some("eu-west")).await?).await?;
    assert_eq!((status, code.as_str()), (503, "region_retired"));
    assert_eq!(
        get_region(&c, Some("cn-east")).await?.status(),
        200,
        "other regions are unaffected"
    );
    // Retired is final.
    assert!(!c.cli(&["region", "activate", "eu-west"])?.success);
    Ok(())
}

#[tokio::test]
async fn keeps_serving_without_the_control_plane_and_restarts_from_the_local_copy() -> Result {
    let mut c = standard().start().await?;
    let revision = c.revision()?;
    c.wait_applied(revision, 3, Duration::from_secs(5)).await?;
    c.kill_control_plane();

    // Static stability: both regions still answer through the router.
    for region in ["cn-east", "eu-west"] {
        assert_eq!(get_region(&c, Some(region)).await?.status(), 200);
    }

    // A router and a cell restarted meanwhile start from their persisted copies.
    c.restart_router(0, "cn-east").await?;
    c.cell_mut("eu-west").unwrap().process.take();
    c.start_cell("eu-west").await?;
    c.wait_ready(Duration::from_secs(10)).await?;
    for region in ["cn-east", "eu-west"] {
        let resp = get_region(&c, Some(region)).await?;
        assert_eq!(resp.status(), 200);
        let body: serde_json::Value = resp.json().await?;
        assert_eq!(body["region"], region);
        assert_eq!(body["config_revision"], revision);
    }

    // The control plane comes back: subscribers reconnect and catch up.
    c.start_control_plane().await?;
    let out = c.cli_ok(&[
        "-o",
        "json",
        "config",
        "set",
        "feature.banner",
        "hello",
        "--type",
        "string",
    ])?;
    let next = out.json()?["revision"].as_u64().unwrap();
    c.wait_applied(next, 3, Duration::from_secs(10)).await?;
    Ok(())
}

#[tokio::test]
async fn bad_cli_input_writes_nothing() -> Result {
    let c = standard().start().await?;
    let before = c.revision()?;
    let bad: &[&[&str]] = &[
        &[
            "region",
            "add",
            "cn-east",
            "--public-endpoint",
            "http://127.0.0.1:1",
            "--internal-endpoint",
            "https://127.0.0.1:2",
        ],
        &[
            "region",
            "add",
            "Bad_Id",
            "--public-endpoint",
            "http://127.0.0.1:1",
            "--internal-endpoint",
            "https://127.0.0.1:2",
        ],
        &[
            "region",
            "add",
            "us-east",
            "--public-endpoint",
            "not a url",
            "--internal-endpoint",
            "https://127.0.0.1:2",
        ],
        &[
            "region",
            "add",
            "us-east",
            "--public-endpoint",
            "http://127.0.0.1:1",
            "--internal-endpoint",
            "https://host-without-port",
        ],
        &[
            "region",
            "add",
            "us-east",
            "--public-endpoint",
            "http://127.0.0.1:1",
            "--internal-endpoint",
            "https://127.0.0.1:2",
            "--countries",
            "ZZ",
        ],
        &[
            "region",
            "add",
            "us-east",
            "--public-endpoint",
            "http://127.0.0.1:1",
            "--internal-endpoint",
            "https://127.0.0.1:2",
            "--countries",
            "CN",
        ],
        &["region", "drain", "nowhere"],
        &["region", "update", "cn-east", "--status", "sleeping"],
        &["config", "set", "auth.lockout.max_failures", "many"],
        &[
            "config",
            "set",
            "auth.lockout.max_failures",
            "5",
            "--type",
            "string",
        ],
        &["config", "set", "auth.lockout.duration", "soon"],
        &["config", "set", "feature.flag", "true"],
        &[
            "config",
            "set",
            "feature.flag",
            "{bad json",
            "--type",
            "json",
        ],
        &["config", "set", "Bad Key", "1", "--type", "int"],
        &[
            "config",
            "set",
            "feature.flag",
            "true",
            "--type",
            "bool",
            "--region",
            "nowhere",
        ],
        &["config", "unset", "not.set"],
        &["config", "rollback", "--to", "999999"],
    ];
    for args in bad {
        let out = c.cli(args)?;
        assert!(!out.success, "accepted: {args:?}");
        let err = out.stderr.trim();
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
    assert_eq!(c.revision()?, before, "bad input moved the revision");
    Ok(())
}

#[tokio::test]
async fn only_operators_may_change_the_control_plane() -> Result {
    let c = standard().start().await?;
    // Present a cell's certificate to the operator CLI.
    let pki = c.pki_dir.clone();
    let out =
        std::process::Command::new(homecell_harness::Binaries::locate()?.path("control-plane"))
            .args(["region", "drain", "cn-east"])
            .env("HOMECELL_CONTROL_PLANE", c.control_plane_endpoint())
            .env("HOMECELL_TLS_CA", pki.join("ca.pem"))
            .env("HOMECELL_TLS_CERT", pki.join("cell.eu-west.pem"))
            .env("HOMECELL_TLS_KEY", pki.join("cell.eu-west-key.pem"))
            .env_remove("HOMECELL_PKI_DIR")
            .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an operator"));
    assert_eq!(get_region(&c, Some("cn-east")).await?.status(), 200);
    Ok(())
}

#[tokio::test]
async fn a_cell_runs_on_postgresql_and_guards_its_region() -> Result {
    let pg = homecell_harness::postgres::TempPostgres::start()?;
    let url = pg.create_database("cell_eu_west")?;
    let mut c = Cluster::temp()?;
    c.start_control_plane().await?;
    c.add_region("cn-east", "CN")?;
    c.add_region("eu-west", "DE")?;
    c.plan_cell("eu-west");
    c.cell_mut("eu-west").unwrap().database_url = Some(url.clone());
    c.start_cell("eu-west").await?;
    c.start_cell("cn-east").await?;
    c.start_router("cn-east", "cn-east").await?;
    c.wait_ready(Duration::from_secs(20)).await?;
    let body: serde_json::Value = get_region(&c, Some("eu-west")).await?.json().await?;
    assert_eq!(body["region"], "eu-west");
    assert_eq!(body["datastore"], "postgres");

    // Restarting on the same database works (migrations are idempotent)…
    c.cell_mut("eu-west").unwrap().process.take();
    c.start_cell("eu-west").await?;
    c.wait_ready(Duration::from_secs(10)).await?;
    assert_eq!(get_region(&c, Some("eu-west")).await?.status(), 200);

    // …but another region's cell refuses to open eu-west's datastore.
    c.cell_mut("cn-east").unwrap().process.take();
    c.cell_mut("cn-east").unwrap().database_url = Some(url);
    let started = c.start_cell("cn-east").await;
    assert!(started.is_err(), "cn-east opened eu-west's datastore");
    let log = std::fs::read_to_string(c.root.join("logs/cell-cn-east.log"))?;
    assert!(log.contains("belongs to region eu-west"), "{log}");
    Ok(())
}
