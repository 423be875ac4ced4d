//! Map and reduce tasks: reading sources, running operators, routing rows
//! to reduce partitions, pulling blocks, delivering outputs, and keyed
//! state snapshots.

use super::*;

impl Scheduler {
    /// Starts map task (b, stage, p) on a slot with the rows its read
    /// brought; false when they are not in (the task stays pending).
    pub(super) fn run_map(
        &mut self,
        qid: QueryId,
        b: u64,
        stage: u32,
        p: MapPartition,
    ) -> Result<bool> {
        let Some(wq) = self.queries.get_mut(&qid) else {
            return Ok(true);
        };
        let Some(state) = wq.maps.get_mut(&(stage, p)) else {
            return Err(ExecError::invalid(format!(
                "map partition {p} of stage {stage} not on this worker"
            )));
        };
        let read_started = Instant::now();
        let until = wq.pending_maps.get(&(b, stage, p)).map(|(_, t)| *t);
        let from = state.next_offset;
        let Some((read_from, read_until, read)) = state.read.done.remove(&b) else {
            return Ok(false);
        };
        if read_from != from || Some(read_until) != until {
            // Read for another position (the partition was reset): read again.
            state.read = ReadAhead::default();
            return Ok(false);
        }
        wq.pending_maps.remove(&(b, stage, p));
        self.shared
            .counters
            .map_tasks_run
            .fetch_add(1, Ordering::Relaxed);
        let (to, pieces) = read?;
        let ended = state.source.end() == Some(to);
        state.next_offset = to;
        state.last_batch = Some(b);
        wq.rows_in += to - from;
        let chain = std::mem::take(&mut state.chain);
        let steps = wq.steps.get(stage as usize).map_or(0, Vec::len);
        let mut stats = StageStats::new(steps);
        stats.tasks += 1;
        let read = (to - from) as usize;
        stats.input.record(read, read, read_started);
        let group = group_of(&wq.group_starts, b);
        if let Some(progress) = wq.groups.get_mut(&group) {
            progress.ranges.push(pb::SourceRange {
                batch: b,
                partition: p.0,
                from,
                to,
                stage,
            });
        }
        // A processing-time column takes the batch's trigger time: the
        // same on every replay of the batch.
        let proctime = match wq.graph.stage(GraphStage(stage)).map(|s| &s.input) {
            Some(StageInput::Source(def)) if def.proctime.is_some() => {
                Some((def.schema(), read_until))
            }
            _ => None,
        };
        let mut task = wq.slot_task(
            qid,
            (b, stage, p.0),
            stats,
            Work::Map {
                chain,
                pieces,
                ended,
                proctime,
            },
        );
        task.range = Some((from, to));
        self.dispatch(task);
        Ok(true)
    }

    /// Hands `task` to a slot; its partition is busy until it is back.
    pub(super) fn dispatch(&mut self, task: SlotTask) {
        if let Some(wq) = self.queries.get_mut(&task.query) {
            wq.busy.insert((task.stage, task.partition));
        }
        self.running += 1;
        self.shared
            .counters
            .peak_tasks_running
            .fetch_max(self.running as u64, Ordering::Relaxed);
        let inbox = self.shared.inbox.lock().clone();
        self.slots.run(move || {
            let done = task.run();
            let _ = inbox.send(Msg::Computed(Box::new(done)));
        });
    }

