//! The cluster protocol (`proto/drizzle.proto`, compiled by `build.rs`) and
//! the helpers both ends share: connections, Arrow IPC payloads, versions.

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

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use tonic::transport::{Channel, Endpoint};

use crate::error::{ExecError, Result};

/// The protocol version both ends must speak.
pub const PROTOCOL_VERSION: u32 = pb::ProtocolVersion::Current as u32;

/// Largest control message accepted (results and table sides travel as IPC).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

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

/// A client of the coordinator service.
pub fn coordinator_client(
    address: &str,
) -> Result<pb::coordinator_client::CoordinatorClient<Channel>> {
    Ok(
        pb::coordinator_client::CoordinatorClient::new(channel(address)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
}

/// A client of a worker's control service.
pub fn worker_client(address: &str) -> Result<pb::worker_client::WorkerClient<Channel>> {
    Ok(pb::worker_client::WorkerClient::new(channel(address)?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
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
