//! Runs every `.slt` file under `sql-tests/slt/` against a real `drizzle`
//! server over the Postgres wire protocol, one fresh server per file.
//!
//! `cargo test -p drizzle-sql-tests --test sqllogictests -- FILTER` runs the
//! files whose path contains FILTER; `--complete` rewrites expectations.

use std::path::PathBuf;
use std::time::Duration;

use drizzle_sql_tests::{drizzle_bin, SltClient, TestServer};

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
    let mut failed = Vec::new();
    let mut passed = 0;
    for file in &files {
        let name = file
            .strip_prefix(&root)
            .unwrap_or(file)
            .display()
            .to_string();
        let result = rt.block_on(async {
            let server = TestServer::start(&bin, &["--workers", "2"])?;
            let port = server.port;
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
                        anyhow::bail!("{}\n--- server log ---\n{}", e.display(true), server.log())
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
                println!("test {name} ... ok");
            }
            Err(e) => {
                println!("test {name} ... FAILED\n{e:#}");
                failed.push(name);
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
