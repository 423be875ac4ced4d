//! One client connection: the Postgres wire protocol, driven by hand so that
//! continuous results are flushed to the socket as each micro-batch
//! completes (a stock pgwire handler only flushes at the end of a result).
//!
//! A reader task decodes frontend messages (pgwire's codec) into a bounded
//! channel; the session loop answers them. While a continuous query streams,
//! the loop also watches that channel (a closed socket stops the query) and
//! the session's cancel signal (a CancelRequest on another connection).
//!
//! Supported: simple query protocol (many statements per message), extended
//! protocol (Parse/Bind/Describe/Execute/Close/Sync/Flush, text and binary
//! parameters and results, PortalSuspended for `max_rows`), `COPY FROM
//! STDIN`, `COPY (...) TO STDOUT`, cursors (`DECLARE`/`FETCH`/`CLOSE`) and
//! transaction blocks for them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use bytes::{Bytes, BytesMut};
use datafusion::common::ScalarValue;
use drizzle_exec::QueryHandle;
use drizzle_planner::{parse_statements, CopyOptions, DrizzleStatement, PlannedQuery, RoleOptions};
use parking_lot::Mutex;
use pgwire::messages::copy::{CopyData, CopyDone, CopyInResponse, CopyOutResponse};
use pgwire::messages::data::{FieldDescription, NoData, ParameterDescription, RowDescription};
use pgwire::messages::extendedquery::{
    BindComplete, CloseComplete, ParseComplete, PortalSuspended,
};
use pgwire::messages::response::{
    CommandComplete, EmptyQueryResponse, ErrorResponse, ReadyForQuery, TransactionStatus,
};
use pgwire::messages::startup::{Authentication, BackendKeyData, ParameterStatus, SecretKey};
use pgwire::messages::{
    DecodeContext, PgWireBackendMessage, PgWireFrontendMessage, SslNegotiationMetaMessage,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::auth::{AuthMethod, Identity, RoleDef, ScramExchange, ScramStep};
use crate::engine::{Engine, Outcome, Settings};
use crate::errors::PgError;

/// Largest frontend message accepted; a larger one closes the connection.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Time a new connection has to complete its startup packet.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest COPY FROM STDIN payload held for one statement.
pub const MAX_COPY_BYTES: usize = 1 << 30;

/// Sessions by backend pid, for CancelRequest, and the server's shutdown
/// signal.
pub struct SessionRegistry {
    sessions: Mutex<HashMap<i32, Registered>>,
    next_pid: AtomicI32,
    shutdown: watch::Sender<bool>,
}

/// A session as the registry knows it.
struct Registered {
    /// Its cancel key.
    secret: i32,
    /// Bumped to cancel its running statement.
    cancel: watch::Sender<u64>,
    /// Set to end the session (server shutdown, `pg_terminate_backend`).
    terminate: watch::Sender<bool>,
    /// Its role, for `pg_cancel_backend` and `pg_terminate_backend`.
    user: String,
    /// What it is doing, for `pg_stat_activity`.
    activity: Mutex<Activity>,
}

/// A session as `pg_stat_activity` shows it.
#[derive(Debug, Clone)]
pub struct Activity {
    /// Backend pid.
    pub pid: i32,
    /// Role.
    pub user: String,
    /// Database asked for.
    pub database: String,
    /// `application_name` at connect.
    pub application_name: String,
    /// Connected at (Unix µs).
    pub backend_start_us: i64,
    /// `active` while a statement runs, else `idle`.
    pub state: &'static str,
    /// The running (or last) statement's text.
    pub query: String,
    /// When it started (Unix µs).
    pub query_start_us: Option<i64>,
}

fn unix_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl Default for SessionRegistry {
    fn default() -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            next_pid: AtomicI32::new(0),
            shutdown: watch::channel(false).0,
        }
    }
}

impl SessionRegistry {
    fn register(
        &self,
        user: &str,
        database: &str,
        application_name: &str,
    ) -> (i32, i32, watch::Receiver<u64>, watch::Receiver<bool>) {
        let pid = self.next_pid.fetch_add(1, Ordering::Relaxed) + 1000;
        let secret = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(7) as i32)
            ^ pid.wrapping_mul(0x5bd1_e995);
        let (tx, rx) = watch::channel(0);
        let (terminate, ended) = watch::channel(*self.shutdown.borrow());
        self.sessions.lock().insert(
            pid,
            Registered {
                secret,
                cancel: tx,
                terminate,
                user: user.to_string(),
                activity: Mutex::new(Activity {
                    pid,
                    user: user.to_string(),
                    database: database.to_string(),
                    application_name: application_name.to_string(),
                    backend_start_us: unix_us(),
                    state: "idle",
                    query: String::new(),
                    query_start_us: None,
                }),
            },
        );
        (pid, secret, rx, ended)
    }

    fn unregister(&self, pid: i32) {
        self.sessions.lock().remove(&pid);
    }

    /// Tells every session the server is shutting down: an idle session is
    /// closed, a running continuous query ends with 57P01, and a statement
    /// in progress (an `INSERT`, a `COPY`) finishes and is acknowledged
    /// first.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
        for s in self.sessions.lock().values() {
            s.terminate.send_replace(true);
        }
    }

    /// `pg_cancel_backend(pid)` (`terminate`: `pg_terminate_backend`) from
    /// a session of `user`: a superuser may signal any session, a role its
    /// own. False when there is no such session; 42501 when not allowed.
    pub fn signal(
        &self,
        pid: i32,
        user: &str,
        superuser: bool,
        terminate: bool,
    ) -> Result<bool, PgError> {
        let sessions = self.sessions.lock();
        let Some(s) = sessions.get(&pid) else {
            return Ok(false);
        };
        if !superuser && s.user != user {
            return Err(PgError::new(
                "42501",
                format!(
                    "permission denied to {} backend {pid}",
                    if terminate { "terminate" } else { "cancel" }
                ),
            )
            .with_hint("only superusers may signal other roles' sessions"));
        }
        if terminate {
            s.terminate.send_replace(true);
        } else {
            s.cancel.send_modify(|v| *v += 1);
        }
        Ok(true)
    }

    /// Every session's activity, by pid.
    pub fn activity(&self) -> Vec<Activity> {
        let mut all: Vec<Activity> = self
            .sessions
            .lock()
            .values()
            .map(|s| s.activity.lock().clone())
            .collect();
        all.sort_by_key(|a| a.pid);
        all
    }

    /// Marks session `pid` running `query` (`Some`) or idle (`None`).
    fn set_activity(&self, pid: i32, query: Option<&str>) {
        if let Some(s) = self.sessions.lock().get(&pid) {
            let mut a = s.activity.lock();
            match query {
                Some(q) => {
                    a.state = "active";
                    // Bounded: a statement can be 1 GiB of COPY text.
                    a.query = q.chars().take(1024).collect();
                    a.query_start_us = Some(unix_us());
                }
                None => a.state = "idle",
            }
        }
    }

    /// Sessions still open.
    pub fn open_sessions(&self) -> usize {
        self.sessions.lock().len()
    }

    fn cancel(&self, pid: i32, secret: &SecretKey) {
        let sessions = self.sessions.lock();
        if let Some(s) = sessions.get(&pid) {
            if secret.eq_value(&SecretKey::I32(s.secret)) {
                s.cancel.send_modify(|v| *v += 1);
            }
        }
    }
}

enum Inbound {
    Msg(PgWireFrontendMessage),
    /// A well-framed message with content that is refused (not UTF-8): an
    /// error for that message, the session goes on.
    Invalid {
        error: PgError,
        /// From the extended protocol: skip to the next Sync.
        extended: bool,
    },
    Closed,
    Bad(String),
}

/// How the pgwire endpoint checks its clients (see `docs/security.md`).
#[derive(Debug, Clone)]
pub struct Security {
    /// Password checking.
    pub auth: AuthMethod,
    /// TLS, when a certificate is configured.
    pub tls: Option<crate::tls::TlsSettings>,
    /// Refuse sessions that did not negotiate TLS.
    pub tls_required: bool,
    /// Salts the decoy SCRAM verifier of unknown users.
    pub decoy_key: [u8; 32],
}

impl Security {
    /// No passwords, no TLS (tests and benchmarks on loopback).
    pub fn trust() -> Self {
        Self {
            auth: AuthMethod::Trust,
            tls: None,
            tls_required: false,
            decoy_key: crate::auth::random_key(),
        }
    }
}

/// A client connection: plain TCP or TLS over it.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}
type BoxConn = Box<dyn Conn>;

/// What opens a connection.
enum Opening {
    SslRequest,
    Startup(pgwire::messages::startup::Startup),
    Close,
}

