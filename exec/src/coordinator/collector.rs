//! The sink side: table and worker watchers, and the collector that
//! releases final-stage outputs in batch order.

use super::*;

/// Pushes the table version to every worker when a table or view changes,
/// so lookup joins re-read their finite side.
pub(super) async fn watch_tables(state: Arc<State>, mut stop: watch::Receiver<bool>) {
    let mut last = state.tables.any_version();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = stop.changed() => return,
        }
        let version = state.tables.any_version();
        if version == last {
            continue;
        }
        last = version;
        let clients: Vec<_> = state
            .workers
            .read()
            .values()
            .map(|w| w.client.clone())
            .collect();
        for mut c in clients {
            tokio::spawn(async move {
                let req = pb::TablesChangedRequest { version };
                let _ = tokio::time::timeout(LAUNCH_TIMEOUT, c.tables_changed(req)).await;
            });
        }
    }
}

/// Forgets workers that stopped heartbeating.
pub(super) async fn watch_workers(state: Arc<State>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.changed() => return,
        }
        let timeout = state.worker_timeout;
        let silent: Vec<(WorkerId, u64)> = state
            .workers
            .read()
            .values()
            .filter(|w| !state.is_live(w))
            .map(|w| (w.id, w.epoch))
            .collect();
        for (id, epoch) in silent {
            state.forget_worker(id, epoch, &format!("no heartbeat for {timeout:?}"));
        }
    }
}

/// The sink side: gathers final-stage outputs and emits them in batch order.
pub(super) async fn collect(
    query: Arc<CompiledQuery>,
    mut sink: mpsc::UnboundedReceiver<SinkMsg>,
    results: mpsc::Sender<Result<EmittedBatch>>,
    done: watch::Sender<u64>,
    cancel: Arc<CancelToken>,
) {
    // Per batch, each final task's output (a task re-run by a later attempt
    // replaces, never adds to, its partition's output: tasks are
    // deterministic, so any attempt of a generation computes the same rows).
    let mut pending: BTreeMap<u64, BTreeMap<u32, Chunks>> = BTreeMap::new();
    let mut generation = 0u64;
    let mut final_tasks = u32::MAX;
    // Batches below `next` were released: results for them are duplicates.
    let mut next = query.released.load(Ordering::Acquire);
    let mut remaining = query.plan.limit;
    let schema = Arc::clone(&query.plan.output_schema);
    let end = |reason: &str| {
        *query.status.ended.lock() = Some(reason.to_string());
    };
    loop {
        let cancelled = cancel.notify.notified();
        let msg = if cancel.is_cancelled() {
            None
        } else {
            tokio::select! {
                m = sink.recv() => m,
                _ = cancelled => None,
                _ = results.closed() => None,
            }
        };
        let Some(msg) = msg else {
            end("cancelled");
            cancel.cancel();
            // A client still listening learns why its query ended (CANCEL QUERY).
            let _ = results.try_send(Err(ExecError::Cancelled));
            return;
        };
        match msg {
            SinkMsg::Failed(e) => {
                end(&e.to_string());
                let _ = results.send(Err(e)).await;
                cancel.cancel();
                return;
            }
            SinkMsg::Attempt {
                generation: g,
                final_tasks: n,
            } => {
                if g != generation || n != final_tasks {
                    // A new generation re-runs every unreleased batch; lost-work
                    // recovery keeps the survivors' outputs (the lost
                    // partitions' are delivered again).
                    pending.clear();
                }
                generation = g;
                final_tasks = n;
            }
            SinkMsg::Output {
                attempt: a,
                from,
                batch,
                partition,
                chunks,
            } => {
                if a >= generation && batch.0 >= next {
                    for empty in from.max(next)..batch.0 {
                        pending
                            .entry(empty)
                            .or_default()
                            .insert(partition, Vec::new());
                    }
                    pending
                        .entry(batch.0)
                        .or_default()
                        .insert(partition, chunks);
                }
            }
        }
        while pending
            .get(&next)
            .is_some_and(|parts| parts.len() as u32 >= final_tasks)
        {
            let Some(parts) = pending.remove(&next) else {
                break;
            };
            let mut chunks: Chunks = parts.into_values().flatten().collect();
            // Closed windows in window order, whatever partition they came from.
            chunks.sort_by_key(|(w, _)| *w);
            let batches: Vec<RecordBatch> = chunks
                .into_iter()
                .map(|(_, b)| b)
                .filter(|b| b.num_rows() > 0)
                .collect();
            let mut rows = match arrow::compute::concat_batches(&schema, &batches) {
                Ok(r) => r,
                Err(e) => {
                    let _ = results.send(Err(e.into())).await;
                    cancel.cancel();
                    return;
                }
            };
            let mut finished = false;
            if let Some(left) = remaining.as_mut() {
                if rows.num_rows() >= *left {
                    rows = rows.slice(0, *left);
                    finished = true;
                }
                *left -= rows.num_rows();
            }
            let status = &query.status;
            status.batches.fetch_add(1, Ordering::Relaxed);
            status
                .rows_out
                .fetch_add(rows.num_rows() as u64, Ordering::Relaxed);
            let latency = Instant::now().saturating_duration_since(query.trigger_at(BatchId(next)));
            status
                .last_latency_us
                .store(latency.as_micros() as u64, Ordering::Relaxed);
            {
                let mut recent = status.recent_latencies_us.lock();
                if recent.len() == RECENT_BATCHES {
                    recent.pop_front();
                }
                recent.push_back(latency.as_micros().min(u32::MAX as u128) as u32);
            }
            {
                let mut emits = status.recent_emits.lock();
                if emits.len() == RECENT_BATCHES {
                    emits.pop_front();
                }
                emits.push_back((
                    Instant::now(),
                    next,
                    status.group_size.load(Ordering::Relaxed),
                ));
            }
            if rows.num_rows() > 0 || finished {
                let emitted = EmittedBatch {
                    batch: BatchId(next),
                    rows,
                };
                query.last_sent_rows.store(next + 1, Ordering::Release);
                if results.send(Ok(emitted)).await.is_err() {
                    end("client gone");
                    cancel.cancel();
                    return;
                }
            }
            next += 1;
            query.released.store(next, Ordering::Release);
            let _ = done.send(next);
            if finished {
                end("limit reached");
                cancel.cancel();
                return;
            }
        }
    }
}
