//! An answer given before the request's body was read to its end (a
//! refusal by a layer, an unknown route, a body past the limit) closes the
//! connection, and says so with `Connection: close`.
//!
//! Why: hyper reuses a connection only once the request body is consumed.
//! When a handler answers without reading it, hyper drains what is already
//! buffered and otherwise closes the connection after the answer, without
//! a word in the answer itself. The router would then pool a connection
//! about to go away and lose the next request it sent on it (a 502 for a
//! POST, which it must not send twice). Told, it never pools it.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use http::HeaderValue;
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use hyper::body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

pub async fn close_if_unread(req: Request, next: Next) -> Response {
    // HTTP/2 has no `Connection` header and multiplexes (cell-to-cell
    // gRPC); a request without a body has nothing to leave unread.
    if req.version() >= http::Version::HTTP_2 || !has_body(&req) {
        return next.run(req).await;
    }
    let done = Arc::new(AtomicBool::new(false));
    let (parts, body) = req.into_parts();
    let body = axum::body::Body::new(Watched {
        inner: body,
        done: done.clone(),
    });
    let mut resp = next.run(Request::from_parts(parts, body)).await;
    if !done.load(Ordering::Acquire) {
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

fn has_body(req: &Request) -> bool {
    req.headers().contains_key(TRANSFER_ENCODING)
        || req
            .headers()
            .get(CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

/// The request body, noting when it has been read to its end.
struct Watched {
    inner: axum::body::Body,
    done: Arc<AtomicBool>,
}

impl Body for Watched {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.done.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
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
    async fn an_answer_that_leaves_the_body_unread_closes_the_connection() {
        let app = axum::Router::new()
            .route("/refuse", post(|| async { http::StatusCode::UNAUTHORIZED }))
            .route(
                "/read",
                post(|body: axum::body::Bytes| async move { body.len().to_string() }),
            )
            .layer(axum::middleware::from_fn(close_if_unread));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });

        // The body is still on its way (none of it sent): refused unread.
        let refused = head_of(
            addr,
            "POST /refuse HTTP/1.1\r\nhost: cell\r\ncontent-length: 100000\r\n\r\n",
        )
        .await;
        assert!(refused.starts_with("http/1.1 401"), "{refused}");
        assert!(refused.contains("connection: close"), "{refused}");

        // A body read to its end leaves the connection reusable.
        let read = head_of(
            addr,
            "POST /read HTTP/1.1\r\nhost: cell\r\ncontent-length: 5\r\n\r\nhello",
        )
        .await;
        assert!(read.starts_with("http/1.1 200"), "{read}");
        assert!(!read.contains("connection: close"), "{read}");
    }
}
