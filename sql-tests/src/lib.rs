//! # drizzle-sql-tests: test support that drives the real server
//!
//! Where it sits: outside the system, as a client. [`TestServer`] starts the
//! real `drizzle` binary on a free loopback port with a temporary data
//! directory and waits (bounded) until it accepts connections; [`SltClient`]
//! adapts a `tokio-postgres` connection to the `sqllogictest` runner, so every
//! `.slt` file under `slt/` runs through the real Postgres wire protocol.
//!
//! Types to read first: [`TestServer`], [`SltClient`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The cluster secret every server and worker started here shares.
pub const TEST_CLUSTER_SECRET: &str = "drizzle test cluster secret";

/// Locates the `drizzle` binary: `$DRIZZLE_BIN`, else `target/<profile>/drizzle`
/// next to the running test executable.
pub fn drizzle_bin() -> PathBuf {
    if let Ok(p) = std::env::var("DRIZZLE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/debug/deps/test-xxxx → target/debug/drizzle
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("drizzle"))
        .unwrap_or_else(|| PathBuf::from("drizzle"))
}

/// A running `drizzle server` process on loopback.
pub struct TestServer {
    child: Option<Child>,
    /// Its pgwire port.
    pub port: u16,
    /// Its coordinator's cluster address (`host:port`), for workers.
    pub cluster_address: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    bin: PathBuf,
    args: Vec<String>,
}

impl TestServer {
    /// Starts a server with a fresh data directory.
    pub fn start(bin: &Path, extra_args: &[&str]) -> anyhow::Result<Self> {
        let tmp = tempfile::tempdir()?;
        let data_dir = tmp.path().to_path_buf();
        let mut server = Self {
            child: None,
            port: 0,
            cluster_address: String::new(),
            data_dir,
            _tmp: Some(tmp),
            bin: bin.to_path_buf(),
            args: extra_args.iter().map(|s| s.to_string()).collect(),
        };
        server.spawn()?;
        Ok(server)
    }