    /// A task is back from its slot: its partition's state goes back, its
    /// output goes out (blocks and notices, or results), and the group's
    /// report once it was the group's last task here.
    pub(super) fn computed(&mut self, done: Computed) {
        self.running = self.running.saturating_sub(1);
        tracing::debug!(query = %done.query, batch = done.batch, stage = done.stage, partition = done.partition, ok = done.result.is_ok(), "task back");
        let Computed {
            query: qid,
            incarnation,
            batch: b,
            stage,
            partition,
            stats,
            late,
            range,
            state,
            result,
        } = done;
        let Some(wq) = self
            .queries
            .get_mut(&qid)
            .filter(|wq| wq.incarnation == incarnation)
        else {
            return; // the query ended, or started over, meanwhile
        };
        wq.busy.remove(&(stage, partition));
        let merged = wq
            .stats
            .entry(stage)
            .or_insert_with(|| StageStats::new(stats.steps.len()));
        merged.merge(&stats);
        wq.late_rows += late;
        match state {
            Some(Returned::Map(chain)) => {
                if let Some(m) = wq.maps.get_mut(&(stage, MapPartition(partition))) {
                    m.chain = chain;
                }
            }
            Some(Returned::Reduce(work)) => {
                if let Some(r) = wq.reduces.get_mut(&(stage, ReducePartition(partition))) {
                    r.work = Some(work);
                }
            }
            None => {}
        }
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                self.fail(qid, BatchId(b), e);
                return;
            }
        };
        if let Err(e) = self.task_output(qid, b, stage, partition, range, out) {
            self.fail(qid, BatchId(b), e);
            return;
        }
        self.task_done(qid, b);
    }

    fn task_output(
        &mut self,
        qid: QueryId,
        b: u64,
        stage: u32,
        partition: u32,
        range: Option<(u64, u64)>,
        out: TaskOut,
    ) -> Result<()> {
        let Some(wq) = self.queries.get_mut(&qid) else {
            return Ok(());
        };
        wq.gauges.insert(
            (stage, partition),
            Gauge {
                state: out.size,
                watermark_us: out.watermark_us,
            },
        );
        let group = group_of(&wq.group_starts, b);
        let checkpoint = wq.group_ends.get(&group) == Some(&(b, true));
        if let Some((_, to)) = range {
            // A map task: its position, in a checkpoint group's report.
            let max_event_us = wq
                .maps
                .get(&(stage, MapPartition(partition)))
                .and_then(|m| m.chain.window.max_event_us);
            if let Some(progress) = wq.groups.get_mut(&group).filter(|_| checkpoint) {
                progress.maps.push(pb::MapState {
                    batch: b,
                    stage,
                    partition,
                    next_offset: to,
                    max_event_us,
                });
            }
        } else {
            let operator = wq
                .reduces
                .get(&(stage, ReducePartition(partition)))
                .and_then(|r| r.work.as_ref())
                .map_or("operator", |w| w.operator.name());
            let operator = format!("{operator} (partition {partition} of stage {stage})");
            wq.check_budget(&operator, self.shared.store.query_bytes(qid))?;
        }
        if let Some(snapshot) = out.snapshot {
            // A checkpoint: the snapshot was taken on the slot; encoded on
            // the blocking pool and written asynchronously (a missing piece
            // leaves the checkpoint incomplete, never wrong).
            let req = pb::SaveStateRequest {
                query: qid.0,
                attempt: wq.attempt,
                batch: b,
                stage,
                partition,
                state: Vec::new(),
            };
            let data = self.shared.data.clone();
            let handle = self.shared.handle.clone();
            self.shared.handle.spawn(async move {
                let bytes = match handle
                    .spawn_blocking(move || encode_snapshot(&snapshot))
                    .await
                {
                    Ok(Ok(bytes)) => bytes,
                    Ok(Err(e)) => {
                        tracing::warn!("encoding checkpoint state failed: {e}");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!("encoding checkpoint state failed: {e}");
                        return;
                    }
                };
                if let Err(e) = data.save_state(req, &bytes).await {
                    tracing::warn!("saving checkpoint state failed: {e}");
                }
            });
        }
        match out.produced {
            Produced::Shuffle { blocks, rows } => {
                self.publish(qid, b, stage, partition, blocks, rows, out.watermark_us)
            }
            Produced::Sink(chunks) => {
                let rows_in = if range.is_some() {
                    std::mem::take(&mut wq.rows_in)
                } else {
                    0
                };
                let late = std::mem::take(&mut wq.late_rows);
                self.deliver(qid, BatchId(b), partition, chunks, rows_in, late)
            }
        }
    }

    /// Stores a task's shuffle blocks and announces them to every
    /// consumer's worker (Drizzle) or to the coordinator (BSP). `producer`
    /// is the task's partition in `stage`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn publish(
        &mut self,
        qid: QueryId,
        b: u64,
        stage: u32,
        producer: u32,
        blocks: Vec<Option<bytes::Bytes>>,
        rows: Vec<u32>,
        watermark_us: Option<i64>,
    ) -> Result<()> {
        let Some(wq) = self.queries.get_mut(&qid) else {
            return Ok(());
        };
        let p = MapPartition(producer);
        for (r, bytes) in blocks.into_iter().enumerate() {
            let Some(bytes) = bytes else {
                continue;
            };
            let id = BlockId {
                query: qid,
                batch: BatchId(b),
                stage: StageId(stage),
                map: p,
                reduce: ReducePartition(r as u32),
            };
            self.shared.store.put(id, bytes);
        }
        let notice = pb::MapOutputReady {
            query: qid.0,
            batch: b,
            stage,
            map: p.0,
            rows,
            watermark_us,
            location: self.shared.address.clone(),
            worker: self.shared.worker_id(),
            attempt: wq.attempt,
            token: wq.token.0.to_vec(),
        };
        if wq.mode == SchedulingMode::Bsp {
            // BSP: the coordinator collects every map task's notice and
            // launches the reduce tasks itself.
            self.shared.event(pb::worker_event::Event::MapDone(notice));
            return Ok(());
        }
        if wq.retain {
            // Kept with the blocks, to announce again after a recovery.
            wq.produced.insert((b, stage, p.0), notice.clone());
        }
        // One notice per consumer worker, pushed directly (no coordinator).
        let mut targets = wq.reduce_placement.clone();
        targets.sort();
        targets.dedup();
        for t in targets {
            self.send_notice(&t, notice.clone())?;
        }
        Ok(())
    }

    /// Pulls a remote block now, blocking the task thread: only for a
    /// block that was not downloaded ahead (see `download`).
    pub(super) fn fetch(
        &self,
        qid: QueryId,
        b: u64,
        r: ReducePartition,
        n: &pb::MapOutputReady,
    ) -> Result<Vec<RecordBatch>> {
        let id = announced_block(qid, b, r, n);
        self.shared
            .counters
            .blocks_fetched_remote
            .fetch_add(1, Ordering::Relaxed);
        let client =
            crate::cluster::flight_client(self.shared.peer(&n.location)?, &self.shared.secret);
        let location = n.location.clone();
        let token = self
            .queries
            .get(&qid)
            .map(|wq| wq.token)
            .unwrap_or_default();
        self.shared
            .handle
            .block_on(fetch_remote(client, location, id, token))
    }

    /// A block of `failed`'s producer could not be pulled: the producer's
    /// outputs are lost. The task goes back to waiting, every notice of that
    /// producer is forgotten, and the coordinator hears of it: it re-runs
    /// the producer's partitions elsewhere, whose notices then come again.
    pub(super) fn fetch_failed(
        &mut self,
        qid: QueryId,
        (b, stage, r): (u64, u32, ReducePartition),
        mut pending: PendingReduce,
        failed: &pb::MapOutputReady,
        e: ExecError,
    ) {
        tracing::warn!(query = %qid, batch = b, producer = failed.worker, location = %failed.location, "fetch failed: {e}");
        self.shared
            .counters
            .fetch_failures
            .fetch_add(1, Ordering::Relaxed);
        let Some(wq) = self.queries.get_mut(&qid) else {
            return;
        };
        pending.notices.retain(|n| n.worker != failed.worker);
        wq.pending_reduces.insert((b, stage, r), pending);
        for p in wq.pending_reduces.values_mut() {
            p.notices.retain(|n| n.worker != failed.worker);
            // (its downloads too: they come again with the notices of the
            // partitions' new owners)
            p.forget_unannounced();
        }
        let event = pb::FetchFailed {
            query: qid.0,
            attempt: wq.attempt,
            batch: b,
            producer: failed.worker,
            location: failed.location.clone(),
            message: e.to_string(),
        };
        self.shared
            .event(pb::worker_event::Event::FetchFailed(event));
    }

    /// Starts reduce task (b, stage, r) on a slot: its inputs are in
    /// (downloaded ahead, or this worker's own blocks).
    pub(super) fn run_reduce(
        &mut self,
        qid: QueryId,
        b: u64,
        stage: u32,
        r: ReducePartition,
    ) -> Result<()> {
        let Some(wq) = self.queries.get_mut(&qid) else {
            return Ok(());
        };
        let mut pending = wq
            .pending_reduces
            .remove(&(b, stage, r))
            .unwrap_or_default();
        pending.notices.sort_by_key(|n| (n.stage, n.map));
        let stage_inputs = wq.inputs_of(stage).to_vec();
        // Blocks per input of the stage, in its input order (a join: left, right).
        let mut inputs: Vec<Vec<Input>> = Vec::new();
        inputs.resize_with(stage_inputs.len().max(1), Vec::new);
        let mut failed = None;
        for n in &pending.notices {
            if n.rows.get(r.0 as usize).copied().unwrap_or(0) == 0 {
                continue;
            }
            let i = stage_inputs
                .iter()
                .position(|(s, _)| *s == n.stage)
                .unwrap_or(0);
            let input = if let Some(rows) = pending.fetched.remove(&(n.stage, n.map, n.worker)) {
                // Downloaded ahead when its notice came.
                Ok(Input::Rows(rows))
            } else if n.location == self.shared.address {
                // Our own block: no network.
                self.shared
                    .counters
                    .blocks_read_local
                    .fetch_add(1, Ordering::Relaxed);
                let id = announced_block(qid, b, r, n);
                Ok(Input::Local(self.shared.store.read(&id)?))
            } else {
                // Not downloaded ahead (should not happen): fetch now.
                self.fetch(qid, b, r, n).map(Input::Rows)
            };
            match input {
                Ok(input) => {
                    if let Some(v) = inputs.get_mut(i) {
                        v.push(input);
                    }
                }
                // Another worker's block: its producer is gone, not the query.
                Err(e) => {
                    failed = Some((n.clone(), e));
                    break;
                }
            }
        }
        if let Some((n, e)) = failed {
            self.fetch_failed(qid, (b, stage, r), pending, &n, e);
            return Ok(());
        }
        self.shared
            .counters
            .reduce_tasks_run
            .fetch_add(1, Ordering::Relaxed);
        let Some(wq) = self.queries.get_mut(&qid) else {
            return Ok(());
        };
        let Some(state) = wq.reduces.get_mut(&(stage, r)) else {
            return Err(ExecError::invalid(format!(
                "partition {r} of stage {stage} not on this worker"
            )));
        };
        if state.last_batch.is_some_and(|l| l >= b) {
            self.shared
                .counters
                .out_of_order_reduces
                .fetch_add(1, Ordering::Relaxed);
        }
        let Some(work) = state.work.take() else {
            return Err(ExecError::invalid(format!(
                "partition {r} of stage {stage} is already running"
            )));
        };
        state.last_batch = Some(b);
        let watermark = watermark_of(&pending.notices, &stage_inputs);
        let group = group_of(&wq.group_starts, b);
        let keeps_state = wq
            .graph
            .stage(GraphStage(stage))
            .is_some_and(|s| s.is_stateful());
        let checkpoint = (keeps_state && wq.group_ends.get(&group) == Some(&(b, true)))
            .then(|| wq.delta_bases.get(&group).copied().flatten());
        let steps = wq.steps.get(stage as usize).map_or(1, Vec::len);
        let work = Work::Reduce {
            work,
            inputs,
            watermark,
            checkpoint,
        };
        let task = wq.slot_task(qid, (b, stage, r.0), StageStats::new(steps), work);
        self.dispatch(task);
        Ok(())
    }

    /// Sends a final-stage task's output to the coordinator's collector:
    /// its rows inline when they are small ([`DIRECT_RESULT_BYTES`]), else
    /// put over Flight ahead of the group report.
    pub(super) fn deliver(
        &mut self,
        qid: QueryId,
        b: BatchId,
        partition: u32,
        chunks: Vec<(Option<i64>, RecordBatch)>,
        mut rows_in: u64,
        mut late_rows: u64,
    ) -> Result<()> {
        // Rows go over Flight; the result says how many rows each chunk has.
        let out: Vec<pb::OutputChunk> = chunks
            .iter()
            .map(|(window_end, batch)| pb::OutputChunk {
                window_end: *window_end,
                ipc: Vec::new(),
                rows: batch.num_rows() as u64,
            })
            .collect();
        // What a map-only query holds is its lookup tables.
        let state = match self.queries.get(&qid) {
            Some(wq) => wq.check_budget(
                "LookupJoinExec (lookup tables)",
                self.shared.store.query_bytes(qid),
            )?,
            None => StateSize::default(),
        };
        let attempt = self.queries.get(&qid).map_or(0, |wq| wq.attempt);
        let empty = chunks
            .iter()
            .all(|(window_end, c)| window_end.is_none() && c.num_rows() == 0);
        let mut empty_from = None;
        if let Some(wq) = self.queries.get_mut(&qid) {
            let prior = wq.empty_runs.remove(&partition);
            let (run, before) = match prior {
                Some(r) if empty && r.attempt == attempt && r.to + 1 == b.0 => (Some(r), None),
                other => (None, other),
            };
            if let Some(r) = before {
                // A run that does not lead up to this result goes first.
                self.shared
                    .event(pb::worker_event::Event::Output(pb::TaskOutput {
                        query: qid.0,
                        batch: r.to,
                        partition,
                        rows_in: r.rows_in,
                        late_rows: r.late_rows,
                        attempt: r.attempt,
                        state_bytes: state.bytes,
                        state_keys: state.keys,
                        empty_from: (r.from < r.to).then_some(r.from),
                        ..Default::default()
                    }));
            }
            if empty {
                let mut run = run.unwrap_or(EmptyRun {
                    from: b.0,
                    to: b.0,
                    attempt,
                    rows_in: 0,
                    late_rows: 0,
                });
                run.to = b.0;
                run.rows_in += rows_in;
                run.late_rows += late_rows;
                if wq.holds_empty(&run) {
                    wq.empty_runs.insert(partition, run);
                    self.shared
                        .counters
                        .empty_results_in_runs
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                rows_in = run.rows_in;
                late_rows = run.late_rows;
                empty_from = (run.from < b.0).then_some(run.from);
            }
        }
        let output = pb::TaskOutput {
            query: qid.0,
            batch: b.0,
            partition,
            chunks: out,
            error: None,
            error_code: String::new(),
            rows_in,
            late_rows,
            attempt,
            state_bytes: state.bytes,
            state_keys: state.keys,
            empty_from,
        };
        let bytes: usize = chunks.iter().map(|(_, b)| b.get_array_memory_size()).sum();
        if bytes <= DIRECT_RESULT_BYTES {
            // Small (or empty: its chunks say which windows closed empty):
            // inline in the result, on the Events stream, as Spark sends
            // results under its maxDirectResultSize with the task's status.
            let mut output = output;
            for (c, (_, batch)) in output.chunks.iter_mut().zip(&chunks) {
                c.ipc = to_ipc(&batch.schema(), std::slice::from_ref(batch))?;
            }
            self.shared.event(pb::worker_event::Event::Output(output));
            return Ok(());
        }
        let schema = chunks
            .iter()
            .map(|(_, b)| b.schema())
            .next()
            .unwrap_or_else(|| Arc::new(arrow::datatypes::Schema::empty()));
        let batches = chunks
            .into_iter()
            .map(|(_, b)| b)
            .filter(|b| b.num_rows() > 0)
            .collect();
        self.shared.rows(output, schema, batches);
        Ok(())
    }
}

