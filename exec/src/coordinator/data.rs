//! The coordinator's data endpoint: Arrow Flight on the cluster port, behind
//! the same cluster secret and worker credentials as the control service
//! (the wire format is in [`crate::dataplane`]). Workers pull source ranges,
//! lookup tables and checkpoint state from it with `do_get`, and push
//! checkpoint state and final-stage results with `do_put`.

use std::pin::Pin;

use arrow_flight::decode::{DecodedPayload, FlightDataDecoder};
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use tonic::Streaming;

use super::*;
use crate::dataplane::{answer_metadata, state_from_batches, state_schema, state_to_batches};

type FlightStream<T> = Pin<Box<dyn futures::Stream<Item = std::result::Result<T, Status>> + Send>>;

/// How far in the future a source range's trigger time may be (µs).
const MAX_READ_AHEAD_US: i64 = 30_000_000;

/// The coordinator's Flight service.
pub(super) struct CoordinatorData {
    pub(super) state: Arc<State>,
}

fn unimplemented<T>(what: &str) -> std::result::Result<T, Status> {
    Err(Status::unimplemented(format!(
        "{what}: the coordinator's Flight endpoint serves workers by do_get and do_put only"
    )))
}

/// `batches` (with `schema`) as a do_get answer whose first message carries
/// `answer`.
fn answer(
    schema: SchemaRef,
    answer: pb::DataAnswer,
    batches: Vec<RecordBatch>,
) -> Response<FlightStream<FlightData>> {
    let stream = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .with_metadata(answer_metadata(&answer))
        .build(futures::stream::iter(batches.into_iter().map(Ok)))
        .map_err(Status::from);
    Response::new(Box::pin(stream))
}

impl CoordinatorData {
    async fn source(
        &self,
        caller: Option<(WorkerId, u64)>,
        req: pb::ReadSourceRequest,
    ) -> std::result::Result<Response<FlightStream<FlightData>>, Status> {
        let q = self.state.query(req.query)?;
        self.state.placed(caller, &q)?;
        let source = q
            .inputs
            .get(req.stage as usize)
            .and_then(|i| i.sources.get(req.partition as usize))
            .cloned()
            .ok_or_else(|| Status::invalid_argument("no such source partition"))?;
        let schema = match q.graph.stage(GraphStage(req.stage)).map(|s| &s.input) {
            Some(StageInput::Source(stream)) => stream.source_schema(),
            _ => return Err(Status::invalid_argument("no such source stage")),
        };
        // The batch's range ends at what was appended by its trigger time:
        // wait until that time has passed here (clocks differ), then ask.
        let until = if req.until_unix_us > 0 {
            req.until_unix_us
        } else {
            unix_us()
        };
        let ahead = until.saturating_add(1).saturating_sub(unix_us());
        // Workers read at most a little ahead (and clocks differ a little):
        // a range far in the future is refused rather than waited for.
        if ahead > MAX_READ_AHEAD_US {
            return Err(Status::invalid_argument(format!(
                "a source range triggered {} s from now: too far ahead",
                ahead / 1_000_000
            )));
        }
        if ahead > 0 {
            tokio::time::sleep(Duration::from_micros(ahead as u64)).await;
        }
        let (to, batches) =
            tokio::task::spawn_blocking(move || -> Result<(u64, Vec<RecordBatch>)> {
                let to = source
                    .available_at(until)
                    .min(req.from.saturating_add(req.max_rows))
                    .max(req.from);
                Ok((to, source.read(req.from, to)?))
            })
            .await
            .map_err(internal)?
            .map_err(internal)?;
        Ok(answer(
            schema,
            pb::DataAnswer {
                to,
                ..Default::default()
            },
            batches,
        ))
    }

