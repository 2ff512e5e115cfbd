//! Spans exported over OTLP to a receiver in the harness
//! (opentelemetry-proto's `TraceService`): one request is one trace across
//! the router, the cells and the control plane, each span the child of the
//! hop that called it, and no span attribute carries personal data.

use homecell_harness::api::Api;
use homecell_harness::otlp::{OtlpReceiver, ReceivedSpan};
use homecell_harness::standard;
use reqwest::StatusCode;
use serde_json::json;
use std::time::{Duration, Instant};

type Result<T = ()> = anyhow::Result<T>;
const PW: &str = "correct horse battery";
const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const CONSUMER: i32 = 5;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One line per span: service, name, kind, id ← parent.
fn listing(spans: &[ReceivedSpan]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "{} {:?} kind {} {} <- {}",
                s.service,
                s.name,
                s.kind,
                hex(&s.span_id),
                hex(&s.parent_span_id)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The spans of `trace` once every one of `services` has exported the
/// span it should (the batch exporter sends every few seconds).
async fn trace_of(otlp: &OtlpReceiver, trace: &str, want: usize) -> Result<Vec<ReceivedSpan>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spans: Vec<ReceivedSpan> = otlp
            .spans()
            .into_iter()
            .filter(|s| hex(&s.trace_id) == trace)
            .collect();
        if spans.len() >= want {
            return Ok(spans);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "trace {trace}: {} of {want} spans:\n{}",
            spans.len(),
            listing(&spans)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The one span of `service` named `name`.
fn span<'a>(spans: &'a [ReceivedSpan], service: &str, name: &str) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.service == service && s.name == name)
        .collect();
    assert_eq!(found.len(), 1, "{service} {name} in\n{}", listing(spans));
    found[0]
}

fn child_of(child: &ReceivedSpan, parent: &ReceivedSpan) {
    assert_eq!(
        hex(&child.parent_span_id),
        hex(&parent.span_id),
        "{} ({}) is the child of {} ({})",
        child.name,
        child.service,
        parent.name,
        parent.service
    );
}

#[tokio::test]
async fn one_request_is_one_trace_across_router_cells_and_control_plane() -> Result {
    let otlp = OtlpReceiver::start().await?;
    let c = standard().export_spans_to(&otlp.endpoint).start().await?;
    let base = c.router_url(0);
    let east = Api::new(&base, "cn-east");

    // 1. A registration: router → cn-east → the control plane's claim.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let who = "tracy@example.com";
    let r = east
        .call(
            reqwest::Method::POST,
            "/v1/auth/register",
            Some(json!({"identifier": who, "password": PW})),
            &[("traceparent", &format!("00-{trace}-{caller}-01"))],
        )
        .await?;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let user_id = r.body["user_id"].as_str().unwrap_or_default().to_string();
    let spans = trace_of(&otlp, trace, 4).await?;
    let router = span(&spans, "homecell-region-router", "POST /v1/auth/register");
    let cell = span(&spans, "homecell-cell", "POST /v1/auth/register");
    let claim = span(
        &spans,
        "homecell-cell",
        "homecell.control.v1.DirectoryService/ClaimIdentifier",
    );
    let cp = span(
        &spans,
        "homecell-control-plane",
        "homecell.control.v1.DirectoryService/ClaimIdentifier",
    );
    assert_eq!(hex(&router.parent_span_id), caller, "the caller's span");
    child_of(cell, router);
    child_of(claim, cell);
    child_of(cp, claim);
    assert_eq!(
        [router.kind, cell.kind, claim.kind, cp.kind],
        [SERVER, SERVER, CLIENT, SERVER]
    );
    assert_eq!(router.attributes["http.route"], "/v1/auth/register");
    assert_eq!(router.attributes["http.response.status_code"], "201");
    assert_eq!(cell.attributes["http.request.method"], "POST");
    assert_eq!(claim.attributes["rpc.method"], "ClaimIdentifier");
    let cell_span = cell.span_id.clone();

    // The welcome the registration queued is dispatched later, in a trace
    // of its own linked to the request's.
    let deadline = Instant::now() + Duration::from_secs(30);
    let dispatch = loop {
        let found = otlp
            .spans()
            .into_iter()
            .find(|s| s.name == "notice.dispatch user.welcome");
        if let Some(s) = found {
            break s;
        }
        anyhow::ensure!(Instant::now() < deadline, "no dispatch span");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(dispatch.kind, CONSUMER);
    assert_eq!(dispatch.service, "homecell-cell");
    assert_eq!(
        dispatch
            .links
            .iter()
            .map(|(t, s)| (hex(t), hex(s)))
            .collect::<Vec<_>>(),
        [(trace.to_string(), hex(&cell_span))],
        "linked to the registration's span at the cell"
    );

    // 2. A read across cells: eu-west's user looks at cn-east's; cn-east
    // asks eu-west whether the session lives (cell → peer cell).
    c.wait_applied(c.revision()?, 3, Duration::from_secs(10))
        .await?;
    let (west, login) = Api::new(&base, "eu-west")
        .signed_in("wes@example.com", PW)
        .await?;
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let r = west
        .call(
            reqwest::Method::GET,
            &format!("/v1/users/{user_id}"),
            None,
            &[("traceparent", &format!("00-{trace}-{caller}-01"))],
        )
        .await?;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let spans = trace_of(&otlp, trace, 4).await?;
    let router = span(&spans, "homecell-region-router", "GET /v1/users/{id}");
    let cell = span(&spans, "homecell-cell", "GET /v1/users/{id}");
    let check = spans
        .iter()
        .filter(|s| s.name == "homecell.cell.v1.CellService/CheckSession")
        .collect::<Vec<_>>();
    assert_eq!(
        check.len(),
        2,
        "the call and its serving:\n{}",
        listing(&spans)
    );
    let (call, served) = match check[0].kind {
        CLIENT => (check[0], check[1]),
        _ => (check[1], check[0]),
    };
    child_of(cell, router);
    child_of(call, cell);
    child_of(served, call);
    assert_eq!(served.kind, SERVER);

    // No attribute or event of any span holds what identifies a person:
    // the identifier, the password, a user id, a token. (Log events, which
    // do name users, never reach the exporter.)
    let token = west.token.clone().unwrap_or_default();
    let secrets = [
        who,
        PW,
        "wes@example.com",
        &user_id,
        login["user_id"].as_str().unwrap_or("-"),
        login["refresh_token"].as_str().unwrap_or("-"),
        &token,
    ];
    for s in otlp.spans() {
        for (k, v) in &s.attributes {
            for secret in &secrets {
                assert!(
                    !secret.is_empty() && !v.contains(secret),
                    "{} {}: {k} = {v}",
                    s.service,
                    s.name
                );
            }
        }
        assert!(!s.name.contains(&user_id), "{}", s.name);
        for e in &s.events {
            for secret in &secrets {
                assert!(!e.contains(secret), "{} {}: event {e}", s.service, s.name);
            }
        }
    }
    Ok(())
}
