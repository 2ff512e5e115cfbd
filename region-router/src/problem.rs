//! The router's own answers: a refusal (no route, an invalid token, a
//! limit, a region that cannot take the request) as `application/problem+json`
//! in the shared error vocabulary (`homecell_proto::error`).

use crate::decide::Refusal;
use crate::state::Ctx;
use bytes::Bytes;
use homecell_proto::error::{PROBLEM_CONTENT_TYPE, Problem};
use pingora::http::ResponseHeader;
use pingora::protocols::http::{HttpTask, ServerSession};

/// Answers with a problem+json body (header and body in one write).
pub async fn respond_problem(
    session: &mut ServerSession,
    ctx: &Ctx,
    refusal: &Refusal,
) -> pingora::Result<()> {
    let mut problem = Problem::new(refusal.code, refusal.detail.clone());
    problem.instance = Some(format!("urn:request:{}", ctx.request_id));
    let body = Bytes::from(problem.to_json());
    let mut resp = ResponseHeader::build(refusal.code.http_status(), Some(5))?;
    resp.insert_header("content-type", PROBLEM_CONTENT_TYPE)?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("x-request-id", ctx.request_id.as_str())?;
    if let Some(secs) = refusal.retry_after {
        resp.insert_header("retry-after", secs.to_string())?;
    }
    session
        .response_duplex_vec(vec![
            HttpTask::Header(Box::new(resp), false),
            HttpTask::Body(Some(body), true),
        ])
        .await?;
    Ok(())
}