    async fn table(
        &self,
        caller: Option<(WorkerId, u64)>,
        req: pb::ReadTableRequest,
    ) -> std::result::Result<Response<FlightStream<FlightData>>, Status> {
        let q = self.state.query(req.query)?;
        self.state.placed(caller, &q)?;
        let spec = q.join(req.join).ok_or_else(|| {
            Status::invalid_argument(format!("query has no lookup join {}", req.join))
        })?;
        let schema = Arc::clone(&spec.table_schema);
        // The version of what this join reads, not of every relation.
        let version = self.state.tables.version(spec);
        if req.held_version == Some(version) {
            let unchanged = pb::DataAnswer {
                version,
                unchanged: true,
                ..Default::default()
            };
            return Ok(answer(schema, unchanged, Vec::new()));
        }
        let cached = q
            .tables
            .lock()
            .get(&req.join)
            .filter(|(v, _)| *v == version)
            .map(|(_, rows)| Arc::clone(rows));
        let rows = match cached {
            Some(rows) => rows,
            None => {
                let tables = Arc::clone(&self.state.tables);
                let q2 = Arc::clone(&q);
                let join = req.join;
                let (v, rows) =
                    tokio::task::spawn_blocking(move || -> Result<(u64, Vec<RecordBatch>)> {
                        let spec = q2.join(join).ok_or_else(|| {
                            ExecError::invalid(format!("query has no lookup join {join}"))
                        })?;
                        tables.evaluate(spec, None)?.ok_or_else(|| {
                            ExecError::invalid("a lookup join's table came back unchanged unasked")
                        })
                    })
                    .await
                    .map_err(internal)?
                    .map_err(internal)?;
                let rows = Arc::new(rows);
                q.tables.lock().insert(req.join, (v, Arc::clone(&rows)));
                if v != version {
                    // Changed again meanwhile: answer with what was read.
                    return Ok(answer(
                        schema,
                        pb::DataAnswer {
                            version: v,
                            ..Default::default()
                        },
                        rows.as_ref().clone(),
                    ));
                }
                rows
            }
        };
        Ok(answer(
            schema,
            pb::DataAnswer {
                version,
                ..Default::default()
            },
            rows.as_ref().clone(),
        ))
    }

    async fn load_state(
        &self,
        caller: Option<(WorkerId, u64)>,
        req: pb::LoadStateRequest,
    ) -> std::result::Result<Response<FlightStream<FlightData>>, Status> {
        let q = self.state.query(req.query)?;
        self.state.placed(caller, &q)?;
        if !req.path.starts_with(&format!("{}/", q.key)) {
            return Err(Status::permission_denied("not this query's checkpoint"));
        }
        let Some(store) = self.state.checkpoints.as_ref() else {
            return Err(Status::failed_precondition("checkpoints are disabled"));
        };
        let bytes = store.get(&req.path).await.map_err(internal)?;
        let batches = state_to_batches(&bytes).map_err(internal)?;
        Ok(answer(state_schema(), pb::DataAnswer::default(), batches))
    }

    /// Whether `caller` may save this state object: a stateful stage's
    /// partition it owns. Checked as soon as the put names the object,
    /// before its bytes are gathered, and again when they are saved.
    fn may_save_state(
        &self,
        caller: Option<(WorkerId, u64)>,
        req: &pb::SaveStateRequest,
    ) -> std::result::Result<(), Status> {
        let q = self.state.query(req.query)?;
        if !q.stateful_stages().contains(&req.stage) {
            return Err(Status::invalid_argument(format!(
                "stage {} of query {} keeps no state",
                req.stage, req.query
            )));
        }
        if caller.map(|(id, _)| id.0) != q.owners.lock().reduce(req.partition) {
            return Err(Status::permission_denied(
                "only the worker that owns a reduce partition saves its state",
            ));
        }
        Ok(())
    }

