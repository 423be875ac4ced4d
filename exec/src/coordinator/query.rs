//! A compiled query: placement owners, and the checkpoints it keeps and resolves.

use super::*;

impl Owners {
    pub(super) fn of(layout: &Layout) -> Self {
        let id = |slot: &usize| layout.workers[*slot].id.0;
        Self {
            workers: layout.workers.iter().map(|w| w.id.0).collect(),
            maps: layout
                .maps
                .iter()
                .map(|m| m.iter().map(id).collect())
                .collect(),
            reduces: layout.reduces.iter().map(id).collect(),
        }
    }

    pub(super) fn reduce(&self, r: u32) -> Option<u32> {
        self.reduces.get(r as usize).copied()
    }

    /// The owner of partition `p` of stage `stage`: a source stage's
    /// (`stage` < the number of sources) map partition, else a reduce
    /// partition (every shuffle stage's partition `p` is on one worker).
    pub(super) fn task(&self, stage: u32, p: u32) -> Option<u32> {
        match self.maps.get(stage as usize) {
            Some(maps) => maps.get(p as usize).copied(),
            None => self.reduce(p),
        }
    }

    /// The owner of final-stage task `p`: a reduce partition, or a map
    /// partition of a plan without a shuffle.
    pub(super) fn final_task(&self, p: u32) -> Option<u32> {
        if self.reduces.is_empty() {
            self.maps.first()?.get(p as usize).copied()
        } else {
            self.reduce(p)
        }
    }
}

impl CompiledQuery {
    /// The checkpoint a keyed-state snapshot may be a delta of: the latest
    /// complete one, if it has the current reduce partitions, fewer than
    /// [`MAX_DELTAS`] deltas, and deltas that add up to no more than the
    /// full snapshot (or [`MIN_DELTA_BUDGET`]).
    pub(super) fn delta_base(&self) -> Option<u64> {
        let keyed = self
            .graph
            .stages
            .iter()
            .flat_map(|s| &s.operators)
            .any(|op| match op {
                Operator::AggregateFinal(_) | Operator::WindowJoin(_) => true,
                Operator::IntervalJoin(plan) => {
                    crate::operators::IntervalJoinExec::writes_deltas(plan)
                }
                _ => false,
            });
        if !keyed || self.full_checkpoint_next.load(Ordering::Acquire) {
            return None;
        }
        let last = self.last_checkpoint.lock();
        let m = last.as_ref()?;
        let partitions = self.status.reduce_partitions.load(Ordering::Acquire);
        (m.reduce_partitions == partitions
            && m.states.len() == self.state_objects(partitions)
            && m.states.iter().all(|s| {
                let base = if s.chain.is_empty() {
                    s.bytes
                } else {
                    s.base_bytes
                };
                s.chain.len() < MAX_DELTAS && s.delta_bytes() <= base.max(MIN_DELTA_BUDGET)
            }))
        .then_some(m.batch)
    }

    /// Resolves each delta's chain against the kept checkpoints; `None` when
    /// a base is gone (the checkpoint is then dropped, and the next one is
    /// written in full).
    pub(super) fn resolve_chains(
        &self,
        states: Vec<(StateFile, Option<u64>)>,
    ) -> Option<Vec<StateFile>> {
        let kept = self.kept_checkpoints.lock();
        let mut out = Vec::with_capacity(states.len());
        for (mut file, base) in states {
            if let Some(base) = base {
                let m = kept.iter().find(|m| m.batch == base)?;
                let prev = m.states.iter().find(|s| {
                    self.stage_of(s) == self.stage_of(&file) && s.partition == file.partition
                })?;
                file.chain = prev.chain.clone();
                file.chain.push(prev.path.clone());
                file.chain_bytes = prev.chain_bytes + prev.bytes;
                file.base_bytes = if prev.chain.is_empty() {
                    prev.bytes
                } else {
                    prev.base_bytes
                };
            }
            out.push(file);
        }
        Some(out)
    }
}

impl CompiledQuery {
    /// The shuffle stages whose partitions keep state (and checkpoint it).
    pub(super) fn stateful_stages(&self) -> Vec<u32> {
        self.graph
            .stages
            .iter()
            .filter(|s| s.is_stateful())
            .map(|s| s.id.0)
            .collect()
    }

    /// State objects a complete checkpoint holds with `partitions` reduce
    /// partitions: one per partition of every stateful stage.
    pub(super) fn state_objects(&self, partitions: u32) -> usize {
        partitions as usize * self.stateful_stages().len()
    }

    /// The stage of a checkpoint's state object (objects written before
    /// plans had several are the only stateful stage's).
    pub(super) fn stage_of(&self, file: &StateFile) -> u32 {
        file.stage
            .or_else(|| self.stateful_stages().first().copied())
            .unwrap_or(0)
    }
}

