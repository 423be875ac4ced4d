//! The data plane between workers and the coordinator: Arrow Flight on the
//! coordinator's cluster port (served by the [`coordinator`](crate::coordinator)),
//! so rows never travel inside control messages ([`pb`] for the messages).
//!
//! | call | what | answer |
//! |---|---|---|
//! | `do_get` `DataTicket.source` | a built-in stream's log range | its rows; `DataAnswer.to` |
//! | `do_get` `DataTicket.table` | a lookup join's table | its rows, or `unchanged` |
//! | `do_get` `DataTicket.state` | a checkpoint state object | its bytes as `chunk` batches |
//! | `do_put` `DataPut.state` | a checkpoint state object | |
//! | `do_put` `DataPut.output` | a final-stage task's rows (above 64 KiB) | |
//!
//! Tickets and descriptors are prost-encoded; the answer's metadata rides
//! in the first message's `app_metadata`. Calls carry the cluster token and
//! the worker's credential ([`ClusterSecret`]), so the coordinator knows the
//! caller as it does on the control plane.

use std::sync::Arc;

use arrow::array::{Array, BinaryArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow_flight::decode::{DecodedPayload, FlightDataDecoder};
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::{FlightClient, FlightDescriptor, Ticket};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use prost::Message;

use crate::cluster::{pb, ClusterChannel, ClusterSecret};
use crate::error::{ExecError, Result};

/// Bytes of a state object per `chunk` value.
const STATE_CHUNK: usize = 1 << 20;

/// The schema state objects travel in: one binary column.
pub(crate) fn state_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new(
        "chunk",
        DataType::Binary,
        false,
    )]))
}

/// A state object as `chunk` batches (one value per [`STATE_CHUNK`] bytes).
pub(crate) fn state_to_batches(bytes: &[u8]) -> Result<Vec<RecordBatch>> {
    let schema = state_schema();
    bytes
        .chunks(STATE_CHUNK)
        .map(|c| {
            Ok(RecordBatch::try_new(
                Arc::clone(&schema),
                vec![Arc::new(BinaryArray::from_iter_values([c]))],
            )?)
        })
        .collect()
}

/// The bytes [`state_to_batches`] carried.
pub(crate) fn state_from_batches(batches: &[RecordBatch]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for b in batches {
        let col = b
            .columns()
            .first()
            .and_then(|c| c.as_any().downcast_ref::<BinaryArray>())
            .ok_or_else(|| ExecError::invalid("a state stream without its chunk column"))?;
        for i in 0..col.len() {
            out.extend_from_slice(col.value(i));
        }
    }
    Ok(out)
}

/// A Flight failure as a runtime error.
fn flight_error(what: &str, e: FlightError) -> ExecError {
    let message = match e {
        FlightError::Tonic(s) => s.message().to_string(),
        other => other.to_string(),
    };
    ExecError::Unavailable {
        message: format!("{what}: {message}"),
    }
}

/// A worker's client of the coordinator's data endpoint.
#[derive(Clone)]
pub(crate) struct DataClient {
    channel: ClusterChannel,
}

impl DataClient {
    /// A client over the coordinator channel `channel` (its interceptor
    /// attaches the cluster token and the worker's credential).
    pub(crate) fn new(channel: tonic::transport::Channel, secret: &ClusterSecret) -> Self {
        Self {
            channel: tonic::service::interceptor::InterceptedService::new(channel, secret.clone()),
        }
    }

    fn client(&self) -> FlightClient<ClusterChannel> {
        FlightClient::new(self.channel.clone())
    }

