//! Waiting for a cluster's processes: up, ready, keys published, a
//! revision applied. Every wait is bounded and says what it waited for.

use crate::Cluster;
use crate::process::Process;
use anyhow::{Result, bail};
use std::time::{Duration, Instant};

impl Cluster {
    /// Waits until `url` answers 200.
    pub async fn wait_http_ok(&self, url: &str, timeout: Duration, what: &str) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) = self
                .http
                .get(url)
                .timeout(Duration::from_secs(1))
                .send()
                .await
                && r.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{what} did not answer 200 at {url} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits for every router and cell to report ready.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        for c in self.cells.values().filter(|c| c.process.is_some()) {
            self.wait_http_ok(
                &format!("http://{}/ready", c.admin),
                timeout,
                &format!("cell {}", c.region),
            )
            .await?;
        }
        for (i, r) in self
            .routers
            .iter()
            .enumerate()
            .filter(|(_, r)| r.process.is_some())
        {
            self.wait_http_ok(
                &format!("http://{}/ready", r.admin),
                timeout,
                &format!("router {i}"),
            )
            .await?;
        }
        Ok(())
    }

    /// Waits until every region lists a signing key (cells publish theirs at
    /// start), so tokens of any cell verify everywhere.
    pub async fn wait_signing_keys(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.cli_ok(&["-o", "json", "region", "list"])?.json()?;
            let ready = v["regions"].as_array().is_some_and(|rs| {
                rs.iter()
                    .all(|r| r["signing_keys"].as_array().is_some_and(|k| !k.is_empty()))
            });
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("cells did not publish their keys: {v}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every connected subscriber has applied `revision`.
    pub async fn wait_applied(
        &self,
        revision: u64,
        subscribers: usize,
        timeout: Duration,
    ) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let v = self.cli_ok(&["-o", "json", "status"])?.json()?;
            let subs = v["subscribers"].as_array().cloned().unwrap_or_default();
            let done = subs
                .iter()
                .filter(|s| {
                    s["connected"] == true && s["applied_revision"].as_u64() >= Some(revision)
                })
                .count();
            if done >= subscribers {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!("only {done} of {subscribers} subscribers applied revision {revision}: {v}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits until a just-started process answers 200 at `url`; fails fast,
/// with the end of its log, if it exits instead.
pub(crate) async fn wait_up(http: &reqwest::Client, url: &str, proc: &mut Process) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = http.get(url).timeout(Duration::from_secs(1)).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if !proc.is_running() {
            bail!("{} exited at start:\n{}", proc.name, proc.log_tail(5));
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not answer at {url} within 20 s:\n{}",
                proc.name,
                proc.log_tail(5)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The 6-digit code after `phrase` ("sign-in code is ") in one of the
/// messages `texts` gives (mail or SMS) that is not in `seen` (then in it):
/// a maildir lists its messages in no order, so the newest code is the one
/// not seen before. Waits at most 20 s.
pub async fn new_code(
    texts: impl Fn() -> Vec<String>,
    phrase: &str,
    seen: &mut Vec<String>,
) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let fresh = texts().iter().find_map(|t| {
            let at = t.find(phrase)? + phrase.len();
            t.get(at..at + 6)
                .map(str::to_string)
                .filter(|c| !seen.contains(c))
        });
        if let Some(code) = fresh {
            seen.push(code.clone());
            return Ok(code);
        }
        if Instant::now() >= deadline {
            bail!("no new code after {phrase:?} arrived");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