/// Pulls block `id` from the producer at `location`, waiting at most
/// [`FETCH_TIMEOUT`] (a producer cut off by a partition never answers).
pub(super) async fn fetch_remote(
    mut client: arrow_flight::FlightClient,
    location: String,
    id: BlockId,
    token: QueryToken,
) -> Result<Vec<RecordBatch>> {
    tokio::time::timeout(
        FETCH_TIMEOUT,
        drizzle_shuffle::fetch_block(&mut client, &location, id, &token),
    )
    .await
    .unwrap_or_else(|_| {
        Err(drizzle_shuffle::ShuffleError::Fetch {
            block: id.to_string(),
            location: location.clone(),
            message: format!("no answer within {FETCH_TIMEOUT:?}"),
        })
    })
    .map_err(ExecError::from)
}

/// Above this many bytes (in memory) a task's results are put over Flight
/// rather than sent inline with its status: one round trip per put costs
/// more than the bytes of a small result.
pub(super) const DIRECT_RESULT_BYTES: usize = 64 << 10;

/// How stage `stage`'s shuffle spreads its rows; `None` when it writes
/// the sink.
pub(super) fn shuffle_keys(graph: &StageGraph, stage: GraphStage) -> Option<Partitioning> {
    match &graph.stage(stage)?.output {
        StageOutput::Shuffle { partitioning, .. } => Some(partitioning.clone()),
        StageOutput::Sink(_) => None,
    }
}