/// Reads until an SSLRequest, a StartupMessage or a CancelRequest (which is
/// served here) arrives, within `deadline`.
async fn read_opening<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    ctx: &mut DecodeContext,
    deadline: tokio::time::Instant,
    registry: &SessionRegistry,
) -> Opening {
    loop {
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            PgWireFrontendMessage::decode(buf, ctx)
        }));
        match decoded {
            Ok(Ok(Some(PgWireFrontendMessage::SslNegotiation(
                SslNegotiationMetaMessage::None,
            )))) => {
                ctx.awaiting_frontend_ssl = false;
                continue;
            }
            Ok(Ok(Some(PgWireFrontendMessage::SslNegotiation(
                SslNegotiationMetaMessage::PostgresSsl(_),
            )))) => {
                ctx.awaiting_frontend_ssl = false;
                return Opening::SslRequest;
            }
            Ok(Ok(Some(PgWireFrontendMessage::SslNegotiation(_)))) => {
                // GSSAPI encryption: not offered.
                if s.write_all(b"N").await.is_err() {
                    return Opening::Close;
                }
                continue;
            }
            Ok(Ok(Some(PgWireFrontendMessage::CancelRequest(c)))) => {
                registry.cancel(c.pid, &c.secret_key);
                return Opening::Close;
            }
            Ok(Ok(Some(PgWireFrontendMessage::Startup(st)))) => return Opening::Startup(st),
            Ok(Ok(Some(_))) => return Opening::Close,
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                let _ = send_fatal(
                    s,
                    PgError::new("08P01", format!("invalid startup packet: {e}")),
                )
                .await;
                return Opening::Close;
            }
            Err(_) => {
                let _ = send_fatal(s, PgError::new("08P01", "invalid startup packet")).await;
                return Opening::Close;
            }
        }
        if buf.len() > 1 << 16 {
            return Opening::Close;
        }
        match tokio::time::timeout_at(deadline, s.read_buf(buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Opening::Close,
            Ok(Ok(_)) => {}
        }
    }
}

/// Reads one whole message (during authentication) within `deadline`.
async fn read_auth_message<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    deadline: tokio::time::Instant,
) -> Option<(u8, Vec<u8>)> {
    loop {
        if buf.len() >= 5 {
            let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
            if !(4..=(1 << 16)).contains(&len) {
                return None;
            }
            let total = len as usize + 1;
            if buf.len() >= total {
                let frame = buf.split_to(total);
                return Some((frame[0], frame[5..].to_vec()));
            }
        }
        match tokio::time::timeout_at(deadline, s.read_buf(buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(_)) => {}
        }
    }
}

/// Writes backend messages now.
async fn send_now<S: AsyncWrite + Unpin>(
    s: &mut S,
    msgs: Vec<PgWireBackendMessage>,
) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    for m in msgs {
        let _ = m.encode(&mut out);
    }
    s.write_all(&out).await?;
    s.flush().await
}

/// Runs the SCRAM-SHA-256 exchange for `user`. `Err` has been sent.
async fn scram<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    deadline: tokio::time::Instant,
    exchange: &mut ScramExchange,
) -> Result<(), ()> {
    let sasl = Authentication::SASL(vec![crate::auth::SCRAM_SHA_256.to_string()]);
    if send_now(s, vec![PgWireBackendMessage::Authentication(sasl)])
        .await
        .is_err()
    {
        return Err(());
    }
    let bad = || PgError::new("08P01", "expected a SASL response").fatal();
    let step = match read_auth_message(s, buf, deadline).await {
        Some((b'p', body)) => match crate::auth::parse_initial_response(&body) {
            Some((mechanism, data)) => exchange.on_initial(&mechanism, &data),
            None => Err(bad()),
        },
        Some(_) => Err(bad()),
        None => return Err(()),
    };
    let first = match step {
        Ok(ScramStep::Continue(first)) => first,
        Ok(ScramStep::Final(_)) => return Err(()),
        Err(e) => {
            let _ = send_fatal(s, e).await;
            return Err(());
        }
    };
    let cont = Authentication::SASLContinue(Bytes::from(first.into_bytes()));
    if send_now(s, vec![PgWireBackendMessage::Authentication(cont)])
        .await
        .is_err()
    {
        return Err(());
    }
    let step = match read_auth_message(s, buf, deadline).await {
        Some((b'p', body)) => exchange.on_response(&body),
        Some(_) => Err(bad()),
        None => return Err(()),
    };
    match step {
        Ok(ScramStep::Final(last)) => {
            let fin = Authentication::SASLFinal(Bytes::from(last.into_bytes()));
            send_now(s, vec![PgWireBackendMessage::Authentication(fin)])
                .await
                .map_err(|_| ())
        }
        Ok(ScramStep::Continue(_)) => Err(()),
        Err(e) => {
            let _ = send_fatal(s, e).await;
            Err(())
        }
    }
}

/// Serves one connection until it closes. Never panics on client input.
///
/// Start-up: an optional SSLRequest (answered `S` and a TLS handshake when a
/// certificate is configured, else `N`), the StartupMessage (or a
/// CancelRequest), then authentication by [`Security::auth`], all within
/// [`STARTUP_TIMEOUT`] (a stalled half-open client must not hold a task
/// forever).
pub async fn serve(
    engine: Arc<Engine>,
    registry: Arc<SessionRegistry>,
    security: Arc<Security>,
    mut socket: TcpStream,
) {
    let _ = socket.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(8192);
    let mut ctx = DecodeContext::default();
    let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
    let (mut conn, startup, encrypted): (BoxConn, _, bool) =
        match read_opening(&mut socket, &mut buf, &mut ctx, deadline, &registry).await {
            Opening::Close => return,
            Opening::Startup(st) => (Box::new(socket), st, false),
            Opening::SslRequest => match &security.tls {
                Some(tls) => {
                    if !buf.is_empty() {
                        // Bytes sent before the handshake would be taken as
                        // if they came over TLS (CVE-2021-23214).
                        let _ = send_fatal(
                            &mut socket,
                            PgError::new("08P01", "received unencrypted data after SSL request"),
                        )
                        .await;
                        return;
                    }
                    if socket.write_all(b"S").await.is_err() {
                        return;
                    }
                    let mut stream = match tokio::time::timeout_at(
                        deadline,
                        tls.acceptor.accept(socket),
                    )
                    .await
                    {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            tracing::debug!("TLS handshake failed: {e}");
                            return;
                        }
                        Err(_) => return,
                    };
                    match read_opening(&mut stream, &mut buf, &mut ctx, deadline, &registry).await {
                        Opening::Startup(st) => (Box::new(stream), st, true),
                        _ => return,
                    }
                }
                None => {
                    if socket.write_all(b"N").await.is_err() {
                        return;
                    }
                    match read_opening(&mut socket, &mut buf, &mut ctx, deadline, &registry).await {
                        Opening::Startup(st) => (Box::new(socket), st, false),
                        _ => return,
                    }
                }
            },
        };
    ctx.awaiting_frontend_startup = false;
    if startup.protocol_number_major != 3 {
        let _ = send_fatal(
            &mut conn,
            PgError::new("0A000", "unsupported frontend protocol"),
        )
        .await;
        return;
    }
    if security.tls_required && !encrypted {
        let _ = send_fatal(
            &mut conn,
            PgError::new("28000", "this server accepts TLS connections only")
                .with_hint("connect with sslmode=require"),
        )
        .await;
        return;
    }
    let Some(user) = startup.parameters.get("user").cloned() else {
        let _ = send_fatal(
            &mut conn,
            PgError::new(
                "28000",
                "no PostgreSQL user name specified in startup packet",
            ),
        )
        .await;
        return;
    };
    let role = engine.catalog.role(&user);
    let identity = match security.auth {
        AuthMethod::Trust => {
            if role.as_ref().is_some_and(|r| !r.login) {
                let _ = send_fatal(
                    &mut conn,
                    PgError::new(
                        "28000",
                        format!("role \"{user}\" is not permitted to log in"),
                    ),
                )
                .await;
                return;
            }
            // Trust: an unknown user name is let in with every right.
            Identity {
                superuser: role.as_ref().is_none_or(|r| r.superuser),
                user,
            }
        }
        AuthMethod::ScramSha256 => {
            let mut exchange = ScramExchange::new(&user, role.as_ref(), &security.decoy_key);
            if scram(&mut conn, &mut buf, deadline, &mut exchange)
                .await
                .is_err()
            {
                tracing::info!(%user, "password authentication failed");
                return;
            }
            Identity {
                superuser: role.as_ref().is_some_and(|r| r.superuser),
                user,
            }
        }
    };
    if *registry.shutdown.borrow() {
        let _ = send_fatal(&mut conn, shutting_down()).await;
        return;
    }
    let database_asked = startup
        .parameters
        .get("database")
        .cloned()
        .unwrap_or_else(|| identity.user.clone());
    let application_name = startup
        .parameters
        .get("application_name")
        .cloned()
        .unwrap_or_default();
    let (pid, secret, cancel, ended) =
        registry.register(&identity.user, &database_asked, &application_name);
    let (rd, wr) = tokio::io::split(conn);
    let (tx, rx) = mpsc::channel(64);
    let reader = tokio::spawn(read_loop(rd, buf, ctx, tx));
    let superuser = identity.superuser;
    let identity_user = identity.user.clone();
    let mut session = Session {
        settings: engine.default_settings(),
        engine,
        identity,
        out: BytesMut::with_capacity(64 * 1024),
        wr,
        rx,
        pending: VecDeque::new(),
        cancel,
        deadline: None,
        shutdown: ended,
        registry: Arc::clone(&registry),
        pid,
        database: startup
            .parameters
            .get("database")
            .cloned()
            .unwrap_or_else(|| identity_user.clone()),
        in_txn: false,
        txn_failed: false,
        cursors: HashMap::new(),
        statements: HashMap::new(),
        portals: HashMap::new(),
        skip_until_sync: false,
    };
    // Read-only parameters that describe the session (SHOW, current_setting).
    session.settings.other.insert(
        "session_authorization".into(),
        session.identity.user.clone(),
    );
    session
        .settings
        .other
        .insert("database".into(), session.database.clone());
    session.settings.other.insert(
        "is_superuser".into(),
        if superuser { "on" } else { "off" }.into(),
    );
    if let Some(app) = startup.parameters.get("application_name") {
        session
            .settings
            .other
            .insert("application_name".into(), app.clone());
    }
    session.push(PgWireBackendMessage::Authentication(Authentication::Ok));
    let session_authorization = session.identity.user.clone();
    for (k, v) in [
        ("server_version", crate::SERVER_VERSION),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("TimeZone", "UTC"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("IntervalStyle", "postgres"),
        ("is_superuser", if superuser { "on" } else { "off" }),
        ("session_authorization", session_authorization.as_str()),
    ] {
        session.push(PgWireBackendMessage::ParameterStatus(ParameterStatus::new(
            k.into(),
            v.into(),
        )));
    }
    session.push(PgWireBackendMessage::BackendKeyData(BackendKeyData::new(
        pid,
        SecretKey::I32(secret),
    )));
    session.ready();
    if session.flush().await.is_ok() {
        session.run().await;
    }
    registry.unregister(pid);
    reader.abort();
}

