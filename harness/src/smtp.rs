//! A real SMTP server on loopback for tests: Python's aiosmtpd (Debian
//! `python3-aiosmtpd`, or `pip install aiosmtpd`) writing every message it
//! accepts into a maildir that tests read.

use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct SmtpSink {
    pub port: u16,
    maildir: PathBuf,
    child: Child,
    /// The temp dir the maildir is in, removed with the sink.
    owned_dir: Option<tempfile::TempDir>,
}

/// A Python that can import aiosmtpd.
fn python() -> Result<&'static str> {
    for p in ["python3", "/usr/bin/python3"] {
        let ok = Command::new(p)
            .args(["-c", "import aiosmtpd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(p);
        }
    }
    bail!("aiosmtpd is not installed (apt-get install python3-aiosmtpd, or pip install aiosmtpd)")
}

impl SmtpSink {
    pub async fn start() -> Result<Self> {
        Self::start_on(crate::free_port()).await
    }

    pub async fn start_on(port: u16) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let maildir = dir.path().join("mail");
        let mut sink = Self::start_into(maildir, port).await?;
        sink.owned_dir = Some(dir);
        Ok(sink)
    }

    /// Writing into the maildir `maildir` (kept when the sink stops): the
    /// local cluster's mail, for a person to read.
    pub async fn start_into(maildir: PathBuf, port: u16) -> Result<Self> {
        let child = Command::new(python()?)
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&maildir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start aiosmtpd")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("aiosmtpd did not listen on {port}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            port,
            maildir,
            child,
            owned_dir: None,
        })
    }

    /// Cell config that sends mail here.
    pub fn cell_config(&self) -> String {
        format!(
            "[notice]\nemail_from = \"Homecell <no-reply@homecell.test>\"\n[notice.smtp]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\n",
            self.port
        )
    }

    /// Every message received so far, raw.
    pub fn messages(&self) -> Vec<String> {
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            if let Ok(entries) = std::fs::read_dir(self.maildir.join(sub)) {
                for e in entries.flatten() {
                    if let Ok(m) = std::fs::read_to_string(e.path()) {
                        out.push(m);
                    }
                }
            }
        }
        out
    }

    /// Waits for a message to `to` that contains `needle`.
    pub async fn wait_for(&self, to: &str, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(m) = self.messages().into_iter().find(|m| {
                m.lines()
                    .any(|l| l.to_ascii_lowercase().starts_with("to:") && l.contains(to))
                    && m.contains(needle)
            }) {
                return Ok(m);
            }
            if Instant::now() > deadline {
                bail!("no message to {to} containing {needle:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
