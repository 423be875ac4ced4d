//! The catalog: streams, tables and materialized views, persisted as one JSON
//! file in the data directory, plus the logs that hold their rows.
//!
//! The catalog file is replaced atomically (write a temporary file, fsync,
//! rename, fsync the directory), so a crash leaves either the old or the new
//! catalog, never a torn one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use drizzle_exec::log::Log;
use drizzle_planner::{Relation, RelationResolver, StreamDef, TableDef, ViewDef};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::errors::PgError;
use crate::providers::{TableLogProvider, ViewProvider, ViewStore};

#[derive(Debug, Default, Serialize, Deserialize)]
struct CatalogFile {
    streams: BTreeMap<String, StreamDef>,
    tables: BTreeMap<String, TableDef>,
    views: BTreeMap<String, ViewDef>,
}

/// A catalog object with its storage.
pub struct Catalog {
    dir: PathBuf,
    inner: RwLock<State>,
    /// Changes whenever a table's or view's contents change (lookup joins re-read).
    pub data_version: Arc<AtomicU64>,
}

#[derive(Default)]
struct State {
    file: CatalogFile,
    stream_logs: BTreeMap<String, Arc<Log>>,
    table_logs: BTreeMap<String, Arc<Log>>,
    views: BTreeMap<String, Arc<ViewStore>>,
}

impl Catalog {
    /// Opens the catalog in `dir`, with the logs of every stream and table.
    pub fn open(dir: &Path) -> Result<Self, PgError> {
        std::fs::create_dir_all(dir).map_err(|e| PgError::io(dir, e))?;
        let path = dir.join("catalog.json");
        let file: CatalogFile = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                PgError::internal(format!("catalog {} is damaged: {e}", path.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => CatalogFile::default(),
            Err(e) => return Err(PgError::io(&path, e)),
        };
        let mut state = State::default();
        for (name, def) in &file.streams {
            if def.connector().is_none() {
                let log = Log::open(
                    &dir.join("streams").join(name),
                    def.schema(),
                    def.partitions,
                    false,
                )?;
                state.stream_logs.insert(name.clone(), Arc::new(log));
            }
        }
        for (name, def) in &file.tables {
            let log = Log::open(&dir.join("tables").join(name), def.schema(), 1, true)?;
            state.table_logs.insert(name.clone(), Arc::new(log));
        }
        state.file = file;
        Ok(Self {
            dir: dir.to_path_buf(),
            inner: RwLock::new(state),
            data_version: Arc::new(AtomicU64::new(1)),
        })
    }

    fn persist(&self, file: &CatalogFile) -> Result<(), PgError> {
        let path = self.dir.join("catalog.json");
        let tmp = self.dir.join("catalog.json.tmp");
        let bytes =
            serde_json::to_vec_pretty(file).map_err(|e| PgError::internal(e.to_string()))?;
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| PgError::io(&path, e))
    }

    fn name_taken(state: &State, name: &str) -> bool {
        state.file.streams.contains_key(name)
            || state.file.tables.contains_key(name)
            || state.file.views.contains_key(name)
    }

    /// `CREATE ... IF NOT EXISTS` of a taken name is a no-op; without it, 42P07.
    fn already_exists(name: &str, if_not_exists: bool) -> Result<bool, PgError> {
        if if_not_exists {
            Ok(false)
        } else {
            Err(PgError::duplicate(name))
        }
    }

    /// Adds a stream (and creates its log). `Ok(false)` if it existed and `if_not_exists`.
    pub fn create_stream(&self, def: StreamDef, if_not_exists: bool) -> Result<bool, PgError> {
        let mut state = self.inner.write();
        if Self::name_taken(&state, &def.name) {
            return Self::already_exists(&def.name, if_not_exists);
        }
        if def.connector().is_none() {
            let log = Log::open(
                &self.dir.join("streams").join(&def.name),
                def.schema(),
                def.partitions,
                false,
            )?;
            state.stream_logs.insert(def.name.clone(), Arc::new(log));
        }
        state.file.streams.insert(def.name.clone(), def);
        self.persist(&state.file)?;
        Ok(true)
    }

    /// Adds a table.
    pub fn create_table(&self, def: TableDef, if_not_exists: bool) -> Result<bool, PgError> {
        let mut state = self.inner.write();
        if Self::name_taken(&state, &def.name) {
            return Self::already_exists(&def.name, if_not_exists);
        }
        let log = Log::open(
            &self.dir.join("tables").join(&def.name),
            def.schema(),
            1,
            true,
        )?;
        state.table_logs.insert(def.name.clone(), Arc::new(log));
        state.file.tables.insert(def.name.clone(), def);
        self.persist(&state.file)?;
        Ok(true)
    }

    /// Adds a view definition with its store.
    pub fn create_view(&self, def: ViewDef, store: Arc<ViewStore>) -> Result<(), PgError> {
        let mut state = self.inner.write();
        if Self::name_taken(&state, &def.name) {
            return Err(PgError::duplicate(&def.name));
        }
        state.views.insert(def.name.clone(), store);
        state.file.views.insert(def.name.clone(), def);
        self.persist(&state.file)
    }

