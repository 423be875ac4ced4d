//! One query's coordination: attempts, placement, groups, checkpoints and
//! recovery (the coordinator loop `Runtime::coordinate`).

use super::*;

/// How often an attempt waiting for its batches looks at membership (lost,
/// draining or new workers) when nothing told it that membership changed.
const MEMBERSHIP_CHECK: Duration = Duration::from_millis(20);

impl Runtime {
    /// The coordinator loop of one query: runs attempts until the query
    /// ends. An attempt places partitions on the live workers, then plans and
    /// ships one group at a time (group g+1 while group g runs); it ends when
    /// a worker is lost or at a boundary where the cluster or the
    /// parallelism changed (the next attempt starts from the checkpoint taken
    /// there, a new generation). After a loss, lost-work recovery continues
    /// the generation: the survivors keep their partitions and only the lost
    /// ones restart from the last checkpoint; a rollback starts a new
    /// generation from that checkpoint.
    pub(super) async fn coordinate(
        &self,
        query: &Arc<CompiledQuery>,
        mut done: watch::Receiver<u64>,
        mut reports: mpsc::UnboundedReceiver<pb::GroupReport>,
        mut map_done: mpsc::UnboundedReceiver<pb::MapOutputReady>,
    ) -> Result<()> {
        let cancel = &query.cancel;
        let mut carry: Option<Carry> = None;
        let mut rolling_back = false;
        // Workers that may hold the query: told to drop it when it ends.
        let mut placed: Vec<Placed> = Vec::new();
        // Attempts that fail at once back off (10 ms doubling to 1 s), so a
        // cluster in flux is never spun on.
        let mut backoff = Duration::ZERO;
        let result = loop {
            if cancel.is_cancelled() {
                break Ok(());
            }
            if !backoff.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = cancel.notify.notified() => {}
                }
                if cancel.is_cancelled() {
                    break Ok(());
                }
            }
            if let Err(e) = self.wait_for_workers(cancel).await {
                break Err(e);
            }
            let started = Instant::now();
            let attempt = query.status.attempt.fetch_add(1, Ordering::AcqRel) + 1;
            let resume = query.last_checkpoint.lock().clone();
            let start = match carry.take() {
                Some(c) => self.continue_from(query, c, attempt),
                None => Start::Fresh {
                    after_loss: std::mem::take(&mut rolling_back),
                },
            };
            let (end, launched) = self
                .run_attempt(
                    query,
                    attempt,
                    resume,
                    start,
                    &mut done,
                    &mut reports,
                    &mut map_done,
                )
                .await;
            if let Some(c) = &launched {
                placed = c.layout.workers.clone();
            }
            match end {
                AttemptEnd::Cancelled => break Ok(()),
                AttemptEnd::WorkerLost(who) => {
                    backoff = if started.elapsed() < Duration::from_secs(1) {
                        (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1))
                    } else {
                        Duration::ZERO
                    };
                    query.status.recoveries.fetch_add(1, Ordering::Relaxed);
                    let from = query.last_checkpoint.lock().as_ref().map(|m| m.batch);
                    if query.can_recover_lost_work() {
                        tracing::warn!(query = %query.id, attempt, "worker {who} lost; re-running its work from checkpoint {from:?}");
                        carry = launched;
                    } else {
                        tracing::warn!(query = %query.id, attempt, "worker {who} lost; rolling back to checkpoint {from:?}");
                        // Every worker drops the attempt's state.
                        cancel_on(&placed, query.id, attempt);
                        rolling_back = true;
                    }
                }
                AttemptEnd::Rebalance => {
                    backoff = Duration::ZERO;
                    tracing::info!(query = %query.id, attempt, "rebalancing at a group boundary");
                    cancel_on(&placed, query.id, attempt);
                }
            }
        };
        cancel_on(&placed, query.id, 0);
        result
    }

    /// Plans lost-work recovery from what the last attempt launched: its
    /// live workers keep their partitions, the lost workers' partitions move
    /// to the least loaded live ones that are not draining. A fresh start
    /// when none may take them.
    pub(super) fn continue_from(&self, query: &CompiledQuery, carry: Carry, attempt: u64) -> Start {
        let (keep, take): (Vec<bool>, Vec<bool>) = {
            let workers = self.state.workers.read();
            carry
                .layout
                .workers
                .iter()
                .map(|p| match workers.get(&p.id) {
                    Some(w) if w.epoch == p.epoch && self.state.is_live(w) => (true, !w.draining),
                    _ => (false, false),
                })
                .unzip()
        };
        // A lost worker that is merely cut off drops the query when it hears.
        let gone: Vec<Placed> = carry
            .layout
            .workers
            .iter()
            .zip(&keep)
            .filter(|(_, k)| !**k)
            .map(|(p, _)| p.clone())
            .collect();
        cancel_on(&gone, query.id, attempt - 1);
        match carry.layout.after_loss(&keep, &take) {
            Some((layout, moved)) if !layout.workers.is_empty() => Start::Continue {
                layout,
                next_batch: carry.next_batch,
                moved,
            },
            _ => {
                // Nobody to continue on: every survivor drops the query.
                cancel_on(&carry.layout.workers, query.id, attempt - 1);
                Start::Fresh { after_loss: true }
            }
        }
    }

    /// One attempt of a query; see [`Runtime::coordinate`]. Returns why it
    /// ended and what it had launched.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn run_attempt(
        &self,
        query: &Arc<CompiledQuery>,
        attempt: u64,
        resume: Option<Manifest>,
        start: Start,
        done: &mut watch::Receiver<u64>,
        reports: &mut mpsc::UnboundedReceiver<pb::GroupReport>,
        map_done: &mut mpsc::UnboundedReceiver<pb::MapOutputReady>,
    ) -> (AttemptEnd, Option<Carry>) {
        let cancel = &query.cancel;
        // A checkpoint an earlier attempt asked for never comes: this
        // attempt asks again at its first checkpoint group.
        *query.checkpoint_due.lock() = None;
        let map_partitions: Vec<u32> = (0..query.inputs.len())
            .map(|s| query.partitions(s))
            .collect();
        let first_batch = resume.as_ref().map_or(0, |m| m.batch + 1);
        let restored_from = resume.as_ref().map_or("the start".to_string(), |m| {
            format!("checkpoint {}", m.batch)
        });
        // Placement, frozen for the attempt: consumers first, then producers.
        // Each placed worker's registration epoch goes with its launches: a
        // worker that registered again since (a new worker) refuses them.
        let mut recovering = false;
        let (layout, mut next_batch) = match start {
            Start::Fresh { after_loss } => {
                recovering = after_loss;
                let workers: Vec<Placed> = self
                    .state
                    .workers
                    .read()
                    .values()
                    .filter(|w| !w.draining && self.state.is_live(w))
                    .map(|w| Placed {
                        id: w.id,
                        address: w.address.clone(),
                        client: w.client.clone(),
                        epoch: w.epoch,
                    })
                    .collect();
                if workers.is_empty() {
                    // Every worker is draining: wait for one to come.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    return (AttemptEnd::Rebalance, None);
                }
                let reduce_partitions = if query.plan.has_shuffle() {
                    query.target_partitions.load(Ordering::Acquire).max(1)
                } else {
                    0
                };
                query.generation.store(attempt, Ordering::Release);
                (
                    Layout::spread(workers, &map_partitions, reduce_partitions),
                    first_batch,
                )
            }
            Start::Continue {
                layout,
                next_batch,
                moved,
            } => {
                query
                    .status
                    .recovered_partitions
                    .fetch_add(u64::from(moved), Ordering::Relaxed);
                *query.status.last_recovery.lock() = Some(format!(
                    "lost work: {moved} of {} partitions restored from {} on {} workers",
                    layout.partitions(),
                    restored_from,
                    layout.workers.len()
                ));
                (layout, next_batch.max(first_batch))
            }
        };
        let generation = query.generation.load(Ordering::Acquire);
        if recovering {
            // A rollback after a loss restores every partition.
            query
                .status
                .recovered_partitions
                .fetch_add(layout.partitions() as u64, Ordering::Relaxed);
            *query.status.last_recovery.lock() = Some(format!(
                "rollback: all {} partitions restored from {} on {} workers",
                layout.partitions(),
                restored_from,
                layout.workers.len()
            ));
        }
        let placement = &layout.workers;
        *query.owners.lock() = Owners::of(&layout);
        self.state
            .placements
            .lock()
            .insert(query.id, placement.iter().map(|p| p.id).collect());
        let reduce_partitions = layout.reduces.len() as u32;
        query
            .status
            .reduce_partitions
            .store(reduce_partitions, Ordering::Relaxed);
        let final_tasks = if reduce_partitions > 0 {
            reduce_partitions
        } else {
            query.partitions(0)
        };
        let _ = query.sink.send(SinkMsg::Attempt {
            generation,
            final_tasks,
        });
        query
            .pending_checkpoints
            .lock()
            .retain(|_, p| p.attempt >= attempt);
        let reduce_placement: Vec<String> = layout
            .reduces
            .iter()
            .map(|&slot| placement[slot].address.clone())
            .collect();
        let map_owners = layout.map_owners();
        let reduce_owners: Vec<u32> = layout
            .reduces
            .iter()
            .map(|&slot| placement[slot].id.0)
            .collect();
        let mode = match query.scheduling {
            Scheduling::Drizzle => SchedulingMode::Drizzle,
            Scheduling::GroupOnly | Scheduling::Bsp => SchedulingMode::Bsp,
        };
        // A checkpoint ten intervals late (after its group's last batch
        // triggered): the store is failing.
        let stall = (self.state.checkpoint_interval * 10).max(Duration::from_secs(2));
        let restore = resume.as_ref().map(|m| pb::Restore {
            batch: m.batch,
            reduce_partitions: m.reduce_partitions,
            states: m
                .states
                .iter()
                .map(|s| pb::StateRef {
                    stage: query.stage_of(s),
                    partition: s.partition,
                    path: s.path.clone(),
                    chain: s.chain.clone(),
                })
                .collect(),
        });
        let start_of = |stage: usize, p: u32| -> (u64, Option<i64>) {
            if let Some(m) = &resume {
                if let Some(c) = m
                    .maps
                    .iter()
                    .find(|c| c.stage as usize == stage && c.partition == p)
                {
                    return (c.next_offset, c.max_event_us);
                }
            }
            let offset = query
                .inputs
                .get(stage)
                .and_then(|i| i.start_offsets.get(p as usize).copied())
                .unwrap_or(0);
            (offset, None)
        };
        let carry = |next_batch: u64| {
            Some(Carry {
                layout: layout.clone(),
                next_batch,
            })
        };
        let mut plan_sent = vec![false; placement.len()];
        // Each worker's tasks, once per attempt (placement is sticky within
        // it): a group's launches then cost O(workers), not O(workers²).
        let mut slot_maps: Vec<Vec<(usize, u32)>> = vec![Vec::new(); placement.len()];
        for (stage, slots) in layout.maps.iter().enumerate() {
            for (p, &slot) in (0u32..).zip(slots) {
                if let Some(m) = slot_maps.get_mut(slot) {
                    m.push((stage, p));
                }
            }
        }
        let mut slot_reduces: Vec<Vec<u32>> = vec![Vec::new(); placement.len()];
        for (r, &slot) in (0u32..).zip(&layout.reduces) {
            if let Some(v) = slot_reduces.get_mut(slot) {
                v.push(r);
            }
        }
        let mut last_boundary: Option<Instant> = None;
        let mut coordinated = Duration::ZERO;
        let mut group = 0u64;
        let mut last_checkpoint_at = Instant::now();
        // The checkpoint that ends this attempt (a rebalance), once launched.
        let mut closing: Option<u64> = None;
        // BSP: notices per batch, collected by the coordinator.
        let mut barrier = ShuffleBarrier::new(&query.graph, &map_partitions, reduce_partitions);
        let reduce_workers: Vec<usize> = {
            let mut v = layout.reduces.clone();
            v.sort();
            v.dedup();
            v
        };
        let checkpoints_on = self.state.checkpoints.is_some();
        loop {
            if cancel.is_cancelled() {
                return (AttemptEnd::Cancelled, carry(next_batch));
            }
            if let Some(lost) = self.lost_worker(placement) {
                return (AttemptEnd::WorkerLost(lost), carry(next_batch));
            }
            if let Some(target) = closing {
                // Rebalancing: no more groups; wait for the closing checkpoint.
                if query
                    .last_checkpoint
                    .lock()
                    .as_ref()
                    .is_some_and(|m| m.batch >= target)
                {
                    return (AttemptEnd::Rebalance, carry(next_batch));
                }
            } else {
                let t0 = Instant::now();
                if query.status.adaptive {
                    // A group boundary: adapt to the last group's coordination share.
                    if let Some(since) = last_boundary {
                        let wall = t0.saturating_duration_since(since).as_secs_f64();
                        let share = coordinated.as_secs_f64() / wall.max(1e-9);
                        let g = query.status.group_size.load(Ordering::Relaxed);
                        query
                            .status
                            .group_size
                            .store(self.state.adaptive.next(g, share), Ordering::Relaxed);
                    }
                    last_boundary = Some(t0);
                    coordinated = Duration::ZERO;
                }
                let g = query.status.group_size.load(Ordering::Relaxed).max(1) as u64;
                let rebalance =
                    checkpoints_on && self.needs_rebalance(query, placement, reduce_partitions);
                let checkpoint = checkpoints_on
                    && (rebalance
                        || last_checkpoint_at.elapsed() >= self.state.checkpoint_interval);
                if checkpoint {
                    last_checkpoint_at = Instant::now();
                    // Due once the group's last batch has triggered: from
                    // then on, a checkpoint that does not come is late.
                    let last = next_batch + g - 1;
                    let trigger =
                        query.start_unix_us + query.offset_of(BatchId(last)).as_micros() as i64;
                    let wait =
                        Duration::from_micros(trigger.saturating_sub(unix_us()).max(0) as u64);
                    query
                        .checkpoint_due
                        .lock()
                        .get_or_insert(Instant::now() + wait);
                }
                // A recovery's first group also re-covers, for the partitions
                // it moved, every batch since the checkpoint (the survivors
                // skip what they already ran).
                let from = if group == 0 { first_batch } else { next_batch };
                // Map outputs are kept for lost-work recovery (see `coordinate`)
                // while checkpoints keep releasing them.
                query.check_retention(stall, from);
                let retain_blocks = query.retaining.load(Ordering::Acquire);
                let batches: Vec<pb::BatchParams> = (from..next_batch + g)
                    .map(|b| pb::BatchParams {
                        batch: b,
                        trigger_unix_us: query.start_unix_us
                            + query.offset_of(BatchId(b)).as_micros() as i64,
                    })
                    .collect();
                let tables_version = self.state.tables.any_version();
                let covered_through = query.last_checkpoint.lock().as_ref().map(|m| m.batch);
                // A rebalance's closing checkpoint is written in full: the
                // attempt waits for it, so it must never depend on a base.
                let delta_base = if rebalance { None } else { query.delta_base() };
                let mut sends = Vec::new();
                let mut sent_to = Vec::new();
                for (i, placed) in placement.iter().enumerate() {
                    let first = !plan_sent[i];
                    let map_tasks: Vec<pb::MapTaskSpec> = slot_maps[i]
                        .iter()
                        .map(|&(stage, p)| {
                            let (start, max_event) =
                                if first { start_of(stage, p) } else { (0, None) };
                            pb::MapTaskSpec {
                                partition: p,
                                stage: stage as u32,
                                start_offset: first.then_some(start),
                                max_event_us: max_event,
                            }
                        })
                        .collect();
                    let reduce_tasks = slot_reduces[i].clone();
                    if map_tasks.is_empty() && reduce_tasks.is_empty() {
                        continue;
                    }
                    let req = pb::LaunchGroupRequest {
                        protocol_version: PROTOCOL_VERSION,
                        query: query.id.0,
                        group,
                        epoch: placed.epoch,
                        plan: if plan_sent[i] {
                            Vec::new()
                        } else {
                            query.encoded_plan.clone()
                        },
                        mode: mode as i32,
                        map_partitions: query.partitions(0),
                        reduce_partitions,
                        // The layout travels in an attempt's first launch
                        // to each worker; later ones leave it empty
                        // (unchanged), so they do not grow with the cluster.
                        reduce_placement: if first {
                            reduce_placement.clone()
                        } else {
                            Vec::new()
                        },
                        map_tasks,
                        reduce_tasks,
                        batches: batches.clone(),
                        label: query.status.label.clone(),
                        tables_version,
                        shuffle_inputs: if reduce_partitions > 0 && first {
                            map_partitions.clone()
                        } else {
                            Vec::new()
                        },
                        attempt,
                        checkpoint,
                        restore: if plan_sent[i] { None } else { restore.clone() },
                        generation,
                        map_owners: if first {
                            map_owners.clone()
                        } else {
                            Vec::new()
                        },
                        reduce_owners: if first {
                            reduce_owners.clone()
                        } else {
                            Vec::new()
                        },
                        retain_blocks,
                        covered_through,
                        memory_limit: query.status.memory_limit,
                        delta_base,
                        query_token: query.token.0.to_vec(),
                    };
                    plan_sent[i] = true;
                    sent_to.push(placed.id);
                    let mut client = placed.client.clone();
                    let who = placed.clone();
                    sends.push(async move {
                        // A partitioned worker never answers: bound the wait.
                        let r = tokio::time::timeout(LAUNCH_TIMEOUT, client.launch_group(req))
                            .await
                            .unwrap_or_else(|_| Err(Status::deadline_exceeded("launch timed out")));
                        (who, r)
                    });
                }
                let n = sends.len() as u64;
                let mut failed = None;
                for (who, r) in futures::future::join_all(sends).await {
                    if let Err(s) = r {
                        // A worker that cannot take its launch is gone (dead,
                        // cut off, or registered again): forgotten, so that no
                        // attempt counts on its state again.
                        tracing::warn!(query = %query.id, "launch to worker {} ({}) failed: {}", who.id.0, who.address, s.message());
                        self.state
                            .forget_worker(who.id, who.epoch, "its launch failed");
                        failed = Some(format!("{} ({})", who.id.0, who.address));
                    }
                }
                if let Some(who) = failed {
                    // Survivors that took the launch hold its batches: a
                    // continuation re-covers them.
                    return (AttemptEnd::WorkerLost(who), carry(next_batch + g));
                }
                {
                    let mut workers = self.state.workers.write();
                    for id in sent_to {
                        if let Some(w) = workers.get_mut(&id) {
                            w.launches_sent += 1;
                        }
                    }
                }
                query.status.launches.fetch_add(n, Ordering::Relaxed);
                query.status.groups.fetch_add(1, Ordering::Relaxed);
                self.state.launch_messages.fetch_add(n, Ordering::Relaxed);
                let spent = t0.elapsed();
                coordinated += spent;
                query
                    .status
                    .coordination_us
                    .fetch_add(spent.as_micros() as u64, Ordering::Relaxed);
                next_batch += g;
                group += 1;
                if rebalance {
                    closing = Some(next_batch - 1);
                    continue;
                }
            }
            // Drizzle ships the next group once the previous one is done and
            // this one is half way through the previous one's length: about
            // one group ahead, so a boundary never stalls the pipeline (with
            // G = 1 too). BSP waits for its batch: that barrier is BSP.
            let g = query.status.group_size.load(Ordering::Relaxed).max(1) as u64;
            let threshold = match (closing, query.scheduling) {
                (Some(_), _) => u64::MAX,
                (None, Scheduling::Bsp) => next_batch,
                (None, _) => next_batch.saturating_sub(g) + g / 2,
            };
            // Membership is checked when it changed, and at least every
            // MEMBERSHIP_CHECK: not on every released batch (it costs
            // O(workers)).
            let mut membership_changed = true;
            let mut last_membership_check = Instant::now();
            loop {
                if *done.borrow() >= threshold || cancel.is_cancelled() {
                    break;
                }
                let workers_changed = self.state.workers_changed.notified();
                let progress = query.checkpoint_progress.notified();
                if let Err(e) = self.commit_checkpoints(query, attempt).await {
                    tracing::warn!(query = %query.id, "checkpoint not written: {e}");
                }
                if closing.is_some_and(|target| {
                    query
                        .last_checkpoint
                        .lock()
                        .as_ref()
                        .is_some_and(|m| m.batch >= target)
                }) {
                    break;
                }
                if membership_changed || last_membership_check.elapsed() >= MEMBERSHIP_CHECK {
                    membership_changed = false;
                    last_membership_check = Instant::now();
                    if let Some(lost) = self.lost_worker(placement) {
                        return (AttemptEnd::WorkerLost(lost), carry(next_batch));
                    }
                    if closing.is_none()
                        && checkpoints_on
                        && self.needs_rebalance(query, placement, reduce_partitions)
                    {
                        break; // plan the closing group now
                    }
                }
                tokio::select! {
                    r = done.changed() => if r.is_err() { return (AttemptEnd::Cancelled, carry(next_batch)) },
                    _ = cancel.notify.notified() => return (AttemptEnd::Cancelled, carry(next_batch)),
                    _ = workers_changed => membership_changed = true,
                    _ = progress => {}
                    Some(report) = reports.recv() => {
                        tracing::trace!(query = %query.id, group = report.group, worker = report.worker, "group report");
                    }
                    Some(notice) = map_done.recv() => {
                        if notice.attempt != attempt {
                            continue;
                        }
                        let t0 = Instant::now();
                        // The consuming stage's tasks of the batch start
                        // once all its producers reported (the worker tells
                        // the stage from the notices).
                        if let Some((batch, _stage, notices)) = barrier.add(notice) {
                            let mut sends = Vec::new();
                            for &i in &reduce_workers {
                                let mut client = placement[i].client.clone();
                                let req = pb::LaunchReduceRequest {
                                    query: query.id.0,
                                    batch,
                                    notices: notices.clone(),
                                };
                                sends.push(async move {
                                    tokio::time::timeout(LAUNCH_TIMEOUT, client.launch_reduce(req))
                                        .await
                                        .unwrap_or_else(|_| Err(Status::deadline_exceeded("launch timed out")))
                                });
                            }
                            let failed = futures::future::join_all(sends)
                                .await
                                .into_iter()
                                .find_map(|r| r.err());
                            let spent = t0.elapsed();
                            coordinated += spent;
                            query
                                .status
                                .coordination_us
                                .fetch_add(spent.as_micros() as u64, Ordering::Relaxed);
                            if let Some(s) = failed {
                                return (AttemptEnd::WorkerLost(format!("(launching reduce tasks: {})", s.message())), carry(next_batch));
                            }
                        }
                    }
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }

    /// At a boundary: should the next group close this attempt (a worker is
    /// draining, a new one is idle, or the parallelism changed)?
    pub(super) fn needs_rebalance(
        &self,
        query: &CompiledQuery,
        placement: &[Placed],
        reduce_partitions: u32,
    ) -> bool {
        if query.plan.has_shuffle()
            && query.target_partitions.load(Ordering::Acquire) != reduce_partitions
        {
            return true;
        }
        let workers = self.state.workers.read();
        let live = workers.values().filter(|w| !w.draining).count();
        live != placement.len()
            || placement
                .iter()
                .any(|p| workers.get(&p.id).is_none_or(|w| w.draining))
    }

    /// Writes every complete checkpoint of the attempt whose batches the
    /// sink has committed.
    pub(super) async fn commit_checkpoints(
        &self,
        query: &CompiledQuery,
        attempt: u64,
    ) -> Result<()> {
        let Some(store) = self.state.checkpoints.as_ref() else {
            return Ok(());
        };
        let Some(committed) = query.committed_through() else {
            return Ok(());
        };
        let maps = query.total_map_partitions() as usize;
        let reduces = query.status.reduce_partitions.load(Ordering::Acquire) as usize;
        let objects = query.state_objects(reduces as u32);
        let ready = {
            let pending = query.pending_checkpoints.lock();
            pending
                .iter()
                .rev()
                .find(|(b, p)| {
                    **b <= committed
                        && p.attempt == attempt
                        && p.maps.len() >= maps
                        && p.states.len() >= objects
                })
                .map(|(b, p)| (*b, p.maps.clone(), p.states.clone()))
        };
        let Some((batch, mut map_states, mut states)) = ready else {
            if tracing::enabled!(tracing::Level::DEBUG) {
                let pending = query.pending_checkpoints.lock();
                for (b, p) in pending.iter() {
                    tracing::debug!(query = %query.id, batch = *b, committed, attempt = p.attempt, maps = p.maps.len(), want_maps = maps, states = p.states.len(), want_states = objects, "checkpoint pending");
                }
            }
            return Ok(());
        };
        map_states.sort_by_key(|m| (m.stage, m.partition));
        map_states.dedup_by_key(|m| (m.stage, m.partition));
        states.sort_by_key(|(s, _)| (query.stage_of(s), s.partition));
        states.dedup_by_key(|(s, _)| (query.stage_of(s), s.partition));
        let Some(states) = query.resolve_chains(states) else {
            tracing::warn!(
                query = %query.id,
                batch,
                "a checkpoint delta's base is no longer kept: dropped; the next is written in full"
            );
            query.pending_checkpoints.lock().retain(|b, _| *b > batch);
            query.full_checkpoint_next.store(true, Ordering::Release);
            return Ok(());
        };
        let full = states.iter().all(|s| s.chain.is_empty());
        let manifest = Manifest {
            key: query.key.clone(),
            batch,
            origin_unix_us: query.start_unix_us,
            interval_us: query.interval.as_micros() as u64,
            reduce_partitions: reduces as u32,
            maps: map_states,
            states,
            last_emitted: Some(committed),
            created_unix_ms: unix_us() / 1000,
        };
        store.commit(&manifest).await?;
        query.pending_checkpoints.lock().retain(|b, _| *b > batch);
        if full {
            query.full_checkpoint_next.store(false, Ordering::Release);
        }
        *query.status.last_checkpoint.lock() = Some((batch, Instant::now(), manifest.bytes()));
        *query.checkpoint_due.lock() = None;
        {
            let mut kept = query.kept_checkpoints.lock();
            kept.push(manifest.clone());
            let excess = kept.len().saturating_sub(crate::checkpoint::KEEP);
            kept.drain(..excess);
        }
        *query.last_checkpoint.lock() = Some(manifest);
        Ok(())
    }

    /// A worker of `placement` that is gone (deregistered or silent).
    pub(super) fn lost_worker(&self, placement: &[Placed]) -> Option<String> {
        let lost = {
            let workers = self.state.workers.read();
            placement.iter().find_map(|p| match workers.get(&p.id) {
                Some(w) if w.epoch == p.epoch && self.state.is_live(w) => None,
                _ => Some((p.id, p.epoch, format!("{} ({})", p.id.0, p.address))),
            })
        };
        let (id, epoch, who) = lost?;
        // Forgotten at once, so that the next attempt does not place on it.
        self.state.forget_worker(id, epoch, "it went silent");
        Some(who)
    }
}

/// Tells `workers` to drop `query` (`attempt` and older; 0: every
/// attempt), in the background and bounded: a hung worker gets nothing.
pub(super) fn cancel_on(workers: &[Placed], query: QueryId, attempt: u64) {
    for placed in workers {
        let mut client = placed.client.clone();
        let req = pb::CancelQueryRequest {
            query: query.0,
            attempt,
        };
        tokio::spawn(async move {
            let _ = tokio::time::timeout(LAUNCH_TIMEOUT, client.cancel_query(req)).await;
        });
    }
}

impl Layout {
    /// Sticky placement over `workers`: reduce partition `r` on slot
    /// `r mod W`, then input stage `s`'s partition `p` on slot
    /// `(offset_s + p) mod W`, where `offset_s` counts the partitions of the
    /// stages before `s`.
    pub(super) fn spread(
        workers: Vec<Placed>,
        map_partitions: &[u32],
        reduce_partitions: u32,
    ) -> Self {
        let w = workers.len().max(1);
        let reduces = (0..reduce_partitions as usize).map(|r| r % w).collect();
        let mut offset = 0usize;
        let maps = map_partitions
            .iter()
            .map(|&n| {
                let slots = (0..n as usize).map(|p| (offset + p) % w).collect();
                offset += n as usize;
                slots
            })
            .collect();
        Self {
            workers,
            maps,
            reduces,
        }
    }

    /// The layout after some workers were lost: `keep[slot]` says whether a
    /// slot survived (it keeps every partition it holds), `take[slot]`
    /// whether it may take lost partitions. Returns the new layout and the
    /// number of partitions moved, or `None` when partitions must move and
    /// no survivor may take them.
    pub(super) fn after_loss(&self, keep: &[bool], take: &[bool]) -> Option<(Self, u32)> {
        let (maps, reduces, moved) = reassign(keep, take, &self.maps, &self.reduces)?;
        // Renumber the surviving slots.
        let mut slot_of = vec![usize::MAX; self.workers.len()];
        let mut workers = Vec::new();
        for (i, w) in self.workers.iter().enumerate() {
            if keep.get(i).copied().unwrap_or(false) {
                slot_of[i] = workers.len();
                workers.push(w.clone());
            }
        }
        let renumber = |s: &usize| slot_of[*s];
        Some((
            Self {
                workers,
                maps: maps
                    .iter()
                    .map(|slots| slots.iter().map(renumber).collect())
                    .collect(),
                reduces: reduces.iter().map(renumber).collect(),
            },
            moved,
        ))
    }

    /// Worker ids owning each map partition, input stages in order.
    pub(super) fn map_owners(&self) -> Vec<u32> {
        self.maps
            .iter()
            .flatten()
            .map(|&slot| self.workers[slot].id.0)
            .collect()
    }

    /// Partitions (map and reduce) in all.
    pub(super) fn partitions(&self) -> usize {
        self.maps.iter().map(Vec::len).sum::<usize>() + self.reduces.len()
    }
}

/// Moves every partition of a slot that is not kept to the least loaded slot
/// that may take partitions, reduce partitions first (consumers are placed
/// before producers), so the replay is spread over all survivors. Kept slots
/// keep every partition they hold. Returns the new slots per partition and
/// how many moved, or `None` when some partition has nowhere to go.
pub(super) fn reassign(
    keep: &[bool],
    take: &[bool],
    maps: &[Vec<usize>],
    reduces: &[usize],
) -> Option<(Vec<Vec<usize>>, Vec<usize>, u32)> {
    let kept = |s: usize| keep.get(s).copied().unwrap_or(false);
    let mut load = vec![0usize; keep.len()];
    for &s in reduces.iter().chain(maps.iter().flatten()) {
        if kept(s) {
            load[s] += 1;
        }
    }
    let mut moved = 0u32;
    let mut place = |s: usize| -> Option<usize> {
        if kept(s) {
            return Some(s);
        }
        let to = (0..keep.len())
            .filter(|&t| kept(t) && take.get(t).copied().unwrap_or(false))
            .min_by_key(|&t| (load[t], t))?;
        load[to] += 1;
        moved += 1;
        Some(to)
    };
    let reduces = reduces
        .iter()
        .map(|&s| place(s))
        .collect::<Option<Vec<_>>>()?;
    let maps = maps
        .iter()
        .map(|slots| slots.iter().map(|&s| place(s)).collect::<Option<Vec<_>>>())
        .collect::<Option<Vec<_>>>()?;
    Some((maps, reduces, moved))
}
