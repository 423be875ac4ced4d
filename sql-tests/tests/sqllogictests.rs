//! Runs every `.slt` file under `sql-tests/slt/` against a real `drizzle`
//! server over the Postgres wire protocol, one fresh server per file, in
//! three deployments with the same expected results:
//!
//! * `embedded`: one `drizzle server` with 2 in-process workers;
//! * `cluster`: `drizzle server --workers 0` plus 3 `drizzle worker`
//!   processes on 127.0.0.1, group scheduling with pre-scheduled shuffles;
//! * `cluster-bsp`: the same cluster with `--scheduling bsp`.
//!
//! `cargo test -p drizzle-sql-tests --test sqllogictests -- FILTER` runs the
//! files whose path contains FILTER; `DRIZZLE_SLT_MODES=embedded,cluster`
//! picks deployments; `--complete` rewrites expectations (embedded only).

use std::path::PathBuf;
use std::time::Duration;

use drizzle_sql_tests::{drizzle_bin, SltClient, TestCluster, TestServer};

/// A deployment the suite runs against.
enum Deployment {
    Embedded(TestServer),
    Cluster(TestCluster),
}

impl Deployment {
    fn start(mode: &str, bin: &std::path::Path) -> anyhow::Result<Self> {
        Ok(match mode {
            "embedded" => Deployment::Embedded(TestServer::start(bin, &["--workers", "2"])?),
            "cluster" => Deployment::Cluster(TestCluster::start(bin, 3, &[])?),
            "cluster-bsp" => {
                Deployment::Cluster(TestCluster::start(bin, 3, &["--scheduling", "bsp"])?)
            }
            other => anyhow::bail!("unknown deployment {other}"),
        })
    }

    fn port(&self) -> u16 {
        match self {
            Deployment::Embedded(s) => s.port,
            Deployment::Cluster(c) => c.server.port,
        }
    }

    fn logs(&self) -> String {
        match self {
            Deployment::Embedded(s) => s.log(),
            Deployment::Cluster(c) => c.logs(),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--") || a == "--complete")
        .collect();
    let complete = args.iter().any(|a| a == "--complete");
    let filters: Vec<&String> = args.iter().filter(|a| *a != "--complete").collect();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("slt");
    let mut files: Vec<PathBuf> = walk(&root);
    files.sort();
    files.retain(|f| {
        filters.is_empty()
            || filters
                .iter()
                .any(|flt| f.to_string_lossy().contains(flt.as_str()))
    });
    let rt = tokio::runtime::Runtime::new()?;
    let bin = drizzle_bin();
    let modes: Vec<String> = match std::env::var("DRIZZLE_SLT_MODES") {
        Ok(m) => m.split(',').map(|s| s.trim().to_string()).collect(),
        Err(_) if complete => vec!["embedded".into()],
        Err(_) => vec!["embedded".into(), "cluster".into(), "cluster-bsp".into()],
    };
    let mut failed = Vec::new();
    let mut passed = 0;
    for mode in &modes {
        for file in &files {
            let name = file
                .strip_prefix(&root)
                .unwrap_or(file)
                .display()
                .to_string();
            let result = rt.block_on(async {
                let server = Deployment::start(mode, &bin)?;
                let port = server.port();
                let mut runner = sqllogictest::Runner::new(move || async move {
                    let (client, conn) = tokio_postgres::connect(
                        &format!("host=127.0.0.1 port={port} user=slt dbname=drizzle"),
                        tokio_postgres::NoTls,
                    )
                    .await
                    .map_err(|e| drizzle_sql_tests::SltError(e.to_string()))?;
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    Ok::<_, drizzle_sql_tests::SltError>(SltClient::new(client))
                });
                if complete {
                    let col_sep = " ";
                    runner
                        .update_test_file(
                            file,
                            col_sep,
                            sqllogictest::default_validator,
                            sqllogictest::default_normalizer,
                            sqllogictest::default_column_validator,
                        )
                        .await
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                } else {
                    let outcome =
                        tokio::time::timeout(Duration::from_secs(300), runner.run_file_async(file))
                            .await;
                    match outcome {
                        Err(_) => anyhow::bail!("file timed out"),
                        Ok(Err(e)) => {
                            anyhow::bail!("{}\n--- logs ---\n{}", e.display(true), server.logs())
                        }
                        Ok(Ok(())) => {}
                    }
                }
                drop(server);
                Ok::<_, anyhow::Error>(())
            });
            match result {
                Ok(()) => {
                    passed += 1;
                    println!("test [{mode}] {name} ... ok");
                }
                Err(e) => {
                    println!("test [{mode}] {name} ... FAILED\n{e:#}");
                    failed.push(format!("[{mode}] {name}"));
                }
            }
        }
    }
    println!("\n{} passed, {} failed", passed, failed.len());
    if !failed.is_empty() {
        anyhow::bail!("failed: {failed:?}");
    }
    Ok(())
}

fn walk(dir: &PathBuf) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else if p.extension().is_some_and(|x| x == "slt") {
                out.push(p);
            }
        }
    }
    out
}
