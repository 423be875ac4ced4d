//! The Docker compose cluster (`docker/compose.yml`): builds the image from
//! local material (`docker/build-local-image.sh`, no registry), brings up one
//! server and three workers, runs a continuous query and a materialized view
//! through `psql`, checks the results, and tears the cluster down.
//!
//! Skipped, with a message saying so, when `docker info` fails or no Compose
//! tool is installed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

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
}

impl Cluster {
    fn compose(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.tool[0]);
        cmd.args(&self.tool[1..])
            .arg("-f")
            .arg(root().join("docker/compose.yml"))
            .args(["-p", &self.project])
            .args(args)
            .env("DRIZZLE_PG_PORT", self.port.to_string());
        run(&mut cmd)
    }

    fn psql(&self, sql: &str) -> Output {
        run(Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "drizzle",
            ])
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]))
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

#[test]
fn compose_cluster_runs_queries_and_views() {
    // Bounded: a wedged Docker daemon must not hang the test run.
    match Command::new("timeout")
        .args(["30", "docker", "info"])
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            println!(
                "SKIPPED compose_cluster_runs_queries_and_views: `docker info` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return;
        }
        Err(e) => {
            println!("SKIPPED compose_cluster_runs_queries_and_views: no docker ({e})");
            return;
        }
    }
    let Some(tool) = compose_tool() else {
        println!("SKIPPED compose_cluster_runs_queries_and_views: neither `docker compose` nor `docker-compose` works");
        return;
    };
    // The image, from the binary this test run built (no registry needed).
    let built = run(Command::new(root().join("docker/build-local-image.sh"))
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
        project: format!("drizzle-test-{}", std::process::id()),
        port,
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
