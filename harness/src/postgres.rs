//! A private PostgreSQL server for tests: `initdb` into a temp dir, started
//! with `pg_ctl` on a free loopback port, stopped on drop. PostgreSQL refuses
//! to run as root, so as root the commands run as the `postgres` user.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TempPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    as_postgres_user: bool,
}

/// The newest `/usr/lib/postgresql/<v>/bin` with `initdb`, or `HOMECELL_PG_BIN`.
fn find_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("HOMECELL_PG_BIN") {
        return Ok(PathBuf::from(p));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (apt-get install postgresql)")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, p)| p)
        .context("no initdb under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl TempPostgres {
    pub fn start() -> Result<Self> {
        Self::start_on(&[])
    }

    /// Listening on loopback and on `also` (the host's ends of a test's
    /// network namespaces, `NetNs::host_ip`), trusting those addresses.
    pub fn start_on(also: &[std::net::Ipv4Addr]) -> Result<Self> {
        Self::start_with(also, false)
    }

    /// Durable, for benchmarks: fsync, full pages and synchronous commit on
    /// (tests run without them).
    pub fn start_durable() -> Result<Self> {
        Self::start_with(&[], true)
    }

    /// Accepting TCP connections over TLS only, with a certificate for
    /// 127.0.0.1 from a CA of its own (`tls_ca`).
    pub fn start_tls() -> Result<Self> {
        let pg = Self::start_stopped(&[])?;
        let data = std::path::PathBuf::from(pg.data_dir());
        let pki = homecell_common::tls::Pki::open_or_create(&pg.dir.path().join("pki"))?;
        let paths = pki.issue(
            &homecell_common::tls::PeerIdentity::ControlPlane,
            &["127.0.0.1".into()],
        )?;
        std::fs::copy(&paths.cert, data.join("server.crt"))?;
        homecell_common::tls::write_private(&data.join("server.key"), &std::fs::read(&paths.key)?)?;
        std::fs::copy(&paths.ca, pg.tls_ca())?;
        // Refused first: any TCP connection without TLS.
        let hba = data.join("pg_hba.conf");
        let rest = std::fs::read_to_string(&hba)?;
        std::fs::write(&hba, format!("hostnossl all all all reject\n{rest}"))?;
        pg.chown_to_postgres(&data)?;
        pg.start_server(&[], false, " -c ssl=on")?;
        Ok(pg)
    }

    /// The CA that signed a `start_tls` server's certificate.
    pub fn tls_ca(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn start_with(also: &[std::net::Ipv4Addr], durable: bool) -> Result<Self> {
        let pg = Self::start_stopped(also)?;
        pg.start_server(also, durable, "")?;
        Ok(pg)
    }

    /// Hands what root wrote in `dir` to the postgres user (the server
    /// refuses a key file it does not own).
    fn chown_to_postgres(&self, dir: &Path) -> Result<()> {
        if self.as_postgres_user {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir)
                .status()?
                .success();
            if !ok {
                bail!("cannot hand {} to the postgres user", dir.display());
            }
        }
        Ok(())
    }

    /// A server initialised, not yet started.
    fn start_stopped(also: &[std::net::Ipv4Addr]) -> Result<Self> {
        let bin = find_bin()?;
        let dir = tempfile::Builder::new().prefix("homecell-pg-").tempdir()?;
        let pg = Self {
            dir,
            bin,
            port: crate::free_port(),
            as_postgres_user: is_root(),
        };
        pg.chown_to_postgres(pg.dir.path())?;
        let data = pg.data_dir();
        pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        if !also.is_empty() {
            use std::io::Write;
            let mut hba = std::fs::OpenOptions::new()
                .append(true)
                .open(std::path::Path::new(&data).join("pg_hba.conf"))?;
            for ip in also {
                writeln!(hba, "host all all {ip}/30 trust")?;
            }
        }
        Ok(pg)
    }

    fn start_server(&self, also: &[std::net::Ipv4Addr], durable: bool, extra: &str) -> Result<()> {
        let (pg, data) = (self, self.data_dir());
        let listen: Vec<String> = std::iter::once("127.0.0.1".to_string())
            .chain(also.iter().map(|ip| ip.to_string()))
            .collect();
        let fast = if durable {
            ""
        } else {
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        };
        let opts = format!(
            "-p {} -k {} -c listen_addresses={}{fast}{extra} -c max_connections=200",
            pg.port,
            pg.dir.path().display(),
            listen.join(",")
        );
        let log = pg.dir.path().join("postgres.log");
        pg.run(
            "pg_ctl",
            &[
                "-D",
                &data,
                "-o",
                &opts,
                "-l",
                &log.display().to_string(),
                "-w",
                "-t",
                "30",
                "start",
            ],
        )?;
        Ok(())
    }

    fn data_dir(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<()> {
        let exe = self.bin.join(tool);
        let out = if self.as_postgres_user {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&exe)
                .args(args)
                .current_dir(self.dir.path())
                .output()
        } else {
            Command::new(&exe)
                .args(args)
                .current_dir(self.dir.path())
                .output()
        }
        .with_context(|| format!("cannot run {}", exe.display()))?;
        if !out.status.success() {
            bail!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Runs a client tool (`createdb`, `dropdb`) against this server.
    fn client(&self, tool: &str, args: &[&str]) -> Result<()> {
        let port = self.port.to_string();
        let mut all = vec!["-h", "127.0.0.1", "-p", &port, "-U", "postgres"];
        all.extend_from_slice(args);
        self.run(tool, &all)
    }

    /// Drops a database (every connection to it is ended first).
    pub fn drop_database(&self, name: &str) -> Result<()> {
        self.client("dropdb", &["--force", name])
    }

    /// Runs one SQL command in `db` as the superuser.
    pub fn sql(&self, db: &str, command: &str) -> Result<()> {
        self.client("psql", &["-d", db, "-v", "ON_ERROR_STOP=1", "-qc", command])
    }

    /// Creates a database and returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String> {
        self.client("createdb", &[name])?;
        Ok(self.url(name))
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The URL of `db` at another of its addresses.
    pub fn url_at(&self, ip: std::net::Ipv4Addr, db: &str) -> String {
        format!("postgres://postgres@{ip}:{}/{db}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let data = self.data_dir();
        let _ = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }
}