    /// Starts a server on a data directory the caller owns (its log is
    /// `<data_dir>.log`, beside it).
    pub fn start_in(bin: &Path, data_dir: &Path, extra_args: &[&str]) -> anyhow::Result<Self> {
        let mut server = Self {
            child: None,
            port: 0,
            cluster_address: String::new(),
            data_dir: data_dir.to_path_buf(),
            _tmp: None,
            bin: bin.to_path_buf(),
            args: extra_args.iter().map(|s| s.to_string()).collect(),
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.with_extension("log"))?;
        let port = format!("127.0.0.1:{}", self.port);
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--listen".as_ref(),
            port.as_ref(),
            "--data-dir".as_ref(),
            self.data_dir.as_os_str(),
        ];
        // A restarted server keeps its cluster address, so its workers
        // find it again.
        let mut extra = self.args.clone();
        if !self.cluster_address.is_empty() {
            if let Some(i) = extra.iter().position(|a| a == "--cluster-listen") {
                if let Some(v) = extra.get_mut(i + 1) {
                    *v = self.cluster_address.clone();
                }
            }
        }
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        let mut child = spawn_drizzle(&self.bin, "server", &args, log)?;
        // The server prints "drizzle cluster endpoint on ADDR" and then
        // "drizzle listening on ADDR" once bound (port 0 = any free port).
        let lines = read_stdout_lines(&mut child, 2);
        self.child = Some(child);
        let lines = match lines.recv_timeout(Duration::from_secs(60)) {
            Ok(lines) => lines,
            Err(_) => anyhow::bail!("server did not report its address: {}", self.log()),
        };
        self.cluster_address = address_after(&lines[0], "drizzle cluster endpoint on ")?;
        let listen = address_after(&lines[1], "drizzle listening on ")?;
        self.port = listen
            .rsplit(':')
            .next()
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| anyhow::anyhow!("unexpected line from server: {}", lines[1]))?;
        self.wait_ready(Duration::from_secs(30))
    }

    /// The server's log so far (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    anyhow::bail!("server exited with {status}: {}", self.log());
                }
            }
            if Instant::now() > deadline {
                anyhow::bail!("server did not listen within {timeout:?}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A libpq-style connection string.
    pub fn conn_str(&self) -> String {
        format!("host=127.0.0.1 port={} user=test dbname=drizzle", self.port)
    }

    /// Connects with tokio-postgres; the connection task is spawned.
    pub async fn client(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (client, conn) =
            tokio_postgres::connect(&self.conn_str(), tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// `kill -9` the server.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and data directory.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn()
    }

    /// Waits (bounded) for the server process to exit; its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        wait_child_exit(&mut self.child, timeout, "the server")
    }

    /// The server process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Starts `drizzle <subcommand> <args>` with stdout piped and stderr to `log`.
fn spawn_drizzle(
    bin: &Path,
    subcommand: &str,
    args: &[&std::ffi::OsStr],
    log: std::fs::File,
) -> anyhow::Result<Child> {
    Command::new(bin)
        .arg(subcommand)
        .args(args)
        // Servers and workers of a test cluster share this secret.
        .env("DRIZZLE_CLUSTER_SECRET", TEST_CLUSTER_SECRET)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", bin.display()))
}

/// Waits (bounded) for a child process to exit; its status.
fn wait_child_exit(
    slot: &mut Option<Child>,
    timeout: Duration,
    what: &str,
) -> anyhow::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    let child = slot
        .as_mut()
        .ok_or_else(|| anyhow::anyhow!("{what} is not running"))?;
    loop {
        if let Some(status) = child.try_wait()? {
            *slot = None;
            return Ok(status);
        }
        if Instant::now() > deadline {
            anyhow::bail!("{what} did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Collects the first `n` stdout lines of `child` on a thread (which keeps
/// draining the pipe afterwards, so the child never blocks on it).
fn read_stdout_lines(child: &mut Child, n: usize) -> std::sync::mpsc::Receiver<Vec<String>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let Some(stdout) = child.stdout.take() else {
        return rx;
    };
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stdout).lines();
        let mut first = Vec::new();
        for line in lines.by_ref() {
            match line {
                Ok(l) => first.push(l),
                Err(_) => return,
            }
            if first.len() == n {
                let _ = tx.send(std::mem::take(&mut first));
                break;
            }
        }
        for _ in lines {}
    });
    rx
}

fn address_after(line: &str, prefix: &str) -> anyhow::Result<String> {
    line.strip_prefix(prefix)
        .map(|a| a.trim().to_string())
        .ok_or_else(|| anyhow::anyhow!("expected '{prefix}ADDR' from the process, got '{line}'"))
}

/// A running `drizzle worker` process on loopback.
pub struct TestWorker {
    child: Option<Child>,
    /// Its control and Flight address.
    pub address: String,
    log_path: PathBuf,
}

impl TestWorker {
    /// Starts a worker that registers with `coordinator`; returns once it
    /// registered (the worker prints its address after registration).
    pub fn start(bin: &Path, coordinator: &str, data_dir: &Path) -> anyhow::Result<Self> {
        Self::start_at(bin, coordinator, data_dir, "127.0.0.1:0")
    }

    /// Like [`TestWorker::start`], listening on `listen` (a fixed port, to
    /// come back at the same address).
    pub fn start_at(
        bin: &Path,
        coordinator: &str,
        data_dir: &Path,
        listen: &str,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        let log_path = data_dir.with_extension("log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let args: [&std::ffi::OsStr; 6] = [
            "--coordinator".as_ref(),
            coordinator.as_ref(),
            "--listen".as_ref(),
            listen.as_ref(),
            "--data-dir".as_ref(),
            data_dir.as_os_str(),
        ];
        let mut child = spawn_drizzle(bin, "worker", &args, log)?;
        let lines = read_stdout_lines(&mut child, 1);
        let mut worker = Self {
            child: Some(child),
            address: String::new(),
            log_path,
        };
        let line = match lines.recv_timeout(Duration::from_secs(60)) {
            Ok(mut l) => l.remove(0),
            Err(_) => anyhow::bail!("worker did not register: {}", worker.log()),
        };
        worker.address = address_after(&line, "drizzle worker listening on ")?;
        Ok(worker)
    }

    /// The worker's log so far (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `kill -9` the worker.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM (a drain request).
    pub fn sigterm(&self) -> anyhow::Result<()> {
        self.signal("TERM")
    }

    /// Freezes the process (SIGSTOP): its connections stay open but nothing
    /// answers, as with a network partition.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal("STOP")
    }

    /// Thaws a paused process (SIGCONT).
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal("CONT")
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .child
            .as_ref()
            .map(Child::id)
            .ok_or_else(|| anyhow::anyhow!("the worker is not running"))?;
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} {pid} failed");
        Ok(())
    }

    /// Waits (bounded) for the process to exit; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        wait_child_exit(&mut self.child, timeout, "the worker")
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One `drizzle server --workers 0` and `n` `drizzle worker` processes.
pub struct TestCluster {
    /// The server (front end and coordinator).
    pub server: TestServer,
    /// The worker processes.
    pub workers: Vec<TestWorker>,
}