/// What a session gets when the server shuts down.
fn shutting_down() -> PgError {
    PgError::new(
        "57P01",
        "terminating connection due to administrator command",
    )
}

/// Resolves once the server shuts down (never, if its registry is gone).
async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn send_fatal<S: AsyncWrite + Unpin>(wr: &mut S, e: PgError) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    let _ = PgWireBackendMessage::ErrorResponse(error_response(&e.fatal())).encode(&mut out);
    wr.write_all(&out).await?;
    wr.flush().await
}

async fn read_loop(
    mut rd: tokio::io::ReadHalf<BoxConn>,
    mut buf: BytesMut,
    ctx: DecodeContext,
    tx: mpsc::Sender<Inbound>,
) {
    loop {
        loop {
            let inbound = match next_frame(&mut buf, &ctx) {
                Ok(Some(inbound)) => inbound,
                Ok(None) => break,
                Err(reason) => {
                    let _ = tx.send(Inbound::Bad(reason)).await;
                    return;
                }
            };
            if tx.send(inbound).await.is_err() {
                return;
            }
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = tx.send(Inbound::Closed).await;
                return;
            }
            Ok(_) => {}
        }
    }
}

/// Takes the next complete frontend message off `buf` (after start-up).
///
/// `Ok(None)`: more bytes are needed. `Err`: the stream cannot be trusted any
/// more (bad length, a body the decoder rejects); the connection ends with
/// 08P01. A Query or Parse whose text is not UTF-8 is a well-framed message
/// with bad content: it becomes [`Inbound::Invalid`] (22021), as in Postgres.
///
/// The body is checked against the message layout first
/// ([`crate::wire::validate_frame`]); the decoder then works on exactly one
/// frame, so a body can never read into the next message, and should the
/// decoder still panic, the panic is caught and refused like any other
/// malformed message.
fn next_frame(buf: &mut BytesMut, ctx: &DecodeContext) -> Result<Option<Inbound>, String> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 || len as usize > MAX_MESSAGE_BYTES {
        return Err(format!(
            "message of {len} bytes refused (the limit is {MAX_MESSAGE_BYTES})"
        ));
    }
    let total = len as usize + 1;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    let tag = frame[0];
    crate::wire::validate_frame(tag, &frame[5..])?;
    if let Some(e) = invalid_text(tag, &frame[5..]) {
        return Ok(Some(Inbound::Invalid {
            error: e,
            extended: tag != b'Q',
        }));
    }
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        PgWireFrontendMessage::decode(&mut frame, ctx)
    }));
    match decoded {
        Ok(Ok(Some(m))) if frame.is_empty() => Ok(Some(Inbound::Msg(m))),
        Ok(Ok(Some(_))) => Err(format!(
            "invalid message format: '{}' message has {} bytes left over",
            char::from(tag),
            frame.len()
        )),
        Ok(Ok(None)) => Err(format!(
            "invalid message format: '{}' message is incomplete",
            char::from(tag)
        )),
        Ok(Err(e)) => Err(format!("invalid message: {e}")),
        Err(_) => Err(format!(
            "invalid message format: '{}' message is malformed",
            char::from(tag)
        )),
    }
}

/// A Query ('Q') or Parse ('P') message whose SQL text is not UTF-8 or holds
/// a NUL byte inside a string is answered 22021, as Postgres does.
fn invalid_text(tag: u8, body: &[u8]) -> Option<PgError> {
    let strings: usize = match tag {
        b'Q' => 1,
        b'P' => 2,
        _ => return None,
    };
    let mut rest = body;
    for _ in 0..strings {
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        if let Err(e) = std::str::from_utf8(&rest[..end]) {
            let at = e.valid_up_to();
            let bad = &rest[at..(at + e.error_len().unwrap_or(1)).min(end)];
            let hex: Vec<String> = bad.iter().map(|b| format!("0x{b:02x}")).collect();
            return Some(PgError::new(
                "22021",
                format!(
                    "invalid byte sequence for encoding \"UTF8\": {}",
                    hex.join(" ")
                ),
            ));
        }
        rest = rest.get(end + 1..).unwrap_or(&[]);
    }
    None
}

fn error_response(e: &PgError) -> ErrorResponse {
    let severity = if e.fatal { "FATAL" } else { "ERROR" };
    let mut fields = vec![
        (b'S', severity.to_string()),
        (b'V', severity.to_string()),
        (b'C', e.code.to_string()),
        (b'M', e.message.clone()),
    ];
    if let Some(h) = &e.hint {
        fields.push((b'H', h.clone()));
    }
    ErrorResponse::new(fields)
}

/// Rows for a cursor or a suspended portal.
enum RowSource {
    Finite {
        schema: SchemaRef,
        batches: VecDeque<RecordBatch>,
    },
    Live {
        handle: QueryHandle,
        buffered: VecDeque<RecordBatch>,
        done: bool,
    },
}

impl RowSource {
    fn schema(&self) -> SchemaRef {
        match self {
            RowSource::Finite { schema, .. } => Arc::clone(schema),
            RowSource::Live { handle, .. } => Arc::clone(&handle.schema),
        }
    }
}

struct Prepared {
    stmt: Option<DrizzleStatement>,
    sql: String,
    param_types: Vec<u32>,
}

struct Portal {
    stmt: Option<DrizzleStatement>,
    sql: String,
    params: Vec<ScalarValue>,
    formats: Vec<i16>,
    /// Set once an Execute with max_rows suspended it.
    rows: Option<RowSource>,
    /// Rows sent so far (for the command tag).
    sent: u64,
}

/// How results are written.
#[derive(Clone)]
enum Mode {
    /// Simple protocol: RowDescription first, text values.
    Simple,
    /// Extended protocol Execute: no RowDescription, the portal's formats.
    Extended { formats: Vec<i16> },
}