/// Splits `batch` into `n` reduce partitions by the shuffle keys (no keys:
/// everything to partition 0; broadcast: all of it to each). Map tasks and
/// re-partitioned state restores route rows the same way.
pub(super) fn route(batch: &RecordBatch, by: &Partitioning, n: usize) -> Result<Vec<RecordBatch>> {
    let by = match by {
        Partitioning::Hash(keys) => keys,
        Partitioning::Broadcast => return Ok(vec![batch.clone(); n]),
    };
    let mut keys = Vec::with_capacity(by.len());
    for k in by {
        keys.push(k.evaluate(batch)?.into_array(batch.num_rows())?);
    }
    if keys.is_empty() {
        let mut v = vec![batch.clone()];
        v.extend((1..n).map(|_| batch.slice(0, 0)));
        return Ok(v);
    }
    Ok(drizzle_shuffle::hash_partition(batch, &keys, n)?)
}

pub(super) fn encode_section(batches: &[RecordBatch]) -> Result<Vec<u8>> {
    match batches.first() {
        Some(first) => Ok(drizzle_shuffle::encode_block(&first.schema(), batches)?.to_vec()),
        None => Ok(Vec::new()),
    }
}

pub(super) fn decode_section(bytes: Vec<u8>) -> Result<Vec<RecordBatch>> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    Ok(drizzle_shuffle::decode_block(&bytes::Bytes::from(bytes))?)
}