impl TestCluster {
    /// Starts the server, then `n` workers registered with it.
    pub fn start(bin: &Path, n: usize, server_args: &[&str]) -> anyhow::Result<Self> {
        let mut args = vec!["--workers", "0", "--cluster-listen", "127.0.0.1:0"];
        args.extend_from_slice(server_args);
        let server = TestServer::start(bin, &args)?;
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let dir = server.data_dir.with_extension(format!("worker{i}"));
            workers.push(TestWorker::start(bin, &server.cluster_address, &dir)?);
        }
        Ok(Self { server, workers })
    }

    /// Starts one more worker registered with the server.
    pub fn add_worker(&mut self, bin: &Path) -> anyhow::Result<&mut TestWorker> {
        let dir = self
            .server
            .data_dir
            .with_extension(format!("worker{}", self.workers.len()));
        self.workers
            .push(TestWorker::start(bin, &self.server.cluster_address, &dir)?);
        let n = self.workers.len();
        Ok(&mut self.workers[n - 1])
    }

    /// The server's and every worker's log.
    pub fn logs(&self) -> String {
        let mut out = format!("--- server ---\n{}", self.server.log());
        for (i, w) in self.workers.iter().enumerate() {
            out.push_str(&format!(
                "\n--- worker {i} ({}) ---\n{}",
                w.address,
                w.log()
            ));
        }
        out
    }
}

/// The data rows of a simple-query reply, columns joined by `|` (NULL as `NULL`).
pub fn rows(msgs: &[tokio_postgres::SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL"))
                    .collect::<Vec<_>>()
                    .join("|"),
            ),
            _ => None,
        })
        .collect()
}

/// Every row of a `SHOW` command (or any query), as column name → value.
pub async fn show(
    client: &tokio_postgres::Client,
    what: &str,
) -> anyhow::Result<Vec<std::collections::HashMap<String, String>>> {
    let mut out = Vec::new();
    for m in client.simple_query(what).await? {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            let mut row = std::collections::HashMap::new();
            for (i, c) in r.columns().iter().enumerate() {
                row.insert(c.name().to_string(), r.get(i).unwrap_or("").to_string());
            }
            out.push(row);
        }
    }
    Ok(out)
}

/// Polls `f` until it returns `Some`, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() > deadline {
            anyhow::bail!("condition not met within {timeout:?}; last error: {last_err:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A sqllogictest database over one tokio-postgres connection.
pub struct SltClient {
    client: tokio_postgres::Client,
    /// Bound on any one statement (continuous queries must end by LIMIT).
    pub timeout: Duration,
}

/// A statement error with its SQLSTATE in the message (`statement error 42P01`).
#[derive(Debug)]
pub struct SltError(pub String);

impl std::fmt::Display for SltError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SltError {}

impl SltClient {
    /// Wraps a connection.
    pub fn new(client: tokio_postgres::Client) -> Self {
        Self {
            client,
            timeout: Duration::from_secs(30),
        }
    }
}

#[async_trait::async_trait]
impl sqllogictest::AsyncDB for SltClient {
    type Error = SltError;
    type ColumnType = sqllogictest::DefaultColumnType;

    async fn run(
        &mut self,
        sql: &str,
    ) -> Result<sqllogictest::DBOutput<Self::ColumnType>, Self::Error> {
        use tokio_postgres::SimpleQueryMessage as M;
        let fut = self.client.simple_query(sql);
        let messages = match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => {
                return Err(SltError(format!(
                    "timed out after {:?}: {sql}",
                    self.timeout
                )))
            }
            Ok(Err(e)) => {
                let msg = match e.as_db_error() {
                    Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
                    None => e.to_string(),
                };
                return Err(SltError(msg));
            }
            Ok(Ok(m)) => m,
        };
        let mut rows = Vec::new();
        let mut width = None;
        let mut count = 0;
        for m in messages {
            match m {
                M::RowDescription(d) => width = Some(d.len()),
                M::Row(r) => {
                    width = Some(r.len());
                    rows.push(
                        (0..r.len())
                            .map(|i| match r.get(i) {
                                None => "NULL".to_string(),
                                Some("") => "(empty)".to_string(),
                                Some(v) => v.to_string(),
                            })
                            .collect(),
                    );
                }
                M::CommandComplete(n) => count = n,
                _ => {}
            }
        }
        match width {
            Some(w) => Ok(sqllogictest::DBOutput::Rows {
                types: vec![sqllogictest::DefaultColumnType::Any; w],
                rows,
            }),
            None => Ok(sqllogictest::DBOutput::StatementComplete(count)),
        }
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "drizzle"
    }

    async fn sleep(dur: Duration) {
        tokio::time::sleep(dur).await;
    }
}

/// Debian's PostgreSQL JDBC driver (`scripts/test.sh` installs it).
pub const JDBC_JAR: &str = "/usr/share/java/postgresql.jar";

/// Compiles a Java client against the JDBC driver with the JDK's javac;
/// returns the directory holding its classes.
pub fn compile_java(source: &Path) -> tempfile::TempDir {
    let classes = tempfile::tempdir().expect("a temporary directory");
    let javac = Command::new("javac")
        .args(["-cp", JDBC_JAR, "-d"])
        .arg(classes.path())
        .arg(source)
        .output()
        .expect("javac runs (scripts/test.sh installs a JDK)");
    assert!(
        javac.status.success() && Path::new(JDBC_JAR).exists(),
        "javac: {}",
        String::from_utf8_lossy(&javac.stderr)
    );
    classes
}
