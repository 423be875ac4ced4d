//! `pg_catalog` and `information_schema`, built from the live catalog each
//! time a query reads them, so tools that list schemas, relations and
//! columns through them see what `SHOW STREAMS|TABLES|MATERIALIZED VIEWS`
//! sees.
//!
//! How Drizzle's objects appear (see `docs/clients.md`):
//! - every stream, table and materialized view is a relation of schema
//!   `public` (OID 2200), with its catalog OID (stable across restarts);
//! - tables and streams have `relkind` `'r'` (an ordinary table) and
//!   materialized views `'m'`; `pg_catalog.drizzle_relations` tells streams
//!   from tables (`kind`);
//! - every object is owned by OID 10, the bootstrap superuser;
//! - there are no indexes, constraints, comments, extensions or
//!   user-defined functions, so those catalogs are empty (with Postgres's
//!   columns).
//!
//! I did not use `datafusion-pg-catalog`: it builds on DataFusion with its
//! default features (parquet, compression codecs) and a second pgwire,
//! which would add a large part of a cold build to CI; its relation OIDs
//! are assigned per process, where these are the catalog's own.

use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanBuilder, Float32Builder, Int64Builder, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::datasource::{MemTable, TableProvider};
use drizzle_planner::{ColumnDef, Relation, RelationResolver};

use crate::catalog::Catalog;
use crate::encode::pg_type;
use crate::engine::Settings;

/// OID of schema `pg_catalog`.
pub const PG_CATALOG_OID: i64 = 11;
/// OID of schema `public`.
pub const PUBLIC_OID: i64 = 2200;
/// OID of schema `information_schema`.
pub const INFORMATION_SCHEMA_OID: i64 = 13_000;
/// OID of the one database.
pub const DATABASE_OID: i64 = 5;
/// OID of the bootstrap superuser, owner of everything.
pub const OWNER_OID: i64 = 10;

/// One cell of a catalog row.
enum V {
    I(i64),
    S(String),
    B(bool),
    F(f32),
    N,
}

fn s(v: impl Into<String>) -> V {
    V::S(v.into())
}

/// A catalog table under construction: its columns, then rows.
struct Table {
    fields: Vec<(String, DataType)>,
    rows: Vec<Vec<V>>,
}

impl Table {
    fn new(columns: &str) -> Self {
        // "name:type, ..." with i (int8), t (text), b (bool), f (float4),
        // a (text[], for ACLs and options, always NULL here), v (int8[], for
        // int2vector and oidvector columns), z (timestamptz).
        let fields = columns
            .split(',')
            .map(|c| {
                let (name, t) = c.trim().split_once(':').unwrap_or((c.trim(), "t"));
                let t = match t {
                    "i" => DataType::Int64,
                    "b" => DataType::Boolean,
                    "f" => DataType::Float32,
                    "a" => DataType::List(Arc::new(Field::new_list_field(DataType::Utf8, true))),
                    // int2vector / oidvector (index keys): always empty here.
                    "v" => DataType::List(Arc::new(Field::new_list_field(DataType::Int64, true))),
                    "z" => DataType::Timestamp(
                        arrow::datatypes::TimeUnit::Microsecond,
                        Some("+00:00".into()),
                    ),
                    _ => DataType::Utf8,
                };
                (name.to_string(), t)
            })
            .collect();
        Self {
            fields,
            rows: Vec::new(),
        }
    }

    fn row(&mut self, row: Vec<V>) {
        self.rows.push(row);
    }

