//! The Docker compose cluster (`docker/compose.yml`): builds the image from
//! local material (`docker/build-local-image.sh`, no registry), brings up one
//! server and three workers, and drives it through `psql`:
//!
//! - a continuous query and a materialized view computed by the workers;
//! - failures: one worker container is killed (`docker kill`) and another is
//!   cut off (`docker network disconnect`) while a view is fed; the view must
//!   end equal to a record-at-a-time model of the input (nothing lost, nothing
//!   counted twice) and the server must stay small.
//!
//! Every docker call is bounded by `timeout`. Skipped, with a message saying
//! so, when `docker info` fails or no Compose tool is installed. The two tests
//! take turns (one cluster at a time).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One compose cluster at a time.
static CLUSTERS: Mutex<()> = Mutex::new(());

/// The superuser's password the test cluster is started with.
const COMPOSE_PASSWORD: &str = "compose test password";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// `program args...` under `timeout`: a wedged Docker daemon must not hang
/// the test run.
fn bounded(seconds: u32, program: &str) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args([&seconds.to_string(), program]);
    cmd
}

/// `docker compose` (v2) or `docker-compose` (v1), whichever works.
fn compose_tool() -> Option<Vec<String>> {
    let v2 = Command::new("docker").args(["compose", "version"]).output();
    if v2.is_ok_and(|o| o.status.success()) {
        return Some(vec!["docker".into(), "compose".into()]);
    }
    let v1 = Command::new("docker-compose").arg("version").output();
    if v1.is_ok_and(|o| o.status.success()) {
        return Some(vec!["docker-compose".into()]);
    }
    None
}

struct Cluster {
    tool: Vec<String>,
    project: String,
    port: u16,
    worker_timeout: u32,
}

impl Cluster {
    fn compose(&self, args: &[&str]) -> Output {
        let mut cmd = bounded(300, &self.tool[0]);
        cmd.args(&self.tool[1..])
            .arg("-f")
            .arg(root().join("docker/compose.yml"))
            .args(["-p", &self.project])
            .args(args)
            .env("DRIZZLE_PG_PORT", self.port.to_string())
            .env("DRIZZLE_PASSWORD", COMPOSE_PASSWORD)
            .env("DRIZZLE_CLUSTER_SECRET", "compose test cluster secret")
            .env("DRIZZLE_WORKER_TIMEOUT", self.worker_timeout.to_string());
        run(&mut cmd)
    }

    /// `docker <args>`, bounded.
    fn docker(&self, args: &[&str]) -> Output {
        run(bounded(60, "docker").args(args))
    }

    /// The container id of a compose service.
    fn container(&self, service: &str) -> String {
        stdout(&self.compose(&["ps", "-q", service]))
    }

    fn psql_cmd(&self) -> Command {
        let mut cmd = bounded(60, "psql");
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "drizzle",
            "-X",
            "-A",
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .env("PGPASSWORD", COMPOSE_PASSWORD);
        cmd
    }

    fn psql(&self, sql: &str) -> Output {
        run(self.psql_cmd().args(["-t", "-c", sql]))
    }

    /// Rows of a SHOW command by column name (None if it failed).
    fn show(&self, sql: &str) -> Option<Vec<HashMap<String, String>>> {
        let out = run(self.psql_cmd().args(["-P", "footer=off", "-c", sql]));
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = text.lines();
        let header: Vec<String> = lines.next()?.split('|').map(str::to_string).collect();
        Some(
            lines
                .map(|l| {
                    header
                        .iter()
                        .cloned()
                        .zip(l.split('|').map(str::to_string))
                        .collect()
                })
                .collect(),
        )
    }