/// A reduce partition's checkpoint: a delta of `delta_base` when there is
/// one and the operator writes deltas (keyed state: the keys changed since;
/// a window or inner join: the rows taken in since), else in full. Taken on the
/// slot; [`encode_snapshot`] makes it an object off the slot.
pub(super) fn snapshot_reduce(
    state: &mut ReduceWork,
    delta_base: Option<u64>,
) -> Result<OperatorSnapshot> {
    state.operator.snapshot(delta_base)
}

/// A snapshot as its checkpoint object (Arrow IPC sections): a copy of
/// every byte of the state, so it runs on the blocking pool, not on a
/// task slot.
pub(super) fn encode_snapshot(snapshot: &OperatorSnapshot) -> Result<Vec<u8>> {
    StateObject {
        closed_through: snapshot.closed_through,
        delta_base: snapshot.delta_base,
        sections: snapshot
            .sections
            .iter()
            .map(|rows| encode_section(rows))
            .collect::<Result<Vec<_>>>()?,
    }
    .encode()
}

/// The checkpoint objects reduce partition `r` of `stage` restores from,
/// in order (each object's delta chain first), with the old partition each
/// belongs to: its own object when the partition count is unchanged, else
/// every object of the stage.
pub(super) fn restore_paths(
    restore: &pb::Restore,
    stage: GraphStage,
    r: ReducePartition,
    partitions: u32,
) -> Vec<(u32, String)> {
    let same = restore.reduce_partitions == partitions;
    restore
        .states
        .iter()
        .filter(|st| st.stage == stage.0 && (!same || st.partition == r.0))
        .flat_map(|st| {
            st.chain
                .iter()
                .chain(std::iter::once(&st.path))
                .map(|p| (st.partition, p.clone()))
        })
        .collect()
}

