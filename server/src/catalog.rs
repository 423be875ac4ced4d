//! The catalog: streams, tables and materialized views, persisted as one JSON
//! file in the data directory, plus the logs that hold their rows.
//!
//! The catalog file is replaced atomically (write a temporary file, fsync,
//! rename, fsync the directory), so a crash leaves either the old or the new
//! catalog, never a torn one.
//!
//! # Names never reach the filesystem
//! Every object has an object id ([`Oid`], from 16384 as in Postgres, never
//! reused): its files live in `streams/<oid>`, `tables/<oid>` or
//! `views/<oid>`, and a view's checkpoints under `views/<oid>`. Any Postgres
//! identifier (`"../x"`, `"/etc"`, spaces, unicode) is just a key in the JSON
//! file. The next id is kept in the file and is also raised past every id
//! directory found at start, so an object created after a crash (files
//! written, catalog not) never takes over another object's files.
//!
//! A data directory with object files but no catalog is refused at start:
//! starting empty would hide the data and let a new object of the same name
//! bring old rows back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use drizzle_exec::log::Log;
use drizzle_planner::{FunctionDef, Relation, RelationResolver, StreamDef, TableDef, ViewDef};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::auth::RoleDef;
use crate::errors::PgError;
use crate::providers::{TableLogProvider, ViewProvider, ViewStore};

/// A dropped view: its id (its files and checkpoints are named by it) and
/// its store (to stop).
pub struct DroppedView {
    /// The view's object id.
    pub oid: Oid,
    /// Its store, if it was attached.
    pub store: Option<Arc<ViewStore>>,
}

/// An object id: names a catalog object's files and, for Postgres tools, the
/// object itself.
pub type Oid = u32;

/// The first object id handed out (Postgres's `FirstNormalObjectId`).
pub const FIRST_OID: Oid = 16384;

/// Folders of object files, one per kind.
const KIND_DIRS: [&str; 3] = ["streams", "tables", "views"];

#[derive(Debug, Default, Serialize, Deserialize)]
struct CatalogFile {
    streams: BTreeMap<String, StreamDef>,
    tables: BTreeMap<String, TableDef>,
    views: BTreeMap<String, ViewDef>,
    /// Each object's id, by name (absent in catalogs written before ids:
    /// those are migrated at open).
    #[serde(default)]
    oids: BTreeMap<String, Oid>,
    /// The next id to hand out.
    #[serde(default)]
    next_oid: Oid,
    /// Roles (users), by name.
    #[serde(default)]
    roles: BTreeMap<String, RoleDef>,
    /// SQL functions, by name (a namespace of their own, as in Postgres).
    #[serde(default)]
    functions: BTreeMap<String, FunctionDef>,
}

/// A catalog object with its storage.
pub struct Catalog {
    dir: PathBuf,
    inner: RwLock<State>,
    /// Changes whenever a table's or view's contents change (lookup joins re-read).
    pub data_version: Arc<AtomicU64>,
    /// Per table or view name: changes whenever its contents change (a lookup
    /// join re-reads only when a relation it reads changed). Kept across a
    /// drop, so a re-created relation never repeats an earlier version.
    relation_versions: parking_lot::Mutex<std::collections::HashMap<String, u64>>,
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
    ///
    /// Refuses a directory that holds object files but no catalog file.
    pub fn open(dir: &Path) -> Result<Self, PgError> {
        std::fs::create_dir_all(dir).map_err(|e| PgError::io(dir, e))?;
        let path = dir.join("catalog.json");
        let mut file: CatalogFile = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                PgError::internal(format!(
                    "catalog {} is damaged: {e}; stop here and run `drizzle repair --data-dir \
                     {}` to restore its previous version",
                    path.display(),
                    dir.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(found) = object_files(dir)? {
                    return Err(PgError::internal(format!(
                        "data directory {} holds object files ({}) but no catalog.json: \
                         refusing to start empty, which would hide that data. Restore \
                         catalog.json from a backup, or move the directory away to start \
                         a new server",
                        dir.display(),
                        found.display()
                    )));
                }
                CatalogFile::default()
            }
            Err(e) => return Err(PgError::io(&path, e)),
        };
        let mut catalog = Self {
            dir: dir.to_path_buf(),
            inner: RwLock::new(State::default()),
            data_version: Arc::new(AtomicU64::new(1)),
            relation_versions: Default::default(),
        };
        if catalog.assign_missing_oids(&mut file)? {
            catalog.persist(&file)?;
        }
        let mut state = State::default();
        for (name, def) in &file.streams {
            if def.connector().is_none() {
                let log = Log::open(
                    &catalog.object_dir("streams", file.oids[name]),
                    def.source_schema(),
                    def.partitions,
                    false,
                )?;
                state.stream_logs.insert(name.clone(), Arc::new(log));
            }
        }
        for (name, def) in &file.tables {
            let log = Log::open(
                &catalog.object_dir("tables", file.oids[name]),
                def.schema(),
                1,
                true,
            )?;
            state.table_logs.insert(name.clone(), Arc::new(log));
        }
        state.file = file;
        catalog.inner = RwLock::new(state);
        Ok(catalog)
    }