enum Sink<'a> {
    Rows(&'a [bool]),
    Copy(&'a CopyOptions),
}

struct Session {
    engine: Arc<Engine>,
    settings: Settings,
    out: BytesMut,
    wr: tokio::io::WriteHalf<BoxConn>,
    identity: Identity,
    rx: mpsc::Receiver<Inbound>,
    pending: VecDeque<Inbound>,
    cancel: watch::Receiver<u64>,
    /// Turns true when the server shuts down.
    shutdown: watch::Receiver<bool>,
    in_txn: bool,
    txn_failed: bool,
    cursors: HashMap<String, RowSource>,
    statements: HashMap<String, Prepared>,
    portals: HashMap<String, Portal>,
    skip_until_sync: bool,
    /// Every session, for `pg_cancel_backend` and `pg_terminate_backend`.
    registry: Arc<SessionRegistry>,
    /// This session's backend pid.
    pid: i32,
    /// The database the client asked for (`current_database()`).
    database: String,
    /// When the running statement passes `statement_timeout`.
    deadline: Option<tokio::time::Instant>,
}

/// 57014, as Postgres says it.
fn statement_timeout() -> PgError {
    PgError::new("57014", "canceling statement due to statement timeout")
}

/// Resolves when `deadline` passes (never without one).
async fn deadline_passed(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Runs `work` under the statement's deadline: 57014 when it passes.
async fn bounded<T>(
    deadline: Option<tokio::time::Instant>,
    work: impl std::future::Future<Output = Result<T, PgError>>,
) -> Result<T, PgError> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, work)
            .await
            .unwrap_or_else(|_| Err(statement_timeout())),
        None => work.await,
    }
}

/// The session ends (client gone or protocol violation).
struct Disconnect;

fn binary_flags(formats: &[i16], n: usize) -> Vec<bool> {
    match formats.len() {
        0 => vec![false; n],
        1 => vec![formats[0] == 1; n],
        _ => (0..n)
            .map(|i| formats.get(i).copied().unwrap_or(0) == 1)
            .collect(),
    }
}

impl Session {
    fn push(&mut self, m: PgWireBackendMessage) {
        if let Err(e) = m.encode(&mut self.out) {
            tracing::warn!("cannot encode a backend message: {e}");
        }
    }

    async fn flush(&mut self) -> Result<(), Disconnect> {
        if self.out.is_empty() {
            return Ok(());
        }
        let r = self.wr.write_all(&self.out).await;
        self.out.clear();
        r.map_err(|_| Disconnect)?;
        // TLS buffers records: push them out.
        self.wr.flush().await.map_err(|_| Disconnect)
    }

    fn ready(&mut self) {
        let status = match (self.in_txn, self.txn_failed) {
            (false, _) => TransactionStatus::Idle,
            (true, false) => TransactionStatus::Transaction,
            (true, true) => TransactionStatus::Error,
        };
        self.push(PgWireBackendMessage::ReadyForQuery(ReadyForQuery::new(
            status,
        )));
    }

    fn error(&mut self, e: PgError) {
        self.push(PgWireBackendMessage::ErrorResponse(error_response(&e)));
    }

    fn complete(&mut self, tag: String) {
        self.push(PgWireBackendMessage::CommandComplete(CommandComplete::new(
            tag,
        )));
    }

    fn row_description(&mut self, schema: &SchemaRef, formats: &[i16]) {
        let binary = binary_flags(formats, schema.fields().len());
        let fields = crate::encode::describe(schema)
            .into_iter()
            .zip(binary)
            .map(|((name, oid, size), bin)| {
                FieldDescription::new(name, 0, 0, oid, size, -1, i16::from(bin))
            })
            .collect();
        self.push(PgWireBackendMessage::RowDescription(RowDescription::new(
            fields,
        )));
    }

    /// Writes finite rows: a RowDescription first in the simple protocol, then
    /// one DataRow per row in the formats asked for. Returns the row count.
    fn send_rows(&mut self, schema: &SchemaRef, batches: &[RecordBatch], mode: &Mode) -> usize {
        let formats = match mode {
            Mode::Simple => {
                self.row_description(schema, &[]);
                vec![]
            }
            Mode::Extended { formats } => formats.clone(),
        };
        let binary = binary_flags(&formats, schema.fields().len());
        let mut n = 0;
        for b in batches {
            crate::encode::write_data_rows(&mut self.out, b, &binary);
            n += b.num_rows();
        }
        n
    }

    async fn next_inbound(&mut self) -> Option<Inbound> {
        if let Some(m) = self.pending.pop_front() {
            return Some(m);
        }
        self.rx.recv().await
    }

    async fn run(&mut self) {
        loop {
            let mut stop = *self.shutdown.borrow();
            let inbound = match self.pending.pop_front() {
                Some(m) if !stop => Some(m),
                _ if stop => None,
                _ => tokio::select! {
                    biased;
                    _ = shutdown_requested(&mut self.shutdown) => {
                        stop = true;
                        None
                    }
                    inbound = self.rx.recv() => inbound,
                },
            };
            if stop {
                self.error(shutting_down().fatal());
                let _ = self.flush().await;
                return;
            }
            let msg = match inbound {
                Some(Inbound::Msg(m)) => m,
                Some(Inbound::Bad(reason)) => {
                    self.error(PgError::new("08P01", reason).fatal());
                    let _ = self.flush().await;
                    return;
                }
                Some(Inbound::Invalid { error, extended }) => {
                    if extended {
                        self.extended_error(error);
                    } else {
                        self.fail(error);
                        self.ready();
                    }
                    if self.flush().await.is_err() {
                        return;
                    }
                    continue;
                }
                Some(Inbound::Closed) | None => return,
            };
            let r = match msg {
                PgWireFrontendMessage::Query(q) => {
                    self.skip_until_sync = false;
                    let r = self.simple_query(&q.query).await;
                    if r.is_ok() {
                        self.ready();
                    }
                    r
                }
                PgWireFrontendMessage::Terminate(_) => return,
                PgWireFrontendMessage::Sync(_) => {
                    self.skip_until_sync = false;
                    if let Some(p) = self.portals.remove("") {
                        drop(p);
                    }
                    self.ready();
                    Ok(())
                }
                PgWireFrontendMessage::Flush(_) => Ok(()),
                m if self.skip_until_sync && m.is_extended_query() => continue,
                PgWireFrontendMessage::Parse(p) => {
                    self.on_parse(p.name.unwrap_or_default(), p.query, p.type_oids);
                    Ok(())
                }
                PgWireFrontendMessage::Bind(b) => {
                    self.on_bind(b);
                    Ok(())
                }
                PgWireFrontendMessage::Describe(d) => {
                    self.on_describe(d.target_type, d.name.unwrap_or_default())
                        .await;
                    Ok(())
                }
                PgWireFrontendMessage::Execute(e) => {
                    self.on_execute(e.name.unwrap_or_default(), e.max_rows)
                        .await
                }
                PgWireFrontendMessage::Close(c) => {
                    let name = c.name.unwrap_or_default();
                    if c.target_type == b'S' {
                        self.statements.remove(&name);
                    } else {
                        self.portals.remove(&name);
                    }
                    self.push(PgWireBackendMessage::CloseComplete(CloseComplete::new()));
                    Ok(())
                }
                // COPY messages outside COPY, password messages: ignored as Postgres does.
                _ => Ok(()),
            };
            if r.is_err() || self.flush().await.is_err() {
                return;
            }
        }
    }

