//! Routing keys at the router: requests reach the home cell of the user they
//! concern without the client naming a region.
//!
//! Why one file of this length: one area's end-to-end tests share their
//! fixtures (the cluster helpers and clients above the tests), and each test
//! starts its own processes, so they stay independent.

use homecell_harness::api::Api;
use homecell_harness::{Cluster, standard, start_standard};
use reqwest::StatusCode;
use serde_json::json;

type Result<T = ()> = anyhow::Result<T>;
const PW: &str = "correct horse battery";

/// A client that names no region: the router must work it out.
async fn call(
    c: &Cluster,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> Result<(StatusCode, reqwest::header::HeaderMap, serde_json::Value)> {
    let mut req = c
        .http()
        .request(method, format!("{}{path}", c.router_url(0)))
        .header("x-client-type", "app");
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await?;
    let (status, headers) = (r.status(), r.headers().clone());
    let text = r.text().await?;
    Ok((
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    ))
}

#[tokio::test]
async fn every_auth_step_reaches_the_home_cell_without_a_region_header() -> Result {
    let c = standard().start().await?;
    use reqwest::Method;

    // Registration honours an explicit preference for an active region.
    let (s, _, b) = call(
        &c,
        Method::POST,
        "/v1/auth/register",
        None,
        Some(json!({"identifier": "uma@example.com", "password": PW, "region": "eu-west"})),
    )
    .await?;
    assert_eq!(
        (s, b["home_region"].as_str()),
        (StatusCode::CREATED, Some("eu-west")),
        "{b}"
    );
    let uma = b["user_id"].as_str().unwrap().to_string();
    // No preference: the router's default region.
    let (s, _, b) = call(
        &c,
        Method::POST,
        "/v1/auth/register",
        None,
        Some(json!({"identifier": "vic@example.com", "password": PW})),
    )
    .await?;
    assert_eq!(
        (s, b["home_region"].as_str()),
        (StatusCode::CREATED, Some("cn-east"))
    );

    // Login goes to the identifier's home (found by HMAC in the directory).
    let (s, _, login) = call(
        &c,
        Method::POST,
        "/v1/auth/login",
        None,
        Some(json!({"identifier": "UMA@example.com", "password": PW})),
    )
    .await?;
    assert_eq!(s, StatusCode::OK, "{login}");
    assert_eq!(login["home_region"], "eu-west");
    let token = login["access_token"].as_str().unwrap().to_string();

    // A token routes to its home, and wins over x-home-region.
    let (s, h, me) = call(&c, Method::GET, "/v1/users/me", Some(&token), None).await?;
    assert_eq!((s, me["id"].as_str()), (StatusCode::OK, Some(uma.as_str())));
    assert_eq!(h["x-home-region"], "eu-west");
    let r = c
        .http()
        .get(format!("{}/v1/users/me", c.router_url(0)))
        .bearer_auth(&token)
        .header("x-home-region", "cn-east")
        .send()
        .await?;
    assert_eq!(
        (r.status(), r.headers()["x-home-region"].to_str()?),
        (StatusCode::OK, "eu-west")
    );

    // A refresh goes to the region its token was issued in.
    let refresh = login["refresh_token"].as_str().unwrap();
    assert!(refresh.starts_with("eu-west~"));
    let (s, _, b) = call(
        &c,
        Method::POST,
        "/v1/auth/refresh",
        None,
        Some(json!({"refresh_token": refresh})),
    )
    .await?;
    assert_eq!(s, StatusCode::OK, "{b}");

    // A user-addressed path goes to that user's home, whoever asks.
    let (_, _, vic) = call(
        &c,
        Method::POST,
        "/v1/auth/login",
        None,
        Some(json!({"identifier": "vic@example.com", "password": PW})),
    )
    .await?;
    let vic_token = vic["access_token"].as_str().unwrap();
    let (s, h, p) = call(
        &c,
        Method::GET,
        &format!("/v1/users/{uma}"),
        Some(vic_token),
        None,
    )
    .await?;
    assert_eq!(
        (s, h["x-home-region"].to_str()?),
        (StatusCode::OK, "eu-west"),
        "{p}"
    );

    // Password reset by identifier reaches the home cell (202 either way).
    let (s, _, _) = call(
        &c,
        Method::POST,
        "/v1/auth/password/reset",
        None,
        Some(json!({"identifier": "uma@example.com"})),
    )
    .await?;
    assert_eq!(s, StatusCode::ACCEPTED);
    Ok(())
}

#[tokio::test]
async fn invalid_tokens_and_oversize_auth_bodies_stop_at_the_router() -> Result {
    let c = standard().start().await?;
    use reqwest::Method;
    let api = Api::new(&c.router_url(0), "cn-east");
    let (_, login) = api.signed_in("wes", PW).await?;
    let token = login["access_token"].as_str().unwrap();
    for bad in ["garbage", &format!("{token}x"), "a.b.c"] {
        let (s, h, b) = call(&c, Method::GET, "/v1/users/me", Some(bad), None).await?;
        assert_eq!(
            (s, b["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("unauthenticated"))
        );
        assert!(
            h.get("x-home-region").is_none(),
            "answered by a cell, not the router"
        );
        assert!(h.get("x-request-id").is_some());
    }
    let big = "x".repeat(9 * 1024);
    let (s, h, b) = call(
        &c,
        Method::POST,
        "/v1/auth/login",
        None,
        Some(json!({"identifier": "wes", "password": big})),
    )
    .await?;
    assert_eq!(
        (s.as_u16(), b["code"].as_str()),
        (413, Some("payload_too_large"))
    );
    assert!(h.get("x-home-region").is_none());
    // Malformed bodies still reach a cell, which explains them.
    let r = c
        .http()
        .post(format!("{}/v1/auth/login", c.router_url(0)))
        .header("content-type", "application/json")
        .header("x-client-type", "app")
        .body("{not json")
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // A login's answer names no region (it would say where an identifier
    // lives): the cell's own detail shows the cell answered.
    assert!(r.headers().get("x-home-region").is_none());
    let problem: serde_json::Value = r.json().await?;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or("")
            .contains("malformed JSON"),
        "{problem}"
    );
    Ok(())
}

/// A country database in the GeoLite2 schema: 81.2.69.0/24 is in GB.
fn geoip_fixture(dir: &std::path::Path) -> std::path::PathBuf {
    #[derive(serde::Serialize)]
    struct Country {
        iso_code: String,
    }
    #[derive(serde::Serialize)]
    struct Record {
        country: Country,
    }
    let mut w = mmdb_writer::Writer::new("Homecell-Test-Country");
    w.insert(
        "81.2.69.0/24".parse::<ipnet::IpNet>().unwrap(),
        &Record {
            country: Country {
                iso_code: "GB".into(),
            },
        },
    )
    .unwrap();
    let path = dir.join("country.mmdb");
    std::fs::write(&path, w.to_bytes().unwrap()).unwrap();
    path
}

#[tokio::test]
async fn registration_is_homed_by_the_clients_country_behind_trusted_proxies() -> Result {
    let mut c = Cluster::temp()?;
    let db = geoip_fixture(&c.root);
    c.router_extra_config = format!(
        "geoip_database = {:?}\ntrusted_proxies = [\"127.0.0.1\"]\n",
        db.display().to_string()
    );
    start_standard(&mut c).await?;
    let register = |id: &'static str, xff: Option<&'static str>| {
        let mut req = c
            .http()
            .post(format!("{}/v1/auth/register", c.router_url(0)))
            .json(&json!({"identifier": id, "password": PW}));
        if let Some(x) = xff {
            req = req.header("x-forwarded-for", x);
        }
        req.send()
    };
    // From a British address (through a trusted proxy): eu-west lists GB.
    let b: serde_json::Value = register("from-uk", Some("81.2.69.142"))
        .await?
        .json()
        .await?;
    assert_eq!(b["home_region"], "eu-west", "{b}");
    // An address without a country: the default region.
    let b: serde_json::Value = register("from-nowhere", Some("192.0.2.1"))
        .await?
        .json()
        .await?;
    assert_eq!(b["home_region"], "cn-east");
    // Without a forwarded address, the connection's own (loopback): default.
    let b: serde_json::Value = register("direct", None).await?.json().await?;
    assert_eq!(b["home_region"], "cn-east");
    Ok(())
}

#[tokio::test]
async fn any_router_reaches_the_home_cell() -> Result {
    let mut c = standard().start().await?;
    // A second router, in eu-west, defaulting to eu-west.
    let b = c.start_router("eu-west", "eu-west").await?;
    c.wait_ready(std::time::Duration::from_secs(20)).await?;
    let a_url = c.router_url(0);
    let b_url = c.router_url(b);
    let http = c.http().clone();
    let post = |base: String, path: &'static str, body: serde_json::Value| {
        http.post(format!("{base}{path}"))
            .header("x-client-type", "app")
            .json(&body)
            .send()
    };
    // Registered through A's router, homed in cn-east.
    let r: serde_json::Value = post(
        a_url.clone(),
        "/v1/auth/register",
        json!({"identifier": "xena", "password": PW}),
    )
    .await?
    .json()
    .await?;
    assert_eq!(r["home_region"], "cn-east");
    // Wait until B's router has the claim (replication), then log in through B.
    let mut login = serde_json::Value::Null;
    for _ in 0..50 {
        let resp = post(
            b_url.clone(),
            "/v1/auth/login",
            json!({"identifier": "xena", "password": PW}),
        )
        .await?;
        if resp.status() == StatusCode::OK {
            login = resp.json().await?;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        login["home_region"], "cn-east",
        "login through B did not reach cn-east"
    );
    // A's token at B's router reaches A.
    let token = login["access_token"].as_str().unwrap();
    let r = http
        .get(format!("{b_url}/v1/users/me"))
        .bearer_auth(token)
        .send()
        .await?;
    assert_eq!(
        (r.status(), r.headers()["x-home-region"].to_str()?),
        (StatusCode::OK, "cn-east")
    );
    Ok(())
}

#[tokio::test]
async fn hostile_headers_and_tokens_never_crash_the_router() -> Result {
    let mut c = standard().start().await?;
    let url = format!("{}/v1/users/me", c.router_url(0));
    let long = "a".repeat(60_000);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("authorization", b"Bearer ".to_vec()),
        ("authorization", format!("Bearer {long}").into_bytes()),
        ("authorization", b"Bearer a.b.c.d.e".to_vec()),
        ("authorization", b"Basic Zm9vOmJhcg==".to_vec()),
        ("authorization", b"Bearer \xff\xfe".to_vec()),
        ("x-home-region", b"\xff\xfe".to_vec()),
        ("x-home-region", long.clone().into_bytes()),
        ("x-request-id", long.clone().into_bytes()),
        ("x-forwarded-for", b"not-an-ip, ::::, 999.1.1.1".to_vec()),
        ("content-length", b"-1".to_vec()),
    ];
    for (name, value) in cases {
        let Ok(v) = reqwest::header::HeaderValue::from_bytes(&value) else {
            continue;
        };
        let _ = c.http().get(&url).header(name, v).send().await;
    }
    // Raw garbage on the socket, too.
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(c.routers[0].listen).await?;
    s.write_all(b"GET /\x00\xff HTTP/1.1\r\nHost: x\r\nx-home-region: \xff\r\n\r\n")
        .await?;
    drop(s);
    // Still alive and routing.
    assert!(c.routers[0].process.as_mut().unwrap().is_running());
    let r = c
        .http()
        .get(format!("{}/v1/region", c.router_url(0)))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::OK);
    Ok(())
}

