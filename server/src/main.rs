//! The `drizzle` binary: `drizzle server` starts a complete single-machine
//! Drizzle (pgwire front end, coordinator and in-process workers), or the
//! front end and coordinator of a cluster (`--workers 0`); `drizzle worker`
//! joins a cluster as a worker process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use drizzle_server::engine::{Engine, EngineConfig};
use drizzle_server::session::serve;

#[derive(Parser)]
#[command(
    name = "drizzle",
    version,
    about = "Drizzle: a streaming SQL server (micro-batches, group scheduling, Postgres wire protocol)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a server: pgwire front end, coordinator and in-process workers.
    Server(Box<ServerArgs>),
    /// Start a worker process that joins a server's cluster.
    Worker(WorkerArgs),
    /// Exit 0 when something accepts TCP connections at ADDR (container health checks).
    Healthcheck {
        /// host:port to probe.
        addr: SocketAddr,
    },
    /// Run a benchmark on an embedded engine and print its figures.
    Bench(BenchArgs),
    /// Repair a damaged data directory (the server must be stopped): damaged
    /// log frames go to quarantine files and every good frame is kept.
    Repair {
        /// The server's data directory.
        #[arg(long, env = "DRIZZLE_DATA_DIR", default_value = "./drizzle-data")]
        data_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Workload: `ysb` (YSB-lite), `sched` (scheduling overhead per
    /// micro-batch), `sim` (the coordinator's cost with many virtual
    /// workers: `--remote-workers N`), `machine` (the coordinator's
    /// decisions alone: its state machine with N virtual workers and no
    /// network, 10,000 micro-batches), `recovery` (a worker killed mid-run)
    /// `adaptive` (the group size under changing load) or `nexmark` (a
    /// Nexmark query: `--query qN`; throughput over `--events` events, or
    /// live at `--rate` when it is given).
    #[arg(default_value = "ysb")]
    workload: String,
    /// Nexmark: the query (q0 .. q22).
    #[arg(long, default_value = "q0")]
    query: String,
    /// Nexmark throughput: events in the backlog.
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    /// Worker processes to start (0 = in-process workers only).
    #[arg(long, default_value_t = 0)]
    remote_workers: usize,
    /// Scheduling: drizzle, group or bsp.
    #[arg(long, default_value = "drizzle")]
    scheduling: String,
    /// Offered events per second.
    #[arg(long, default_value_t = 1_000_000.0)]
    rate: f64,
    /// Seconds to run (windows are 10 s; use at least 40).
    #[arg(long, default_value_t = 45)]
    seconds: u64,
    /// Micro-batch interval.
    #[arg(long, default_value = "100ms")]
    batch_interval: String,
    /// Workers (default: number of cores).
    #[arg(long)]
    workers: Option<usize>,
    /// Sched: stages of the query (1 to 4; 2 is a GROUP BY over a shuffle).
    #[arg(long, default_value_t = 2)]
    stages: u32,
    /// Group size.
    #[arg(long, default_value_t = 10)]
    group_size: u32,
    /// Print the table header first.
    #[arg(long)]
    header: bool,
    /// YSB window size in seconds.
    #[arg(long, default_value_t = 10)]
    window_seconds: u64,
    /// Recovery: seconds before one worker is killed.
    #[arg(long, default_value_t = 10)]
    kill_after: u64,
    /// Recovery: where the per-batch timeline CSV goes.
    #[arg(long, default_value = "recovery_timeline.csv")]
    timeline: PathBuf,
    /// Recovery: `lost-work` or `rollback`.
    #[arg(long, default_value = "lost-work")]
    recovery: String,
    /// Adaptive: input phases, `<seconds>s@<rows per second>`, comma-separated.
    #[arg(long, default_value = "10s@20000,10s@1000000,15s@20000")]
    phases: String,
}

#[derive(clap::Args)]
struct ServerArgs {
    /// Address the Postgres wire protocol listens on.
    #[arg(long, env = "DRIZZLE_LISTEN", default_value = "127.0.0.1:5433")]
    listen: SocketAddr,
    /// Directory for the catalog, stream logs and table data.
    #[arg(long, env = "DRIZZLE_DATA_DIR", default_value = "./drizzle-data")]
    data_dir: PathBuf,
    /// Number of in-process workers (default: number of cores; 0 = none,
    /// wait for `drizzle worker` processes).
    #[arg(long, env = "DRIZZLE_WORKERS")]
    workers: Option<usize>,
    /// Address the coordinator listens on for workers (port 0 = any free port;
    /// the bound address is printed on stdout).
    #[arg(long, env = "DRIZZLE_CLUSTER_LISTEN", default_value = "127.0.0.1:0")]
    cluster_listen: SocketAddr,
    /// Coordinator address workers are told to use (default: the bound address).
    #[arg(long, env = "DRIZZLE_CLUSTER_ADVERTISE")]
    cluster_advertise: Option<String>,
    /// Default scheduling: `drizzle` (group scheduling with pre-scheduled
    /// shuffles), `bsp` (one micro-batch per launch, coordinator barriers) or
    /// `group` (group launches, coordinator shuffle barriers).
    #[arg(long, env = "DRIZZLE_SCHEDULING", default_value = "drizzle")]
    scheduling: String,
    /// Seconds a query waits for a first worker to register before it fails.
    #[arg(long, env = "DRIZZLE_WORKER_WAIT", default_value_t = 30)]
    worker_wait: u64,
    /// Seconds without a heartbeat after which a worker is declared lost.
    #[arg(long, env = "DRIZZLE_WORKER_TIMEOUT", default_value_t = 10)]
    worker_timeout: u64,
    /// Default micro-batch interval for new queries (e.g. 100ms).
    #[arg(long, env = "DRIZZLE_BATCH_INTERVAL", default_value = "100ms")]
    batch_interval: String,
    /// Default micro-batches per scheduling group: `auto` (adapts to the
    /// measured coordination share) or a fixed number.
    #[arg(long, env = "DRIZZLE_GROUP_SIZE", default_value = "auto")]
    group_size: String,
    /// Adaptive group size: coordination share below which G decreases by 1.
    #[arg(long, env = "DRIZZLE_COORDINATION_LOWER", default_value_t = 0.02)]
    coordination_lower: f64,
    /// Adaptive group size: coordination share above which G doubles.
    #[arg(long, env = "DRIZZLE_COORDINATION_UPPER", default_value_t = 0.05)]
    coordination_upper: f64,
    /// Adaptive group size: the largest G.
    #[arg(long, env = "DRIZZLE_GROUP_SIZE_MAX", default_value_t = 1000)]
    group_size_max: u32,
    /// Checkpoint storage: a directory, or `s3://bucket/prefix` for an
    /// S3-compatible store configured by the AWS_* environment variables
    /// (default: `<data-dir>/checkpoints`).
    #[arg(long, env = "DRIZZLE_CHECKPOINT_LOCATION")]
    checkpoint_location: Option<String>,
    /// Milliseconds between checkpoints (taken at the first group boundary
    /// after the interval).
    #[arg(long, env = "DRIZZLE_CHECKPOINT_INTERVAL_MS", default_value_t = 1000)]
    checkpoint_interval_ms: u64,
    /// What a lost worker costs: `lost-work` re-runs only its partitions
    /// (restored from the last checkpoint on the survivors, which keep
    /// theirs); `rollback` restarts every partition of its queries from the
    /// last checkpoint. BSP and group scheduling always roll back.
    #[arg(long, env = "DRIZZLE_RECOVERY", default_value = "lost-work")]
    recovery: String,
    /// Client authentication: `trust` (any user, no password) or
    /// `scram-sha-256`. Default: trust while --listen is a loopback address,
    /// scram-sha-256 otherwise (a server listening elsewhere without a
    /// password refuses to start).
    #[arg(long, env = "DRIZZLE_AUTH")]
    auth: Option<String>,
    /// The superuser whose password --password-file / DRIZZLE_PASSWORD sets
    /// (created at start if missing).
    #[arg(long, env = "DRIZZLE_SUPERUSER", default_value = "drizzle")]
    superuser: String,
    /// A file holding the superuser's password (its first line).
    #[arg(long, env = "DRIZZLE_PASSWORD_FILE")]
    password_file: Option<PathBuf>,
    /// TLS certificate chain (PEM) for pgwire; with --tls-key, SSLRequest is
    /// answered `S`.
    #[arg(long, env = "DRIZZLE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for pgwire.
    #[arg(long, env = "DRIZZLE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Refuse sessions that do not use TLS.
    #[arg(long, env = "DRIZZLE_TLS_REQUIRED", requires = "tls_cert")]
    tls_required: bool,
    /// A file holding the cluster secret (its first line, 16 characters or
    /// more) that workers must prove they know; DRIZZLE_CLUSTER_SECRET gives
    /// it directly. Without one, a random secret is made at each start and
    /// only in-process workers can join.
    #[arg(long, env = "DRIZZLE_CLUSTER_SECRET_FILE")]
    cluster_secret_file: Option<PathBuf>,
    /// Default memory budget of one query's state (keyed state, join rows,
    /// lookup tables) over all workers, e.g. `512MB`; `unlimited` for none.
    /// Sessions change theirs with `SET query_memory_limit`; materialized
    /// views use this one. A query past it fails with SQLSTATE 53200.
    #[arg(long, env = "DRIZZLE_QUERY_MEMORY_LIMIT", default_value = "1GB")]
    query_memory_limit: String,
    /// Budget of all queries' state together (default: half the machine's
    /// memory); past it, the query holding the most fails with 53200.
    #[arg(long, env = "DRIZZLE_SERVER_MEMORY_LIMIT")]
    server_memory_limit: Option<String>,
}

/// The cluster secret from `file` or DRIZZLE_CLUSTER_SECRET, if any.
fn cluster_secret(
    file: Option<&PathBuf>,
) -> anyhow::Result<Option<drizzle_exec::cluster::ClusterSecret>> {
    let text = match file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --cluster-secret-file {}", path.display()))?
                .lines()
                .next()
                .unwrap_or("")
                .to_string(),
        ),
        None => std::env::var("DRIZZLE_CLUSTER_SECRET")
            .ok()
            .filter(|s| !s.is_empty()),
    };
    text.map(|t| drizzle_exec::cluster::ClusterSecret::new(&t).map_err(|e| anyhow::anyhow!("{e}")))
        .transpose()
}