/// Loads the objects of [`restore_paths`] from the coordinator's data
/// endpoint, off the task thread; the scheduler hears when they are in
/// (`Msg::Restored`).
pub(super) async fn load_restore(
    data: crate::dataplane::DataClient,
    qid: QueryId,
    paths: Vec<(u32, String)>,
) -> Result<Vec<(u32, Vec<u8>)>> {
    let mut loaded = Vec::with_capacity(paths.len());
    for (partition, path) in paths {
        let req = pb::LoadStateRequest { query: qid.0, path };
        loaded.push((partition, data.load_state(req).await?));
    }
    Ok(loaded)
}

/// Restores reduce partition `r`'s state from the loaded checkpoint
/// objects ([`load_restore`]): as they are when the partition count is
/// unchanged, else every object's rows whose key routes to `r` under the
/// new count.
pub(super) fn restore_reduce(
    graph: &StageGraph,
    stage: GraphStage,
    restore: &pb::Restore,
    (r, partitions): (ReducePartition, u32),
    loaded: Vec<(u32, Vec<u8>)>,
    state: &mut ReduceWork,
) -> Result<()> {
    let same = restore.reduce_partitions == partitions;
    // Section i holds rows of the stage's input i, routed by that input's keys.
    let inputs: Vec<GraphStage> = match graph.stage(stage).map(|s| &s.input) {
        Some(StageInput::Shuffle(inputs)) => inputs.clone(),
        _ => Vec::new(),
    };
    // Every object's layers (a delta chain first), restored at the end.
    let mut layers = Vec::new();
    for (old_partition, bytes) in loaded {
        {
            let object = StateObject::decode(&bytes)?;
            let mut sections = Vec::with_capacity(object.sections.len());
            for (i, section) in object.sections.into_iter().enumerate() {
                let rows = decode_section(section)?;
                if same {
                    sections.push(rows);
                    continue;
                }
                let by = inputs
                    .get(i)
                    .and_then(|s| shuffle_keys(graph, *s))
                    .unwrap_or(Partitioning::Hash(Vec::new()));
                if matches!(by, Partitioning::Broadcast) {
                    // Every old partition held all of a broadcast input:
                    // take old partition 0's copy, for every new partition.
                    sections.push(if old_partition == 0 { rows } else { Vec::new() });
                    continue;
                }
                let mut mine = Vec::with_capacity(rows.len());
                for batch in &rows {
                    let mut parts = route(batch, &by, partitions as usize)?;
                    if (r.0 as usize) < parts.len() {
                        mine.push(parts.swap_remove(r.0 as usize));
                    }
                }
                sections.push(mine);
            }
            layers.push(OperatorSnapshot {
                closed_through: object.closed_through,
                delta_base: object.delta_base,
                sections,
            });
        }
    }
    state.operator.restore(layers, restore.batch)?;
    Ok(())
}

