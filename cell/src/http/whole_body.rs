//! Every HTTP/1 request body is read whole (up to the body limit) before
//! any layer or handler runs; one over the limit, or that fails to arrive,
//! is refused and the connection closed, saying so (`Connection: close`).
//!
//! Why, twice over:
//! - hyper reuses a connection only once its request body is consumed.
//!   A handler that answered without reading it (a refusal by a layer, an
//!   unknown route) left hyper to close the connection after the answer,
//!   without a word in the answer: the router then pooled a connection
//!   about to go away and lost the next request sent on it. Closing on
//!   every such answer instead would let anyone force a new mTLS
//!   connection per request with a one-byte body.
//! - No handler acts on a request whose body has not fully arrived, so a
//!   request the router could not finish writing was never acted on, and
//!   the router may send it again (region-router/src/forward.rs).

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use homecell_proto::error::{CodedError, ErrorCode};
use http::HeaderValue;
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};

pub async fn read_whole(req: Request, next: Next) -> Response {
    // HTTP/2 (cell-to-cell gRPC) streams its messages and has no
    // `Connection` header; a request without a body has nothing to read.
    if req.version() >= http::Version::HTTP_2 || !has_body(&req) {
        return next.run(req).await;
    }
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let (parts, body) = req.into_parts();
    // A length over the limit is refused before any of it is read.
    let read = match declared {
        Some(n) if n > super::MAX_BODY => Err(()),
        _ => axum::body::to_bytes(body, super::MAX_BODY)
            .await
            .map_err(|_| ()),
    };
    match read {
        Ok(bytes) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        Err(_) => {
            let e = CodedError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "the request body is over {} bytes, or did not arrive whole",
                    super::MAX_BODY
                ),
            );
            let mut resp = super::ApiError(e).into_response();
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            resp
        }
    }
}

fn has_body(req: &Request) -> bool {
    req.headers().contains_key(TRANSFER_ENCODING)
        || req
            .headers()
            .get(CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::post;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The answer's head to `request`, sent on a fresh connection.
    async fn head_of(addr: std::net::SocketAddr, request: &str) -> String {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before an answer");
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).to_ascii_lowercase()
    }

    #[tokio::test]
    async fn bodies_are_read_whole_and_one_over_the_limit_closes_the_connection() {
        let app = axum::Router::new()
            .route("/refuse", post(|| async { http::StatusCode::UNAUTHORIZED }))
            .route(
                "/read",
                post(|body: axum::body::Bytes| async move { body.len().to_string() }),
            )
            .layer(axum::middleware::from_fn(read_whole));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });

        // Over the limit: refused at once, and the connection closes.
        let refused = head_of(
            addr,
            "POST /refuse HTTP/1.1\r\nhost: cell\r\ncontent-length: 100000\r\n\r\n",
        )
        .await;
        assert!(refused.starts_with("http/1.1 413"), "{refused}");
        assert!(refused.contains("connection: close"), "{refused}");

        // A small body a handler does not read is read for it: the
        // connection stays reusable.
        let unread = head_of(
            addr,
            "POST /refuse HTTP/1.1\r\nhost: cell\r\ncontent-length: 5\r\n\r\nhello",
        )
        .await;
        assert!(unread.starts_with("http/1.1 401"), "{unread}");
        assert!(!unread.contains("connection: close"), "{unread}");

        // The handler gets the whole body.
        let read = head_of(
            addr,
            "POST /read HTTP/1.1\r\nhost: cell\r\ncontent-length: 5\r\n\r\nhello",
        )
        .await;
        assert!(read.starts_with("http/1.1 200"), "{read}");
        assert!(!read.contains("connection: close"), "{read}");
    }
}
