//! The coordinator's shared state: registered workers, running queries and
//! what their tasks report.

use super::*;

impl State {
    pub(super) fn query(&self, id: u64) -> std::result::Result<Arc<CompiledQuery>, Status> {
        self.queries
            .lock()
            .get(&QueryId(id))
            .cloned()
            .ok_or_else(|| Status::not_found(format!("query q{id} is not running")))
    }
}

impl State {
    /// Whether a registered worker still heartbeats.
    pub(super) fn is_live(&self, w: &WorkerEntry) -> bool {
        w.last_heartbeat.elapsed() < self.worker_timeout
    }

    /// Declares a worker incarnation lost (or drained): it is forgotten, its
    /// queries start a new attempt, and if alive it must register again.
    pub(super) fn forget_worker(&self, id: WorkerId, epoch: u64, why: &str) {
        let removed = {
            let mut workers = self.workers.write();
            match workers.get(&id) {
                Some(w) if w.epoch == epoch => workers.remove(&id),
                _ => None,
            }
        };
        if let Some(w) = removed {
            tracing::warn!(worker = id.0, address = %w.address, "worker removed: {why}");
            let queries: Vec<Arc<CompiledQuery>> = self.queries.lock().values().cloned().collect();
            for q in queries {
                q.status.analysis.lock().forget(id.0);
            }
            self.workers_changed.notify_waiters();
        }
    }

    pub(super) fn on_group_report(&self, report: pb::GroupReport) {
        if let Ok(q) = self.query(report.query) {
            if report.attempt != q.status.attempt.load(Ordering::Acquire) {
                return; // fenced: an older attempt
            }
            if !report.maps.is_empty() {
                let mut pending = q.pending_checkpoints.lock();
                for m in &report.maps {
                    let entry = pending.entry(m.batch).or_default();
                    entry.attempt = report.attempt;
                    entry.maps.push(MapCheckpoint {
                        stage: m.stage,
                        partition: m.partition,
                        next_offset: m.next_offset,
                        max_event_us: m.max_event_us,
                    });
                }
                drop(pending);
                q.checkpoint_progress.notify_one();
            }
            q.status
                .rows_in
                .fetch_add(report.rows_in, Ordering::Relaxed);
            q.status
                .late_rows
                .fetch_add(report.late_rows, Ordering::Relaxed);
            q.status.analysis.lock().add(report.worker, &report);
            let _ = q.reports.send(report);
        }
    }

    /// A consumer could not pull a block from its producer: the producer's
    /// map outputs are lost. Like a worker that went silent, the producer is
    /// forgotten (if alive, it registers again as a new worker), and the
    /// query's next attempt re-runs its partitions on the survivors.
    pub(super) fn on_fetch_failed(&self, reporter: u32, f: pb::FetchFailed) {
        let Ok(q) = self.query(f.query) else {
            return;
        };
        if f.attempt < q.generation.load(Ordering::Acquire) {
            return; // about an older generation's notice
        }
        let producer = WorkerId(f.producer);
        let epoch = self.workers.read().get(&producer).map(|w| w.epoch);
        if let Some(epoch) = epoch {
            self.forget_worker(
                producer,
                epoch,
                &format!(
                    "worker {reporter} could not pull its output of batch {} from {}: {}",
                    f.batch, f.location, f.message
                ),
            );
        }
    }

    /// A final-stage task's output (or failure) for the query's collector,
    /// from worker `worker`, its rows inline (`chunks[i].ipc`).
    pub(super) fn on_output(&self, worker: u32, mut out: pb::TaskOutput) {
        let Some(q) = self.output_counts(worker, &out) else {
            return;
        };
        let mut chunks = Vec::with_capacity(out.chunks.len());
        for c in std::mem::take(&mut out.chunks) {
            match from_ipc(c.ipc) {
                Ok(batches) => chunks.extend(batches.into_iter().map(|b| (c.window_end, b))),
                Err(e) => {
                    let _ = q.sink.send(SinkMsg::Failed(e));
                    return;
                }
            }
        }
        self.output_rows(&q, out, chunks);
    }

    /// Checks a task output's sender and attempt, and takes in its
    /// counters and state size; a failure fails the query. Returns the
    /// query when the output's rows go on to its collector.
    pub(super) fn output_counts(
        &self,
        worker: u32,
        out: &pb::TaskOutput,
    ) -> Option<Arc<CompiledQuery>> {
        let Ok(q) = self.query(out.query) else {
            // The query ended; its late results have nowhere to go.
            return None;
        };
        if out.attempt < q.generation.load(Ordering::Acquire) {
            return None; // fenced: an older generation (its batches are re-run)
        }
        {
            let owners = q.owners.lock();
            let counts = match out.error {
                Some(_) => owners.workers.contains(&worker),
                None => owners.final_task(out.partition) == Some(worker),
            };
            if !counts {
                tracing::warn!(
                    query = %q.id,
                    worker,
                    partition = out.partition,
                    "ignored a task output from a worker that does not own the task"
                );
                return None;
            }
        }
        if out.error.is_none() {
            self.account_state(&q, worker, out.state_bytes, out.state_keys);
        }
        q.status.rows_in.fetch_add(out.rows_in, Ordering::Relaxed);
        q.status
            .late_rows
            .fetch_add(out.late_rows, Ordering::Relaxed);
        if let Some(message) = &out.error {
            if out.attempt == q.status.attempt.load(Ordering::Acquire) {
                // (a failure of an attempt that was replaced is dropped)
                let _ = q.sink.send(SinkMsg::Failed(ExecError::Remote {
                    code: out.error_code.clone(),
                    message: message.clone(),
                }));
            }
            return None;
        }
        Some(q)
    }