    fn build(self) -> datafusion::error::Result<Arc<dyn TableProvider>> {
        let schema: SchemaRef = Arc::new(Schema::new(
            self.fields
                .iter()
                .map(|(n, t)| Field::new(n.as_str(), t.clone(), true))
                .collect::<Vec<_>>(),
        ));
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.fields.len());
        for (i, (_, t)) in self.fields.iter().enumerate() {
            fn cell(r: &[V], i: usize) -> &V {
                r.get(i).unwrap_or(&V::N)
            }
            let array: ArrayRef = match t {
                DataType::Int64 => {
                    let mut b = Int64Builder::new();
                    for r in &self.rows {
                        match cell(r, i) {
                            V::I(v) => b.append_value(*v),
                            _ => b.append_null(),
                        }
                    }
                    Arc::new(b.finish())
                }
                DataType::Boolean => {
                    let mut b = BooleanBuilder::new();
                    for r in &self.rows {
                        match cell(r, i) {
                            V::B(v) => b.append_value(*v),
                            _ => b.append_null(),
                        }
                    }
                    Arc::new(b.finish())
                }
                DataType::Float32 => {
                    let mut b = Float32Builder::new();
                    for r in &self.rows {
                        match cell(r, i) {
                            V::F(v) => b.append_value(*v),
                            _ => b.append_null(),
                        }
                    }
                    Arc::new(b.finish())
                }
                DataType::List(_) => arrow::array::new_null_array(t, self.rows.len()),
                DataType::Timestamp(_, _) => {
                    let mut b =
                        arrow::array::TimestampMicrosecondBuilder::new().with_timezone("+00:00");
                    for r in &self.rows {
                        match cell(r, i) {
                            V::I(v) => b.append_value(*v),
                            _ => b.append_null(),
                        }
                    }
                    Arc::new(b.finish())
                }
                _ => {
                    let mut b = StringBuilder::new();
                    for r in &self.rows {
                        match cell(r, i) {
                            V::S(v) => b.append_value(v),
                            V::I(v) => b.append_value(v.to_string()),
                            _ => b.append_null(),
                        }
                    }
                    Arc::new(b.finish())
                }
            };
            columns.push(array);
        }
        let batch = RecordBatch::try_new(Arc::clone(&schema), columns)?;
        Ok(Arc::new(MemTable::try_new(schema, vec![vec![batch]])?))
    }
}

/// What a relation is, for the catalogs.
struct Rel {
    oid: i64,
    name: String,
    kind: &'static str,
    relkind: &'static str,
    columns: Vec<(String, DataType, bool)>,
}

/// A built-in Postgres type: (oid, name, length, category, array oid, element oid).
const TYPES: &[(i64, &str, i64, &str, i64, i64)] = &[
    (16, "bool", 1, "B", 1000, 0),
    (17, "bytea", -1, "U", 1001, 0),
    (19, "name", 64, "S", 1003, 0),
    (20, "int8", 8, "N", 1016, 0),
    (21, "int2", 2, "N", 1005, 0),
    (23, "int4", 4, "N", 1007, 0),
    (25, "text", -1, "S", 1009, 0),
    (26, "oid", 4, "N", 1028, 0),
    (700, "float4", 4, "N", 1021, 0),
    (701, "float8", 8, "N", 1022, 0),
    (1043, "varchar", -1, "S", 1015, 0),
    (1082, "date", 4, "D", 1182, 0),
    (1114, "timestamp", 8, "D", 1115, 0),
    (1184, "timestamptz", 8, "D", 1185, 0),
    (1186, "interval", 16, "T", 1187, 0),
    (1700, "numeric", -1, "N", 1231, 0),
    (1000, "_bool", -1, "A", 0, 16),
    (1001, "_bytea", -1, "A", 0, 17),
    (1005, "_int2", -1, "A", 0, 21),
    (1007, "_int4", -1, "A", 0, 23),
    (1009, "_text", -1, "A", 0, 25),
    (1015, "_varchar", -1, "A", 0, 1043),
    (1016, "_int8", -1, "A", 0, 20),
    (1021, "_float4", -1, "A", 0, 700),
    (1022, "_float8", -1, "A", 0, 701),
    (1115, "_timestamp", -1, "A", 0, 1114),
    (1182, "_date", -1, "A", 0, 1082),
    (1231, "_numeric", -1, "A", 0, 1700),
];

/// The SQL name of a column's type (`information_schema.columns.data_type`).
fn sql_type_name(t: &DataType) -> String {
    drizzle_planner::functions::catalog::type_name(pg_type(t) as i64, None)
        .unwrap_or_else(|| "text".into())
}

/// Who is asking (for `pg_database`, `pg_settings`).
pub struct Asker<'a> {
    /// The database the session asked for.
    pub database: &'a str,
    /// The session's settings.
    pub settings: &'a Settings,
    /// Every session (`pg_stat_activity`).
    pub sessions: &'a crate::session::SessionRegistry,
}

/// Resolves user relations through the catalog and system relations
/// (`pg_catalog.*`, `information_schema.*`) by building them.
pub struct SystemResolver<'a> {
    /// Drizzle's catalog.
    pub catalog: &'a Catalog,
    /// The session asking.
    pub asker: Asker<'a>,
}