impl CompiledQuery {
    /// Whether a loss now can re-run only the lost work: every map output
    /// since the last checkpoint is retained.
    pub(super) fn can_recover_lost_work(&self) -> bool {
        if !self.lost_work || !self.retaining.load(Ordering::Acquire) {
            return false;
        }
        let since = self.retained_since.load(Ordering::Acquire);
        self.last_checkpoint
            .lock()
            .as_ref()
            .map_or(since == 0, |m| m.batch + 1 >= since)
    }

    /// At a group boundary: stops retaining map outputs once a checkpoint
    /// is `stall` late (the store is failing: retained blocks would grow
    /// without bound), and retains again from batch `from` on once
    /// checkpoints are back. Updates the recovery mode SHOW QUERIES shows.
    pub(super) fn check_retention(&self, stall: Duration, from: u64, now: Instant) {
        if !self.lost_work {
            return;
        }
        // How late the outstanding checkpoint is (none outstanding: not late).
        let age = self
            .checkpoint_due
            .lock()
            .map_or(Duration::ZERO, |due| now.saturating_duration_since(due));
        let retaining = self.retaining.load(Ordering::Acquire);
        if retaining && age > stall {
            self.retaining.store(false, Ordering::Release);
            tracing::warn!(query = %self.id, "no checkpoint for {age:?}: map outputs are no longer retained, a lost worker now rolls the query back");
        } else if !retaining && age < stall {
            self.retained_since.store(from, Ordering::Release);
            self.retaining.store(true, Ordering::Release);
            tracing::info!(query = %self.id, "checkpoints are back: map outputs retained again from batch {from}");
        }
        let mode = if !self.retaining.load(Ordering::Acquire) {
            "rollback (checkpoints stalled)"
        } else if self.can_recover_lost_work() {
            "lost-work"
        } else {
            "rollback (until the next checkpoint)"
        };
        let mut shown = self.status.recovery.lock();
        if *shown != mode {
            *shown = mode.to_string();
        }
    }

    /// Every batch up to the returned one was committed by the sink.
    pub(super) fn committed_through(&self) -> Option<u64> {
        let released = self.released.load(Ordering::Acquire);
        if !self.durability.durable_sink {
            return released.checked_sub(1);
        }
        let sent = self.last_sent_rows.load(Ordering::Acquire);
        let acked = self.acked.load(Ordering::Acquire);
        if acked >= sent {
            released.checked_sub(1)
        } else {
            acked.checked_sub(1)
        }
    }

    pub(super) fn trigger_at(&self, b: BatchId) -> Instant {
        self.start + self.offset_of(b)
    }

    pub(super) fn offset_of(&self, b: BatchId) -> Duration {
        Duration::from_nanos((self.interval.as_nanos() as u64).saturating_mul(b.0 + 1))
    }

    /// Map partitions of input stage `s`.
    pub(super) fn partitions(&self, s: usize) -> u32 {
        self.inputs.get(s).map_or(0, |i| i.sources.len() as u32)
    }

    /// Map partitions over every input stage.
    pub(super) fn total_map_partitions(&self) -> u32 {
        (0..self.inputs.len()).map(|s| self.partitions(s)).sum()
    }

    pub(super) fn join(&self, id: u32) -> Option<&LookupJoinSpec> {
        self.graph
            .stages
            .iter()
            .flat_map(|s| &s.operators)
            .find_map(|op| match op {
                Operator::Kernel(BatchOp::LookupJoin(spec)) if spec.id == id => Some(spec.as_ref()),
                _ => None,
            })
    }
}

/// The receiving ends of a new query's channels: the collector's, and the
/// coordination's (group reports and BSP notices).
pub(super) struct QueryChannels {
    pub(super) sink_rx: mpsc::UnboundedReceiver<SinkMsg>,
    pub(super) report_rx: mpsc::UnboundedReceiver<pb::GroupReport>,
    pub(super) map_done_rx: mpsc::UnboundedReceiver<pb::MapOutputReady>,
}

