//! # drizzle-server: the front end
//!
//! Where it sits: the edge of the system. Clients speak the Postgres wire
//! protocol to [`session`]; statements are parsed and planned by
//! `drizzle-planner` and run by [`engine::Engine`], which owns the
//! [`catalog::Catalog`] (streams, tables, views and their logs) and the
//! `drizzle-exec` runtime (coordinator and workers).
//!
//! ```text
//!  psql / drivers ──pgwire──▶ session ──▶ engine ──▶ planner ──▶ exec runtime
//!                  ◀── rows flushed per micro-batch ──────────────┘
//! ```
//!
//! The edge is hardened (see `docs/security.md` and `docs/operations.md`):
//! [`auth`] (roles, SCRAM-SHA-256), [`tls`] (rustls), [`wire`] (frontend
//! messages checked before they are decoded), and [`repair`] (`drizzle
//! repair` for a damaged data directory).
//!
//! What Postgres clients and tools expect (see `docs/clients.md`):
//! [`system_catalog`] (`pg_catalog` and `information_schema` built from the
//! live catalog), [`compat`] (session functions replaced by their values,
//! and the rewrites psql's and tools' catalog SQL needs), [`copy`] and
//! [`copy_binary`] (COPY in text, CSV and Postgres's binary format).
//!
//! Errors from every crate are classified into SQLSTATE codes in [`errors`].
//! Types to read first: [`engine::Engine`], [`session::serve`],
//! [`catalog::Catalog`], [`providers::ViewStore`].

pub mod auth;
pub mod bench;
pub mod catalog;
pub mod compat;
pub mod copy;
pub mod copy_binary;
pub mod encode;
pub mod engine;
pub mod errors;
pub mod providers;
pub mod repair;
pub mod session;
pub mod system_catalog;
pub mod tls;
pub mod wire;

/// The version reported to clients as `server_version`.
pub const SERVER_VERSION: &str = "16.0 (Drizzle 0.1.0)";

/// [`SERVER_VERSION`] as `server_version_num` says it.
pub const SERVER_VERSION_NUM: &str = "160000";
