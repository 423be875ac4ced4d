//! The cluster protocol (`proto/drizzle.proto`, compiled by `build.rs`) and
//! the helpers both ends share: connections, Arrow IPC payloads, versions,
//! and proof of membership.
//!
//! # Membership
//! Every gRPC and Arrow Flight call between the coordinator and the workers
//! carries a token derived from the cluster secret ([`ClusterSecret`],
//! `--cluster-secret-file` / `DRIZZLE_CLUSTER_SECRET`; an embedded server
//! makes a random one at each start) in the `x-drizzle-cluster-token`
//! header, and every endpoint refuses a call without the right token
//! (`UNAUTHENTICATED`) before any service code runs ([`MembershipCheck`]).
//! The token is an HMAC of the secret, so the secret itself never travels;
//! it is compared in constant time.
//!
//! # Roles
//! The secret proves membership, not which member is calling. On top of it,
//! every call carries a role credential in [`CREDENTIAL_HEADER`]:
//! - the coordinator gives each registration its own random credential,
//!   known only to that worker and the coordinator;
//! - a worker attaches it to every call to the coordinator, which knows the
//!   caller by it (never by what a message says): reports, results and
//!   checkpoint state count only from the worker that owns the task, reads
//!   of sources, tables and checkpoints only from a worker the query runs
//!   on, and a stale registration's credential is refused;
//! - the coordinator attaches the worker's credential to its calls to that
//!   worker, which accepts `LaunchGroup`, `LaunchReduce`, `CancelQuery` and
//!   `TablesChanged` only with it (`PERMISSION_DENIED` otherwise), so no
//!   other member can cancel or launch work on it;
//! - between workers, notices and Flight tickets carry the query's shuffle
//!   token, which only the workers placed on that query receive.

#[allow(
    missing_docs,
    unreachable_pub,
    unused_qualifications,
    clippy::all,
    clippy::clone_on_ref_ptr
)]
pub mod pb {
    //! Generated gRPC types and services.
    tonic::include_proto!("drizzle.cluster.v1");
}

use std::time::Duration;

/// The `step` of an [`pb::OperatorStats`] that counts a stage's input (a
/// source range read, or shuffled blocks fetched) rather than a step of its
/// chain.
pub const INPUT_STEP: u32 = u32::MAX;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

use crate::error::{ExecError, Result};

/// The protocol version both ends must speak.
pub const PROTOCOL_VERSION: u32 = pb::ProtocolVersion::Current as u32;

/// Largest control message accepted (results and table sides travel as IPC).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// Largest checkpoint state object (one reduce partition's keyed state)
/// a worker may put; it travels in 1 MiB chunks.
pub const MAX_STATE_OBJECT_BYTES: usize = 16 << 30;

/// Largest result of one final task (one partition's rows of one
/// micro-batch) a worker may put: an upsert over a backlog can emit
/// millions of changed rows at once.
pub const MAX_RESULT_PUT_BYTES: usize = 4 << 30;

/// The metadata header that carries the membership token.
pub const TOKEN_HEADER: &str = "x-drizzle-cluster-token";

/// The metadata header that carries a role credential (see the module docs).
pub const CREDENTIAL_HEADER: &str = "x-drizzle-credential";

/// A role credential, shared by every clone of the [`ClusterSecret`] that
/// carries it (a worker fills it in when it registers).
pub type CredentialSlot = std::sync::Arc<parking_lot::RwLock<Option<MetadataValue<Ascii>>>>;