impl RelationResolver for SystemResolver<'_> {
    fn resolve(&self, name: &str) -> Option<Relation> {
        self.catalog.resolve(name)
    }

    fn function(&self, name: &str) -> Option<drizzle_planner::FunctionDef> {
        self.catalog.function(name)
    }

    fn resolve_system(&self, schema: &str, name: &str) -> Option<Relation> {
        let table = match schema {
            "pg_catalog" => self.pg_catalog(name),
            "information_schema" => self.information_schema(name),
            _ => None,
        }?;
        table.ok().map(Relation::Finite)
    }
}

type Built = datafusion::error::Result<Arc<dyn TableProvider>>;

impl SystemResolver<'_> {
    fn relations(&self) -> Vec<Rel> {
        let mut out = Vec::new();
        let oid = |n: &str| self.catalog.oid(n).map_or(0, i64::from);
        let columns = |cs: &[ColumnDef]| {
            cs.iter()
                .map(|c| (c.name.clone(), c.data_type.clone(), c.nullable))
                .collect()
        };
        for st in self.catalog.streams() {
            out.push(Rel {
                oid: oid(&st.name),
                // With the processing-time column, as queries see it.
                columns: st
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| (f.name().clone(), f.data_type().clone(), f.is_nullable()))
                    .collect(),
                name: st.name,
                kind: "stream",
                relkind: "r",
            });
        }
        for t in self.catalog.tables() {
            out.push(Rel {
                oid: oid(&t.name),
                columns: columns(&t.columns),
                name: t.name,
                kind: "table",
                relkind: "r",
            });
        }
        for v in self.catalog.views() {
            let columns = match self.catalog.resolve(&v.name) {
                Some(Relation::Finite(p)) => p
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| (f.name().clone(), f.data_type().clone(), f.is_nullable()))
                    .collect(),
                _ => Vec::new(),
            };
            out.push(Rel {
                oid: oid(&v.name),
                name: v.name,
                kind: "materialized view",
                relkind: "m",
                columns,
            });
        }
        out.sort_by_key(|r| r.oid);
        out
    }

    fn owner(&self) -> String {
        self.catalog
            .roles()
            .into_iter()
            .find(|(_, r)| r.superuser)
            .map_or_else(|| "drizzle".into(), |(n, _)| n)
    }

    fn pg_catalog(&self, name: &str) -> Option<Built> {
        Some(match name {
            "pg_namespace" => {
                let mut t = Table::new("oid:i, nspname, nspowner:i, nspacl:a");
                for (oid, n) in [
                    (PG_CATALOG_OID, "pg_catalog"),
                    (PUBLIC_OID, "public"),
                    (INFORMATION_SCHEMA_OID, "information_schema"),
                ] {
                    t.row(vec![V::I(oid), s(n), V::I(OWNER_OID), V::N]);
                }
                t.build()
            }
            "pg_class" => {
                let mut t = Table::new(
                    "oid:i, relname, relnamespace:i, reltype:i, reloftype:i, relowner:i, relam:i, \
                     relfilenode:i, reltablespace:i, relpages:i, reltuples:f, relallvisible:i, \
                     reltoastrelid:i, relhasindex:b, relisshared:b, relpersistence, relkind, \
                     relnatts:i, relchecks:i, relhasrules:b, relhastriggers:b, relhassubclass:b, \
                     relrowsecurity:b, relforcerowsecurity:b, relispopulated:b, relreplident, \
                     relispartition:b, relrewrite:i, relfrozenxid:i, relminmxid:i, relacl:a, \
                     reloptions:a, relpartbound",
                );
                for r in self.relations() {
                    t.row(vec![
                        V::I(r.oid),
                        s(r.name),
                        V::I(PUBLIC_OID),
                        V::I(0),
                        V::I(0),
                        V::I(OWNER_OID),
                        V::I(if r.relkind == "r" { 2 } else { 0 }),
                        V::I(r.oid),
                        V::I(0),
                        V::I(0),
                        V::F(-1.0),
                        V::I(0),
                        V::I(0),
                        V::B(false),
                        V::B(false),
                        s("p"),
                        s(r.relkind),
                        V::I(r.columns.len() as i64),
                        V::I(0),
                        V::B(false),
                        V::B(false),
                        V::B(false),
                        V::B(false),
                        V::B(false),
                        V::B(true),
                        s("d"),
                        V::B(false),
                        V::I(0),
                        V::I(0),
                        V::I(0),
                        V::N,
                        V::N,
                        V::N,
                    ]);
                }
                t.build()
            }
            "pg_attribute" => {
                let mut t = Table::new(
                    "attrelid:i, attname, atttypid:i, attstattarget:i, attlen:i, attnum:i, \
                     attndims:i, attcacheoff:i, atttypmod:i, attbyval:b, attalign, attstorage, \
                     attcompression, attnotnull:b, atthasdef:b, atthasmissing:b, attidentity, \
                     attgenerated, attisdropped:b, attislocal:b, attinhcount:i, attcollation:i, \
                     attacl:a, attoptions:a, attfdwoptions:a, attmissingval",
                );
                for r in self.relations() {
                    for (i, (name, dt, nullable)) in r.columns.iter().enumerate() {
                        let typ = pg_type(dt) as i64;
                        let len = TYPES.iter().find(|t| t.0 == typ).map_or(-1, |t| t.2);
                        t.row(vec![
                            V::I(r.oid),
                            s(name.clone()),
                            V::I(typ),
                            V::I(-1),
                            V::I(len),
                            V::I(i as i64 + 1),
                            V::I(i64::from(matches!(dt, DataType::List(_)))),
                            V::I(-1),
                            V::I(-1),
                            V::B(len > 0 && len <= 8),
                            s(if len == 8 { "d" } else { "i" }),
                            s(if len > 0 { "p" } else { "x" }),
                            s(""),
                            V::B(!nullable),
                            V::B(false),
                            V::B(false),
                            s(""),
                            s(""),
                            V::B(false),
                            V::B(true),
                            V::I(0),
                            V::I(if typ == 25 || typ == 1043 { 100 } else { 0 }),
                            V::N,
                            V::N,
                            V::N,
                            V::N,
                        ]);
                    }
                }
                t.build()
            }
            "pg_type" => {
                let mut t = Table::new(
                    "oid:i, typname, typnamespace:i, typowner:i, typlen:i, typbyval:b, typtype, \
                     typcategory, typispreferred:b, typisdefined:b, typdelim, typrelid:i, \
                     typsubscript, typelem:i, typarray:i, typinput, typoutput, typreceive, \
                     typsend, typmodin, typmodout, typanalyze, typalign, typstorage, \
                     typnotnull:b, typbasetype:i, typtypmod:i, typndims:i, typcollation:i, \
                     typdefaultbin, typdefault, typacl:a",
                );
                for (oid, name, len, cat, array, elem) in TYPES {
                    let base = name.trim_start_matches('_');
                    t.row(vec![
                        V::I(*oid),
                        s(*name),
                        V::I(PG_CATALOG_OID),
                        V::I(OWNER_OID),
                        V::I(*len),
                        V::B(*len > 0 && *len <= 8),
                        s("b"),
                        s(*cat),
                        V::B(matches!(*name, "bool" | "text" | "float8" | "timestamptz")),
                        V::B(true),
                        s(","),
                        V::I(0),
                        s(if *elem != 0 {
                            "array_subscript_handler"
                        } else {
                            "-"
                        }),
                        V::I(*elem),
                        V::I(*array),
                        s(if *elem != 0 {
                            "array_in".to_string()
                        } else {
                            format!("{base}in")
                        }),
                        s(if *elem != 0 {
                            "array_out".to_string()
                        } else {
                            format!("{base}out")
                        }),
                        s(format!("{base}recv")),
                        s(format!("{base}send")),
                        s("-"),
                        s("-"),
                        s("-"),
                        s(if *len == 8 { "d" } else { "i" }),
                        s(if *len > 0 { "p" } else { "x" }),
                        V::B(false),
                        V::I(0),
                        V::I(-1),
                        V::I(0),
                        V::I(if *cat == "S" { 100 } else { 0 }),
                        V::N,
                        V::N,
                        V::N,
                    ]);
                }
                t.build()
            }
            "pg_database" => {
                let mut t = Table::new(
                    "oid:i, datname, datdba:i, encoding:i, datlocprovider, datistemplate:b, \
                     datallowconn:b, datconnlimit:i, datfrozenxid:i, datminmxid:i, \
                     dattablespace:i, datcollate, datctype, daticulocale, datcollversion, datacl:a",
                );
                t.row(vec![
                    V::I(DATABASE_OID),
                    s(self.asker.database),
                    V::I(OWNER_OID),
                    V::I(6),
                    s("c"),
                    V::B(false),
                    V::B(true),
                    V::I(-1),
                    V::I(0),
                    V::I(0),
                    V::I(1663),
                    s("C"),
                    s("C"),
                    V::N,
                    V::N,
                    V::N,
                ]);
                t.build()
            }
            "pg_roles" | "pg_authid" => {
                let mut t = Table::new(
                    "oid:i, rolname, rolsuper:b, rolinherit:b, rolcreaterole:b, rolcreatedb:b, \
                     rolcanlogin:b, rolreplication:b, rolconnlimit:i, rolpassword, \
                     rolvaliduntil, rolbypassrls:b, rolconfig:a",
                );
                for (i, (name, role)) in self.roles().into_iter().enumerate() {
                    t.row(vec![
                        V::I(role_oid(i)),
                        s(name),
                        V::B(role.superuser),
                        V::B(true),
                        V::B(role.superuser),
                        V::B(role.superuser),
                        V::B(role.login),
                        V::B(false),
                        V::I(-1),
                        s("********"),
                        V::N,
                        V::B(role.superuser),
                        V::N,
                    ]);
                }
                t.build()
            }
            "pg_user" => {
                let mut t = Table::new(
                    "usename, usesysid:i, usecreatedb:b, usesuper:b, userepl:b, usebypassrls:b, \
                     passwd, valuntil, useconfig:a",
                );
                for (i, (name, role)) in self.roles().into_iter().enumerate() {
                    if !role.login {
                        continue;
                    }
                    t.row(vec![
                        s(name),
                        V::I(role_oid(i)),
                        V::B(role.superuser),
                        V::B(role.superuser),
                        V::B(false),
                        V::B(role.superuser),
                        s("********"),
                        V::N,
                        V::N,
                    ]);
                }
                t.build()
            }
            "pg_settings" => {
                let mut t = Table::new(
                    "name, setting, unit, category, short_desc, extra_desc, context, vartype, \
                     source, min_val, max_val, enumvals, boot_val, reset_val, sourcefile, \
                     sourceline:i, pending_restart:b",
                );
                for (name, value, description) in crate::engine::all_settings(self.asker.settings) {
                    t.row(vec![
                        s(name),
                        value.map_or(V::N, s),
                        V::N,
                        s("Drizzle"),
                        s(description),
                        V::N,
                        s("user"),
                        s("string"),
                        s("session"),
                        V::N,
                        V::N,
                        V::N,
                        V::N,
                        V::N,
                        V::N,
                        V::N,
                        V::B(false),
                    ]);
                }
                t.build()
            }
            "pg_tables" => {
                let mut t = Table::new(
                    "schemaname, tablename, tableowner, tablespace, hasindexes:b, hasrules:b, \
                     hastriggers:b, rowsecurity:b",
                );
                let owner = self.owner();
                for r in self.relations().into_iter().filter(|r| r.relkind == "r") {
                    t.row(vec![
                        s("public"),
                        s(r.name),
                        s(owner.clone()),
                        V::N,
                        V::B(false),
                        V::B(false),
                        V::B(false),
                        V::B(false),
                    ]);
                }
                t.build()
            }
            "pg_matviews" => {
                let mut t = Table::new(
                    "schemaname, matviewname, matviewowner, tablespace, hasindexes:b, \
                     ispopulated:b, definition",
                );
                let owner = self.owner();
                for v in self.catalog.views() {
                    t.row(vec![
                        s("public"),
                        s(v.name),
                        s(owner.clone()),
                        V::N,
                        V::B(false),
                        V::B(true),
                        s(v.query),
                    ]);
                }
                t.build()
            }
            "pg_views" => Table::new("schemaname, viewname, viewowner, definition").build(),
            "pg_stat_activity" => {
                let mut t = Table::new(
                    "datid:i, datname, pid:i, leader_pid:i, usesysid:i, usename, \
                     application_name, client_addr, client_hostname, client_port:i, \
                     backend_start:z, xact_start:z, query_start:z, state_change:z, \
                     wait_event_type, wait_event, state, backend_xid, backend_xmin, \
                     query_id:i, query, backend_type",
                );
                for a in self.asker.sessions.activity() {
                    t.row(vec![
                        V::I(DATABASE_OID),
                        s(a.database),
                        V::I(i64::from(a.pid)),
                        V::N,
                        V::N,
                        s(a.user),
                        s(a.application_name),
                        V::N,
                        V::N,
                        V::N,
                        V::I(a.backend_start_us),
                        V::N,
                        a.query_start_us.map_or(V::N, V::I),
                        a.query_start_us.map_or(V::N, V::I),
                        V::N,
                        V::N,
                        s(a.state),
                        V::N,
                        V::N,
                        V::N,
                        s(a.query),
                        s("client backend"),
                    ]);
                }
                t.build()
            }
            "drizzle_relations" => {
                let mut t = Table::new("oid:i, relname, kind, partitions:i, definition");
                let streams = self.catalog.streams();
                let views = self.catalog.views();
                for r in self.relations() {
                    let partitions = streams
                        .iter()
                        .find(|st| st.name == r.name)
                        .map_or(V::N, |st| V::I(i64::from(st.partitions)));
                    let definition = views
                        .iter()
                        .find(|v| v.name == r.name)
                        .map_or(V::N, |v| s(v.query.clone()));
                    t.row(vec![
                        V::I(r.oid),
                        s(r.name),
                        s(r.kind),
                        partitions,
                        definition,
                    ]);
                }
                t.build()
            }
            "pg_am" => {
                let mut t = Table::new("oid:i, amname, amhandler, amtype");
                t.row(vec![V::I(2), s("heap"), s("heap_tableam_handler"), s("t")]);
                t.row(vec![V::I(403), s("btree"), s("bthandler"), s("i")]);
                t.build()
            }
            "pg_tablespace" => {
                let mut t = Table::new("oid:i, spcname, spcowner:i, spcacl:a, spcoptions:a");
                t.row(vec![
                    V::I(1663),
                    s("pg_default"),
                    V::I(OWNER_OID),
                    V::N,
                    V::N,
                ]);
                t.row(vec![
                    V::I(1664),
                    s("pg_global"),
                    V::I(OWNER_OID),
                    V::N,
                    V::N,
                ]);
                t.build()
            }
            "pg_index" => Table::new(
                "indexrelid:i, indrelid:i, indnatts:i, indnkeyatts:i, indisunique:b, \
                 indnullsnotdistinct:b, indisprimary:b, indisexclusion:b, indimmediate:b, \
                 indisclustered:b, indisvalid:b, indcheckxmin:b, indisready:b, indislive:b, \
                 indisreplident:b, indkey:v, indcollation:v, indclass:v, indoption:v, indexprs, \
                 indpred",
            )
            .build(),
            "pg_constraint" => Table::new(
                "oid:i, conname, connamespace:i, contype, condeferrable:b, condeferred:b, \
                 convalidated:b, conrelid:i, contypid:i, conindid:i, conparentid:i, \
                 confrelid:i, confupdtype, confdeltype, confmatchtype, conislocal:b, \
                 coninhcount:i, connoinherit:b, conkey:v, confkey:v, conpfeqop:v, conppeqop:v, \
                 conffeqop:v, confdelsetcols:v, conexclop:v, conbin",
            )
            .build(),
            "pg_description" => Table::new("objoid:i, classoid:i, objsubid:i, description").build(),
            "pg_shdescription" => Table::new("objoid:i, classoid:i, description").build(),
            "pg_extension" => Table::new(
                "oid:i, extname, extowner:i, extnamespace:i, extrelocatable:b, extversion, \
                 extconfig:a, extcondition:a",
            )
            .build(),
            "pg_proc" => Table::new(
                "oid:i, proname, pronamespace:i, proowner:i, prolang:i, procost:f, prorows:f, \
                 provariadic:i, prosupport, prokind, prosecdef:b, proleakproof:b, \
                 proisstrict:b, proretset:b, provolatile, proparallel, pronargs:i, \
                 pronargdefaults:i, prorettype:i, proargtypes, proallargtypes, proargmodes, \
                 proargnames, proargdefaults, protrftypes, prosrc, probin, prosqlbody, \
                 proconfig:a, proacl:a",
            )
            .build(),
            "pg_inherits" => {
                Table::new("inhrelid:i, inhparent:i, inhseqno:i, inhdetachpending:b").build()
            }
            "pg_trigger" => Table::new(
                "oid:i, tgrelid:i, tgparentid:i, tgname, tgfoid:i, tgtype:i, tgenabled, \
                 tgisinternal:b, tgconstrrelid:i, tgconstrindid:i, tgconstraint:i, \
                 tgdeferrable:b, tginitdeferred:b, tgnargs:i, tgattr, tgargs, tgqual, \
                 tgoldtable, tgnewtable",
            )
            .build(),
            "pg_rewrite" => Table::new(
                "oid:i, rulename, ev_class:i, ev_type, ev_enabled, is_instead:b, ev_qual, \
                 ev_action",
            )
            .build(),
            "pg_policy" => Table::new(
                "oid:i, polname, polrelid:i, polcmd, polpermissive:b, polroles, polqual, \
                 polwithcheck",
            )
            .build(),
            "pg_collation" => Table::new(
                "oid:i, collname, collnamespace:i, collowner:i, collprovider, \
                 collisdeterministic:b, collencoding:i, collcollate, collctype",
            )
            .build(),
            "pg_enum" => Table::new("oid:i, enumtypid:i, enumsortorder:f, enumlabel").build(),
            "pg_sequence" => Table::new(
                "seqrelid:i, seqtypid:i, seqstart:i, seqincrement:i, seqmax:i, seqmin:i, \
                 seqcache:i, seqcycle:b",
            )
            .build(),
            "pg_foreign_table" => Table::new("ftrelid:i, ftserver:i, ftoptions:a").build(),
            "pg_partitioned_table" => Table::new(
                "partrelid:i, partstrat, partnatts:i, partdefid:i, partattrs, partclass, \
                 partcollation, partexprs",
            )
            .build(),
            "pg_attrdef" => Table::new("oid:i, adrelid:i, adnum:i, adbin").build(),
            "pg_statistic_ext" => Table::new(
                "oid:i, stxrelid:i, stxname, stxnamespace:i, stxowner:i, stxstattarget:i, \
                 stxkeys, stxkind:a, stxexprs",
            )
            .build(),
            "pg_publication" => Table::new(
                "oid:i, pubname, pubowner:i, puballtables:b, pubinsert:b, pubupdate:b, \
                 pubdelete:b, pubtruncate:b, pubviaroot:b",
            )
            .build(),
            "pg_publication_rel" => {
                Table::new("oid:i, prpubid:i, prrelid:i, prqual, prattrs").build()
            }
            "pg_publication_namespace" => Table::new("oid:i, pnpubid:i, pnnspid:i").build(),
            "pg_depend" => Table::new(
                "classid:i, objid:i, objsubid:i, refclassid:i, refobjid:i, refobjsubid:i, deptype",
            )
            .build(),
            "pg_opclass" => Table::new(
                "oid:i, opcmethod:i, opcname, opcnamespace:i, opcowner:i, opcfamily:i, \
                 opcintype:i, opcdefault:b, opckeytype:i",
            )
            .build(),
            "pg_locks" => Table::new(
                "locktype, database:i, relation:i, page:i, tuple:i, virtualxid, \
                 transactionid:i, classid:i, objid:i, objsubid:i, virtualtransaction, pid:i, \
                 mode, granted:b, fastpath:b, waitstart:z",
            )
            .build(),
            "pg_stat_user_tables" | "pg_stat_all_tables" => Table::new(
                "relid:i, schemaname, relname, seq_scan:i, seq_tup_read:i, idx_scan:i, \
                 idx_tup_fetch:i, n_tup_ins:i, n_tup_upd:i, n_tup_del:i, n_tup_hot_upd:i, \
                 n_live_tup:i, n_dead_tup:i, last_vacuum:z, last_autovacuum:z, \
                 last_analyze:z, last_autoanalyze:z",
            )
            .build(),
            "pg_event_trigger" => {
                Table::new("oid:i, evtname, evtevent, evtowner:i, evtfoid:i, evtenabled, evttags")
                    .build()
            }
            _ => return None,
        })
    }

    fn roles(&self) -> Vec<(String, crate::auth::RoleDef)> {
        let mut roles = self.catalog.roles();
        // The bootstrap superuser first: it is OID 10.
        roles.sort_by_key(|(n, r)| (!r.superuser, n.clone()));
        if roles.is_empty() {
            roles.push((
                "drizzle".into(),
                crate::auth::RoleDef {
                    superuser: true,
                    login: true,
                    verifier: None,
                },
            ));
        }
        roles
    }

    fn information_schema(&self, name: &str) -> Option<Built> {
        let database = self.asker.database;
        Some(match name {
            "schemata" => {
                let mut t = Table::new(
                    "catalog_name, schema_name, schema_owner, default_character_set_catalog, \
                     default_character_set_schema, default_character_set_name, sql_path",
                );
                let owner = self.owner();
                for n in ["pg_catalog", "public", "information_schema"] {
                    t.row(vec![
                        s(database),
                        s(n),
                        s(owner.clone()),
                        V::N,
                        V::N,
                        V::N,
                        V::N,
                    ]);
                }
                t.build()
            }
            "tables" => {
                let mut t = Table::new(
                    "table_catalog, table_schema, table_name, table_type, \
                     self_referencing_column_name, reference_generation, \
                     user_defined_type_catalog, user_defined_type_schema, \
                     user_defined_type_name, is_insertable_into, is_typed, commit_action",
                );
                // Materialized views are not in information_schema (as in
                // Postgres: tools that list them read pg_class or
                // pg_matviews, and add them to what they read here).
                for r in self.relations().into_iter().filter(|r| r.relkind != "m") {
                    t.row(vec![
                        s(database),
                        s("public"),
                        s(r.name),
                        s("BASE TABLE"),
                        V::N,
                        V::N,
                        V::N,
                        V::N,
                        V::N,
                        s("YES"),
                        s("NO"),
                        V::N,
                    ]);
                }
                t.build()
            }
            // Drizzle's views are all materialized, and so not listed here.
            "views" => Table::new(
                "table_catalog, table_schema, table_name, view_definition, check_option, \
                 is_updatable, is_insertable_into, is_trigger_updatable, \
                 is_trigger_deletable, is_trigger_insertable_into",
            )
            .build(),
            "table_constraints" => Table::new(
                "constraint_catalog, constraint_schema, constraint_name, table_catalog, \
                 table_schema, table_name, constraint_type, is_deferrable, initially_deferred, \
                 enforced, nulls_distinct",
            )
            .build(),
            "key_column_usage" => Table::new(
                "constraint_catalog, constraint_schema, constraint_name, table_catalog, \
                 table_schema, table_name, column_name, ordinal_position:i, \
                 position_in_unique_constraint:i",
            )
            .build(),
            "referential_constraints" => Table::new(
                "constraint_catalog, constraint_schema, constraint_name, \
                 unique_constraint_catalog, unique_constraint_schema, unique_constraint_name, \
                 match_option, update_rule, delete_rule",
            )
            .build(),
            "columns" => {
                let mut t = Table::new(
                    "table_catalog, table_schema, table_name, column_name, ordinal_position:i, \
                     column_default, is_nullable, data_type, character_maximum_length:i, \
                     character_octet_length:i, numeric_precision:i, numeric_precision_radix:i, \
                     numeric_scale:i, datetime_precision:i, interval_type, interval_precision:i, \
                     udt_catalog, udt_schema, udt_name, is_identity, is_generated, \
                     is_updatable",
                );
                for r in self.relations().into_iter().filter(|r| r.relkind != "m") {
                    for (i, (name, dt, nullable)) in r.columns.iter().enumerate() {
                        let typ = pg_type(dt) as i64;
                        let udt = TYPES.iter().find(|t| t.0 == typ).map_or("text", |t| t.1);
                        let (precision, radix, scale) = match dt {
                            DataType::Int16 | DataType::Int8 | DataType::UInt8 => {
                                (V::I(16), V::I(2), V::I(0))
                            }
                            DataType::Int32 | DataType::UInt16 => (V::I(32), V::I(2), V::I(0)),
                            DataType::Int64 | DataType::UInt32 | DataType::UInt64 => {
                                (V::I(64), V::I(2), V::I(0))
                            }
                            DataType::Float32 => (V::I(24), V::I(2), V::N),
                            DataType::Float64 => (V::I(53), V::I(2), V::N),
                            DataType::Decimal128(p, sc) => {
                                (V::I(i64::from(*p)), V::I(10), V::I(i64::from(*sc)))
                            }
                            _ => (V::N, V::N, V::N),
                        };
                        let datetime = match dt {
                            DataType::Timestamp(_, _) => V::I(6),
                            DataType::Date32 => V::I(0),
                            _ => V::N,
                        };
                        t.row(vec![
                            s(database),
                            s("public"),
                            s(r.name.clone()),
                            s(name.clone()),
                            V::I(i as i64 + 1),
                            V::N,
                            s(if *nullable { "YES" } else { "NO" }),
                            s(sql_type_name(dt)),
                            V::N,
                            V::N,
                            precision,
                            radix,
                            scale,
                            datetime,
                            V::N,
                            V::N,
                            s(database),
                            s("pg_catalog"),
                            s(udt),
                            s("NO"),
                            s("NEVER"),
                            s(if r.relkind == "r" { "YES" } else { "NO" }),
                        ]);
                    }
                }
                t.build()
            }
            _ => return None,
        })
    }
}

/// Role OIDs: the bootstrap superuser (first) is 10, the others follow
/// from 16_000 (below the object OIDs, which start at 16384).
fn role_oid(i: usize) -> i64 {
    if i == 0 {
        OWNER_OID
    } else {
        16_000 + i as i64
    }
}
