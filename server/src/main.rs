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
use drizzle_server::session::{serve, SessionRegistry};

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
    Server(ServerArgs),
    /// Start a worker process that joins a server's cluster.
    Worker(WorkerArgs),
    /// Exit 0 when something accepts TCP connections at ADDR (container health checks).
    Healthcheck {
        /// host:port to probe.
        addr: SocketAddr,
    },
    /// Run a benchmark on an embedded engine and print its figures.
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Workload: `ysb` (YSB-lite), `sched` (scheduling overhead per
    /// micro-batch), `recovery` (a worker killed mid-run) or `adaptive`
    /// (the group size under changing load).
    #[arg(default_value = "ysb")]
    workload: String,
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
    /// Task slots: each runs its own task thread and registers as a worker
    /// of its own, on the listen port plus its index (port 0: any free port).
    #[arg(long, env = "DRIZZLE_WORKER_SLOTS", default_value_t = 1)]
    slots: u16,
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
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(run_server(args))
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
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(run_worker(args))
        }
        Command::Bench(args) => run_bench(args),
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

async fn run_server(args: ServerArgs) -> anyhow::Result<()> {
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
    };
    let engine = Engine::open(&args.data_dir, workers, config)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot open data directory {}: {e}",
                args.data_dir.display()
            )
        })?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let registry = Arc::new(SessionRegistry::default());
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
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => {
                    tracing::debug!(%peer, "connection");
                    tokio::spawn(serve(Arc::clone(&engine), Arc::clone(&registry), socket));
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("shutting down");
                engine.runtime.shutdown();
                return Ok(());
            }
        }
    }
}

async fn run_worker(args: WorkerArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data directory {}", args.data_dir.display()))?;
    let classify: drizzle_exec::ErrorClassifier = Arc::new(|e: drizzle_exec::ExecError| {
        let pg = drizzle_server::errors::PgError::from(e);
        (pg.code.to_string(), pg.message)
    });
    let mut slots = Vec::new();
    for i in 0..args.slots.max(1) {
        let mut listen = args.listen;
        if listen.port() != 0 {
            listen.set_port(listen.port().saturating_add(i));
        }
        // An advertised host:port moves with the slot too.
        let advertise = args.advertise.as_ref().map(|a| match a.rsplit_once(':') {
            Some((host, port)) if i > 0 => match port.parse::<u16>() {
                Ok(p) => format!("{host}:{}", p.saturating_add(i)),
                Err(_) => a.clone(),
            },
            _ => a.clone(),
        });
        let worker = drizzle_exec::start_worker(drizzle_exec::WorkerConfig {
            coordinator: args.coordinator.clone(),
            listen,
            advertise,
            classify: Arc::clone(&classify),
        })
        .await
        .map_err(|e| anyhow::anyhow!("cannot start the worker: {e}"))?;
        println!("drizzle worker listening on {}", worker.address);
        tracing::info!(address = %worker.address, coordinator = %args.coordinator, "drizzle worker ready");
        slots.push(worker);
    }
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