/// Reads one HTTP/1.1 response head from a raw socket (up to the blank line).
async fn read_head(s: &mut tokio::net::TcpStream) -> Result<String> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n =
            tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut byte)).await??;
        anyhow::ensure!(n == 1, "connection closed after {head:?}");
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).to_lowercase())
}

/// Reads a response's body of the length its head declares.
async fn read_body(s: &mut tokio::net::TcpStream, head: &str) -> Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .ok_or_else(|| anyhow::anyhow!("no content-length in {head}"))?
        .trim()
        .parse()?;
    let mut body = vec![0; len];
    s.read_exact(&mut body).await?;
    Ok(body)
}

#[tokio::test]
async fn hop_by_hop_headers_and_expect_continue_are_handled_at_the_router() -> Result {
    use tokio::io::AsyncWriteExt;
    let c = standard().start().await?;
    let mut s = tokio::net::TcpStream::connect(c.routers[0].listen).await?;

    // A client that waits for 100 Continue before its login body gets it
    // from the router, then the cell's own answer.
    let body = br#"{"identifier":"nobody@example.com","password":"wrong password"}"#;
    let head = format!(
        "POST /v1/auth/login HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n\
         x-client-type: app\r\nexpect: 100-continue\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    let interim = read_head(&mut s).await?;
    assert!(interim.starts_with("http/1.1 100"), "{interim}");
    s.write_all(body).await?;
    let answer = read_head(&mut s).await?;
    assert!(answer.starts_with("http/1.1 401"), "{answer}");
    assert!(!answer.contains("x-home-region: "), "{answer}");
    let problem: serde_json::Value = serde_json::from_slice(&read_body(&mut s, &answer).await?)?;
    assert_eq!(problem["code"], "invalid_credentials", "{problem}");

    // On the same connection: a request with hop-by-hop headers (an
    // upgrade, options naming other headers) gets the cell's plain answer
    // and the connection stays open. Which headers reach the cell is
    // checked in forward.rs's unit tests.
    for _ in 0..2 {
        s.write_all(
            b"GET /v1/region HTTP/1.1\r\nHost: x\r\nx-home-region: eu-west\r\n\
              connection: keep-alive, upgrade, x-drop-me\r\nupgrade: websocket\r\n\
              x-drop-me: 1\r\nte: trailers\r\n\r\n",
        )
        .await?;
        let answer = read_head(&mut s).await?;
        assert!(answer.starts_with("http/1.1 200"), "{answer}");
        assert!(answer.contains("x-home-region: eu-west"), "{answer}");
        let region: serde_json::Value = serde_json::from_slice(&read_body(&mut s, &answer).await?)?;
        assert_eq!(region["region"], "eu-west", "{region}");
    }

    // Too many Connection options is an attack shape: a problem answer,
    // and the connection ends.
    let options: Vec<String> = (0..40).map(|i| format!("x-{i}")).collect();
    s.write_all(
        format!(
            "GET /v1/region HTTP/1.1\r\nHost: x\r\nconnection: {}\r\n\r\n",
            options.join(", ")
        )
        .as_bytes(),
    )
    .await?;
    let answer = read_head(&mut s).await?;
    assert!(answer.starts_with("http/1.1 400"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    Ok(())
}

#[tokio::test]
async fn rate_limits_apply_live_from_control_plane_config() -> Result {
    let c = standard().start().await?;
    let burst = |n: usize| {
        let http = c.http().clone();
        let url = format!("{}/v1/region", c.router_url(0));
        async move {
            let all = futures::future::join_all((0..n).map(|_| http.get(&url).send())).await;
            let mut limited = 0;
            for r in all {
                let r = r.unwrap();
                if r.status() == StatusCode::TOO_MANY_REQUESTS {
                    assert!(r.headers().contains_key("retry-after"));
                    limited += 1;
                } else {
                    assert_eq!(r.status(), StatusCode::OK);
                }
            }
            limited
        }
    };
    assert_eq!(burst(20).await, 0, "no limit by default");
    let out = c.cli_ok(&[
        "-o",
        "json",
        "config",
        "set",
        "router.rate_limit.per_ip",
        "5",
    ])?;
    let rev = out.json()?["revision"].as_u64().unwrap();
    c.wait_applied(rev, 3, std::time::Duration::from_secs(5))
        .await?;
    assert!(burst(20).await >= 10, "the per-address limit did not apply");
    let out = c.cli_ok(&["-o", "json", "config", "unset", "router.rate_limit.per_ip"])?;
    let rev = out.json()?["revision"].as_u64().unwrap();
    c.wait_applied(rev, 3, std::time::Duration::from_secs(5))
        .await?;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(burst(20).await, 0, "lifting the limit did not apply");
    Ok(())
}

/// The log of a process, whole.
fn log_of(p: Option<&homecell_harness::Process>) -> String {
    p.and_then(|p| std::fs::read_to_string(&p.log).ok())
        .unwrap_or_default()
}

#[tokio::test]
async fn one_trace_follows_a_request_from_the_router_across_cells() -> Result {
    let c = standard().start().await?;
    c.wait_signing_keys(std::time::Duration::from_secs(20))
        .await?;
    let base = c.router_url(0);
    let (east, login) = Api::new(&base, "cn-east")
        .signed_in("tess@example.com", PW)
        .await?;
    let east_id = login["user_id"].as_str().expect("user id").to_string();
    let (west, _) = Api::new(&base, "eu-west")
        .signed_in("wes@example.com", PW)
        .await?;
    drop(east);

    // eu-west's user looks at cn-east's user: the router sends it to
    // cn-east, which asks eu-west whether the session is alive (gRPC).
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let r = west
        .call(
            reqwest::Method::GET,
            &format!("/v1/users/{east_id}"),
            None,
            &[("traceparent", caller.as_str())],
        )
        .await?;
    assert_eq!(
        (r.status.as_u16(), r.header("x-home-region")),
        (200, Some("cn-east")),
        "{r:?}"
    );

    // Every hop logged the caller's trace id: the router's access log, the
    // home cell's request and the other cell's session check. Access lines
    // are written after the response has gone out: wait for the router's.
    let mut router = String::new();
    for _ in 0..50 {
        router = log_of(c.routers[0].process.as_ref());
        if router.contains(trace_id) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let east_log = log_of(c.cells["cn-east"].process.as_ref());
    let west_log = log_of(c.cells["eu-west"].process.as_ref());
    assert!(router.contains(trace_id), "router log lacks the trace");
    assert!(
        east_log
            .lines()
            .any(|l| l.contains(trace_id) && l.contains("/v1/users/{id}")),
        "cn-east log lacks the trace"
    );
    assert!(
        west_log
            .lines()
            .any(|l| l.contains(trace_id) && l.contains("CheckSession")),
        "eu-west log lacks the trace on the session check"
    );
    // Each hop took a span of its own: the caller's span id went no further
    // than the router.
    assert!(!east_log.contains("00f067aa0ba902b7"));

    // A malformed traceparent starts a new trace at the router, and that
    // trace (not the garbage) is what reaches the cell.
    let bad = "00-ZZZ-00f067aa0ba902b7-01";
    let r = west
        .call(
            reqwest::Method::GET,
            &format!("/v1/users/{east_id}"),
            None,
            &[("traceparent", bad), ("x-request-id", "trace-bad-1")],
        )
        .await?;
    assert_eq!(r.status, 200);
    // The router writes its access line after the response has gone out.
    let mut line = None;
    for _ in 0..50 {
        let router = log_of(c.routers[0].process.as_ref());
        line = router
            .lines()
            .find(|l| l.contains("trace-bad-1"))
            .map(String::from);
        if line.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let line = line.expect("the router logged the request");
    // The one quoted 32-hex value in the line (the log may carry colours).
    let fresh = line
        .split('"')
        .find(|t| t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no trace id in {line}"));
    assert_ne!(fresh, trace_id);
    assert!(
        log_of(c.cells["cn-east"].process.as_ref()).contains(fresh),
        "the router's new trace did not reach the cell"
    );
    Ok(())
}

/// Sends SIGHUP and waits until the router counts the `n`th reload with `result`.
async fn hup_until(c: &Cluster, pid: u32, result: &str, n: u32) -> Result {
    std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()?;
    let want = format!("homecell_router_config_reloads_total{{result=\"{result}\"}} {n}");
    for _ in 0..100 {
        if c.router_metrics(0).await?.contains(&want) {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    anyhow::bail!("no {want}")
}

/// SIGHUP reloads the router's file settings: trusted proxies and the GeoIP
/// database start to apply without a restart; a file that does not validate
/// changes nothing; a fixed setting is reported, not applied.
#[tokio::test]
async fn router_file_settings_reload_on_sighup() -> Result {
    let c = standard().start().await?;
    let register = |id: &'static str| {
        c.http()
            .post(format!("{}/v1/auth/register", c.router_url(0)))
            .header("x-forwarded-for", "81.2.69.142") // a British address
            .json(&json!({"identifier": id, "password": PW}))
            .send()
    };
    let home = |b: serde_json::Value| b["home_region"].as_str().unwrap_or_default().to_string();
    // No GeoIP and no trusted proxy yet: the default region.
    assert_eq!(
        home(register("before-reload").await?.json().await?),
        "cn-east"
    );

    let file = c.root.join("config/router-0.toml");
    let original = std::fs::read_to_string(&file)?;
    let pid = c.routers[0].process.as_ref().map(|p| p.pid()).unwrap_or(0);
    // A broken file (an unparsable trusted proxy) is refused as a whole.
    // Top-level keys go before the `[tls]` table.
    let with = |lines: &str| original.replacen("[tls]", &format!("{lines}[tls]"), 1);
    std::fs::write(&file, with("trusted_proxies = [\"not an address\"]\n"))?;
    hup_until(&c, pid, "error", 1).await?;
    assert_eq!(
        home(register("after-refusal").await?.json().await?),
        "cn-east"
    );

    // A good one applies at once; a changed fixed setting (threads) is only
    // reported.
    let db = geoip_fixture(&c.root);
    let good = with(&format!(
        "geoip_database = {:?}\ntrusted_proxies = [\"127.0.0.1\"]\n",
        db.display().to_string()
    ));
    std::fs::write(&file, good.replace("threads = 2", "threads = 3"))?;
    hup_until(&c, pid, "ok", 1).await?;
    assert_eq!(
        home(register("after-reload").await?.json().await?),
        "eu-west"
    );
    let log = std::fs::read_to_string(c.root.join("logs/router-0.log")).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains("apply only at the next restart") && l.contains("threads")),
        "the fixed setting is reported"
    );
    Ok(())
}

/// The router's workers share their port (SO_REUSEPORT), but a second
/// router on a port the first already serves refuses to start rather than
/// silently taking half its connections.
#[tokio::test]
async fn a_second_router_on_a_taken_port_refuses_to_start() -> Result {
    let c = standard().start().await?;
    let config = std::fs::read_to_string(c.root.join("config/router-0.toml"))?;
    let admin = homecell_harness::free_port();
    let second: String = config
        .lines()
        .map(|l| {
            if l.starts_with("data_dir") {
                format!(
                    "data_dir = {:?}",
                    c.root.join("router-second").display().to_string()
                )
            } else if l.starts_with("admin_listen") {
                format!("admin_listen = \"127.0.0.1:{admin}\"")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let path = c.root.join("config/router-second.toml");
    std::fs::write(&path, second)?;
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tokio::process::Command::new(homecell_harness::Binaries::locate()?.path("region-router"))
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "warn")
            .output(),
    )
    .await??;
    assert!(!out.status.success(), "the second router started");
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cannot listen on"), "{text}");
    // The first router still serves.
    let r = c
        .http()
        .get(format!("{}/v1/region", c.router_url(0)))
        .header("x-home-region", "eu-west")
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn client_connections_are_spread_over_the_router_workers() -> Result {
    use tokio::io::AsyncWriteExt;
    let c = standard().start().await?;
    // Eight keep-alive connections, one request answered on each: the
    // workers' counts differ by at most two (a worker accepts only while
    // it holds at most one more than the least loaded; two can race), where
    // a first-come accept could leave them all on one worker.
    let mut open = Vec::new();
    for _ in 0..8 {
        let mut s = tokio::net::TcpStream::connect(c.routers[0].listen).await?;
        s.write_all(b"GET /v1/region HTTP/1.1\r\nHost: x\r\nx-home-region: eu-west\r\n\r\n")
            .await?;
        let head = read_head(&mut s).await?;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        let body = read_body(&mut s, &head).await?;
        assert!(String::from_utf8_lossy(&body).contains("eu-west"));
        open.push(s);
    }
    let metrics = c.router_metrics(0).await?;
    let count = |worker: &str| -> Result<i64> {
        let line = format!("homecell_router_worker_connections{{worker=\"{worker}\"}} ");
        Ok(metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .ok_or_else(|| anyhow::anyhow!("no count for worker {worker} in {metrics}"))?
            .trim()
            .parse()?)
    };
    let (a, b) = (count("0")?, count("1")?);
    assert_eq!(a + b, 8, "{metrics}");
    assert!((a - b).abs() <= 2, "workers hold {a} and {b} connections");
    // Closed connections leave the counts.
    drop(open);
    let mut left = i64::MAX;
    for _ in 0..50 {
        let m = c.router_metrics(0).await?;
        left = m
            .lines()
            .filter(|l| l.starts_with("homecell_router_worker_connections{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
            .sum();
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(left, 0, "connections still counted after closing");
    Ok(())
}

/// A cell serves its own users' profiles only. Another region's token
/// presented to a cell directly (as a router would, over mTLS) is checked
/// with its home like any request, and then refused, since the data lives
/// at home; once its home has ended the session, it is refused as ended.
#[tokio::test]
async fn a_cell_serves_only_its_own_users_profile() -> Result {
    use homecell_common::tls::{PeerIdentity, TlsPaths};
    let c = standard().start().await?;
    let west = Api::new(&c.router_url(0), "eu-west");
    let (uma, _) = west.signed_in("uma@example.com", PW).await?;
    let token = uma.token.clone().expect("signed in");

    // The router's identity, which the cells require of their callers.
    let tls = TlsPaths::in_dir(
        &c.pki_dir,
        &PeerIdentity::Router {
            region: "cn-east".into(),
        },
    )
    .load()?
    .client_config()?;
    let mut client = reqwest::Client::builder()
        .use_preconfigured_tls((*tls).clone())
        .timeout(std::time::Duration::from_secs(10));
    for region in ["cn-east", "eu-west"] {
        client = client.resolve(&format!("cell.{region}"), c.cells[region].api);
    }
    let client = client.build()?;
    let me = |region: &str, token: &str| {
        client
            .get(format!(
                "https://cell.{region}:{}/v1/users/me",
                c.cells[region].api.port()
            ))
            .header("x-client-type", "app")
            .bearer_auth(token)
            .send()
    };

    let home = me("eu-west", &token).await?;
    assert_eq!(home.status(), StatusCode::OK);
    let elsewhere = me("cn-east", &token).await?;
    assert_eq!(elsewhere.status(), StatusCode::CONFLICT);
    let b: serde_json::Value = elsewhere.json().await?;
    assert_eq!(b["code"], "failed_precondition", "{b}");

    // A newer login on the same client type ends the first session; a
    // cell that never saw the old token asks its home, and is told so.
    let (again, _) = west.signed_in("uma@example.com", PW).await?;
    assert_eq!(
        me("eu-west", &token).await?.status(),
        StatusCode::UNAUTHORIZED
    );
    let fresh = again.token.clone().expect("signed in");
    assert_eq!(
        again.post("/v1/auth/logout", json!({})).await?.status,
        StatusCode::NO_CONTENT
    );
    let ended = me("cn-east", &fresh).await?;
    assert_eq!(ended.status(), StatusCode::UNAUTHORIZED);
    let b: serde_json::Value = ended.json().await?;
    assert_eq!(b["code"], "unauthenticated", "{b}");
    Ok(())
}

/// Only the public API is public: internal gRPC services, any gRPC content
/// type and paths outside the public route table get the router's own 404
/// problem, and never reach a cell (finding 13).
#[tokio::test]
async fn only_the_public_api_passes_the_router() -> Result {
    let c = standard().start().await?;
    // A gRPC frame of CheckSession {session_id: "s", user_id: "u"}.
    let message = [0x0a, 0x01, b's', 0x12, 0x01, b'u'];
    let mut frame = vec![0u8, 0, 0, 0, message.len() as u8];
    frame.extend_from_slice(&message);
    for (path, ct) in [
        (
            "/homecell.cell.v1.CellService/CheckSession",
            "application/grpc",
        ),
        (
            "/homecell.cell.v1.CellService/CheckSession",
            "application/json",
        ),
        ("/v1/region", "application/grpc+proto"),
        ("/v1/region", "Application/GRPC-web"),
        ("/internal/anything", "application/json"),
        ("/v1/users/me/", "application/json"),
    ] {
        let r = c
            .http()
            .post(format!("{}{path}", c.router_url(0)))
            .header("content-type", ct)
            .header("x-home-region", "cn-east")
            .body(frame.clone())
            .send()
            .await?;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path} {ct}");
        assert_eq!(
            r.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/problem+json"),
            "{path} {ct}"
        );
        assert!(
            r.headers().get("x-home-region").is_none(),
            "answered by the router, not a cell: {path} {ct}"
        );
        assert!(r.headers().get("grpc-status").is_none());
    }
    // The public API still passes.
    let r = c
        .http()
        .get(format!("{}/v1/region", c.router_url(0)))
        .header("x-home-region", "cn-east")
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::OK);
    Ok(())
}

/// The router hands cells the client address it resolved: behind a trusted
/// proxy, two clients have separate per-address budgets, and a client
/// cannot choose its own address with `x-homecell-client-ip` (finding 5).
#[tokio::test]
async fn per_address_limits_count_the_client_behind_a_proxy() -> Result {
    let c = standard()
        .router_config("trusted_proxies = [\"127.0.0.1\"]\n")
        .cell_config("login_attempts_per_ip_per_minute = 3\n")
        .start()
        .await?;
    let api = Api::new(&c.router_url(0), "cn-east");
    let login = |client: &'static str, spoof: Option<&'static str>| {
        let api = api.clone();
        async move {
            let mut extra = vec![("x-forwarded-for", client)];
            if let Some(s) = spoof {
                extra.push(("x-homecell-client-ip", s));
            }
            api.call(
                reqwest::Method::POST,
                "/v1/auth/login",
                Some(json!({"identifier": "nobody@x.test", "password": "wrong password"})),
                &extra,
            )
            .await
        }
    };
    for _ in 0..3 {
        assert_eq!(
            login("198.51.100.1", None).await?.status,
            StatusCode::UNAUTHORIZED
        );
    }
    let r = login("198.51.100.1", Some("198.51.100.99")).await?;
    assert_eq!(
        r.status,
        StatusCode::TOO_MANY_REQUESTS,
        "a client-sent x-homecell-client-ip is overwritten"
    );
    assert_eq!(
        login("198.51.100.2", None).await?.status,
        StatusCode::UNAUTHORIZED,
        "another client behind the same proxy has its own budget"
    );
    // A proxy that adds its own X-Forwarded-For line: the client's forged
    // first line is not taken for the proxy's word.
    let r = c
        .http()
        .post(format!("{}/v1/auth/login", c.router_url(0)))
        .header("x-client-type", "app")
        .header("x-forwarded-for", "203.0.113.77")
        .header("x-forwarded-for", "198.51.100.1")
        .json(&json!({"identifier": "nobody@x.test", "password": "wrong password"}))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    Ok(())
}
