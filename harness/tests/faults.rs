//! Faults: a killed cell is marked down within seconds; its users get a fast
//! 503 with Retry-After; other regions are unaffected; recovery is automatic.

use homecell_harness::{Cluster, start_standard};
use std::time::{Duration, Instant};

type Result<T = ()> = anyhow::Result<T>;

async fn cell_up_metric(c: &Cluster, region: &str) -> Result<Option<i64>> {
    let text = c.router_metrics(0).await?;
    let prefix = format!("homecell_router_cell_up{{region=\"{region}\"}} ");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok()))
}

async fn region_status(c: &Cluster, region: &str) -> Result<(u16, Option<String>, Duration)> {
    let t = Instant::now();
    let r = c
        .http()
        .get(format!("{}/v1/region", c.router_url(0)))
        .header("x-home-region", region)
        .send()
        .await?;
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    Ok((r.status().as_u16(), retry, t.elapsed()))
}

#[tokio::test]
async fn a_killed_cell_is_marked_down_and_recovers() -> Result {
    let mut c = Cluster::temp()?;
    start_standard(&mut c).await?;
    assert_eq!(region_status(&c, "eu-west").await?.0, 200);

    c.kill_cell("eu-west");
    let killed = Instant::now();
    loop {
        if cell_up_metric(&c, "eu-west").await? == Some(0) {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "not marked down after {:?}",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, retry, took) = region_status(&c, "eu-west").await?;
    assert_eq!(status, 503);
    assert!(retry.is_some(), "503 without Retry-After");
    assert!(
        took < Duration::from_millis(500),
        "a down cell must be answered at once, took {took:?}"
    );
    assert_eq!(
        region_status(&c, "cn-east").await?.0,
        200,
        "other regions are unaffected"
    );

    c.cell_mut("eu-west").unwrap().process.take();
    c.start_cell("eu-west").await?;
    let restarted = Instant::now();
    loop {
        if region_status(&c, "eu-west").await?.0 == 200 {
            break;
        }
        assert!(restarted.elapsed() < Duration::from_secs(5), "no recovery");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(cell_up_metric(&c, "eu-west").await?, Some(1));
    Ok(())
}