/// The superuser's password from --password-file or DRIZZLE_PASSWORD.
fn superuser_password(args: &ServerArgs) -> anyhow::Result<Option<String>> {
    if let Some(path) = &args.password_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --password-file {}", path.display()))?;
        let password = text.lines().next().unwrap_or("").to_string();
        if password.is_empty() {
            anyhow::bail!("--password-file {} holds no password", path.display());
        }
        return Ok(Some(password));
    }
    match std::env::var("DRIZZLE_PASSWORD") {
        Ok(p) if !p.is_empty() => Ok(Some(p)),
        _ => Ok(None),
    }
}

/// Client authentication and TLS, checked before anything listens.
fn security(
    args: &ServerArgs,
    engine: &Engine,
) -> anyhow::Result<drizzle_server::session::Security> {
    use drizzle_server::auth::AuthMethod;
    let loopback = args.listen.ip().is_loopback();
    let auth = match &args.auth {
        Some(a) => a
            .parse::<AuthMethod>()
            .map_err(|e| anyhow::anyhow!("--auth: {e}"))?,
        None if loopback => AuthMethod::Trust,
        None => AuthMethod::ScramSha256,
    };
    if let Some(password) = superuser_password(args)? {
        let verifier =
            drizzle_server::auth::make_verifier(&password).map_err(|e| anyhow::anyhow!("{e}"))?;
        engine
            .catalog
            .alter_role(&args.superuser, true, |r| {
                r.superuser = true;
                r.login = true;
                r.verifier = Some(verifier);
            })
            .map_err(|e| anyhow::anyhow!("cannot set the superuser's password: {e}"))?;
    }
    if auth == AuthMethod::ScramSha256
        && !engine
            .catalog
            .roles()
            .iter()
            .any(|(_, r)| r.superuser && r.login && r.verifier.is_some())
    {
        anyhow::bail!(
            "{}: no superuser has a password, so nobody could log in. Set one with \
             DRIZZLE_PASSWORD or --password-file (for the superuser '{}'), or listen on \
             loopback only (--listen 127.0.0.1:5433), where --auth trust is the default",
            if loopback {
                "--auth scram-sha-256".to_string()
            } else {
                format!(
                    "listening on {} (not loopback) requires password authentication",
                    args.listen
                )
            },
            args.superuser
        );
    }
    if auth == AuthMethod::Trust && !loopback {
        tracing::warn!(
            listen = %args.listen,
            "--auth trust on a non-loopback address: anyone who reaches it is a superuser"
        );
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            Some(drizzle_server::tls::load(cert, key).map_err(|e| anyhow::anyhow!("{e}"))?)
        }
        _ => None,
    };
    Ok(drizzle_server::session::Security {
        auth,
        tls,
        tls_required: args.tls_required,
        decoy_key: drizzle_server::auth::random_key(),
    })
}