    /// A final-stage task's rows (inline in its `TaskOutput`, or put over
    /// Flight), to the query's collector.
    pub(super) fn output_rows(
        &self,
        q: &Arc<CompiledQuery>,
        out: pb::TaskOutput,
        chunks: Vec<(Option<i64>, RecordBatch)>,
    ) {
        // Never trust a peer with the collector's invariants.
        let want = q.plan.output_schema.fields().len();
        if let Some((_, b)) = chunks.iter().find(|(_, b)| b.num_columns() != want) {
            let _ = q.sink.send(SinkMsg::Failed(ExecError::invalid(format!(
                "a task of query {} returned {} columns, expected {want}",
                q.id,
                b.num_columns()
            ))));
            return;
        }
        let from = out.empty_from.unwrap_or(out.batch);
        if from > out.batch
            || out.batch - from >= crate::cluster::MAX_LAUNCH_BATCHES
            || (from < out.batch && chunks.iter().any(|(_, b)| b.num_rows() > 0))
        {
            let _ = q.sink.send(SinkMsg::Failed(ExecError::invalid(format!(
                "a task of query {} sent a run of empty results {from}..={} that is not one",
                q.id, out.batch
            ))));
            return;
        }
        let _ = q.sink.send(SinkMsg::Output {
            attempt: out.attempt,
            from,
            batch: BatchId(out.batch),
            partition: out.partition,
            chunks,
        });
    }
}

/// The operator that holds most of a query's state, for budget errors: its
/// first stateful operator, else its lookup tables.
pub(super) fn state_operator(graph: &StageGraph) -> &'static str {
    graph
        .stages
        .iter()
        .flat_map(|s| &s.operators)
        .find_map(|op| {
            crate::operators::stateful_operator(op)
                .ok()
                .flatten()
                .map(|o| o.name())
        })
        .unwrap_or("LookupJoinExec (lookup tables)")
}

impl State {
    /// Records what `worker` holds for query `q`, and enforces the query's
    /// budget and the server's.
    pub(super) fn account_state(&self, q: &Arc<CompiledQuery>, worker: u32, bytes: u64, keys: u64) {
        if q.over_budget.load(Ordering::Acquire) {
            return;
        }
        // Running totals, updated under the lock by the worker's change
        // (every sink task reports: a sum over all workers would cost
        // O(workers) per task).
        let (total, total_keys) = {
            let mut by = q.state_by_worker.lock();
            let (old_bytes, old_keys) = by.insert(worker, (bytes, keys)).unwrap_or_default();
            let total =
                (q.status.state_bytes.load(Ordering::Relaxed) + bytes).saturating_sub(old_bytes);
            let total_keys =
                (q.status.state_keys.load(Ordering::Relaxed) + keys).saturating_sub(old_keys);
            q.status.state_bytes.store(total, Ordering::Relaxed);
            q.status.state_keys.store(total_keys, Ordering::Relaxed);
            (total, total_keys)
        };
        let limit = q.status.memory_limit;
        if limit > 0 && total > limit {
            q.over_budget.store(true, Ordering::Release);
            let _ = q.sink.send(SinkMsg::Failed(ExecError::OutOfMemory {
                message: format!(
                    "query memory limit exceeded: {} holds {} of state \
                     ({total_keys} keys or rows) over all workers, query_memory_limit is {}",
                    state_operator(&q.graph),
                    crate::worker::human_bytes(total),
                    crate::worker::human_bytes(limit)
                ),
            }));
            return;
        }
        let server_limit = self.server_memory_limit;
        if server_limit == 0 {
            return;
        }
        let queries: Vec<Arc<CompiledQuery>> = self.queries.lock().values().cloned().collect();
        let all: u64 = queries
            .iter()
            .filter(|q| !q.over_budget.load(Ordering::Acquire))
            .map(|q| q.status.state_bytes.load(Ordering::Relaxed))
            .sum();
        if all <= server_limit {
            return;
        }
        // The largest holder fails, not whichever query grew last.
        if let Some(big) = queries
            .iter()
            .filter(|q| !q.over_budget.load(Ordering::Acquire))
            .max_by_key(|q| q.status.state_bytes.load(Ordering::Relaxed))
        {
            let held = big.status.state_bytes.load(Ordering::Relaxed);
            let _ = big.sink.send(SinkMsg::Failed(ExecError::OutOfMemory {
                message: format!(
                    "server memory limit exceeded: queries hold {} of state together, \
                     server_memory_limit is {}; this query's {} held the most ({})",
                    crate::worker::human_bytes(all),
                    crate::worker::human_bytes(server_limit),
                    state_operator(&big.graph),
                    crate::worker::human_bytes(held)
                ),
            }));
            // Not counted again while it winds down.
            big.over_budget.store(true, Ordering::Release);
        }
    }
}

impl State {
    /// The current registration whose credential `request` carries.
    pub(super) fn member<T>(&self, request: &Request<T>) -> Option<(WorkerId, u64)> {
        let credential = crate::cluster::credential_of(request)?;
        self.workers
            .read()
            .values()
            .find(|w| {
                w.credential.len() == credential.len()
                    && crate::cluster::has_credential(request, &w.credential)
            })
            .map(|w| (w.id, w.epoch))
    }

    /// Fails unless `caller` is a worker the query is placed on.
    pub(super) fn placed(
        &self,
        caller: Option<(WorkerId, u64)>,
        q: &CompiledQuery,
    ) -> std::result::Result<(), Status> {
        let Some((id, _)) = caller else {
            return Err(stale_member());
        };
        if self
            .placements
            .lock()
            .get(&q.id)
            .is_some_and(|p| p.contains(&id))
        {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "worker {} does not run query {}",
                id.0, q.id
            )))
        }
    }
}
