//! A compromised cell can hurt only its own region: with a real `cell.<r>`
//! certificate (as a thief of one cell's credentials holds it), the control
//! plane refuses what would reach into another region (finding 11).

type Result<T = ()> = anyhow::Result<T>;
use homecell_common::tls::{PeerIdentity, Pki, TlsPaths};
use homecell_harness::api::Api;
use homecell_harness::{Cluster, start_standard};
use homecell_proto::control::directory_service_client::DirectoryServiceClient;
use homecell_proto::control::region_service_client::RegionServiceClient;
use homecell_proto::control::{ClaimIdentifierRequest, PublishSigningKeysRequest, SigningKey};
use std::time::Duration;

const PW: &str = "correct horse battery";

/// A control-plane channel with `region`'s cell certificate.
async fn as_cell(c: &Cluster, region: &str) -> Result<tonic::transport::Channel> {
    let pki = Pki::open_or_create(&c.pki_dir)?;
    let paths: TlsPaths = pki.issue(
        &PeerIdentity::Cell {
            region: region.into(),
        },
        &[],
    )?;
    Ok(
        tonic::transport::Endpoint::from_shared(c.control_plane_endpoint())?
            .tls_config(paths.load()?.tonic_client("control-plane"))?
            .connect()
            .await?,
    )
}

#[tokio::test]
async fn a_rogue_cell_cannot_reach_into_another_region() -> Result {
    let mut c = Cluster::temp()?;
    start_standard(&mut c).await?;
    c.wait_signing_keys(Duration::from_secs(15)).await?;
    let eu = Api::new(&c.router_url(0), "eu-west");
    let (me, login) = eu.signed_in("victim@x.test", PW).await?;
    let victim = login["user_id"].as_str().unwrap().to_string();
    let before = c.revision()?;
    let rogue = as_cell(&c, "cn-east").await?;

    // Re-homing eu-west's user to cn-east through a fresh identifier.
    let claim = DirectoryServiceClient::new(rogue.clone())
        .claim_identifier(ClaimIdentifierRequest {
            identifier: "username:rogue-handle".into(),
            user_id: victim.clone(),
            region: "cn-east".into(),
        })
        .await;
    assert_eq!(
        claim.map(|_| ()).map_err(|s| s.code()),
        Err(tonic::Code::PermissionDenied)
    );

    // Shadowing eu-west's signing key with cn-east's name on it, or a kid
    // that does not carry cn-east.
    let jwks = eu.get("/.well-known/jwks.json").await?;
    let eu_kid = jwks.body["keys"][0]["kid"].as_str().unwrap().to_string();
    let key = |kid: &str| SigningKey {
        kid: kid.into(),
        alg: "EdDSA".into(),
        public_key: vec![7; 32],
        ..Default::default()
    };
    for k in [key("eu-west-forged"), key("not-a-region-kid"), key(&eu_kid)] {
        let kid = k.kid.clone();
        let r = RegionServiceClient::new(rogue.clone())
            .publish_signing_keys(PublishSigningKeysRequest {
                region: "cn-east".into(),
                keys: vec![k],
            })
            .await;
        assert_eq!(
            r.map(|_| ()).map_err(|s| s.code()),
            Err(tonic::Code::PermissionDenied),
            "{kid}"
        );
    }
    assert_eq!(c.revision()?, before, "nothing changed");
    // The victim is still served at home.
    assert_eq!(
        me.get("/v1/users/me").await?.status,
        reqwest::StatusCode::OK
    );
    Ok(())
}