    async fn simple_query(&mut self, sql: &str) -> Result<(), Disconnect> {
        let stmts = match parse_statements(sql) {
            Ok(s) => s,
            Err(e) => {
                self.fail(e.into());
                return Ok(());
            }
        };
        if stmts.is_empty() {
            self.push(PgWireBackendMessage::EmptyQueryResponse(
                EmptyQueryResponse::new(),
            ));
            return Ok(());
        }
        let implicit = !self.in_txn && stmts.len() > 1;
        for stmt in stmts {
            if self.txn_failed
                && !matches!(
                    stmt,
                    DrizzleStatement::Commit
                        | DrizzleStatement::Rollback
                        | DrizzleStatement::RollbackToSavepoint
                )
            {
                self.error(PgError::new(
                    "25P02",
                    "current transaction is aborted, commands ignored until end of transaction block",
                ));
                break;
            }
            match self.statement(stmt, &[], Mode::Simple, sql).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    self.fail(e);
                    break;
                }
                Err(d) => return Err(d),
            }
            self.flush().await?;
        }
        let _ = implicit;
        self.registry.set_activity(self.pid, None);
        Ok(())
    }

    fn fail(&mut self, e: PgError) {
        if self.in_txn {
            self.txn_failed = true;
        }
        self.error(e);
    }

    /// Runs one statement. The outer error ends the session; the inner one is sent to the client.
    async fn statement(
        &mut self,
        stmt: DrizzleStatement,
        params: &[ScalarValue],
        mode: Mode,
        sql: &str,
    ) -> Result<Result<(), PgError>, Disconnect> {
        self.start_deadline();
        self.registry.set_activity(self.pid, Some(sql));
        let mut stmt = stmt;
        // set_config() changes the settings the statement runs with.
        let mut settings = self.settings.clone();
        let rewritten =
            crate::compat::rewrite_statement(&mut stmt, &self.facts(false), &mut settings);
        self.settings = settings;
        if let Err(e) = rewritten {
            return Ok(Err(e));
        }
        match stmt {
            DrizzleStatement::RollbackToSavepoint => {
                if !self.in_txn {
                    return Ok(Err(PgError::new(
                        "25P01",
                        "ROLLBACK TO SAVEPOINT can only be used in transaction blocks",
                    )));
                }
                self.txn_failed = false;
                self.complete("ROLLBACK".into());
                Ok(Ok(()))
            }
            DrizzleStatement::Begin => {
                self.in_txn = true;
                self.complete("BEGIN".into());
                Ok(Ok(()))
            }
            DrizzleStatement::Commit | DrizzleStatement::Rollback => {
                let tag = if matches!(stmt, DrizzleStatement::Commit) && !self.txn_failed {
                    "COMMIT"
                } else {
                    "ROLLBACK"
                };
                self.in_txn = false;
                self.txn_failed = false;
                self.cursors.clear();
                self.complete(tag.into());
                Ok(Ok(()))
            }
            DrizzleStatement::DeclareCursor { name, query } => {
                if !self.in_txn {
                    return Ok(Err(PgError::new(
                        "25P01",
                        "DECLARE CURSOR can only be used in transaction blocks",
                    )));
                }
                if self.cursors.contains_key(&name) {
                    return Ok(Err(PgError::new(
                        "42P03",
                        format!("cursor \"{name}\" already exists"),
                    )));
                }
                let source = match self.open_rows(&query, params, sql).await {
                    Ok(s) => s,
                    Err(e) => return Ok(Err(e)),
                };
                self.cursors.insert(name, source);
                self.complete("DECLARE CURSOR".into());
                Ok(Ok(()))
            }
            DrizzleStatement::Fetch {
                name,
                count,
                timeout_us,
            } => {
                let timeout = match timeout_us {
                    Some(0) => None,
                    Some(us) => Some(Duration::from_micros(us)),
                    None => self.settings.fetch_timeout,
                };
                let Some(mut source) = self.cursors.remove(&name) else {
                    return Ok(Err(PgError::new(
                        "34000",
                        format!("cursor \"{name}\" does not exist"),
                    )));
                };
                let fetched = self
                    .fetch(&mut source, count.map(|c| c as usize), timeout)
                    .await;
                let schema = source.schema();
                self.cursors.insert(name, source);
                let batches = match fetched? {
                    Ok(b) => b,
                    Err(e) => return Ok(Err(e)),
                };
                let n = self.send_rows(&schema, &batches, &mode);
                self.complete(format!("FETCH {n}"));
                Ok(Ok(()))
            }
            DrizzleStatement::CloseCursor(name) => {
                match name {
                    None => self.cursors.clear(),
                    Some(n) => {
                        if self.cursors.remove(&n).is_none() {
                            return Ok(Err(PgError::new(
                                "34000",
                                format!("cursor \"{n}\" does not exist"),
                            )));
                        }
                    }
                }
                self.complete("CLOSE CURSOR".into());
                Ok(Ok(()))
            }
            DrizzleStatement::CopyTo { query, options } => {
                self.copy_to(&query, &options, params, sql).await
            }
            DrizzleStatement::Deallocate(name) => {
                let tag = if name.is_none() {
                    "DEALLOCATE ALL"
                } else {
                    "DEALLOCATE"
                };
                match name {
                    None => self.statements.clear(),
                    Some(n) => {
                        if self.statements.remove(&n).is_none() {
                            return Ok(Err(PgError::new(
                                "26000",
                                format!("prepared statement \"{n}\" does not exist"),
                            )));
                        }
                    }
                }
                self.complete(tag.into());
                Ok(Ok(()))
            }
            DrizzleStatement::CreateRole {
                name,
                user,
                options,
            } => Ok(self.create_role(&name, user, options).map(|()| {
                self.complete("CREATE ROLE".into());
            })),
            DrizzleStatement::AlterRole { name, options } => {
                Ok(self.alter_role(&name, options).map(|()| {
                    self.complete("ALTER ROLE".into());
                }))
            }
            DrizzleStatement::DropRole { names, if_exists } => {
                Ok(self.drop_roles(&names, if_exists).map(|()| {
                    self.complete("DROP ROLE".into());
                }))
            }
            DrizzleStatement::DiscardAll => {
                if self.in_txn {
                    return Ok(Err(PgError::new(
                        "25001",
                        "DISCARD ALL cannot run inside a transaction block",
                    )));
                }
                self.statements.clear();
                self.portals.clear();
                self.cursors.clear();
                let app = self.settings.other.get("application_name").cloned();
                let defaults = self.engine.default_settings();
                self.settings.reset_to(defaults);
                if let Some(app) = app {
                    self.settings.other.insert("application_name".into(), app);
                }
                self.complete("DISCARD ALL".into());
                Ok(Ok(()))
            }
            other => {
                let outcome = bounded(
                    self.deadline,
                    self.engine.execute(other, &mut self.settings, params, sql),
                )
                .await;
                let outcome = match outcome {
                    Ok(o) => o,
                    Err(e) => return Ok(Err(e)),
                };
                self.outcome(outcome, mode).await
            }
        }
    }

    async fn outcome(
        &mut self,
        outcome: Outcome,
        mode: Mode,
    ) -> Result<Result<(), PgError>, Disconnect> {
        match outcome {
            Outcome::Command(tag) => {
                self.complete(tag);
                Ok(Ok(()))
            }
            Outcome::Rows {
                schema,
                batches,
                tag,
            } => {
                let n = self.send_rows(&schema, &batches, &mode);
                self.complete(if tag == "SELECT" {
                    format!("SELECT {n}")
                } else {
                    tag.to_string()
                });
                Ok(Ok(()))
            }
            Outcome::Stream(mut handle) => {
                let formats = match &mode {
                    Mode::Simple => {
                        self.row_description(&Arc::clone(&handle.schema), &[]);
                        vec![]
                    }
                    Mode::Extended { formats } => formats.clone(),
                };
                let binary = binary_flags(&formats, handle.schema.fields().len());
                self.flush().await?;
                match self.stream(&mut handle, Sink::Rows(&binary)).await? {
                    Ok(n) => {
                        self.complete(format!("SELECT {n}"));
                        Ok(Ok(()))
                    }
                    Err(e) => Ok(Err(e)),
                }
            }
            Outcome::CopyIn(target) => {
                let n = target.columns.len() as i16;
                let format = i8::from(target.options.binary);
                self.push(PgWireBackendMessage::CopyInResponse(CopyInResponse::new(
                    format,
                    n,
                    vec![format as i16; n as usize],
                )));
                self.flush().await?;
                let mut data = BytesMut::new();
                loop {
                    match self.next_inbound().await {
                        Some(Inbound::Msg(PgWireFrontendMessage::CopyData(d))) => {
                            if data.len() + d.data.len() > MAX_COPY_BYTES {
                                // Drain the rest of the copy, then fail it.
                                return Ok(Err(self
                                    .abort_copy(PgError::new(
                                        "54000",
                                        "COPY data exceeds 1 GiB; split it",
                                    ))
                                    .await?));
                            }
                            data.extend_from_slice(&d.data);
                        }
                        Some(Inbound::Msg(PgWireFrontendMessage::CopyDone(_))) => break,
                        Some(Inbound::Msg(PgWireFrontendMessage::CopyFail(f))) => {
                            return Ok(Err(PgError::new(
                                "57014",
                                format!("COPY from stdin failed: {}", f.message),
                            )));
                        }
                        Some(Inbound::Msg(
                            PgWireFrontendMessage::Sync(_) | PgWireFrontendMessage::Flush(_),
                        )) => {}
                        Some(Inbound::Msg(_)) | Some(Inbound::Invalid { .. }) => {
                            return Ok(Err(PgError::new(
                                "08P01",
                                "unexpected message during COPY FROM STDIN",
                            )));
                        }
                        Some(Inbound::Bad(_)) | Some(Inbound::Closed) | None => {
                            return Err(Disconnect)
                        }
                    }
                }
                let engine = Arc::clone(&self.engine);
                let data = data.freeze();
                let result =
                    tokio::task::spawn_blocking(move || engine.copy_in(&target, &data)).await;
                match result {
                    Ok(Ok(rows)) => {
                        self.complete(format!("COPY {rows}"));
                        Ok(Ok(()))
                    }
                    Ok(Err(e)) => Ok(Err(e)),
                    Err(e) => Ok(Err(PgError::internal(format!("COPY failed: {e}")))),
                }
            }
        }
    }

    async fn abort_copy(&mut self, e: PgError) -> Result<PgError, Disconnect> {
        loop {
            match self.next_inbound().await {
                Some(Inbound::Msg(
                    PgWireFrontendMessage::CopyDone(_) | PgWireFrontendMessage::CopyFail(_),
                )) => return Ok(e),
                Some(Inbound::Msg(_)) => {}
                _ => return Err(Disconnect),
            }
        }
    }

    /// Streams a continuous query's batches to the client as they complete.
    /// Returns the number of rows sent, or the error that stopped it.
    async fn stream(
        &mut self,
        handle: &mut QueryHandle,
        sink: Sink<'_>,
    ) -> Result<Result<u64, PgError>, Disconnect> {
        let mut sent = 0u64;
        // Only a cancel that arrives while this query runs counts.
        self.cancel.borrow_and_update();
        loop {
            tokio::select! {
                biased;
                _ = shutdown_requested(&mut self.shutdown) => {
                    handle.cancel();
                    self.error(shutting_down().fatal());
                    let _ = self.flush().await;
                    return Err(Disconnect);
                }
                changed = self.cancel.changed() => {
                    if changed.is_ok() {
                        handle.cancel();
                        return Ok(Err(PgError::cancelled()));
                    }
                }
                _ = deadline_passed(self.deadline) => {
                    handle.cancel();
                    return Ok(Err(statement_timeout()));
                }
                inbound = self.rx.recv() => match inbound {
                    Some(Inbound::Msg(m)) => {
                        if matches!(m, PgWireFrontendMessage::Terminate(_)) {
                            handle.cancel();
                            return Err(Disconnect);
                        }
                        if self.pending.len() > 1024 {
                            return Err(Disconnect);
                        }
                        self.pending.push_back(Inbound::Msg(m));
                    }
                    Some(invalid @ Inbound::Invalid { .. }) => {
                        if self.pending.len() > 1024 {
                            return Err(Disconnect);
                        }
                        self.pending.push_back(invalid);
                    }
                    Some(Inbound::Bad(_)) | Some(Inbound::Closed) | None => {
                        handle.cancel();
                        return Err(Disconnect);
                    }
                },
                next = handle.next() => match next {
                    None => return Ok(Ok(sent)),
                    Some(Err(e)) => return Ok(Err(e.into())),
                    Some(Ok(batch)) => {
                        match sink {
                            Sink::Rows(binary) => crate::encode::write_data_rows(&mut self.out, &batch.rows, binary),
                            Sink::Copy(options) => {
                                let rows = if options.binary {
                                    crate::copy_binary::rows(&batch.rows)
                                } else {
                                    crate::copy::format_rows(&batch.rows, options)
                                };
                                for row in rows {
                                    self.push(PgWireBackendMessage::CopyData(CopyData::new(row)));
                                }
                            }
                        }
                        sent += batch.rows.num_rows() as u64;
                        self.flush().await?;
                    }
                },
            }
        }
    }

    async fn copy_to(
        &mut self,
        query: &datafusion::sql::sqlparser::ast::Query,
        options: &CopyOptions,
        params: &[ScalarValue],
        sql: &str,
    ) -> Result<Result<(), PgError>, Disconnect> {
        let planned = match self.engine.plan_in(query, params, &self.settings) {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        match planned {
            PlannedQuery::Finite(plan) => {
                let (schema, batches) =
                    match bounded(self.deadline, self.engine.run_finite(plan)).await {
                        Ok(r) => r,
                        Err(e) => return Ok(Err(e)),
                    };
                self.copy_out_start(&schema, options);
                let mut rows = 0;
                for b in &batches {
                    let lines = if options.binary {
                        crate::copy_binary::rows(b)
                    } else {
                        crate::copy::format_rows(b, options)
                    };
                    for row in lines {
                        self.push(PgWireBackendMessage::CopyData(CopyData::new(row)));
                    }
                    rows += b.num_rows();
                }
                self.copy_out_end(options);
                self.complete(format!("COPY {rows}"));
                Ok(Ok(()))
            }
            PlannedQuery::Continuous(plan) => {
                let mut handle = match self.engine.start_continuous(
                    *plan,
                    &self.settings,
                    sql.trim().to_string(),
                ) {
                    Ok(h) => h,
                    Err(e) => return Ok(Err(e)),
                };
                let schema = Arc::clone(&handle.schema);
                self.copy_out_start(&schema, options);
                self.flush().await?;
                match self.stream(&mut handle, Sink::Copy(options)).await? {
                    Ok(rows) => {
                        self.copy_out_end(options);
                        self.complete(format!("COPY {rows}"));
                        Ok(Ok(()))
                    }
                    Err(e) => Ok(Err(e)),
                }
            }
        }
    }

    /// CopyOutResponse, then the header line (CSV) or the binary header.
    fn copy_out_start(&mut self, schema: &SchemaRef, options: &CopyOptions) {
        let n = schema.fields().len() as i16;
        let format = i8::from(options.binary);
        self.push(PgWireBackendMessage::CopyOutResponse(CopyOutResponse::new(
            format,
            n,
            vec![format as i16; n as usize],
        )));
        if options.binary {
            self.push(PgWireBackendMessage::CopyData(CopyData::new(
                crate::copy_binary::header(),
            )));
        } else if options.header {
            let header = crate::copy::header_line(schema, options);
            self.push(PgWireBackendMessage::CopyData(CopyData::new(Bytes::from(
                header,
            ))));
        }
    }

    /// The binary trailer, then CopyDone.
    fn copy_out_end(&mut self, options: &CopyOptions) {
        if options.binary {
            self.push(PgWireBackendMessage::CopyData(CopyData::new(
                crate::copy_binary::trailer(),
            )));
        }
        self.push(PgWireBackendMessage::CopyDone(CopyDone::new()));
    }

    async fn open_rows(
        &mut self,
        query: &datafusion::sql::sqlparser::ast::Query,
        params: &[ScalarValue],
        sql: &str,
    ) -> Result<RowSource, PgError> {
        match self.engine.plan_in(query, params, &self.settings)? {
            PlannedQuery::Finite(plan) => {
                let (schema, batches) =
                    bounded(self.deadline, self.engine.run_finite(plan)).await?;
                Ok(RowSource::Finite {
                    schema,
                    batches: batches.into(),
                })
            }
            PlannedQuery::Continuous(plan) => {
                let handle =
                    self.engine
                        .start_continuous(*plan, &self.settings, sql.trim().to_string())?;
                Ok(RowSource::Live {
                    handle,
                    buffered: VecDeque::new(),
                    done: false,
                })
            }
        }
    }

    /// Up to `count` rows (None = all). A live source waits until `count`
    /// rows arrived or the query ended, or, if one is given, `timeout` passed.
    async fn fetch(
        &mut self,
        source: &mut RowSource,
        count: Option<usize>,
        timeout: Option<Duration>,
    ) -> Result<Result<Vec<RecordBatch>, PgError>, Disconnect> {
        let want = count.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        let mut have = 0usize;
        let take_from =
            |queue: &mut VecDeque<RecordBatch>, out: &mut Vec<RecordBatch>, have: &mut usize| {
                while *have < want {
                    let Some(b) = queue.pop_front() else { break };
                    let room = want - *have;
                    if b.num_rows() > room {
                        out.push(b.slice(0, room));
                        queue.push_front(b.slice(room, b.num_rows() - room));
                        *have += room;
                    } else {
                        *have += b.num_rows();
                        out.push(b);
                    }
                }
            };
        match source {
            RowSource::Finite { batches, .. } => take_from(batches, &mut out, &mut have),
            RowSource::Live {
                handle,
                buffered,
                done,
            } => {
                take_from(buffered, &mut out, &mut have);
                self.cancel.borrow_and_update();
                let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
                let expired = async move {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::pin!(expired);
                while have < want && !*done {
                    tokio::select! {
                        biased;
                        _ = shutdown_requested(&mut self.shutdown) => {
                            handle.cancel();
                            self.error(shutting_down().fatal());
                            let _ = self.flush().await;
                            return Err(Disconnect);
                        }
                        changed = self.cancel.changed() => {
                            if changed.is_ok() {
                                handle.cancel();
                                return Ok(Err(PgError::cancelled()));
                            }
                        }
                        _ = deadline_passed(self.deadline) => {
                            handle.cancel();
                            return Ok(Err(statement_timeout()));
                        }
                        _ = &mut expired => break,
                        // A client that goes away stops the wait.
                        inbound = self.rx.recv() => match inbound {
                            Some(Inbound::Msg(PgWireFrontendMessage::Terminate(_)))
                            | Some(Inbound::Bad(_))
                            | Some(Inbound::Closed)
                            | None => {
                                handle.cancel();
                                return Err(Disconnect);
                            }
                            Some(other) => {
                                if self.pending.len() > 1024 {
                                    return Err(Disconnect);
                                }
                                self.pending.push_back(other);
                            }
                        },
                        next = handle.next() => match next {
                            None => *done = true,
                            Some(Err(e)) => return Ok(Err(e.into())),
                            Some(Ok(b)) => {
                                buffered.push_back(b.rows);
                                take_from(buffered, &mut out, &mut have);
                            }
                        },
                    }
                }
            }
        }
        Ok(Ok(out))
    }

    // ----- roles -----

    fn require_superuser(&self, what: &str) -> Result<(), PgError> {
        if self.identity.superuser {
            Ok(())
        } else {
            Err(
                PgError::new("42501", format!("permission denied to {what}"))
                    .with_hint("only superusers may manage roles"),
            )
        }
    }

    fn create_role(&mut self, name: &str, user: bool, o: RoleOptions) -> Result<(), PgError> {
        self.require_superuser("create role")?;
        let verifier = match o.password {
            Some(Some(p)) => Some(crate::auth::make_verifier(&p.0)?),
            _ => None,
        };
        self.engine.catalog.create_role(
            name,
            RoleDef {
                superuser: o.superuser.unwrap_or(false),
                login: o.login.unwrap_or(user),
                verifier,
            },
        )
    }

    fn alter_role(&mut self, name: &str, o: RoleOptions) -> Result<(), PgError> {
        let name = if name.is_empty() {
            self.identity.user.clone()
        } else {
            name.to_string()
        };
        let own_password_only =
            name == self.identity.user && o.superuser.is_none() && o.login.is_none();
        if !own_password_only {
            self.require_superuser("alter role")?;
        }
        let verifier = match &o.password {
            Some(Some(p)) => Some(Some(crate::auth::make_verifier(&p.0)?)),
            Some(None) => Some(None),
            None => None,
        };
        self.engine.catalog.alter_role(&name, false, |r| {
            if let Some(v) = verifier {
                r.verifier = v;
            }
            if let Some(s) = o.superuser {
                r.superuser = s;
            }
            if let Some(l) = o.login {
                r.login = l;
            }
        })
    }

    fn drop_roles(&mut self, names: &[String], if_exists: bool) -> Result<(), PgError> {
        self.require_superuser("drop role")?;
        if names.contains(&self.identity.user) {
            return Err(PgError::new("55006", "current user cannot be dropped"));
        }
        if !if_exists {
            if let Some(missing) = names.iter().find(|n| self.engine.catalog.role(n).is_none()) {
                return Err(PgError::new(
                    "42704",
                    format!("role \"{missing}\" does not exist"),
                ));
            }
        }
        for name in names {
            self.engine.catalog.drop_role(name)?;
        }
        Ok(())
    }

    // ----- extended protocol -----

    fn on_parse(&mut self, name: String, sql: String, declared: Vec<u32>) {
        let stmts = match parse_statements(&sql) {
            Ok(s) => s,
            Err(e) => return self.extended_error(e.into()),
        };
        if stmts.len() > 1 {
            return self.extended_error(PgError::new(
                "42601",
                "cannot insert multiple commands into a prepared statement",
            ));
        }
        let stmt = stmts.into_iter().next();
        let mut param_types = declared;
        let rewritten = match stmt.as_ref().map(|s| self.dry_rewrite(s)).transpose() {
            Ok(r) => r,
            Err(e) => return self.extended_error(e),
        };
        let described = match rewritten.as_ref() {
            Some(DrizzleStatement::Insert {
                target,
                columns,
                source,
            }) => self
                .engine
                .describe_insert(target, columns, source)
                .map(|t| Some((None, t))),
            Some(other) => match statement_query(other) {
                Some(query) => self
                    .engine
                    .describe_query(query, &self.settings)
                    .map(|(s, t)| Some((Some(s), t))),
                None => Ok(None),
            },
            None => Ok(None),
        };
        if let Some(described) = described.transpose() {
            match described.map(|(_, t)| t) {
                Ok(types) => {
                    if param_types.len() < types.len() {
                        param_types.resize(types.len(), 0);
                    }
                    for (i, t) in types.iter().enumerate() {
                        if param_types[i] == 0 {
                            param_types[i] = t
                                .as_ref()
                                .map(crate::encode::pg_type)
                                .unwrap_or(crate::encode::oid::TEXT);
                        }
                    }
                }
                Err(e) => return self.extended_error(e),
            }
        }
        self.statements.insert(
            name,
            Prepared {
                stmt,
                sql,
                param_types,
            },
        );
        self.push(PgWireBackendMessage::ParseComplete(ParseComplete::new()));
    }

    fn extended_error(&mut self, e: PgError) {
        self.fail(e);
        self.skip_until_sync = true;
    }

    fn on_bind(&mut self, b: pgwire::messages::extendedquery::Bind) {
        let name = b.statement_name.clone().unwrap_or_default();
        let Some(prepared) = self.statements.get(&name) else {
            return self.extended_error(PgError::new(
                "26000",
                format!("prepared statement \"{name}\" does not exist"),
            ));
        };
        let mut params = Vec::with_capacity(b.parameters.len());
        for (i, value) in b.parameters.iter().enumerate() {
            let format = match b.parameter_format_codes.len() {
                0 => 0,
                1 => b.parameter_format_codes[0],
                _ => b.parameter_format_codes.get(i).copied().unwrap_or(0),
            };
            let oid = prepared
                .param_types
                .get(i)
                .copied()
                .unwrap_or(crate::encode::oid::TEXT);
            match decode_param(value.as_deref(), format, oid) {
                Ok(v) => params.push(v),
                Err(e) => return self.extended_error(e),
            }
        }
        let portal = Portal {
            stmt: prepared.stmt.clone(),
            sql: prepared.sql.clone(),
            params,
            formats: b.result_column_format_codes.clone(),
            rows: None,
            sent: 0,
        };
        self.portals
            .insert(b.portal_name.unwrap_or_default(), portal);
        self.push(PgWireBackendMessage::BindComplete(BindComplete::new()));
    }

    async fn on_describe(&mut self, target: u8, name: String) {
        let (stmt, formats, param_types) = if target == b'S' {
            match self.statements.get(&name) {
                Some(p) => (p.stmt.clone(), vec![], Some(p.param_types.clone())),
                None => {
                    return self.extended_error(PgError::new(
                        "26000",
                        format!("prepared statement \"{name}\" does not exist"),
                    ))
                }
            }
        } else {
            match self.portals.get(&name) {
                Some(p) => {
                    if let Some(rows) = &p.rows {
                        let schema = rows.schema();
                        let formats = p.formats.clone();
                        self.row_description(&schema, &formats);
                        return;
                    }
                    (p.stmt.clone(), p.formats.clone(), None)
                }
                None => {
                    // A DECLAREd cursor is a portal too (one namespace, as in Postgres).
                    if let Some(schema) = self.cursors.get(&name).map(RowSource::schema) {
                        self.row_description(&schema, &[]);
                        return;
                    }
                    return self.extended_error(PgError::new(
                        "34000",
                        format!("portal \"{name}\" does not exist"),
                    ));
                }
            }
        };
        if let Some(types) = param_types {
            self.push(PgWireBackendMessage::ParameterDescription(
                ParameterDescription::new(types),
            ));
        }
        match self.result_schema(stmt.as_ref()).await {
            Ok(Some(schema)) => self.row_description(&schema, &formats),
            Ok(None) => self.push(PgWireBackendMessage::NoData(NoData::new())),
            Err(e) => self.extended_error(e),
        }
    }

    async fn result_schema(
        &mut self,
        stmt: Option<&DrizzleStatement>,
    ) -> Result<Option<SchemaRef>, PgError> {
        let Some(stmt) = stmt else { return Ok(None) };
        match stmt {
            DrizzleStatement::Query(_) => match self.dry_rewrite(stmt)? {
                DrizzleStatement::Query(q) => {
                    Ok(Some(self.engine.describe_query(&q, &self.settings)?.0))
                }
                _ => Ok(None),
            },
            DrizzleStatement::Fetch { name, .. } => Ok(self.cursors.get(name).map(|c| c.schema())),
            DrizzleStatement::Explain(_)
            | DrizzleStatement::ExplainAnalyze(_)
            | DrizzleStatement::ShowObjects(_)
            | DrizzleStatement::ShowQueries
            | DrizzleStatement::ShowWorkers
            | DrizzleStatement::ShowCreate { .. }
            | DrizzleStatement::ShowVariable(_) => {
                let mut settings = self.settings.clone();
                match self
                    .engine
                    .execute(stmt.clone(), &mut settings, &[], "")
                    .await?
                {
                    Outcome::Rows { schema, .. } => Ok(Some(schema)),
                    _ => Ok(None),
                }
            }
            _ => Ok(None),
        }
    }

    /// `stmt` as it will run (session functions replaced by their values),
    /// for describing it: nothing is signalled or set.
    fn dry_rewrite(&self, stmt: &DrizzleStatement) -> Result<DrizzleStatement, PgError> {
        let mut stmt = stmt.clone();
        let mut settings = self.settings.clone();
        crate::compat::rewrite_statement(&mut stmt, &self.facts(true), &mut settings)?;
        Ok(stmt)
    }

    /// What the session functions answer from; `dry` when describing.
    fn facts(&self, dry: bool) -> crate::compat::SessionFacts<'_> {
        crate::compat::SessionFacts {
            user: &self.identity.user,
            superuser: self.identity.superuser,
            database: &self.database,
            pid: self.pid,
            registry: &self.registry,
            dry,
            catalog: &self.engine.catalog,
        }
    }

    /// The running statement's deadline, from `statement_timeout`.
    fn start_deadline(&mut self) {
        self.deadline = self
            .settings
            .statement_timeout
            .and_then(|t| tokio::time::Instant::now().checked_add(t));
    }

    async fn on_execute(&mut self, name: String, max_rows: i32) -> Result<(), Disconnect> {
        self.start_deadline();
        let Some(mut portal) = self.portals.remove(&name) else {
            self.extended_error(PgError::new(
                "34000",
                format!("portal \"{name}\" does not exist"),
            ));
            return Ok(());
        };
        let ends_failure = matches!(
            portal.stmt,
            Some(
                DrizzleStatement::Commit
                    | DrizzleStatement::Rollback
                    | DrizzleStatement::RollbackToSavepoint
            )
        );
        if self.txn_failed && !ends_failure {
            self.extended_error(PgError::new(
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
            ));
            return Ok(());
        }
        let max_rows = if max_rows > 0 { max_rows as usize } else { 0 };
        // A query executed with a row limit becomes a suspended portal.
        if max_rows > 0 && portal.rows.is_none() {
            if let Some(query) = portal.stmt.as_ref().and_then(|s| match s {
                DrizzleStatement::Query(q) => Some(q.clone()),
                _ => None,
            }) {
                match self
                    .open_rows(&query, &portal.params.clone(), &portal.sql.clone())
                    .await
                {
                    Ok(rows) => portal.rows = Some(rows),
                    Err(e) => {
                        self.extended_error(e);
                        return Ok(());
                    }
                }
            }
        }
        if let Some(mut rows) = portal.rows.take() {
            let timeout = self.settings.fetch_timeout;
            let want = if max_rows > 0 { Some(max_rows) } else { None };
            let fetched = match self.fetch(&mut rows, want, timeout).await? {
                Ok(b) => b,
                Err(e) => {
                    self.extended_error(e);
                    return Ok(());
                }
            };
            let binary = binary_flags(&portal.formats, rows.schema().fields().len());
            let mut n = 0;
            for b in &fetched {
                crate::encode::write_data_rows(&mut self.out, b, &binary);
                n += b.num_rows();
            }
            portal.sent += n as u64;
            let exhausted = match &rows {
                RowSource::Finite { batches, .. } => batches.is_empty(),
                RowSource::Live { done, buffered, .. } => *done && buffered.is_empty(),
            };
            if max_rows > 0 && n == max_rows && !exhausted {
                self.push(PgWireBackendMessage::PortalSuspended(PortalSuspended::new()));
                portal.rows = Some(rows);
            } else {
                self.complete(format!("SELECT {}", portal.sent));
            }
            self.portals.insert(name, portal);
            return Ok(());
        }
        let Some(stmt) = portal.stmt.clone() else {
            self.push(PgWireBackendMessage::EmptyQueryResponse(
                EmptyQueryResponse::new(),
            ));
            return Ok(());
        };
        let mode = Mode::Extended {
            formats: portal.formats.clone(),
        };
        let params = portal.params.clone();
        let sql = portal.sql.clone();
        self.portals.insert(name, portal);
        match self.statement(stmt, &params, mode, &sql).await? {
            Ok(()) => {}
            Err(e) => self.extended_error(e),
        }
        self.registry.set_activity(self.pid, None);
        Ok(())
    }
}

