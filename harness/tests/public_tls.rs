//! The router's HTTPS listener for clients: HTTP/2 and HTTP/1.1 by ALPN, and
//! a certificate replaced on disk goes into service without a restart.

use anyhow::{Context, Result};
use bytes::Bytes;
use homecell_common::tls::{PeerIdentity, Pki, TlsPaths};
use homecell_harness::{Cluster, free_port, start_standard};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A public CA of its own (clients would trust a real one) and a server
/// certificate for 127.0.0.1 under it.
fn public_cert(dir: &Path) -> Result<(TlsPaths, Vec<u8>)> {
    let pki = Pki::open_or_create(dir)?;
    let id = PeerIdentity::Router {
        region: "cn-east".into(),
    };
    let paths = pki.issue(&id, &["localhost".into(), "127.0.0.1".into()])?;
    let ca = std::fs::read(&paths.ca)?;
    Ok((paths, ca))
}

fn client_config(cas: &[&[u8]], alpn: &[&[u8]]) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        for c in rustls_pemfile_certs(ca) {
            roots.add(c)?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // A resumed session shows the certificate of the session it resumes;
    // every connection here must show the one in service now.
    c.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(c))
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    let m = homecell_common::tls::TlsMaterial {
        ca_pem: Vec::new(),
        cert_pem: pem.to_vec(),
        key_pem: Vec::new(),
    };
    m.cert_chain().unwrap_or_default()
}

/// Connects, sends `GET /v1/region` for cn-east; returns the negotiated
/// protocol, the status and the server's leaf certificate.
async fn get_region(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<(String, u16, Vec<u8>)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("127.0.0.1")?, tcp)
        .await?;
    let (_, conn) = tls.get_ref();
    let alpn = conn
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no server certificate")?
        .to_vec();
    // h2 carries the authority in the URI; HTTP/1.1 in the Host header.
    let h2 = alpn == "h2";
    let uri = if h2 {
        format!("https://127.0.0.1:{}/v1/region", addr.port())
    } else {
        "/v1/region".to_string()
    };
    let req = || {
        hyper::Request::get(uri.as_str())
            .header("x-home-region", "cn-east")
            .body(Empty::<Bytes>::new())
    };
    let io = TokioIo::new(tls);
    let status = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        let r = send.send_request(req()?).await?;
        let s = r.status().as_u16();
        r.into_body().collect().await?;
        s
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        let r = send
            .send_request({
                let mut q = req()?;
                q.headers_mut()
                    .insert("host", "127.0.0.1".parse().expect("header"));
                q
            })
            .await?;
        let s = r.status().as_u16();
        r.into_body().collect().await?;
        s
    };
    Ok((alpn, status, leaf))
}

#[tokio::test]
async fn https_serves_h2_and_http1_and_reloads_its_certificate() -> Result<()> {
    let mut c = Cluster::temp()?;
    let (first, ca1) = public_cert(&c.root.join("public-ca-1"))?;
    let (second, ca2) = public_cert(&c.root.join("public-ca-2"))?;
    // The router serves copies, replaced below.
    let served = c.root.join("public");
    std::fs::create_dir_all(&served)?;
    let (cert, key) = (served.join("cert.pem"), served.join("key.pem"));
    std::fs::copy(&first.cert, &cert)?;
    std::fs::copy(&first.key, &key)?;
    let https: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    c.router_extra_config = format!(
        "[public_tls]\nlisten = \"{https}\"\ncert = {:?}\nkey = {:?}\nreload_secs = 1\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    start_standard(&mut c).await?;

    let both = client_config(&[&ca1, &ca2], &[b"h2", b"http/1.1"])?;
    let (alpn, status, leaf) = get_region(https, both.clone()).await?;
    assert_eq!((alpn.as_str(), status), ("h2", 200));
    let first_leaf = rustls_pemfile_certs(&std::fs::read(&first.cert)?)[0].to_vec();
    assert_eq!(leaf, first_leaf);
    let http1 = client_config(&[&ca1], &[b"http/1.1"])?;
    let (alpn, status, _) = get_region(https, http1).await?;
    assert_eq!((alpn.as_str(), status), ("http/1.1", 200));
    // The plain listener is still there.
    let plain = c
        .http()
        .get(format!("{}/v1/region", c.router_url(0)))
        .header("x-home-region", "cn-east")
        .send()
        .await?;
    assert_eq!(plain.status(), 200);

    // A half-written renewal (garbage) keeps the old certificate in service.
    std::fs::write(&cert, b"-----BEGIN CERTIFICATE-----\nnot base64\n")?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, status, leaf) = get_region(https, both.clone()).await?;
    assert_eq!((status, leaf), (200, first_leaf.clone()));

    // The renewal lands (written aside, renamed into place): new connections
    // get the new certificate, without a restart.
    let router_pid = c.routers[0].process.as_ref().map(|p| p.pid());
    for (from, to) in [(&second.key, &key), (&second.cert, &cert)] {
        let tmp = to.with_extension("new");
        std::fs::copy(from, &tmp)?;
        std::fs::rename(&tmp, to)?;
    }
    let second_leaf = rustls_pemfile_certs(&std::fs::read(&second.cert)?)[0].to_vec();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, status, leaf) = get_region(https, both.clone()).await?;
        assert_eq!(status, 200);
        if leaf == second_leaf {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate never went into service:\n{}",
            c.routers[0]
                .process
                .as_ref()
                .map(|p| p.log_tail(20))
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(c.routers[0].process.as_ref().map(|p| p.pid()), router_pid);
    let metrics = c.router_metrics(0).await?;
    assert!(
        metrics.contains("homecell_router_cert_reloads_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("homecell_router_cert_reloads_total{result=\"error\"}"));
    Ok(())
}
