//! One child process of the harness, killed when its handle drops, and
//! where the built binaries and free ports come from.

use anyhow::{Context, Result, bail};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the built binaries are: `HOMECELL_BIN_DIR`, else next to the running
/// executable (a test binary lives in `target/<profile>/deps`).
#[derive(Debug, Clone)]
pub struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    pub fn locate() -> Result<Self> {
        let dir = match std::env::var_os("HOMECELL_BIN_DIR") {
            Some(d) => PathBuf::from(d),
            None => {
                let exe = std::env::current_exe()?;
                let mut dir = exe
                    .parent()
                    .context("executable has no directory")?
                    .to_path_buf();
                if dir.ends_with("deps") {
                    dir.pop();
                }
                dir
            }
        };
        for bin in ["control-plane", "cell", "region-router"] {
            if !dir.join(bin).exists() {
                bail!(
                    "{} is missing: build the workspace first (cargo build --workspace)",
                    dir.join(bin).display()
                );
            }
        }
        Ok(Self { dir })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// A port that was free a moment ago on 127.0.0.1. Drawn at random below
/// Linux's ephemeral range (32768+), so the outgoing connections of parallel
/// tests cannot take it between now and the bind; never the same twice in
/// one process.
pub fn free_port() -> u16 {
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().expect("poisoned");
    for _ in 0..1000 {
        let mut b = [0u8; 2];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
            .expect("randomness");
        let port = 20_000 + u16::from_le_bytes(b) % 12_000;
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("cannot find a free port")
}

pub(crate) fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A running child process, killed on drop.
pub struct Process {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Process {
    /// Starts `cmd` with its output appended to `logs/<name>.log`.
    pub fn spawn(name: &str, mut cmd: Command, logs: &Path) -> Result<Self> {
        std::fs::create_dir_all(logs)?;
        let log = logs.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL after `grace`. Returns true if it exited in time.
    pub fn terminate(&mut self, grace: Duration) -> bool {
        signal(self.child.id(), "-TERM");
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").arg(sig).arg(pid.to_string()).status();
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}