#[derive(clap::Args)]
struct WorkerArgs {
    /// The server's cluster address (`--cluster-listen` of `drizzle server`).
    #[arg(long, env = "DRIZZLE_COORDINATOR")]
    coordinator: String,
    /// Address this worker listens on (control service and Arrow Flight).
    #[arg(long, env = "DRIZZLE_WORKER_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Address the coordinator and peers use to reach this worker (default: the bound address).
    #[arg(long, env = "DRIZZLE_WORKER_ADVERTISE")]
    advertise: Option<String>,
    /// Directory for this worker's local data.
    #[arg(
        long,
        env = "DRIZZLE_DATA_DIR",
        default_value = "./drizzle-worker-data"
    )]
    data_dir: PathBuf,
    /// Task slots: how many tasks the worker runs at once (default: one
    /// per core).
    #[arg(long, env = "DRIZZLE_WORKER_SLOTS", default_value_t = 0)]
    slots: usize,
    /// A file holding the cluster secret (the server's); DRIZZLE_CLUSTER_SECRET
    /// gives it directly. Required.
    #[arg(long, env = "DRIZZLE_CLUSTER_SECRET_FILE")]
    cluster_secret_file: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Server(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("drizzle-io")
                .thread_stack_size(drizzle_exec::THREAD_STACK_BYTES)
                .build()
                .context("cannot start the async runtime")?;
            let result = runtime.block_on(run_server(*args));
            // Tasks still parked (connections, timers) are not waited for.
            runtime.shutdown_timeout(Duration::from_secs(2));
            result
        }
        Command::Healthcheck { addr } => {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .with_context(|| format!("nothing accepts connections at {addr}"))?;
            Ok(())
        }
        Command::Worker(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("drizzle-io")
                .thread_stack_size(drizzle_exec::THREAD_STACK_BYTES)
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(run_worker(args))
        }
        Command::Bench(args) => run_bench(args),
        Command::Repair { data_dir } => {
            let repaired = drizzle_server::repair::repair(&data_dir)
                .map_err(|e| anyhow::anyhow!("repair of {} failed: {e}", data_dir.display()))?;
            for line in &repaired.lines {
                println!("{line}");
            }
            println!(
                "checked {} log files in {}: {}",
                repaired.logs_checked,
                data_dir.display(),
                if repaired.lines.is_empty() {
                    "nothing to repair"
                } else {
                    "repaired"
                }
            );
            Ok(())
        }
    }
}