    /// Gives every object an id (catalogs written before ids), moving its
    /// files from the folder named after it when that name is a plain file
    /// name, and raises `next_oid` past every id in use or on disk. Returns
    /// whether the file changed.
    fn assign_missing_oids(&self, file: &mut CatalogFile) -> Result<bool, PgError> {
        let mut changed = false;
        let mut next = file.next_oid.max(FIRST_OID);
        next = next.max(file.oids.values().map(|o| o + 1).max().unwrap_or(0));
        for kind in KIND_DIRS {
            next = next.max(max_oid_dir(&self.dir.join(kind))?.map_or(0, |o| o + 1));
        }
        let names: Vec<(&str, String)> = file
            .streams
            .keys()
            .map(|n| ("streams", n.clone()))
            .chain(file.tables.keys().map(|n| ("tables", n.clone())))
            .chain(file.views.keys().map(|n| ("views", n.clone())))
            .collect();
        for (kind, name) in names {
            if file.oids.contains_key(&name) {
                continue;
            }
            let oid = next;
            next += 1;
            if is_plain_file_name(&name) {
                let legacy = self.dir.join(kind).join(&name);
                if legacy.is_dir() {
                    let to = self.object_dir(kind, oid);
                    std::fs::rename(&legacy, &to).map_err(|e| PgError::io(&legacy, e))?;
                    tracing::info!(object = %name, to = %to.display(), "moved to its object id");
                }
            }
            file.oids.insert(name, oid);
            changed = true;
        }
        if next != file.next_oid {
            file.next_oid = next;
            changed = true;
        }
        Ok(changed)
    }

    /// The folder of an object's files.
    fn object_dir(&self, kind: &str, oid: Oid) -> PathBuf {
        self.dir.join(kind).join(oid.to_string())
    }

    /// Hands out a new object id (kept in the file by the next persist; an id
    /// handed out and not persisted is skipped at the next start if its
    /// folder was made).
    fn allocate_oid(file: &mut CatalogFile) -> Oid {
        let oid = file.next_oid.max(FIRST_OID);
        file.next_oid = oid + 1;
        oid
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
            // The version being replaced stays as catalog.json.prev, for
            // `drizzle repair` should the new one ever be damaged.
            if path.exists() {
                let _ = std::fs::copy(&path, self.dir.join("catalog.json.prev"));
            }
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
        let oid = Self::allocate_oid(&mut state.file);
        if def.connector().is_none() {
            let log = Log::open(
                &self.object_dir("streams", oid),
                def.source_schema(),
                def.partitions,
                false,
            )?;
            state.stream_logs.insert(def.name.clone(), Arc::new(log));
        }
        state.file.oids.insert(def.name.clone(), oid);
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
        let oid = Self::allocate_oid(&mut state.file);
        let log = Log::open(&self.object_dir("tables", oid), def.schema(), 1, true)?;
        state.table_logs.insert(def.name.clone(), Arc::new(log));
        state.file.oids.insert(def.name.clone(), oid);
        state.file.tables.insert(def.name.clone(), def);
        self.persist(&state.file)?;
        Ok(true)
    }