fn statement_query(stmt: &DrizzleStatement) -> Option<&datafusion::sql::sqlparser::ast::Query> {
    match stmt {
        DrizzleStatement::Query(q)
        | DrizzleStatement::Explain(q)
        | DrizzleStatement::CopyTo { query: q, .. }
        | DrizzleStatement::DeclareCursor { query: q, .. }
        | DrizzleStatement::Insert { source: q, .. }
        | DrizzleStatement::CreateView { query: q, .. } => Some(q),
        _ => None,
    }
}

/// Decodes one Bind parameter to a DataFusion scalar of the declared type.
fn decode_param(value: Option<&[u8]>, format: i16, oid: u32) -> Result<ScalarValue, PgError> {
    use crate::encode::oid as o;
    let target = match oid {
        o::BOOL => DataType::Boolean,
        o::INT2 => DataType::Int16,
        o::INT4 => DataType::Int32,
        o::INT8 => DataType::Int64,
        o::FLOAT4 => DataType::Float32,
        o::FLOAT8 => DataType::Float64,
        o::DATE => DataType::Date32,
        o::TIMESTAMP => DataType::Timestamp(TimeUnit::Microsecond, None),
        o::TIMESTAMPTZ => DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
        o::NUMERIC => DataType::Decimal128(38, 10),
        _ => DataType::Utf8,
    };
    let Some(bytes) = value else {
        return ScalarValue::try_from(&target).map_err(crate::errors::from_datafusion);
    };
    let bad = |what: &str| {
        PgError::new(
            "22P03",
            format!("incorrect binary data format in bind parameter ({what})"),
        )
    };
    if format == 1 {
        let fixed = |n: usize| -> Result<&[u8], PgError> {
            if bytes.len() == n {
                Ok(bytes)
            } else {
                Err(bad(&format!("expected {n} bytes, got {}", bytes.len())))
            }
        };
        return Ok(match oid {
            o::BOOL => ScalarValue::Boolean(Some(fixed(1)?[0] != 0)),
            o::INT2 => ScalarValue::Int16(Some(i16::from_be_bytes(
                fixed(2)?.try_into().map_err(|_| bad("int2"))?,
            ))),
            o::INT4 => ScalarValue::Int32(Some(i32::from_be_bytes(
                fixed(4)?.try_into().map_err(|_| bad("int4"))?,
            ))),
            o::INT8 => ScalarValue::Int64(Some(i64::from_be_bytes(
                fixed(8)?.try_into().map_err(|_| bad("int8"))?,
            ))),
            o::FLOAT4 => ScalarValue::Float32(Some(f32::from_be_bytes(
                fixed(4)?.try_into().map_err(|_| bad("float4"))?,
            ))),
            o::FLOAT8 => ScalarValue::Float64(Some(f64::from_be_bytes(
                fixed(8)?.try_into().map_err(|_| bad("float8"))?,
            ))),
            o::DATE => ScalarValue::Date32(Some(
                i32::from_be_bytes(fixed(4)?.try_into().map_err(|_| bad("date"))?) + 10_957,
            )),
            o::TIMESTAMP | o::TIMESTAMPTZ => {
                let us = i64::from_be_bytes(fixed(8)?.try_into().map_err(|_| bad("timestamp"))?)
                    + 946_684_800_000_000;
                let tz = if oid == o::TIMESTAMPTZ {
                    Some("+00:00".into())
                } else {
                    None
                };
                ScalarValue::TimestampMicrosecond(Some(us), tz)
            }
            o::NUMERIC => {
                return Err(
                    PgError::unsupported("binary NUMERIC parameters are not supported")
                        .with_hint("send numeric parameters as text"),
                )
            }
            _ => {
                let text = std::str::from_utf8(bytes)
                    .map_err(|_| PgError::new("22021", "parameter is not valid UTF-8"))?;
                reject_nul(text)?;
                ScalarValue::Utf8(Some(text.to_string()))
            }
        });
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|_| PgError::new("22021", "parameter is not valid UTF-8"))?;
    reject_nul(text)?;
    if target == DataType::Utf8 {
        return Ok(ScalarValue::Utf8(Some(text.to_string())));
    }
    let array =
        crate::encode::parse_column(&[Some(text)], &target, "parameter").map_err(|(_, e)| e)?;
    ScalarValue::try_from_array(&array, 0).map_err(crate::errors::from_datafusion)
}

/// Text values may not hold NUL bytes (Postgres: 22021).
pub(crate) fn reject_nul(text: &str) -> Result<(), PgError> {
    if text.as_bytes().contains(&0) {
        return Err(PgError::new(
            "22021",
            "invalid byte sequence for encoding \"UTF8\": 0x00",
        ));
    }
    Ok(())
}