/// `drizzle bench WORKLOAD`: runs one benchmark on an embedded engine and
/// prints its line of figures.
fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    use drizzle_server::bench;
    let scheduling: drizzle_exec::Scheduling = args
        .scheduling
        .parse()
        .map_err(|e| anyhow::anyhow!("--scheduling: {e}"))?;
    let batch_interval = Duration::from_micros(
        drizzle_planner::statement::parse_duration_setting_us(&args.batch_interval)
            .map_err(|e| anyhow::anyhow!("--batch-interval: {e}"))?,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(bench::COORDINATOR_THREADS)
        .thread_stack_size(drizzle_exec::THREAD_STACK_BYTES)
        .build()
        .context("cannot start the async runtime")?;
    let ysb = |workers: usize, remote_workers: usize| bench::YsbConfig {
        rate: args.rate,
        duration: Duration::from_secs(args.seconds),
        batch_interval,
        workers,
        group_size: args.group_size,
        remote_workers,
        scheduling,
        window_seconds: args.window_seconds,
    };
    let line = match args.workload.as_str() {
        "sched" => {
            if args.header {
                println!("{}", bench::sched_header());
            }
            runtime.block_on(bench::run_sched(bench::SchedConfig {
                workers: args.remote_workers.max(1),
                scheduling,
                group_size: args.group_size,
                duration: Duration::from_secs(args.seconds),
                stages: args.stages,
            }))
        }
        "nexmark" => {
            // The rate's default is YSB's; for Nexmark only an explicit
            // --rate means a live run.
            let live = std::env::args().any(|a| a == "--rate" || a.starts_with("--rate="));
            if args.header {
                println!(
                    "{}",
                    if live {
                        bench::nexmark::live_header()
                    } else {
                        bench::nexmark::throughput_header()
                    }
                );
            }
            runtime.block_on(bench::nexmark::run_nexmark(bench::nexmark::NexmarkConfig {
                query: args.query.clone(),
                rate: if live { args.rate } else { 0.0 },
                events: args.events,
                duration: Duration::from_secs(args.seconds),
                batch_interval,
                group_size: args.group_size,
                workers: args
                    .workers
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
            }))
        }
        "machine" => {
            if args.header {
                println!("{}", bench::machine_header());
            }
            bench::run_machine(
                args.remote_workers.max(1),
                args.stages,
                scheduling,
                args.group_size,
            )
        }
        "sim" => {
            if args.header {
                println!("{}", bench::sim_header());
            }
            runtime.block_on(bench::run_sim(bench::SimConfig {
                workers: args.remote_workers.max(1),
                scheduling,
                group_size: args.group_size,
                duration: Duration::from_secs(args.seconds),
                stages: args.stages,
            }))
        }
        "recovery" => {
            let remote = args.remote_workers.max(2);
            runtime.block_on(bench::run_recovery(bench::RecoveryConfig {
                ysb: ysb(remote, remote),
                kill_after: Duration::from_secs(args.kill_after),
                timeline: args.timeline.clone(),
                recovery: args
                    .recovery
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--recovery: {e}"))?,
            }))
        }
        "adaptive" => runtime.block_on(bench::run_adaptive(bench::AdaptiveConfig {
            phases: bench::parse_phases(&args.phases)
                .map_err(|e| anyhow::anyhow!("--phases: {e}"))?,
            batch_interval,
            remote_workers: args.remote_workers.max(1),
            timeline: args.timeline.clone(),
        })),
        "ysb" => {
            if args.header {
                println!("{}", bench::header());
            }
            let workers = args.workers.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2)
            });
            runtime.block_on(bench::run_ysb(ysb(workers, args.remote_workers)))
        }
        other => anyhow::bail!("unknown workload {other} (try ysb, sched, recovery or adaptive)"),
    }
    .map_err(|e| anyhow::anyhow!("benchmark failed: {e}"))?;
    println!("{line}");
    Ok(())
}