    /// Runs `ticket`: its answer's metadata and rows.
    async fn get(
        &self,
        what: &str,
        ticket: pb::data_ticket::Kind,
    ) -> Result<(pb::DataAnswer, Vec<RecordBatch>)> {
        let ticket = pb::DataTicket { kind: Some(ticket) }.encode_to_vec();
        let stream = self
            .client()
            .inner_mut()
            .do_get(Ticket::new(ticket))
            .await
            .map_err(|s| flight_error(what, FlightError::Tonic(Box::new(s))))?
            .into_inner();
        let mut decoder =
            FlightDataDecoder::new(stream.map_err(|s| FlightError::Tonic(Box::new(s))));
        let mut answer = None;
        let mut batches = Vec::new();
        while let Some(msg) = decoder.next().await {
            let msg = msg.map_err(|e| flight_error(what, e))?;
            if answer.is_none() && !msg.inner.app_metadata.is_empty() {
                answer = Some(
                    pb::DataAnswer::decode(msg.inner.app_metadata.clone())
                        .map_err(|e| ExecError::invalid(format!("{what}: {e}")))?,
                );
            }
            if let DecodedPayload::RecordBatch(b) = msg.payload {
                batches.push(b);
            }
        }
        Ok((answer.unwrap_or_default(), batches))
    }

    /// Rows `[from, to)` of a built-in stream's partition, where `to` is
    /// what the trigger time `until_unix_us` fixes (at most `max_rows`).
    pub(crate) async fn read_source(
        &self,
        req: pb::ReadSourceRequest,
    ) -> Result<(u64, Vec<RecordBatch>)> {
        let from = req.from;
        let (answer, batches) = self
            .get("reading the stream log", pb::data_ticket::Kind::Source(req))
            .await?;
        Ok((answer.to.max(from), batches))
    }

    /// A lookup join's table: `None` when the held version is current.
    pub(crate) async fn read_table(
        &self,
        req: pb::ReadTableRequest,
    ) -> Result<Option<(u64, Vec<RecordBatch>)>> {
        let (answer, batches) = self
            .get(
                "reading a lookup join's table",
                pb::data_ticket::Kind::Table(req),
            )
            .await?;
        if answer.unchanged {
            return Ok(None);
        }
        Ok(Some((answer.version, batches)))
    }

    /// A checkpoint state object.
    pub(crate) async fn load_state(&self, req: pb::LoadStateRequest) -> Result<Vec<u8>> {
        let (_, batches) = self
            .get(
                "loading checkpoint state",
                pb::data_ticket::Kind::State(req),
            )
            .await?;
        state_from_batches(&batches)
    }

    /// Puts `batches` under the descriptor `put`.
    async fn put(
        &self,
        what: &str,
        put: pb::data_put::Kind,
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
    ) -> Result<()> {
        let descriptor = FlightDescriptor::new_cmd(pb::DataPut { kind: Some(put) }.encode_to_vec());
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .with_flight_descriptor(Some(descriptor))
            .build(futures::stream::iter(batches.into_iter().map(Ok)));
        let acks = self
            .client()
            .do_put(stream)
            .await
            .map_err(|e| flight_error(what, e))?;
        let _: Vec<_> = acks
            .try_collect()
            .await
            .map_err(|e| flight_error(what, e))?;
        Ok(())
    }

    /// Writes a checkpoint state object (`req.state` is ignored: `bytes`
    /// travel as the put's batches).
    pub(crate) async fn save_state(
        &self,
        mut req: pb::SaveStateRequest,
        bytes: &[u8],
    ) -> Result<()> {
        req.state = Vec::new();
        let batches = state_to_batches(bytes)?;
        self.put(
            "saving checkpoint state",
            pb::data_put::Kind::State(req),
            state_schema(),
            batches,
        )
        .await
    }

    /// Sends a final-stage task's rows; `out.chunks` say which rows are
    /// which chunk (`rows`), in order.
    pub(crate) async fn put_output(
        &self,
        out: pb::TaskOutput,
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
    ) -> Result<()> {
        self.put(
            "sending a task's results",
            pb::data_put::Kind::Output(out),
            schema,
            batches,
        )
        .await
    }
}

/// The answer metadata `answer`, for a do_get's first message.
pub(crate) fn answer_metadata(answer: &pb::DataAnswer) -> Bytes {
    Bytes::from(answer.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_objects_round_trip_through_chunks() {
        for len in [0usize, 1, STATE_CHUNK - 1, STATE_CHUNK, 2 * STATE_CHUNK + 7] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let batches = state_to_batches(&bytes).expect("chunks");
            assert_eq!(batches.len(), len.div_ceil(STATE_CHUNK));
            assert_eq!(state_from_batches(&batches).expect("bytes"), bytes);
        }
    }
}