    fn logs(&self) -> String {
        let out = self.compose(&["logs", "--no-color"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.compose(&["down", "-v", "--remove-orphans"]);
    }
}

fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Builds the image and brings a cluster up with three registered workers;
/// None (after saying why) when Docker or Compose is missing.
fn start_cluster(test: &str, worker_timeout: u32) -> Option<Cluster> {
    match bounded(30, "docker").arg("info").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            println!(
                "SKIPPED {test}: `docker info` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return None;
        }
        Err(e) => {
            println!("SKIPPED {test}: no docker ({e})");
            return None;
        }
    }
    let Some(tool) = compose_tool() else {
        println!("SKIPPED {test}: neither `docker compose` nor `docker-compose` works");
        return None;
    };
    // The image, from the binary this test run built (no registry needed).
    let built = run(bounded(
        300,
        &root().join("docker/build-local-image.sh").to_string_lossy(),
    )
    .env("DRIZZLE_BIN", env!("CARGO_BIN_EXE_drizzle")));
    assert!(
        built.status.success(),
        "build-local-image.sh failed: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let cluster = Cluster {
        tool,
        project: format!("drizzle-test-{}-{test}", std::process::id()).replace('_', "-"),
        port,
        worker_timeout,
    };
    let up = cluster.compose(&["up", "-d"]);
    assert!(
        up.status.success(),
        "compose up failed: {}\n{}",
        String::from_utf8_lossy(&up.stderr),
        cluster.logs()
    );
    let workers = wait_for(Duration::from_secs(90), || {
        let out = cluster.psql("SELECT 1; SHOW WORKERS");
        let rows = stdout(&out);
        (out.status.success() && rows.lines().count() == 4).then_some(rows)
    });
    assert!(
        workers.is_some(),
        "three workers registered:\n{}",
        cluster.logs()
    );
    Some(cluster)
}

#[test]
fn compose_cluster_runs_queries_and_views() {
    let _turn = CLUSTERS.lock().unwrap_or_else(|e| e.into_inner());
    let Some(cluster) = start_cluster("queries", 10) else {
        return;
    };
    let ok = cluster.psql(
        "CREATE STREAM ev (k BIGINT, v BIGINT); \
         CREATE MATERIALIZED VIEW totals AS SELECT k, sum(v) AS total, count(*) AS n FROM ev GROUP BY k; \
         INSERT INTO ev VALUES (1, 10), (2, 20), (1, 5), (3, 1), (2, 2)",
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // A continuous query through psql: ends by LIMIT.
    let out = cluster.psql("SELECT k, v * 2 AS doubled FROM ev WHERE k < 3 LIMIT 4");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout(&out), "1|20\n2|40\n1|10\n2|4");
    // The view, computed by the three workers.
    let view = wait_for(Duration::from_secs(30), || {
        let out = cluster.psql("SELECT k, total, n FROM totals ORDER BY k");
        let rows = stdout(&out);
        (rows == "1|15|2\n2|22|2\n3|1|1").then_some(rows)
    });
    assert!(
        view.is_some(),
        "view totals: {}\n{}",
        stdout(&cluster.psql("SELECT k, total, n FROM totals ORDER BY k")),
        cluster.logs()
    );
    let shown = stdout(&cluster.psql("SHOW WORKERS"));
    assert!(
        shown.lines().filter(|l| l.contains(":7100")).count() == 3,
        "{shown}"
    );
}

/// Bytes from a `docker stats` size such as `123.4MiB`.
fn bytes(size: &str) -> Option<f64> {
    let size = size.trim();
    let split = size.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = size.split_at(split);
    let scale = match unit {
        "B" => 1.0,
        "KiB" | "kB" => 1024.0,
        "MiB" | "MB" => 1024.0 * 1024.0,
        "GiB" | "GB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(n.trim().parse::<f64>().ok()? * scale)
}

#[test]
fn compose_cluster_survives_a_killed_and_a_disconnected_worker() {
    let _turn = CLUSTERS.lock().unwrap_or_else(|e| e.into_inner());
    // Lost workers are declared after 3 s without a heartbeat.
    let Some(cluster) = start_cluster("failures", 3) else {
        return;
    };
    let ok = cluster.psql(
        "SET batch_interval = '50ms'; \
         CREATE STREAM f (k BIGINT, v BIGINT) WITH (partitions = 3); \
         CREATE MATERIALIZED VIEW per_k AS SELECT k, count(*) AS n, sum(v) AS s FROM f GROUP BY k",
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // The oracle: the view's rows computed record at a time.
    let mut model: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    let checkpointed = || {
        cluster.show("SHOW QUERIES").and_then(|q| {
            q.iter()
                .all(|r| r.get("checkpoint_batch").is_some_and(|b| !b.is_empty()))
                .then_some(())
        })
    };
    const ROUNDS: i64 = 12;
    const ROWS: i64 = 20;
    for round in 0..ROUNDS {
        if round == 4 || round == 8 {
            // Faults strike once the view has a checkpoint to recover from.
            assert!(
                wait_for(Duration::from_secs(60), checkpointed).is_some(),
                "no checkpoint: {:?}\n{}",
                cluster.show("SHOW QUERIES"),
                cluster.logs()
            );
        }
        if round == 4 {
            let id = cluster.container("worker2");
            let out = cluster.docker(&["kill", &id]);
            assert!(
                out.status.success(),
                "docker kill: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            println!("killed worker2 before round {round}");
        }
        if round == 8 {
            let id = cluster.container("worker3");
            let network = format!("{}_drizzle", cluster.project);
            let out = cluster.docker(&["network", "disconnect", "--force", &network, &id]);
            assert!(
                out.status.success(),
                "docker network disconnect: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            println!("disconnected worker3 before round {round}");
        }
        let values: Vec<String> = (0..ROWS)
            .map(|j| {
                let n = round * ROWS + j;
                let (k, v) = (n % 7, n);
                let e = model.entry(k).or_default();
                e.0 += 1;
                e.1 += v;
                format!("({k}, {v})")
            })
            .collect();
        let out = cluster.psql(&format!("INSERT INTO f VALUES {}", values.join(", ")));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The input arrives over time (a workload, not a wait).
        std::thread::sleep(Duration::from_millis(300));
    }
    let expected: Vec<String> = model
        .iter()
        .map(|(k, (n, s))| format!("{k}|{n}|{s}"))
        .collect();
    let expected = expected.join("\n");
    let view = wait_for(Duration::from_secs(120), || {
        let out = cluster.psql("SELECT k, n, s FROM per_k ORDER BY k");
        let rows = stdout(&out);
        (rows == expected).then_some(rows)
    });
    assert!(
        view.is_some(),
        "view per_k after the failures:\n{}\nexpected:\n{expected}\nqueries: {:?}\n{}",
        stdout(&cluster.psql("SELECT k, n, s FROM per_k ORDER BY k")),
        cluster.show("SHOW QUERIES"),
        cluster.logs()
    );
    let queries = cluster.show("SHOW QUERIES").unwrap_or_default();
    assert!(
        queries
            .iter()
            .all(|q| q.get("recoveries").and_then(|r| r.parse::<u64>().ok()) >= Some(1)),
        "the view recovered: {queries:?}"
    );
    // Recovery did not cost the server its memory (bounded buffering).
    let stats = cluster.docker(&[
        "stats",
        "--no-stream",
        "--format",
        "{{.MemUsage}}",
        &cluster.container("server"),
    ]);
    let used = stdout(&stats);
    println!("server memory after recovery: {used}");
    let used_bytes = used.split('/').next().and_then(bytes);
    assert!(
        used_bytes.is_some_and(|b| b < 1024.0 * 1024.0 * 1024.0),
        "server memory after recovery: {used}"
    );
}