impl CompiledQuery {
    /// Compiles `spec` as query `id`: its status, its encoded stage graph
    /// and its time origin. `lost_work`: a lost worker re-runs only its
    /// work (the runtime's mode allows it).
    pub(super) fn new(
        id: QueryId,
        spec: QuerySpec,
        lost_work: bool,
    ) -> Result<(Arc<Self>, QueryChannels)> {
        let reduce_partitions = if spec.plan.has_shuffle() {
            spec.reduce_partitions.max(1)
        } else {
            0
        };
        // 0 = 'auto': adaptive, starting from 1.
        let adaptive = spec.group_size == 0 && spec.scheduling != Scheduling::Bsp;
        let group_size = match spec.scheduling {
            Scheduling::Bsp => 1,
            Scheduling::Drizzle | Scheduling::GroupOnly => spec.group_size.max(1),
        };
        let status = Arc::new(QueryStatus {
            id,
            label: spec.label.clone(),
            batch_interval: spec.batch_interval,
            scheduling: spec.scheduling,
            adaptive,
            group_size: AtomicU32::new(group_size),
            batches: AtomicU64::new(0),
            rows_in: AtomicU64::new(0),
            rows_out: AtomicU64::new(0),
            late_rows: AtomicU64::new(0),
            last_latency_us: AtomicU64::new(0),
            coordination_us: AtomicU64::new(0),
            launches: AtomicU64::new(0),
            groups: AtomicU64::new(0),
            recent_latencies_us: Mutex::new(std::collections::VecDeque::new()),
            recent_emits: Mutex::new(std::collections::VecDeque::new()),
            attempt: AtomicU64::new(0),
            recoveries: AtomicU64::new(0),
            recovered_partitions: AtomicU64::new(0),
            last_recovery: Mutex::new(None),
            recovery: Mutex::new(if lost_work { "lost-work" } else { "rollback" }.to_string()),
            reduce_partitions: AtomicU32::new(reduce_partitions),
            last_checkpoint: Mutex::new(
                spec.durability
                    .resume
                    .as_ref()
                    .map(|m| (m.batch, Instant::now(), m.bytes())),
            ),
            started: Instant::now(),
            ended: Mutex::new(None),
            state_bytes: AtomicU64::new(0),
            state_keys: AtomicU64::new(0),
            memory_limit: spec.memory_limit,
            graph: spec.plan.graph(),
            analysis: Mutex::new(Analysis::default()),
            phase: Mutex::new("placing"),
        });
        // Workers get the stage graph (each stage's fragment), not the plan.
        let graph = spec.plan.graph();
        let encoded_plan = drizzle_planner::encode_graph(&graph)?;
        let (sink_tx, sink_rx) = mpsc::unbounded_channel();
        let (report_tx, report_rx) = mpsc::unbounded_channel();
        let (map_done_tx, map_done_rx) = mpsc::unbounded_channel();
        let cancel = Arc::new(CancelToken {
            cancelled: AtomicBool::new(false),
            notify: Notify::new(),
        });
        // The time origin fixes every batch's trigger time, hence its source
        // range: a resumed view keeps its origin, so replayed batches read
        // what they read before.
        let now_us = unix_us();
        let origin_us = spec
            .durability
            .resume
            .as_ref()
            .map(|m| m.origin_unix_us)
            .or(spec.durability.origin_unix_us)
            .unwrap_or(now_us);
        let since_origin = Duration::from_micros(now_us.saturating_sub(origin_us).max(0) as u64);
        let start = Instant::now()
            .checked_sub(since_origin)
            .unwrap_or_else(Instant::now);
        let ephemeral = spec.durability.key.is_none();
        let key = spec
            .durability
            .key
            .clone()
            .unwrap_or_else(|| format!("queries/q{}-{now_us}", id.0));
        let released = spec.durability.skip_through.map_or(0, |b| b + 1).max(
            spec.durability
                .resume
                .as_ref()
                .and_then(|m| m.last_emitted)
                .map_or(0, |b| b + 1),
        );
        let acked = Arc::new(AtomicU64::new(released));
        let resumed = spec.durability.resume.clone();
        let query = Arc::new(CompiledQuery {
            key,
            ephemeral,
            last_checkpoint: Mutex::new(spec.durability.resume.clone()),
            checkpoint_due: Mutex::new(None),
            durability: spec.durability,
            pending_checkpoints: Mutex::new(BTreeMap::new()),
            checkpoint_progress: Notify::new(),
            target_partitions: AtomicU32::new(reduce_partitions),
            generation: AtomicU64::new(0),
            lost_work,
            retaining: AtomicBool::new(lost_work),
            retained_since: AtomicU64::new(0),
            released: AtomicU64::new(released),
            last_sent_rows: AtomicU64::new(0),
            acked: Arc::clone(&acked),
            state_by_worker: Mutex::new(HashMap::new()),
            over_budget: AtomicBool::new(false),
            kept_checkpoints: Mutex::new(resumed.into_iter().collect()),
            full_checkpoint_next: AtomicBool::new(false),
            owners: Mutex::new(Owners::default()),
            token: {
                let mut t = [0u8; 16];
                // Without OS randomness the token is zeros: still required,
                // and the cluster secret still guards every call.
                let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut t);
                drizzle_shuffle::QueryToken(t)
            },
            id,
            encoded_plan,
            scheduling: spec.scheduling,
            inputs: spec.inputs,
            status: Arc::clone(&status),
            sink: sink_tx,
            reports: report_tx,
            map_done: map_done_tx,
            cancel: Arc::clone(&cancel),
            start,
            start_unix_us: origin_us,
            interval: spec.batch_interval,
            tables: Mutex::new(HashMap::new()),
            plan: spec.plan,
            graph,
        });
        Ok((
            query,
            QueryChannels {
                sink_rx,
                report_rx,
                map_done_rx,
            },
        ))
    }
}