    async fn save_state(
        &self,
        caller: Option<(WorkerId, u64)>,
        req: pb::SaveStateRequest,
        bytes: Vec<u8>,
    ) -> std::result::Result<(), Status> {
        let q = self.state.query(req.query)?;
        if req.attempt != q.status.attempt.load(Ordering::Acquire) {
            return Ok(());
        }
        self.may_save_state(caller, &req)?;
        let Some(store) = self.state.checkpoints.as_ref() else {
            return Err(Status::failed_precondition("checkpoints are disabled"));
        };
        let base = StateObject::peek_delta_base(&bytes).map_err(internal)?;
        let file = store
            .put_state(&q.key, req.batch, (req.stage, req.partition), bytes)
            .await
            .map_err(internal)?;
        let mut pending = q.pending_checkpoints.lock();
        let entry = pending.entry(req.batch).or_default();
        entry.attempt = req.attempt;
        entry.states.push((file, base));
        drop(pending);
        q.checkpoint_progress.notify_one();
        Ok(())
    }

    /// A final-stage task's rows: `out.chunks[i].rows` rows each, in order.
    fn output(
        &self,
        caller: Option<(WorkerId, u64)>,
        mut out: pb::TaskOutput,
        batches: Vec<RecordBatch>,
    ) -> std::result::Result<(), Status> {
        let Some((worker, _)) = caller else {
            return Err(stale_member());
        };
        tracing::debug!(
            query = out.query,
            batch = out.batch,
            partition = out.partition,
            rows = batches.iter().map(RecordBatch::num_rows).sum::<usize>(),
            "results put"
        );
        let Some(q) = self.state.output_counts(worker.0, &out) else {
            return Ok(());
        };
        // The rows' own schema (the collector checks their width).
        let schema = batches
            .first()
            .map(RecordBatch::schema)
            .unwrap_or_else(|| Arc::clone(&q.plan.output_schema));
        let all = arrow::compute::concat_batches(&schema, &batches).map_err(|e| {
            Status::invalid_argument(format!("a task's results do not match its query: {e}"))
        })?;
        let mut chunks = Vec::with_capacity(out.chunks.len());
        let mut at = 0usize;
        for c in std::mem::take(&mut out.chunks) {
            let rows = usize::try_from(c.rows).unwrap_or(usize::MAX);
            if at.saturating_add(rows) > all.num_rows() {
                return Err(Status::invalid_argument(
                    "a task's results have fewer rows than its chunks say",
                ));
            }
            chunks.push((c.window_end, all.slice(at, rows)));
            at += rows;
        }
        if at != all.num_rows() {
            return Err(Status::invalid_argument(
                "a task's results have more rows than its chunks say",
            ));
        }
        self.state.output_rows(&q, out, chunks);
        Ok(())
    }
}

#[tonic::async_trait]
impl FlightService for CoordinatorData {
    type HandshakeStream = FlightStream<HandshakeResponse>;
    type ListFlightsStream = FlightStream<FlightInfo>;
    type DoGetStream = FlightStream<FlightData>;
    type DoPutStream = FlightStream<PutResult>;
    type DoExchangeStream = FlightStream<FlightData>;
    type DoActionStream = FlightStream<arrow_flight::Result>;
    type ListActionsStream = FlightStream<ActionType>;

    async fn handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> std::result::Result<Response<Self::HandshakeStream>, Status> {
        unimplemented("handshake")
    }

    async fn list_flights(
        &self,
        _request: Request<Criteria>,
    ) -> std::result::Result<Response<Self::ListFlightsStream>, Status> {
        unimplemented("list_flights")
    }