/// Raises the soft limit on open file descriptors to the hard limit: logs
/// keep a descriptor per partition, and sessions and cluster connections one
/// each.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        let before = limit.rlim_cur;
        let target = limit.rlim_max.min(1 << 20);
        if limit.rlim_cur < target {
            limit.rlim_cur = target;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                tracing::debug!(
                    from = before,
                    to = limit.rlim_cur,
                    "raised the descriptor limit"
                );
            }
        }
    }
}

async fn run_server(args: ServerArgs) -> anyhow::Result<()> {
    raise_fd_limit();
    let workers = args.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let interval_us = drizzle_planner::statement::parse_duration_setting_us(&args.batch_interval)
        .map_err(|e| anyhow::anyhow!("--batch-interval: {e}"))?;
    let scheduling: drizzle_exec::Scheduling = args
        .scheduling
        .parse()
        .map_err(|e| anyhow::anyhow!("--scheduling: {e}"))?;
    let group_size = if args.group_size.eq_ignore_ascii_case("auto") {
        0
    } else {
        args.group_size
            .parse::<u32>()
            .ok()
            .filter(|g| (1..=10_000).contains(g))
            .ok_or_else(|| anyhow::anyhow!("--group-size: 'auto' or a number from 1 to 10000"))?
    };
    if !(0.0..1.0).contains(&args.coordination_lower)
        || !(args.coordination_lower..=1.0).contains(&args.coordination_upper)
    {
        anyhow::bail!("--coordination-lower/--coordination-upper: need 0 <= lower <= upper <= 1");
    }
    let config = EngineConfig {
        batch_interval: Duration::from_micros(interval_us),
        group_size,
        adaptive: drizzle_exec::AdaptiveGroupSize {
            lower: args.coordination_lower,
            upper: args.coordination_upper,
            max: args.group_size_max.max(1),
        },
        parallelism: 0,
        scheduling,
        cluster_listen: args.cluster_listen,
        cluster_advertise: args.cluster_advertise.clone(),
        worker_wait: Duration::from_secs(args.worker_wait),
        worker_timeout: Duration::from_secs(args.worker_timeout.max(1)),
        checkpoint_location: args.checkpoint_location.clone(),
        checkpoint_interval: Duration::from_millis(args.checkpoint_interval_ms.max(1)),
        recovery: args
            .recovery
            .parse()
            .map_err(|e| anyhow::anyhow!("--recovery: {e}"))?,
        cluster_secret: match cluster_secret(args.cluster_secret_file.as_ref())? {
            Some(secret) => secret,
            None if workers == 0 => anyhow::bail!(
                "--workers 0 waits for worker processes, which must prove they belong to this \
                 cluster: give the server and every worker the same secret with \
                 --cluster-secret-file or DRIZZLE_CLUSTER_SECRET"
            ),
            None => drizzle_exec::cluster::ClusterSecret::random(),
        },
        query_memory_limit: drizzle_server::engine::parse_memory_size(&args.query_memory_limit)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "--query-memory-limit {:?}: give a size such as 512MB or 2GB, or unlimited",
                    args.query_memory_limit
                )
            })?,
        server_memory_limit: match &args.server_memory_limit {
            Some(v) => drizzle_server::engine::parse_memory_size(v).ok_or_else(|| {
                anyhow::anyhow!(
                    "--server-memory-limit {v:?}: give a size such as 8GB, or unlimited"
                )
            })?,
            None => drizzle_server::engine::default_server_memory_limit(),
        },
    };
    let engine = Engine::open(&args.data_dir, workers, config)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot open data directory {}: {e}",
                args.data_dir.display()
            )
        })?;
    let security = Arc::new(security(&args, &engine)?);
    tracing::info!(auth = ?security.auth, tls = security.tls.is_some(), "client authentication");
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let registry = Arc::clone(&engine.sessions);
    let bound = listener.local_addr().unwrap_or(args.listen);
    // One line on stdout with the bound address (useful with --listen 127.0.0.1:0).
    println!(
        "drizzle cluster endpoint on {}",
        engine.runtime.cluster_address
    );
    println!("drizzle listening on {bound}");
    tracing::info!(
        listen = %listener.local_addr().unwrap_or(args.listen),
        data_dir = %args.data_dir.display(),
        workers,
        "drizzle server ready"
    );
    let mut signals = Signals::new()?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => {
                    tracing::debug!(%peer, "connection");
                    tokio::spawn(serve(
                        Arc::clone(&engine),
                        Arc::clone(&registry),
                        Arc::clone(&security),
                        socket,
                    ));
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            signal = signals.next() => {
                tracing::warn!("{signal}: shutting down (a second signal exits at once)");
                break;
            }
        }
    }
    // Graceful shutdown: accept nothing more; sessions finish the statement
    // they run (an INSERT or COPY is acknowledged), then get 57P01, and a
    // running continuous query ends with 57P01; views keep their durable
    // output logs and checkpoints and resume at the next start.
    drop(listener);
    registry.begin_shutdown();
    let deadline = tokio::time::Instant::now() + SHUTDOWN_TIMEOUT;
    loop {
        let open = registry.open_sessions();
        if open == 0 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            tracing::warn!(
                open,
                "sessions still open after {SHUTDOWN_TIMEOUT:?}: closing anyway"
            );
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            signal = signals.next() => {
                tracing::warn!("{signal} again: exiting now");
                std::process::exit(1);
            }
        }
    }
    engine.runtime.shutdown();
    tracing::warn!("drizzle server stopped");
    Ok(())
}