/// A fresh random credential (32 hex digits).
pub fn random_credential() -> String {
    let mut bytes = [0u8; 16];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `request` carries `credential` in [`CREDENTIAL_HEADER`]
/// (compared in constant time).
pub fn has_credential<T>(request: &tonic::Request<T>, credential: &str) -> bool {
    request
        .metadata()
        .get(CREDENTIAL_HEADER)
        .is_some_and(|got| constant_time_eq(got.as_bytes(), credential.as_bytes()))
}

/// The credential a request carries, if any.
pub fn credential_of<T>(request: &tonic::Request<T>) -> Option<String> {
    request
        .metadata()
        .get(CREDENTIAL_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The cluster's shared secret, held as the token derived from it. Attached
/// to every outgoing call by its [`Interceptor`] implementation, with the
/// caller's role credential when it has one.
#[derive(Clone)]
pub struct ClusterSecret {
    token: MetadataValue<Ascii>,
    credential: Option<CredentialSlot>,
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

impl ClusterSecret {
    /// The membership token of `secret` (at least 16 bytes: a secret short
    /// enough to guess is refused).
    pub fn new(secret: &str) -> Result<Self> {
        let secret = secret.trim();
        if secret.len() < 16 {
            return Err(ExecError::invalid(
                "the cluster secret must be at least 16 characters",
            ));
        }
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        let tag = ring::hmac::sign(&key, b"drizzle cluster membership v1");
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let token = MetadataValue::try_from(hex)
            .map_err(|e| ExecError::invalid(format!("cluster token: {e}")))?;
        Ok(Self {
            token,
            credential: None,
        })
    }

    /// This secret, carrying the credential `slot` holds (when it holds one).
    pub fn with_credential(&self, slot: CredentialSlot) -> Self {
        Self {
            token: self.token.clone(),
            credential: Some(slot),
        }
    }

    /// A slot holding `credential`.
    pub fn credential_slot(credential: Option<&str>) -> CredentialSlot {
        std::sync::Arc::new(parking_lot::RwLock::new(
            credential.and_then(|c| MetadataValue::try_from(c).ok()),
        ))
    }

    /// A random secret (an embedded server's, at each start).
    pub fn random() -> Self {
        let mut bytes = [0u8; 32];
        // Only fails without OS randomness; the process then cannot be
        // joined by anyone who lacks these (zero) bytes either way.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
        let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        match Self::new(&secret) {
            Ok(s) => s,
            Err(_) => Self {
                token: MetadataValue::from_static("unusable"),
                credential: None,
            },
        }
    }

    /// The token as sent in [`TOKEN_HEADER`].
    pub fn token(&self) -> &MetadataValue<Ascii> {
        &self.token
    }

    /// The server-side check for this secret.
    pub fn check(&self) -> MembershipCheck {
        MembershipCheck {
            secret: self.clone(),
        }
    }
}

impl Interceptor for ClusterSecret {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert(TOKEN_HEADER, self.token.clone());
        if let Some(c) = self
            .credential
            .as_ref()
            .and_then(|slot| slot.read().clone())
        {
            request.metadata_mut().insert(CREDENTIAL_HEADER, c);
        }
        Ok(request)
    }
}

/// Refuses any call that does not carry the cluster's token.
#[derive(Clone, Debug)]
pub struct MembershipCheck {
    secret: ClusterSecret,
}

impl Interceptor for MembershipCheck {
    fn call(
        &mut self,
        request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        let expected = self.secret.token.as_bytes();
        let ok = request
            .metadata()
            .get(TOKEN_HEADER)
            .is_some_and(|got| constant_time_eq(got.as_bytes(), expected));
        if ok {
            Ok(request)
        } else {
            Err(tonic::Status::unauthenticated(
                "not a member of this cluster: the cluster secret is missing or wrong",
            ))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A channel whose calls carry the cluster token.
pub type ClusterChannel = InterceptedService<Channel, ClusterSecret>;

/// A lazily connecting channel to `host:port`.
pub fn channel(address: &str) -> Result<Channel> {
    let endpoint =
        Endpoint::from_shared(format!("http://{address}")).map_err(|e| ExecError::Unavailable {
            message: format!("bad cluster address {address}: {e}"),
        })?;
    Ok(endpoint
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .connect_lazy())
}

/// A gRPC server builder for cluster endpoints: HTTP/2 keepalive pings find
/// a peer that vanished without closing its connections (a partition), so
/// its streams end and their buffers are freed.
pub fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
}

/// A client of the coordinator service whose calls carry `secret`'s token.
pub fn coordinator_client(
    address: &str,
    secret: &ClusterSecret,
) -> Result<pb::coordinator_client::CoordinatorClient<ClusterChannel>> {
    Ok(pb::coordinator_client::CoordinatorClient::with_interceptor(
        channel(address)?,
        secret.clone(),
    )
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// A client of a worker's control service whose calls carry `secret`'s token.
pub fn worker_client(
    address: &str,
    secret: &ClusterSecret,
) -> Result<pb::worker_client::WorkerClient<ClusterChannel>> {
    Ok(
        pb::worker_client::WorkerClient::with_interceptor(channel(address)?, secret.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
}

/// An Arrow Flight client of a peer's block store whose calls carry
/// `secret`'s token.
pub fn flight_client(channel: Channel, secret: &ClusterSecret) -> arrow_flight::FlightClient {
    let mut client = arrow_flight::FlightClient::new(channel);
    client
        .metadata_mut()
        .insert(TOKEN_HEADER, secret.token.clone());
    client
}

/// Rows as an Arrow IPC stream (empty bytes for no batches).
pub fn to_ipc(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>> {
    if batches.is_empty() {
        return Ok(Vec::new());
    }
    Ok(drizzle_shuffle::encode_block(schema, batches)?.to_vec())
}

/// Rows from [`to_ipc`].
pub fn from_ipc(bytes: Vec<u8>) -> Result<Vec<RecordBatch>> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    Ok(drizzle_shuffle::decode_block(&bytes::Bytes::from(bytes))?)
}

/// A gRPC failure as a runtime error.
pub fn rpc_error(what: &str, status: tonic::Status) -> ExecError {
    ExecError::Unavailable {
        message: format!("{what}: {}", status.message()),
    }
}

/// A runtime error as a gRPC status.
pub fn status(e: ExecError) -> tonic::Status {
    match e {
        ExecError::InvalidData { message } => tonic::Status::invalid_argument(message),
        ExecError::Cancelled => tonic::Status::cancelled("query cancelled"),
        other => tonic::Status::internal(other.to_string()),
    }
}

/// Fails unless a peer speaks [`PROTOCOL_VERSION`].
pub fn check_version(v: u32, who: &str) -> std::result::Result<(), tonic::Status> {
    if v != PROTOCOL_VERSION {
        return Err(tonic::Status::failed_precondition(format!(
            "{who} speaks cluster protocol version {v}, this process speaks {PROTOCOL_VERSION}"
        )));
    }
    Ok(())
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// Serves `router` on `listener` until `stop` turns true.
pub fn spawn_server(
    router: tonic::transport::server::Router,
    listener: tokio::net::TcpListener,
    stop: tokio::sync::watch::Receiver<bool>,
    what: &'static str,
) {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(async move {
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, stopped(stop))
            .await
        {
            tracing::error!("{what} endpoint failed: {e}");
        }
    });
}

/// At most this many micro-batches in one launch: a range beyond it is
/// refused, not iterated.
pub const MAX_LAUNCH_BATCHES: u64 = 1 << 20;

impl pb::BatchRange {
    /// The range's batches with their trigger times (Unix µs): the
    /// coordinator's `origin + (b + 1) · interval`, exactly.
    pub fn triggers(&self) -> impl Iterator<Item = (u64, i64)> + '_ {
        (self.first..self.first.saturating_add(self.count)).map(move |b| {
            let offset_ns = self.interval_ns.saturating_mul(b.saturating_add(1));
            let offset_us = i64::try_from(offset_ns / 1000).unwrap_or(i64::MAX);
            (b, self.origin_unix_us.saturating_add(offset_us))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_range_triggers_each_batch_when_the_coordinator_planned_it() {
        let interval = Duration::from_nanos(3_333_333);
        let origin = 1_700_000_000_000_000i64;
        let range = pb::BatchRange {
            first: 997,
            count: 5,
            origin_unix_us: origin,
            interval_ns: interval.as_nanos() as u64,
        };
        let got: Vec<(u64, i64)> = range.triggers().collect();
        let want: Vec<(u64, i64)> = (997..1002u64)
            .map(|b| {
                let offset =
                    Duration::from_nanos((interval.as_nanos() as u64).saturating_mul(b + 1));
                (b, origin + offset.as_micros() as i64)
            })
            .collect();
        assert_eq!(got, want);
        // An absurd range ends instead of overflowing.
        let huge = pb::BatchRange {
            first: u64::MAX - 1,
            count: 10,
            origin_unix_us: i64::MAX - 5,
            interval_ns: u64::MAX,
        };
        assert_eq!(huge.triggers().count(), 1);
    }
}
