//! `drizzle repair`: makes a damaged data directory usable again without
//! losing any good data (see `docs/operations.md`).
//!
//! Every log under the data directory (streams, tables, views' output logs)
//! is checked; a damaged region is moved to a quarantine file beside its log
//! and replaced by a gap that keeps every later row at its offset
//! ([`drizzle_exec::log::PartitionLog::repair`]). A damaged `catalog.json`
//! is set aside and the previous version (`catalog.json.prev`, kept at every
//! change) restored. The server must not be running.

use std::path::{Path, PathBuf};

use drizzle_exec::log::{PartitionLog, RepairReport};

use crate::errors::PgError;

/// What a repair did, one line per finding.
#[derive(Debug, Default)]
pub struct Repaired {
    /// Human-readable findings.
    pub lines: Vec<String>,
    /// Log files checked.
    pub logs_checked: usize,
}

/// Checks and repairs the data directory `dir`.
pub fn repair(dir: &Path) -> Result<Repaired, PgError> {
    let mut out = Repaired::default();
    repair_catalog(dir, &mut out)?;
    for kind in ["streams", "tables", "views"] {
        let mut logs = Vec::new();
        collect_logs(&dir.join(kind), &mut logs)?;
        logs.sort();
        for log in logs {
            out.logs_checked += 1;
            let report = PartitionLog::repair(&log).map_err(PgError::from)?;
            describe(&log, &report, &mut out.lines);
        }
    }
    Ok(out)
}

fn describe(log: &Path, r: &RepairReport, lines: &mut Vec<String>) {
    for (offset, len, quarantine) in &r.quarantined {
        lines.push(format!(
            "{}: {len} damaged bytes at byte {offset} moved to {}",
            log.display(),
            quarantine.display()
        ));
    }
    if r.lost_rows > 0 {
        lines.push(format!(
            "{}: {} rows in damaged frames are lost; every later row keeps its offset",
            log.display(),
            r.lost_rows
        ));
    }
}

fn collect_logs(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), PgError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(PgError::io(dir, e)),
    };
    for entry in entries {
        let path = entry.map_err(|e| PgError::io(dir, e))?.path();
        if path.is_dir() {
            collect_logs(&path, out)?;
        } else if path.extension().is_some_and(|x| x == "log") {
            out.push(path);
        }
    }
    Ok(())
}

fn repair_catalog(dir: &Path, out: &mut Repaired) -> Result<(), PgError> {
    let path = dir.join("catalog.json");
    let parses = |p: &Path| {
        std::fs::read(p)
            .ok()
            .is_some_and(|b| serde_json::from_slice::<serde_json::Value>(&b).is_ok())
    };
    if !path.exists() || parses(&path) {
        return Ok(());
    }
    let prev = dir.join("catalog.json.prev");
    if !parses(&prev) {
        return Err(PgError::internal(format!(
            "{} is damaged and there is no usable catalog.json.prev to restore; restore \
             catalog.json from a backup",
            path.display()
        )));
    }
    let aside = dir.join("catalog.json.bad");
    std::fs::rename(&path, &aside).map_err(|e| PgError::io(&path, e))?;
    std::fs::copy(&prev, &path).map_err(|e| PgError::io(&prev, e))?;
    out.lines.push(format!(
        "{} was damaged: moved to {} and the previous version restored (the last catalog \
         change may be missing)",
        path.display(),
        aside.display()
    ));
    Ok(())
}