    /// Registers a view's store at startup (definition already persisted).
    pub fn attach_view(&self, name: &str, store: Arc<ViewStore>) {
        self.inner.write().views.insert(name.to_string(), store);
    }

    /// Whether a name is taken by anything.
    pub fn exists(&self, name: &str) -> bool {
        Self::name_taken(&self.inner.read(), name)
    }

    /// Removes a stream; fails if a view reads it.
    pub fn drop_stream(&self, name: &str) -> Result<bool, PgError> {
        self.drop_logged(name, "stream")
    }

    /// Removes a table; fails if a view reads it.
    pub fn drop_table(&self, name: &str) -> Result<bool, PgError> {
        self.drop_logged(name, "table")
    }

    /// Drops a stream or table with its log files, unless a view depends on it.
    fn drop_logged(&self, name: &str, what: &str) -> Result<bool, PgError> {
        let mut state = self.inner.write();
        let exists = match what {
            "stream" => state.file.streams.contains_key(name),
            _ => state.file.tables.contains_key(name),
        };
        if !exists {
            return Ok(false);
        }
        if let Some(v) = state.file.views.values().find(|v| mentions(&v.query, name)) {
            return Err(PgError::new(
                "2BP01",
                format!(
                    "cannot drop {what} {name} because materialized view {} depends on it",
                    v.name
                ),
            )
            .with_hint("drop the materialized view first"));
        }
        let log = if what == "stream" {
            state.file.streams.remove(name);
            state.stream_logs.remove(name)
        } else {
            state.file.tables.remove(name);
            state.table_logs.remove(name)
        };
        if let Some(log) = log {
            let _ = log.remove_files();
        }
        self.persist(&state.file)?;
        self.data_version.fetch_add(1, Ordering::AcqRel);
        Ok(true)
    }

    /// Removes a view definition; returns its store so the caller stops it.
    pub fn drop_view(&self, name: &str) -> Result<Option<Arc<ViewStore>>, PgError> {
        let mut state = self.inner.write();
        if state.file.views.remove(name).is_none() {
            return Ok(None);
        }
        let store = state.views.remove(name);
        self.persist(&state.file)?;
        self.data_version.fetch_add(1, Ordering::AcqRel);
        Ok(store)
    }

    /// A stream's definition.
    pub fn stream(&self, name: &str) -> Option<StreamDef> {
        self.inner.read().file.streams.get(name).cloned()
    }

    /// A table's definition.
    pub fn table(&self, name: &str) -> Option<TableDef> {
        self.inner.read().file.tables.get(name).cloned()
    }

    /// A view's definition.
    pub fn view(&self, name: &str) -> Option<ViewDef> {
        self.inner.read().file.views.get(name).cloned()
    }

    /// Changes a view's parallelism (takes effect at its next boundary).
    pub fn set_view_parallelism(&self, name: &str, parallelism: u32) -> Result<bool, PgError> {
        let mut state = self.inner.write();
        let Some(def) = state.file.views.get_mut(name) else {
            return Ok(false);
        };
        def.parallelism = parallelism;
        self.persist(&state.file)?;
        Ok(true)
    }

    /// Where a view keeps its durable output log.
    pub fn view_dir(&self, name: &str) -> PathBuf {
        self.dir.join("views").join(name)
    }

    /// A view's store.
    pub fn view_store(&self, name: &str) -> Option<Arc<ViewStore>> {
        self.inner.read().views.get(name).cloned()
    }

    /// A built-in stream's log.
    pub fn stream_log(&self, name: &str) -> Option<Arc<Log>> {
        self.inner.read().stream_logs.get(name).cloned()
    }

    /// A table's log.
    pub fn table_log(&self, name: &str) -> Option<Arc<Log>> {
        self.inner.read().table_logs.get(name).cloned()
    }

    /// All streams, by name.
    pub fn streams(&self) -> Vec<StreamDef> {
        self.inner.read().file.streams.values().cloned().collect()
    }

    /// All tables, by name.
    pub fn tables(&self) -> Vec<TableDef> {
        self.inner.read().file.tables.values().cloned().collect()
    }

    /// All views, by name.
    pub fn views(&self) -> Vec<ViewDef> {
        self.inner.read().file.views.values().cloned().collect()
    }

    /// Marks table or view data as changed.
    pub fn bump_data_version(&self) {
        self.data_version.fetch_add(1, Ordering::AcqRel);
    }
}

/// Whether SQL text mentions an identifier (dependency check for DROP).
fn mentions(sql: &str, name: &str) -> bool {
    sql.to_lowercase()
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .any(|w| w == name)
}

impl RelationResolver for Catalog {
    fn resolve(&self, name: &str) -> Option<Relation> {
        let state = self.inner.read();
        if let Some(def) = state.file.streams.get(name) {
            return Some(Relation::Stream(def.clone()));
        }
        if let (Some(def), Some(log)) = (state.file.tables.get(name), state.table_logs.get(name)) {
            return Some(Relation::Finite(Arc::new(TableLogProvider::new(
                def.schema(),
                Arc::clone(log),
            ))));
        }
        if let Some(store) = state.views.get(name) {
            return Some(Relation::Finite(Arc::new(ViewProvider::new(Arc::clone(
                store,
            )))));
        }
        None
    }
}