    async fn get_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        unimplemented("get_flight_info")
    }

    async fn poll_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<PollInfo>, Status> {
        unimplemented("poll_flight_info")
    }

    async fn get_schema(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<SchemaResult>, Status> {
        unimplemented("get_schema")
    }

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<Self::DoGetStream>, Status> {
        let caller = self.state.member(&request);
        let ticket = pb::DataTicket::decode(request.into_inner().ticket)
            .map_err(|e| Status::invalid_argument(format!("not a Drizzle data ticket: {e}")))?;
        match ticket.kind {
            Some(pb::data_ticket::Kind::Source(req)) => self.source(caller, req).await,
            Some(pb::data_ticket::Kind::Table(req)) => self.table(caller, req).await,
            Some(pb::data_ticket::Kind::State(req)) => self.load_state(caller, req).await,
            None => Err(Status::invalid_argument("an empty data ticket")),
        }
    }

    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> std::result::Result<Response<Self::DoPutStream>, Status> {
        let caller = self.state.member(&request);
        if caller.is_none() {
            return Err(stale_member());
        }
        let mut decoder = FlightDataDecoder::new(
            request
                .into_inner()
                .map_err(|s| FlightError::Tonic(Box::new(s))),
        );
        let mut put: Option<pb::DataPut> = None;
        let mut batches = Vec::new();
        // A state object's bytes, gathered as they arrive.
        let mut state_bytes: Vec<u8> = Vec::new();
        // A put holds one task's rows or one reduce partition's keyed state
        // (which the query's memory budget bounds on the worker); each has
        // a bound of its own, far above a control message's.
        let mut bytes = 0usize;
        while let Some(msg) = decoder.next().await {
            let msg = msg.map_err(|e| Status::invalid_argument(e.to_string()))?;
            // The bytes received (a decoded batch's memory size counts
            // buffers it shares with others: it overstates a put).
            let received = msg.inner.data_body.len() + msg.inner.data_header.len();
            if put.is_none() {
                if let Some(d) = &msg.inner.flight_descriptor {
                    let named = pb::DataPut::decode(d.cmd.clone()).map_err(|e| {
                        Status::invalid_argument(format!("not a Drizzle data put: {e}"))
                    })?;
                    if let Some(pb::data_put::Kind::State(req)) = &named.kind {
                        // A stale attempt's put is dropped when it ends, as
                        // before; the current attempt's must be its owner's.
                        let current = self
                            .state
                            .query(req.query)?
                            .status
                            .attempt
                            .load(Ordering::Acquire);
                        if req.attempt == current {
                            self.may_save_state(caller, req)?;
                        }
                    }
                    put = Some(named);
                }
            }
            if let DecodedPayload::RecordBatch(b) = msg.payload {
                let is_state = matches!(
                    put.as_ref().and_then(|p| p.kind.as_ref()),
                    Some(pb::data_put::Kind::State(_))
                );
                let limit = if is_state {
                    MAX_STATE_OBJECT_BYTES
                } else {
                    crate::cluster::MAX_RESULT_PUT_BYTES
                };
                bytes = bytes.saturating_add(received);
                if bytes > limit {
                    return Err(Status::resource_exhausted(format!(
                        "a data put larger than {limit} bytes"
                    )));
                }
                if is_state {
                    state_bytes
                        .extend(state_from_batches(std::slice::from_ref(&b)).map_err(internal)?);
                } else {
                    batches.push(b);
                }
            }
        }
        match put.and_then(|p| p.kind) {
            Some(pb::data_put::Kind::State(req)) => {
                self.save_state(caller, req, state_bytes).await?;
            }
            Some(pb::data_put::Kind::Output(out)) => self.output(caller, out, batches)?,
            None => return Err(Status::invalid_argument("a data put without a descriptor")),
        }
        Ok(Response::new(Box::pin(futures::stream::empty())))
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> std::result::Result<Response<Self::DoExchangeStream>, Status> {
        unimplemented("do_exchange")
    }

    async fn do_action(
        &self,
        _request: Request<Action>,
    ) -> std::result::Result<Response<Self::DoActionStream>, Status> {
        unimplemented("do_action")
    }

    async fn list_actions(
        &self,
        _request: Request<Empty>,
    ) -> std::result::Result<Response<Self::ListActionsStream>, Status> {
        unimplemented("list_actions")
    }
}
