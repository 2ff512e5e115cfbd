//! One gRPC channel over several instances of a server (the control
//! plane's): each new connection dials the instances in turn, starting
//! with the one that answered last, so a dead instance costs one failed
//! dial, not a failed call per request. TLS and HTTP/2 are tonic's as
//! usual; only the TCP dial is ours. Every instance must present the same
//! certificate name.

use crate::tls::TlsMaterial;
use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long one instance gets to accept the TCP connection.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);

/// A lazily connected channel to the first of `endpoints`
/// (`https://host:port`, validated) that accepts a connection.
pub fn channel(
    endpoints: &[String],
    tls: &TlsMaterial,
    server_name: &str,
    request_timeout: Duration,
) -> Result<Channel> {
    let first = endpoints.first().context("no endpoint")?;
    // TLS or not is decided by the first endpoint's scheme for all of them:
    // every one must be https (mTLS is not optional between components).
    if let Some(plain) = endpoints.iter().find(|e| !e.starts_with("https://")) {
        anyhow::bail!("{plain}: the control plane is reached over https only");
    }
    let addrs: Arc<Vec<String>> = Arc::new(
        endpoints
            .iter()
            .map(|e| {
                let uri: Uri = e.parse().context("endpoint")?;
                let auth = uri.authority().context("endpoint without a host")?;
                Ok(auth.as_str().to_string())
            })
            .collect::<Result<_>>()?,
    );
    let last_good = Arc::new(AtomicUsize::new(0));
    let dial = tower::service_fn(move |_: Uri| {
        let (addrs, last_good) = (addrs.clone(), last_good.clone());
        async move {
            let start = last_good.load(Ordering::Relaxed);
            let mut last_error = None;
            for i in 0..addrs.len() {
                let n = (start + i) % addrs.len();
                match tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect(&addrs[n]))
                    .await
                {
                    Ok(Ok(stream)) => {
                        let _ = stream.set_nodelay(true);
                        last_good.store(n, Ordering::Relaxed);
                        return Ok(TokioIo::new(stream));
                    }
                    Ok(Err(e)) => last_error = Some(e),
                    Err(_) => {
                        last_error = Some(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("{} did not accept within {DIAL_TIMEOUT:?}", addrs[n]),
                        ))
                    }
                }
            }
            Err(last_error.unwrap_or_else(|| std::io::Error::other("no endpoint")))
        }
    });
    // The dials have their own timeout; this one bounds the whole
    // connection, the TLS handshake included.
    let connect_timeout =
        DIAL_TIMEOUT * u32::try_from(endpoints.len()).unwrap_or(u32::MAX) + Duration::from_secs(3);
    Ok(Endpoint::from_shared(first.clone())?
        .tls_config(tls.tonic_client(server_name))?
        .connect_timeout(connect_timeout)
        .timeout(request_timeout)
        // A connection to an instance that went silent (cut off, or it
        // stopped listening while our FIN was lost) is dropped within 3 s,
        // so the next call dials again instead of waiting on it.
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true)
        .connect_with_connector_lazy(dial))
}