/// The block of reduce partition `r` that notice `n` announces for batch `b`.
pub(super) fn announced_block(
    qid: QueryId,
    b: u64,
    r: ReducePartition,
    n: &pb::MapOutputReady,
) -> BlockId {
    BlockId {
        query: qid,
        batch: BatchId(b),
        stage: StageId(n.stage),
        map: MapPartition(n.map),
        reduce: r,
    }
}

pub(super) fn group_of(starts: &BTreeMap<u64, u64>, b: u64) -> u64 {
    starts
        .range(..=b)
        .next_back()
        .map(|(_, g)| *g)
        .unwrap_or_default()
}

impl WorkerQuery {
    /// Whether a run of empty results (ending with the batch just run)
    /// waits for more (see [`EmptyRun`]): Drizzle mode, the run short of a
    /// quarter of its group and not at the group's last batch, and the
    /// partition's next batch already triggered.
    pub(super) fn holds_empty(&self, run: &EmptyRun) -> bool {
        if self.mode != SchedulingMode::Drizzle {
            return false;
        }
        let Some((&first, &group)) = self.group_starts.range(..=run.to).next_back() else {
            return false;
        };
        let Some(&(last, _)) = self.group_ends.get(&group) else {
            return false;
        };
        let quarter = ((last.saturating_sub(first) + 1) / 4).max(1);
        if run.to >= last || run.to - run.from + 1 >= quarter {
            return false;
        }
        let Some((origin, interval_ns)) = self.clock else {
            return false;
        };
        let next_offset_us = interval_ns.saturating_mul(run.to.saturating_add(2)) / 1000;
        let next_trigger = origin.saturating_add(i64::try_from(next_offset_us).unwrap_or(i64::MAX));
        next_trigger <= unix_us()
    }
}