    /// A new view's id and the folder for its files (the view is added by
    /// [`Catalog::create_view`] once its store is open there).
    pub fn new_view_dir(&self) -> (Oid, PathBuf) {
        let oid = Self::allocate_oid(&mut self.inner.write().file);
        (oid, self.object_dir("views", oid))
    }

    /// Adds a view definition with its store, under the id from
    /// [`Catalog::new_view_dir`].
    pub fn create_view(
        &self,
        def: ViewDef,
        oid: Oid,
        store: Arc<ViewStore>,
    ) -> Result<(), PgError> {
        let mut state = self.inner.write();
        if Self::name_taken(&state, &def.name) {
            return Err(PgError::duplicate(&def.name));
        }
        let name = def.name.clone();
        state.views.insert(name.clone(), store);
        state.file.oids.insert(name.clone(), oid);
        state.file.views.insert(name.clone(), def);
        if let Err(e) = self.persist(&state.file) {
            state.views.remove(&name);
            state.file.views.remove(&name);
            state.file.oids.remove(&name);
            return Err(e);
        }
        Ok(())
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

    /// 2BP01 if a view's query names `name` (a stream, table or function it
    /// needs: its definition is planned again at every start).
    fn no_view_reads(state: &State, what: &str, name: &str) -> Result<(), PgError> {
        match state.file.views.values().find(|v| mentions(&v.query, name)) {
            Some(v) => Err(PgError::new(
                "2BP01",
                format!(
                    "cannot drop {what} {name} because materialized view {} depends on it",
                    v.name
                ),
            )
            .with_hint("drop the materialized view first")),
            None => Ok(()),
        }
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
        Self::no_view_reads(&state, what, name)?;
        state.file.oids.remove(name);
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
        drop(state);
        self.bump_data_version(name);
        Ok(true)
    }

    /// Removes a view definition; returns its id (the caller deletes its
    /// files and checkpoints) and its store (the caller stops it).
    pub fn drop_view(&self, name: &str) -> Result<Option<DroppedView>, PgError> {
        let mut state = self.inner.write();
        if !state.file.views.contains_key(name) {
            return Ok(None);
        }
        // Another view reads this one (as a stream or as a lookup table).
        if let Some(v) = state
            .file
            .views
            .values()
            .find(|v| v.name != name && mentions(&v.query, name))
        {
            return Err(PgError::new(
                "2BP01",
                format!(
                    "cannot drop materialized view {name} because materialized view {} depends on it",
                    v.name
                ),
            )
            .with_hint("drop the materialized view that reads it first"));
        }
        state.file.views.remove(name);
        let oid = state.file.oids.remove(name);
        let store = state.views.remove(name);
        self.persist(&state.file)?;
        drop(state);
        self.bump_data_version(name);
        Ok(oid.map(|oid| DroppedView { oid, store }))
    }

    /// Adds a SQL function, or replaces one with `or_replace` (42723 when
    /// it exists without).
    pub fn create_function(&self, def: FunctionDef, or_replace: bool) -> Result<(), PgError> {
        let mut state = self.inner.write();
        if state.file.functions.contains_key(&def.name) && !or_replace {
            return Err(
                PgError::new("42723", format!("function {} already exists", def.name))
                    .with_hint("use CREATE OR REPLACE FUNCTION to change it"),
            );
        }
        state.file.functions.insert(def.name.clone(), def);
        self.persist(&state.file)
    }

    /// Removes a SQL function; fails if a view's query calls it (its
    /// definition is planned again at every start). `Ok(false)` if absent.
    pub fn drop_function(&self, name: &str) -> Result<bool, PgError> {
        let mut state = self.inner.write();
        if !state.file.functions.contains_key(name) {
            return Ok(false);
        }
        Self::no_view_reads(&state, "function", name)?;
        state.file.functions.remove(name);
        self.persist(&state.file)?;
        Ok(true)
    }

    /// A SQL function.
    pub fn function(&self, name: &str) -> Option<FunctionDef> {
        self.inner.read().file.functions.get(name).cloned()
    }

    /// Every SQL function.
    pub fn functions(&self) -> Vec<FunctionDef> {
        self.inner.read().file.functions.values().cloned().collect()
    }

    /// An object's id.
    pub fn oid(&self, name: &str) -> Option<Oid> {
        self.inner.read().file.oids.get(name).copied()
    }

    /// A role's definition.
    pub fn role(&self, name: &str) -> Option<RoleDef> {
        self.inner.read().file.roles.get(name).cloned()
    }

    /// Every role, by name.
    pub fn roles(&self) -> Vec<(String, RoleDef)> {
        let state = self.inner.read();
        state
            .file
            .roles
            .iter()
            .map(|(n, r)| (n.clone(), r.clone()))
            .collect()
    }

    /// Adds a role (42710 if it exists).
    pub fn create_role(&self, name: &str, def: RoleDef) -> Result<(), PgError> {
        let mut state = self.inner.write();
        if state.file.roles.contains_key(name) {
            return Err(PgError::new(
                "42710",
                format!("role \"{name}\" already exists"),
            ));
        }
        state.file.roles.insert(name.to_string(), def);
        if let Err(e) = self.persist(&state.file) {
            state.file.roles.remove(name);
            return Err(e);
        }
        Ok(())
    }

    /// Changes a role (42704 if it does not exist), or creates it when
    /// `create` (the start-up superuser).
    pub fn alter_role(
        &self,
        name: &str,
        create: bool,
        change: impl FnOnce(&mut RoleDef),
    ) -> Result<(), PgError> {
        let mut state = self.inner.write();
        let old = state.file.roles.get(name).cloned();
        let mut def = match (&old, create) {
            (Some(r), _) => r.clone(),
            (None, true) => RoleDef {
                superuser: false,
                login: true,
                verifier: None,
            },
            (None, false) => {
                return Err(PgError::new(
                    "42704",
                    format!("role \"{name}\" does not exist"),
                ))
            }
        };
        change(&mut def);
        state.file.roles.insert(name.to_string(), def);
        if let Err(e) = self.persist(&state.file) {
            match old {
                Some(r) => state.file.roles.insert(name.to_string(), r),
                None => state.file.roles.remove(name),
            };
            return Err(e);
        }
        Ok(())
    }

    /// Removes a role; `Ok(false)` if it did not exist.
    pub fn drop_role(&self, name: &str) -> Result<bool, PgError> {
        let mut state = self.inner.write();
        let Some(old) = state.file.roles.remove(name) else {
            return Ok(false);
        };
        if let Err(e) = self.persist(&state.file) {
            state.file.roles.insert(name.to_string(), old);
            return Err(e);
        }
        Ok(true)
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

    /// Where the view with id `oid` keeps its durable output log.
    pub fn view_dir(&self, oid: Oid) -> PathBuf {
        self.object_dir("views", oid)
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

    /// Every view, oldest first (a view over a view comes after the view it
    /// reads, so a restart resumes them in this order).
    pub fn views_oldest_first(&self) -> Vec<ViewDef> {
        let state = self.inner.read();
        let mut views: Vec<(Oid, ViewDef)> = state
            .file
            .views
            .values()
            .map(|v| {
                (
                    state.file.oids.get(&v.name).copied().unwrap_or(Oid::MAX),
                    v.clone(),
                )
            })
            .collect();
        views.sort_by_key(|(oid, _)| *oid);
        views.into_iter().map(|(_, v)| v).collect()
    }

    /// An append-only materialized view as a stream another view reads (a
    /// view over a view): its output log, from its first row, one partition;
    /// a windowed view's window bound is its event time (watermark: the
    /// largest value seen, no delay). `None` for an upsert view (its rows
    /// change) or another kind of object.
    pub fn view_as_stream(&self, name: &str) -> Option<StreamDef> {
        let store = self.view_store(name)?;
        if !store.is_append() {
            return None;
        }
        let columns = store
            .schema()
            .fields()
            .iter()
            .map(|f| drizzle_planner::ColumnDef {
                name: f.name().clone(),
                sql_type: crate::encode::sql_type_name(f.data_type()).to_string(),
                data_type: f.data_type().clone(),
                nullable: f.is_nullable(),
            })
            .collect();
        Some(StreamDef {
            name: name.to_string(),
            columns,
            // A windowed view's rows come in window order: its window bound
            // is event time with no delay.
            watermark: store
                .event_time
                .clone()
                .map(|column| drizzle_planner::WatermarkSpec {
                    column,
                    delay_ms: 0,
                }),
            options: [("connector".to_string(), VIEW_CONNECTOR.to_string())].into(),
            partitions: 1,
            created_at_ms: 0,
            proctime: None,
        })
    }

    /// Marks table or view data as changed.
    pub fn bump_data_version(&self, name: &str) {
        let mut versions = self.relation_versions.lock();
        match versions.get_mut(name) {
            Some(v) => *v += 1,
            None => {
                versions.insert(name.to_string(), 1);
            }
        }
        drop(versions);
        self.data_version.fetch_add(1, Ordering::AcqRel);
    }

    /// The version of the contents of the relations `names`: changes
    /// whenever one of them changes.
    pub fn relations_version(&self, names: &[String]) -> u64 {
        let versions = self.relation_versions.lock();
        names
            .iter()
            .map(|n| versions.get(n).copied().unwrap_or(0))
            .fold(0u64, u64::wrapping_add)
    }
}

/// Whether a legacy object folder named after the object can be trusted as
/// one plain folder name inside its kind's folder.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && name.len() <= 255
}

/// The first object file or folder under `dir`'s kind folders, if any.
fn object_files(dir: &Path) -> Result<Option<PathBuf>, PgError> {
    for kind in KIND_DIRS {
        let folder = dir.join(kind);
        match std::fs::read_dir(&folder) {
            Ok(mut entries) => {
                if let Some(entry) = entries.next() {
                    let entry = entry.map_err(|e| PgError::io(&folder, e))?;
                    return Ok(Some(entry.path()));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(PgError::io(&folder, e)),
        }
    }
    Ok(None)
}

/// The largest numeric folder name under `folder` (object ids on disk).
fn max_oid_dir(folder: &Path) -> Result<Option<Oid>, PgError> {
    let entries = match std::fs::read_dir(folder) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(PgError::io(folder, e)),
    };
    let mut max = None;
    for entry in entries {
        let entry = entry.map_err(|e| PgError::io(folder, e))?;
        if let Some(oid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<Oid>().ok())
        {
            max = max.max(Some(oid));
        }
    }
    Ok(max)
}

/// Whether SQL text mentions an identifier (dependency check for DROP).
/// The connector name of a view read as a stream (EXPLAIN shows it; no
/// user stream can have it: `CREATE STREAM` refuses unknown connectors).
pub const VIEW_CONNECTOR: &str = "view";

/// Resolution for a materialized view over materialized views: append-only
/// views are streams (their output logs), everything else as usual.
pub struct ViewsAsStreams<'a, R: RelationResolver>(pub &'a Catalog, pub &'a R);

impl<R: RelationResolver> RelationResolver for ViewsAsStreams<'_, R> {
    fn resolve(&self, name: &str) -> Option<Relation> {
        match self.0.view_as_stream(name) {
            Some(def) => Some(Relation::Stream(def)),
            None => self.1.resolve(name),
        }
    }

    fn resolve_system(&self, schema: &str, name: &str) -> Option<Relation> {
        self.1.resolve_system(schema, name)
    }

    fn function(&self, name: &str) -> Option<FunctionDef> {
        self.1.function(name)
    }
}

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

    fn function(&self, name: &str) -> Option<FunctionDef> {
        Catalog::function(self, name)
    }
}