/// How long a shutdown waits for sessions to finish their statements.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// SIGINT and SIGTERM.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?,
        })
    }

    /// The next signal's name.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

async fn run_worker(args: WorkerArgs) -> anyhow::Result<()> {
    raise_fd_limit();
    let secret = cluster_secret(args.cluster_secret_file.as_ref())?.ok_or_else(|| {
        anyhow::anyhow!(
            "a worker needs the cluster secret of its server: --cluster-secret-file or \
             DRIZZLE_CLUSTER_SECRET"
        )
    })?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data directory {}", args.data_dir.display()))?;
    let classify: drizzle_exec::ErrorClassifier = Arc::new(|e: drizzle_exec::ExecError| {
        let pg = drizzle_server::errors::PgError::from(e);
        (pg.code.to_string(), pg.message)
    });
    let worker = drizzle_exec::start_worker(drizzle_exec::WorkerConfig {
        coordinator: args.coordinator.clone(),
        listen: args.listen,
        advertise: args.advertise.clone(),
        classify: Arc::clone(&classify),
        cluster_secret: secret.clone(),
        slots: args.slots,
    })
    .await
    .map_err(|e| anyhow::anyhow!("cannot start the worker: {e}"))?;
    println!("drizzle worker listening on {}", worker.address);
    tracing::info!(address = %worker.address, coordinator = %args.coordinator, "drizzle worker ready");
    let slots = vec![worker];
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let any_stopped = futures::future::select_all(slots.iter().map(|w| Box::pin(w.stopped())));
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {
            // Drain: the coordinator moves this worker's partitions to the
            // others at the next group boundary (state through a checkpoint),
            // then lets it go; no failure recovery needed.
            tracing::info!("SIGTERM: draining");
            let drains = slots.iter().map(|w| w.drain());
            for r in futures::future::join_all(drains).await {
                if let Err(e) = r {
                    tracing::warn!("drain: {e}");
                }
            }
            println!("drizzle worker drained");
        }
        _ = any_stopped => {}
    }
    tracing::info!("worker shutting down");
    for w in &slots {
        w.shutdown();
    }
    Ok(())
}
