//! The worker-local scheduler: group launches, `MapOutputReady` notices,
//! dependency tracking over every input, and the run queue (earliest batch
//! first).

use super::*;

impl PendingReduce {
    /// Adds a notice unless one for the same map partition is in (a notice
    /// repeated by a recovery describes the same, deterministic, blocks).
    pub(super) fn add(&mut self, notice: pb::MapOutputReady) {
        if !self
            .notices
            .iter()
            .any(|n| n.stage == notice.stage && n.map == notice.map)
        {
            self.notices.push(notice);
        }
    }

    /// True when there is a notice from every partition of every input
    /// (`inputs`: (producing stage, its partitions)).
    pub(super) fn has_all_inputs(&self, inputs: &[(u32, u32)]) -> bool {
        inputs.iter().all(|&(stage, partitions)| {
            let mut seen: Vec<u32> = self
                .notices
                .iter()
                .filter(|n| n.stage == stage)
                .map(|n| n.map)
                .collect();
            seen.sort_unstable();
            seen.dedup();
            seen.len() as u32 >= partitions
        })
    }

    /// Launched, and every input announced.
    pub(super) fn announced(&self, inputs: &[(u32, u32)]) -> bool {
        self.launched && self.has_all_inputs(inputs)
    }

    /// Runnable: launched, every input announced, and every remote block
    /// downloaded.
    pub(super) fn runnable(&self, inputs: &[(u32, u32)]) -> bool {
        self.announced(inputs) && self.fetching.is_empty()
    }

    /// Forgets blocks (downloaded or downloading) whose notice is gone.
    pub(super) fn forget_unannounced(&mut self) {
        let notices = &self.notices;
        let announced =
            |k: &(u32, u32, u32)| notices.iter().any(|n| (n.stage, n.map, n.worker) == *k);
        self.fetching.retain(|k| announced(k));
        self.fetched.retain(|k, _| announced(k));
    }
}

impl WorkerQuery {
    /// The state this worker holds for the query: every reduce partition's
    /// keyed state and join rows, the lookup tables of every task (and
    /// their cached rows), `buffered` bytes of shuffle blocks, and the
    /// inputs fetched ahead (source rows and downloaded blocks).
    pub(super) fn state_size(&self, buffered: usize) -> StateSize {
        let mut size = StateSize {
            bytes: buffered as u64 + self.tables.cache.bytes(),
            keys: 0,
        };
        for m in self.maps.values() {
            size += m.chain.size();
        }
        for r in self.reduces.values() {
            size += r.size();
        }
        // Inputs fetched ahead: source rows read for tasks not run yet, and
        // downloaded blocks waiting for their reduce task.
        let rows = |batches: &[RecordBatch]| -> u64 {
            batches
                .iter()
                .map(|b| b.get_array_memory_size() as u64)
                .sum()
        };
        for m in self.maps.values() {
            for (_, _, read) in m.read.done.values() {
                if let Ok((_, batches)) = read {
                    size.bytes += rows(batches);
                }
            }
        }
        for p in self.pending_reduces.values() {
            for batches in p.fetched.values() {
                size.bytes += rows(batches);
            }
        }
        size
    }

    /// Fails when the state outgrows the query's budget; `operator` names
    /// what just grew.
    pub(super) fn check_budget(&self, operator: &str, buffered: usize) -> Result<StateSize> {
        let size = self.state_size(buffered);
        if self.memory_limit > 0 && size.bytes > self.memory_limit {
            return Err(ExecError::OutOfMemory {
                message: format!(
                    "query memory limit exceeded: {operator}: the query holds {} of state \
                     and shuffle buffers ({} keys or rows) on this worker, \
                     query_memory_limit is {}",
                    human_bytes(size.bytes),
                    size.keys,
                    human_bytes(self.memory_limit)
                ),
            });
        }
        Ok(size)
    }
    /// Whether a notice is valid here: from this generation, and from the
    /// worker that owns its map partition (a lost worker's late notices, and
    /// a fenced incarnation's, are not).
    pub(super) fn accepts(&self, notice: &pb::MapOutputReady) -> bool {
        accepts_notice(notice, self.generation, &self.owners)
    }

    /// Worker ids owning each stage's partitions (empty: any owner), from
    /// the launch's owners (kept in `owners`, read for every notice).
    pub(super) fn owners_from_launch(&self) -> Vec<Vec<u32>> {
        let kinds: Vec<u8> = self
            .graph
            .stages
            .iter()
            .map(|s| u8::from(matches!(s.input, StageInput::Shuffle(_))))
            .collect();
        owners_by_stage(
            &self.map_owners,
            &self.shuffle_inputs,
            &self.reduce_owners,
            &kinds,
        )
    }

    /// The earliest runnable reduce task that is next in its partition.
    /// Whether the lookup tables stage `stage`'s tasks join with are in.
    pub(super) fn tables_in(&self, stage: u32) -> bool {
        self.stage_joins
            .get(stage as usize)
            .is_none_or(|joins| joins.iter().all(|j| self.tables.cache.has(*j)))
    }

    pub(super) fn next_reduce(&self) -> Option<(&(u64, u32, ReducePartition), &PendingReduce)> {
        let mut blocked: Vec<(u32, ReducePartition)> = Vec::new();
        for (key, p) in &self.pending_reduces {
            let (b, stage, r) = key;
            if blocked.contains(&(*stage, *r))
                || self.busy.contains(&(*stage, r.0))
                || self.restoring.contains(&(*stage, r.0))
                || !self.tables_in(*stage)
            {
                continue;
            }
            let in_order = self
                .reduces
                .get(&(*stage, *r))
                .and_then(|s| s.last_batch)
                .is_none_or(|last| *b == last + 1);
            if in_order && p.runnable(self.inputs_of(*stage)) {
                return Some((key, p));
            }
            blocked.push((*stage, *r));
        }
        None
    }

    /// Task (batch, stage, partition) of this query as a slot runs it.
    pub(super) fn slot_task(
        &self,
        qid: QueryId,
        (batch, stage, partition): (u64, u32, u32),
        stats: StageStats,
        work: Work,
    ) -> SlotTask {
        SlotTask {
            query: qid,
            incarnation: self.incarnation,
            batch,
            stage,
            partition,
            steps: Arc::clone(&self.steps),
            tables: self.tables.clone(),
            shuffle: shuffle_keys(&self.graph, GraphStage(stage))
                .map(|by| (by, self.reduce_partitions as usize)),
            sink_schema: Arc::clone(&self.graph.output_schema),
            stats,
            work,
            range: None,
        }
    }

    /// Whether map task (b, stage, p)'s read is done.
    pub(super) fn has_read(&self, b: u64, stage: u32, p: MapPartition) -> bool {
        // (a partition not here runs, and fails)
        self.maps
            .get(&(stage, p))
            .is_none_or(|m| m.read.done.contains_key(&b))
    }

    /// The inputs of `stage`: (producing stage, its partitions).
    pub(super) fn inputs_of(&self, stage: u32) -> &[(u32, u32)] {
        self.stage_inputs
            .get(stage as usize)
            .map_or(&[][..], Vec::as_slice)
    }

    /// The stage reading `stage`'s shuffle output, if it writes one.
    pub(super) fn consumer_of(&self, stage: u32) -> Option<u32> {
        match &self.graph.stage(GraphStage(stage))?.output {
            StageOutput::Shuffle { to, .. } => Some(to.0),
            StageOutput::Sink(_) => None,
        }
    }
}

impl Scheduler {
    pub(super) fn new(shared: Arc<Shared>, slots: Slots) -> Self {
        Self {
            shared,
            queries: HashMap::new(),
            early: HashMap::new(),
            next_read: 0,
            next_incarnation: 0,
            slots,
            running: 0,
        }
    }

    pub(super) fn run(mut self, rx: std_mpsc::Receiver<Msg>) {
        // Lazily connecting channels need the runtime's context; `block_on`
        // calls below still run on this (non-runtime) thread.
        let handle = self.shared.handle.clone();
        let _context = handle.enter();
        loop {
            loop {
                match rx.try_recv() {
                    Ok(msg) => {
                        if !self.handle(msg) {
                            return;
                        }
                    }
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => return,
                }
            }
            let now = Instant::now();
            self.start_reads(now);
            match self.next_task(now) {
                Ok(task) => self.run_task(task),
                Err(wait) => {
                    let msg = match wait {
                        Some(deadline) => {
                            match rx.recv_timeout(deadline.saturating_duration_since(now)) {
                                Ok(m) => Some(m),
                                Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                            }
                        }
                        None => match rx.recv() {
                            Ok(m) => Some(m),
                            Err(_) => return,
                        },
                    };
                    if let Some(msg) = msg {
                        if !self.handle(msg) {
                            return;
                        }
                    }
                }
            }
        }
    }

    pub(super) fn in_group(&self) -> bool {
        self.queries.values().any(|q| {
            !q.pending_maps.is_empty() || !q.pending_reduces.is_empty() || !q.busy.is_empty()
        })
    }

    /// Returns false on shutdown.
    pub(super) fn handle(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Shutdown => return false,
            Msg::TableLoaded => {}
            Msg::Restored(done) => self.restored(*done),
            Msg::Cancel(QueryId(u64::MAX), _) => {
                self.shared.table_caches.lock().clear();
                for q in std::mem::take(&mut self.queries).into_keys() {
                    self.shared.store.drop_query(q);
                }
                self.early.clear();
            }
            Msg::Cancel(q, attempt) => {
                if self.in_group() {
                    self.shared
                        .counters
                        .coordinator_messages_in_group
                        .fetch_add(1, Ordering::Relaxed);
                }
                let newer = self
                    .queries
                    .get(&q)
                    .is_some_and(|wq| attempt != 0 && wq.attempt > attempt);
                if !newer {
                    self.queries.remove(&q);
                    self.shared.table_caches.lock().remove(&q);
                    self.early.remove(&q);
                    self.shared.store.drop_query(q);
                }
            }
            Msg::Launch(launch) => {
                let id = QueryId(launch.query);
                if let Err(e) = self.launch(*launch) {
                    self.fail(id, BatchId(0), e);
                }
            }
            Msg::Notice(notice) => {
                self.shared
                    .counters
                    .notices_received
                    .fetch_add(1, Ordering::Relaxed);
                self.add_notice(notice);
            }
            Msg::Read(done) => self.read_done(*done),
            Msg::Fetched(done) => self.fetch_done(*done),
            Msg::Computed(done) => self.computed(*done),
            Msg::LaunchReduce(req) => {
                if self.in_group() {
                    self.shared
                        .counters
                        .coordinator_messages_in_group
                        .fetch_add(1, Ordering::Relaxed);
                }
                let Some(wq) = self.queries.get_mut(&QueryId(req.query)) else {
                    return true;
                };
                // The stage the coordinator's barrier released: the one
                // reading the notices' stage.
                let Some(stage) = req.notices.first().and_then(|n| wq.consumer_of(n.stage)) else {
                    return true;
                };
                let reduces: Vec<ReducePartition> = wq
                    .reduces
                    .keys()
                    .filter(|(s, _)| *s == stage)
                    .map(|(_, r)| *r)
                    .collect();
                let mut downloads = Vec::new();
                for r in reduces {
                    let entry = wq.pending_reduces.entry((req.batch, stage, r)).or_default();
                    entry.launched = true;
                    entry.trigger.get_or_insert_with(Instant::now);
                    entry.notices = req.notices.clone();
                    entry.forget_unannounced();
                    for n in &req.notices {
                        downloads.push(((req.batch, stage, r), n.clone()));
                    }
                    self.shared
                        .counters
                        .reduces_started_by_coordinator
                        .fetch_add(1, Ordering::Relaxed);
                }
                let qid = QueryId(req.query);
                for (task, n) in downloads {
                    self.download(qid, task, n);
                }
            }
        }
        true
    }

    pub(super) fn add_notice(&mut self, notice: pb::MapOutputReady) {
        let qid = QueryId(notice.query);
        let Some(wq) = self
            .queries
            .get_mut(&qid)
            .filter(|wq| notice.attempt <= wq.attempt)
        else {
            // The launch of this group (or attempt) may still be on its way.
            let early = self.early.entry(qid).or_default();
            if early.len() < 1 << 16 {
                early.push(notice);
            }
            return;
        };
        if !wq.accepts(&notice) || !wq.token.matches(&notice.token) {
            // fenced: an older generation, not the partition's owner, or
            // not from a worker of this query
            return;
        }
        let Some(consumer) = wq.consumer_of(notice.stage) else {
            return;
        };
        let inputs = wq.inputs_of(consumer).to_vec();
        let mut downloads = Vec::new();
        for ((stage, r), state) in &wq.reduces {
            if *stage != consumer || state.last_batch.is_some_and(|l| notice.batch <= l) {
                continue; // another stage, or past that batch (a recovery's replay)
            }
            let entry = wq
                .pending_reduces
                .entry((notice.batch, consumer, *r))
                .or_default();
            let before = entry.announced(&inputs);
            entry.add(notice.clone());
            downloads.push((notice.batch, consumer, *r));
            if !before && entry.announced(&inputs) {
                self.shared
                    .counters
                    .reduces_started_by_notices
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        for task in downloads {
            self.download(qid, task, notice.clone());
        }
    }

    /// Starts downloading the block `notice` announces for `task` when it
    /// is remote, has rows for the task, and is not in or on its way.
    pub(super) fn download(
        &mut self,
        qid: QueryId,
        task: (u64, u32, ReducePartition),
        notice: pb::MapOutputReady,
    ) {
        let (b, _, r) = task;
        if notice.location == self.shared.address
            || notice.rows.get(r.0 as usize).copied().unwrap_or(0) == 0
        {
            return;
        }
        let Some(wq) = self.queries.get_mut(&qid) else {
            return;
        };
        let token = wq.token;
        let Some(pending) = wq.pending_reduces.get_mut(&task) else {
            return;
        };
        let key = (notice.stage, notice.map, notice.worker);
        // Only the notice the task holds (a repeated one describes the
        // same blocks).
        let held = pending
            .notices
            .iter()
            .any(|n| (n.stage, n.map, n.worker) == key);
        if !held || pending.fetching.contains(&key) || pending.fetched.contains_key(&key) {
            return;
        }
        let channel = match self.shared.peer(&notice.location) {
            Ok(c) => c,
            Err(e) => {
                // Not even an address: the producer is as good as lost.
                let pending = wq.pending_reduces.remove(&task).unwrap_or_default();
                self.fetch_failed(qid, task, pending, &notice, e);
                return;
            }
        };
        pending.fetching.insert(key);
        tracing::debug!(query = %qid, batch = b, stage = notice.stage, map = notice.map, producer = notice.worker, "download started");
        self.shared
            .counters
            .blocks_fetched_remote
            .fetch_add(1, Ordering::Relaxed);
        let client = crate::cluster::flight_client(channel, &self.shared.secret);
        let id = announced_block(qid, b, r, &notice);
        let inbox = self.shared.inbox.lock().clone();
        self.shared.handle.spawn(async move {
            let result = fetch_remote(client, notice.location.clone(), id, token).await;
            let _ = inbox.send(Msg::Fetched(Box::new(FetchDone {
                query: qid,
                task,
                notice,
                result,
            })));
        });
    }

    /// A reduce partition's checkpoint objects are in: its state is
    /// restored and its tasks may start. A failure fails the query, as a
    /// failed launch does.
    pub(super) fn restored(&mut self, done: Restored) {
        let Some(wq) = self.queries.get_mut(&done.query) else {
            return;
        };
        if wq.incarnation != done.incarnation
            || !wq.restoring.remove(&(done.stage, done.partition.0))
        {
            return; // for a replaced incarnation of the query
        }
        let result = match (
            done.result,
            wq.reduces
                .get_mut(&(done.stage, done.partition))
                .and_then(|s| s.work.as_deref_mut()),
        ) {
            (Ok(loaded), Some(work)) => restore_reduce(
                &wq.graph,
                GraphStage(done.stage),
                &done.restore,
                (done.partition, done.partitions),
                loaded,
                work,
            ),
            (Ok(_), None) => Err(ExecError::invalid(format!(
                "partition {} of stage {} was restored while it ran",
                done.partition, done.stage
            ))),
            (Err(e), _) => Err(e),
        };
        if let Err(e) = result {
            self.fail(done.query, BatchId(done.restore.batch), e);
        }
    }

    /// A download finished: its rows wait in the task, or its producer is
    /// lost.
    pub(super) fn fetch_done(&mut self, done: FetchDone) {
        let FetchDone {
            query,
            task,
            notice,
            result,
        } = done;
        let Some(wq) = self.queries.get_mut(&query) else {
            return;
        };
        let key = (notice.stage, notice.map, notice.worker);
        let Some(pending) = wq.pending_reduces.get_mut(&task) else {
            return;
        };
        let current = pending
            .notices
            .iter()
            .any(|n| (n.stage, n.map, n.worker) == key);
        if !pending.fetching.remove(&key) || !current {
            return; // forgotten meanwhile (its producer was lost)
        }
        match result {
            Ok(batches) => {
                pending.fetched.insert(key, batches);
            }
            Err(e) => {
                let pending = wq.pending_reduces.remove(&task).unwrap_or_default();
                self.fetch_failed(query, task, pending, &notice, e);
            }
        }
    }

    /// Starts the reads of map tasks due within [`READ_AHEAD`]: per
    /// partition one at a time, in batch order, each from where the last
    /// one ended, and at most [`READ_AHEAD_BATCHES`] ahead of the tasks.
    pub(super) fn start_reads(&mut self, now: Instant) {
        let horizon = now + READ_AHEAD;
        for (qid, wq) in &mut self.queries {
            // Reads for tasks a launch replaced: start over from the
            // partition's position.
            for (&(stage, p), m) in &mut wq.maps {
                let pending = &wq.pending_maps;
                let stale = m
                    .read
                    .done
                    .keys()
                    .any(|b| !pending.contains_key(&(*b, stage, p)));
                if stale {
                    m.read = ReadAhead::default();
                }
            }
            for (&(b, stage, p), &(at, until_us)) in &wq.pending_maps {
                if at > horizon {
                    break;
                }
                let Some(state) = wq.maps.get_mut(&(stage, p)) else {
                    continue;
                };
                let read = &mut state.read;
                if read.in_flight.is_some()
                    || read.done.contains_key(&b)
                    || read.done.len() >= READ_AHEAD_BATCHES
                {
                    continue;
                }
                let from = read.cursor.unwrap_or(state.next_offset);
                let id = self.next_read;
                self.next_read += 1;
                read.in_flight = Some((b, id, from, until_us));
                tracing::debug!(query = %qid, batch = b, stage, partition = p.0, from, "read started");
                let future = state.source.read(from, until_us);
                let inbox = self.shared.inbox.lock().clone();
                let query = *qid;
                self.shared.handle.spawn(async move {
                    let result = future.await;
                    let _ = inbox.send(Msg::Read(Box::new(ReadDone {
                        query,
                        stage,
                        partition: p,
                        batch: b,
                        id,
                        result: result.map(|(to, rows)| (to.max(from), rows)),
                    })));
                });
            }
        }
    }

    /// A source read finished: its rows wait for their task.
    pub(super) fn read_done(&mut self, done: ReadDone) {
        let Some(state) = self
            .queries
            .get_mut(&done.query)
            .and_then(|wq| wq.maps.get_mut(&(done.stage, done.partition)))
        else {
            return;
        };
        let read = &mut state.read;
        let Some((_, _, from, until)) = read
            .in_flight
            .filter(|(b, id, _, _)| (*b, *id) == (done.batch, done.id))
        else {
            return; // a read of a partition replaced since
        };
        read.in_flight = None;
        if let Ok((to, _)) = &done.result {
            read.cursor = Some(*to);
        }
        read.done.insert(done.batch, (from, until, done.result));
    }

    pub(super) fn launch(&mut self, req: pb::LaunchGroupRequest) -> Result<()> {
        let qid = QueryId(req.query);
        tracing::debug!(query = %qid, group = req.group, attempt = req.attempt, maps = req.map_tasks.len(), reduces = req.reduce_tasks.len(), batches = req.batches.as_ref().map_or(0, |r| r.count), "launch");
        if req
            .batches
            .as_ref()
            .is_some_and(|r| r.count > crate::cluster::MAX_LAUNCH_BATCHES)
        {
            return Err(ExecError::invalid(format!(
                "a launch of more than {} micro-batches",
                crate::cluster::MAX_LAUNCH_BATCHES
            )));
        }
        let mode = SchedulingMode::try_from(req.mode).unwrap_or(SchedulingMode::Drizzle);
        // The generation's first attempt: 0 from a coordinator that does not say.
        let generation = if req.generation == 0 {
            req.attempt
        } else {
            req.generation
        };
        let mut continued = false;
        match self.queries.get(&qid).map(|wq| wq.attempt) {
            Some(a) if a > req.attempt => return Ok(()), // stale
            Some(a) if a < req.attempt && a >= generation => {
                // Recovery of lost work: this worker keeps its partitions,
                // their state and its retained map outputs.
                continued = true;
            }
            Some(a) if a < req.attempt => {
                // A new generation (a rebalance, or a rollback): start over
                // from its checkpoint.
                self.queries.remove(&qid);
                self.shared.table_caches.lock().remove(&qid);
                self.shared.store.drop_query(qid);
            }
            _ => {}
        }
        // Partitions created by this launch are adopted from a lost worker
        // when the attempt continues a generation.
        let adopting = req.attempt > generation;
        let fresh = !self.queries.contains_key(&qid);
        if fresh {
            if req.plan.is_empty() {
                return Err(ExecError::Unavailable {
                    message: format!("launch of query {qid} arrived without its plan"),
                });
            }
            let graph = drizzle_planner::decode_graph(&req.plan, &self.shared.task_ctx)?;
            let steps = graph.stages.iter().map(steps).collect();
            let stage_joins: Vec<Vec<u32>> = graph
                .stages
                .iter()
                .map(|s| {
                    s.operators
                        .iter()
                        .filter_map(|op| match op {
                            drizzle_planner::Operator::Kernel(
                                drizzle_planner::BatchOp::LookupJoin(spec),
                            ) => Some(spec.id),
                            _ => None,
                        })
                        .collect()
                })
                .collect();
            let cache = Arc::clone(self.shared.table_caches.lock().entry(qid).or_default());
            self.shared.prefetch_tables(
                qid,
                &cache,
                stage_joins.iter().flatten().copied().collect(),
            );
            // Partitions per source stage (in stage order), then what each
            // shuffle stage waits for.
            let sources: Vec<u32> = if req.shuffle_inputs.is_empty() {
                vec![req.map_partitions]
            } else {
                req.shuffle_inputs.clone()
            };
            let stage_inputs = graph
                .stages
                .iter()
                .map(|stage| match &stage.input {
                    StageInput::Source(_) => Vec::new(),
                    StageInput::Shuffle(inputs) => inputs
                        .iter()
                        .map(|i| {
                            let partitions = match graph.stage(*i).map(|s| &s.input) {
                                Some(StageInput::Source(_)) => {
                                    sources.get(i.0 as usize).copied().unwrap_or(0)
                                }
                                _ => req.reduce_partitions,
                            };
                            (i.0, partitions)
                        })
                        .collect(),
                })
                .collect();
            self.next_incarnation += 1;
            self.queries.insert(
                qid,
                WorkerQuery {
                    graph,
                    steps: Arc::new(steps),
                    incarnation: self.next_incarnation,
                    busy: std::collections::HashSet::new(),
                    mode,
                    shuffle_inputs: sources,
                    stage_inputs,
                    reduce_partitions: req.reduce_partitions,
                    reduce_placement: req.reduce_placement.clone(),
                    tables: RemoteTables {
                        shared: Arc::clone(&self.shared),
                        query: qid,
                        cache,
                    },
                    maps: BTreeMap::new(),
                    reduces: BTreeMap::new(),
                    pending_maps: BTreeMap::new(),
                    pending_reduces: BTreeMap::new(),
                    groups: BTreeMap::new(),
                    group_starts: BTreeMap::new(),
                    group_ends: BTreeMap::new(),
                    attempt: req.attempt,
                    generation,
                    map_owners: Vec::new(),
                    reduce_owners: Vec::new(),
                    owners: Vec::new(),
                    retain: false,
                    produced: BTreeMap::new(),
                    rows_in: 0,
                    late_rows: 0,
                    memory_limit: 0,
                    delta_bases: BTreeMap::new(),
                    token: QueryToken::default(),
                    stats: BTreeMap::new(),
                    gauges: BTreeMap::new(),
                    clock: None,
                    empty_runs: HashMap::new(),
                    stage_joins,
                    restoring: std::collections::HashSet::new(),
                },
            );
        }
        let Some(wq) = self.queries.get_mut(&qid) else {
            return Ok(());
        };
        wq.generation = generation;
        wq.memory_limit = req.memory_limit;
        if let Some(r) = &req.batches {
            wq.clock = Some((r.origin_unix_us, r.interval_ns));
        }
        if let Some(token) = QueryToken::from_slice(&req.query_token) {
            wq.token = token;
            self.shared.store.set_token(qid, token);
        }
        if !req.map_owners.is_empty() {
            wq.map_owners = req.map_owners.clone();
        }
        if !req.reduce_owners.is_empty() {
            wq.reduce_owners = req.reduce_owners.clone();
        }
        wq.owners = wq.owners_from_launch();
        if !req.reduce_placement.is_empty() {
            wq.reduce_placement = req.reduce_placement.clone();
        }
        wq.retain = req.retain_blocks;
        self.shared.store.retain(qid, req.retain_blocks);
        if let Some(covered) = req.covered_through {
            // A checkpoint covers these batches: no recovery reads them again.
            self.shared.store.drop_through(qid, covered);
            wq.produced = wq.produced.split_off(&(covered.saturating_add(1), 0, 0));
        }
        if continued {
            // The attempt's launch replaces every task not yet run; a lost
            // worker's notices are void (its partitions run elsewhere now).
            wq.attempt = req.attempt;
            wq.pending_maps.clear();
            wq.groups.clear();
            wq.group_starts.clear();
            wq.group_ends.clear();
            wq.delta_bases.clear();
            let (generation, owners) = (wq.generation, wq.owners.clone());
            let reduces = &wq.reduces;
            wq.pending_reduces.retain(|(b, stage, r), p| {
                p.notices.retain(|n| accepts_notice(n, generation, &owners));
                p.forget_unannounced();
                reduces
                    .get(&(*stage, *r))
                    .is_some_and(|s| s.last_batch.is_none_or(|l| *b > l))
            });
        }
        // A partition created here starts after the checkpoint it restores
        // from (or at the query's start).
        let restored_batch = req.restore.as_ref().map(|r| r.batch);
        let mut tasks = 0usize;
        let batches: Vec<(u64, (Instant, i64))> = req
            .batches
            .iter()
            .flat_map(pb::BatchRange::triggers)
            .map(|(b, at)| (b, (instant_of(at), at)))
            .collect();
        for spec in &req.map_tasks {
            let p = MapPartition(spec.partition);
            let key = (spec.stage, p);
            if !wq.maps.contains_key(&key) {
                let Some(start) = spec.start_offset else {
                    return Err(ExecError::invalid(format!(
                        "map partition {p} of stage {} arrived without its start",
                        spec.stage
                    )));
                };
                let stage = wq.graph.stage(GraphStage(spec.stage));
                let Some(StageInput::Source(stream)) = stage.map(|s| &s.input) else {
                    return Err(ExecError::invalid(format!(
                        "source stage {} does not exist",
                        spec.stage
                    )));
                };
                let source: Arc<dyn Source> = match open_generator(stream)? {
                    Some(generator) => Arc::new(GeneratedPartition {
                        generator,
                        partition: spec.partition,
                        read: stage.and_then(|s| s.source_columns_read()).map(Arc::from),
                    }),
                    None => Arc::new(LogRange {
                        data: self.shared.data.clone(),
                        query: qid,
                        stage: spec.stage,
                        partition: spec.partition,
                    }),
                };
                if adopting {
                    self.shared
                        .counters
                        .partitions_adopted
                        .fetch_add(1, Ordering::Relaxed);
                }
                wq.maps.insert(
                    key,
                    MapState {
                        source,
                        read: ReadAhead::default(),
                        last_batch: restored_batch,
                        next_offset: start,
                        chain: ChainState {
                            window: WindowAssignExec {
                                max_event_us: spec.max_event_us,
                            },
                            joins: Vec::new(),
                        },
                    },
                );
            }
            let last = wq.maps.get(&key).and_then(|m| m.last_batch);
            for (b, at) in &batches {
                if last.is_none_or(|l| *b > l) {
                    wq.pending_maps.insert((*b, spec.stage, p), *at);
                    tasks += 1;
                }
            }
        }
        // A reduce partition is that partition of every shuffle stage.
        let shuffle_stages: Vec<u32> = wq
            .graph
            .stages
            .iter()
            .filter(|s| matches!(s.input, StageInput::Shuffle(_)))
            .map(|s| s.id.0)
            .collect();
        for (stage, r) in shuffle_stages.iter().flat_map(|s| {
            req.reduce_tasks
                .iter()
                .map(move |r| (*s, ReducePartition(*r)))
        }) {
            if !wq.reduces.contains_key(&(stage, r)) {
                let Some(operator) = wq
                    .graph
                    .stage(GraphStage(stage))
                    .and_then(|s| s.operators.first())
                    .map(stateful_operator)
                    .transpose()?
                    .flatten()
                else {
                    return Err(ExecError::invalid(format!(
                        "shuffle stage {stage} does not start with a stateful operator"
                    )));
                };
                let mut operator = operator;
                if let Some(ttl) = wq.graph.state_ttl_batches {
                    operator.set_state_ttl(ttl);
                }
                let work = ReduceWork {
                    operator,
                    chain: ChainState::default(),
                };
                // A reduce partition (all its stages) is adopted once.
                if adopting && shuffle_stages.first() == Some(&stage) {
                    self.shared
                        .counters
                        .partitions_adopted
                        .fetch_add(1, Ordering::Relaxed);
                }
                let mut last_batch = None;
                if let Some(restore) = &req.restore {
                    // Loaded off this thread; the partition's tasks wait
                    // until its state is restored (`restored`).
                    last_batch = Some(restore.batch);
                    let paths = restore_paths(restore, GraphStage(stage), r, wq.reduce_partitions);
                    wq.restoring.insert((stage, r.0));
                    let inbox = self.shared.inbox.lock().clone();
                    let data = self.shared.data.clone();
                    let done = Restored {
                        query: qid,
                        incarnation: wq.incarnation,
                        stage,
                        partition: r,
                        restore: restore.clone(),
                        partitions: wq.reduce_partitions,
                        result: Ok(Vec::new()),
                    };
                    self.shared.handle.spawn(async move {
                        let result = load_restore(data, qid, paths).await;
                        let _ = inbox.send(Msg::Restored(Box::new(Restored { result, ..done })));
                    });
                }
                wq.reduces.insert(
                    (stage, r),
                    ReduceState {
                        work: Some(Box::new(work)),
                        last_batch,
                    },
                );
            }
            let last = wq.reduces.get(&(stage, r)).and_then(|s| s.last_batch);
            let inputs = wq.inputs_of(stage).to_vec();
            for (b, (at, _)) in &batches {
                if last.is_some_and(|l| *b <= l) {
                    continue;
                }
                tasks += 1;
                let entry = wq.pending_reduces.entry((*b, stage, r)).or_default();
                entry.trigger = Some(*at);
                if mode == SchedulingMode::Drizzle {
                    // Pre-scheduled: runnable once every notice is in.
                    entry.launched = true;
                    if entry.announced(&inputs) {
                        self.shared
                            .counters
                            .reduces_started_by_notices
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if tasks > 0 {
            if let Some((first, _)) = batches.first() {
                wq.group_starts.insert(*first, req.group);
            }
            if let Some((last, _)) = batches.last() {
                wq.group_ends.insert(req.group, (*last, req.checkpoint));
                wq.delta_bases.insert(req.group, req.delta_base);
            }
            wq.groups.insert(
                req.group,
                GroupProgress {
                    left: tasks,
                    tasks: tasks as u64,
                    ranges: Vec::new(),
                    maps: Vec::new(),
                },
            );
        }
        if continued {
            // Reduce partitions restored elsewhere need this worker's map
            // outputs of every batch since the checkpoint: announce them again
            // to every consumer (a consumer past a batch ignores its notice).
            let mut targets = wq.reduce_placement.clone();
            targets.sort();
            targets.dedup();
            let again: Vec<pb::MapOutputReady> = wq
                .produced
                .values()
                .map(|n| pb::MapOutputReady {
                    attempt: req.attempt,
                    ..n.clone()
                })
                .collect();
            for n in again {
                for t in &targets {
                    self.send_notice(t, n.clone())?;
                }
            }
        }
        if let Some(early) = self.early.remove(&qid) {
            for n in early {
                // Older generations' notices are dropped by add_notice;
                // newer attempts' wait in `early` again.
                self.add_notice(n);
            }
        }
        Ok(())
    }

    /// Sends a notice to the consumer worker at `target` (this worker's own
    /// consumers get it directly).
    pub(super) fn send_notice(&mut self, target: &str, notice: pb::MapOutputReady) -> Result<()> {
        self.shared
            .counters
            .notices_sent
            .fetch_add(1, Ordering::Relaxed);
        if target == self.shared.address {
            self.shared
                .counters
                .notices_received
                .fetch_add(1, Ordering::Relaxed);
            self.add_notice(notice);
            Ok(())
        } else {
            self.shared.notify(target, notice)
        }
    }

    /// The next runnable task, or how long to wait (None = until a message).
    pub(super) fn next_task(&self, now: Instant) -> std::result::Result<Task, Option<Instant>> {
        if self.running >= self.slots.size {
            return Err(None); // every slot is busy: a task coming back wakes us
        }
        let mut best: Option<(Instant, u8, Task)> = None;
        let mut wake: Option<Instant> = None;
        for (qid, wq) in &self.queries {
            // Ready consumers: launched, every input's notices in, and the
            // partition's previous batch done (notices of later batches can
            // overtake earlier ones on the network; reduce state must see
            // batches in order).
            if let Some(((b, stage, r), p)) = wq.next_reduce() {
                let at = p.trigger.unwrap_or(now);
                if best.as_ref().is_none_or(|(t, k, _)| (at, 0) < (*t, *k)) {
                    best = Some((at, 0, Task::Reduce(*qid, *b, *stage, *r)));
                }
            }
            // Due producers whose rows are in (reads start ahead, see
            // `start_reads`; a finished read sends a message, so a read in
            // flight needs no timer).
            let mut map: Option<(Instant, Task)> = None;
            for ((b, s, p), (at, _)) in &wq.pending_maps {
                if wq.busy.contains(&(*s, p.0)) {
                    continue; // its previous batch is on a slot
                }
                if !wq.tables_in(*s) {
                    continue; // its lookup tables are still being read
                }
                let read = wq.has_read(*b, *s, *p);
                if *at <= now {
                    if read {
                        map = Some((*at, Task::Map(*qid, *b, *s, *p)));
                        break;
                    }
                    continue;
                }
                if read {
                    wake = Some(wake.map_or(*at, |w: Instant| w.min(*at)));
                    continue;
                }
                if let Some(start) = at.checked_sub(READ_AHEAD).filter(|t| *t > now) {
                    // Not yet within the read horizon: nor is anything after it.
                    wake = Some(wake.map_or(start, |w: Instant| w.min(start)));
                    break;
                }
            }
            if let Some((at, task)) = map {
                if best.as_ref().is_none_or(|(t, k, _)| (at, 1) < (*t, *k)) {
                    best = Some((at, 1, task));
                }
            }
        }
        match best {
            Some((_, _, t)) => Ok(t),
            None => Err(wake),
        }
    }

    pub(super) fn fail(&mut self, qid: QueryId, batch: BatchId, e: ExecError) {
        tracing::warn!(query = %qid, batch = batch.0, "task failed: {e}");
        let (code, message) = (self.shared.classify)(e);
        let output = pb::TaskOutput {
            query: qid.0,
            batch: batch.0,
            error: Some(message),
            error_code: code,
            attempt: self.queries.get(&qid).map_or(0, |wq| wq.attempt),
            ..Default::default()
        };
        self.shared.event(pb::worker_event::Event::Output(output));
        self.queries.remove(&qid);
        self.shared.table_caches.lock().remove(&qid);
        self.shared.store.drop_query(qid);
    }

    pub(super) fn run_task(&mut self, task: Task) {
        let (qid, b) = match &task {
            Task::Map(q, b, _, _) | Task::Reduce(q, b, _, _) => (*q, *b),
        };
        // A panic in an operator fails the query, never the worker.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match task {
            Task::Map(q, b, s, p) => self.run_map(q, b, s, p),
            Task::Reduce(q, b, stage, r) => self.run_reduce(q, b, stage, r).map(|()| true),
        }))
        .unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(query = %qid, batch = b, "task panicked: {message}");
            Err(ExecError::Unavailable {
                message: format!("a task of query {qid} failed internally: {message}"),
            })
        });
        if let Err(e) = result {
            self.fail(qid, BatchId(b), e);
        }
        // (a task handed to a slot is done when it is back: `computed`)
    }

    /// One of this worker's tasks of batch `b` is done: the group's report
    /// once it was the group's last here.
    pub(super) fn task_done(&mut self, qid: QueryId, b: u64) {
        let Some(wq) = self.queries.get_mut(&qid) else {
            return;
        };
        // Per-group report once all of this worker's tasks of the group are done.
        let group = group_of(&wq.group_starts, b);
        let Some(progress) = wq.groups.get_mut(&group) else {
            return;
        };
        progress.left = progress.left.saturating_sub(1);
        if progress.left > 0 {
            return;
        }
        let progress = wq.groups.remove(&group).unwrap_or_default();
        wq.group_starts.retain(|_, g| *g != group);
        wq.group_ends.remove(&group);
        wq.delta_bases.remove(&group);
        tracing::debug!(query = %qid, group, "group report");
        let report = pb::GroupReport {
            attempt: wq.attempt,
            maps: progress.maps,
            query: qid.0,
            group,
            worker: self.shared.worker_id(),
            epoch: self.shared.identity.lock().1,
            ranges: progress.ranges,
            rows_in: std::mem::take(&mut wq.rows_in),
            late_rows: std::mem::take(&mut wq.late_rows),
            tasks: progress.tasks,
            operators: operator_stats(std::mem::take(&mut wq.stats)),
            stages: stage_gauges(&wq.gauges),
        };
        self.shared
            .event(pb::worker_event::Event::GroupReport(report));
    }
}

/// Whether `notice` is valid for a query at `generation` whose partitions
/// are owned as `owners` says (worker ids per stage, by partition; empty:
/// any owner).
pub(super) fn accepts_notice(
    notice: &pb::MapOutputReady,
    generation: u64,
    owners: &[Vec<u32>],
) -> bool {
    if notice.attempt < generation {
        return false;
    }
    if owners.is_empty() {
        return true;
    }
    owners
        .get(notice.stage as usize)
        .and_then(|o| o.get(notice.map as usize))
        == Some(&notice.worker)
}

/// Owners per stage: source stages take their partitions' owners from
/// `map_owners` in order (`sources[i]` partitions in the i-th source stage),
/// shuffle stages (`kinds[s]` = 1) all have `reduce_owners`. No owners at
/// all (a plan fresh from an old coordinator) means any.
pub(super) fn owners_by_stage(
    map_owners: &[u32],
    sources: &[u32],
    reduce_owners: &[u32],
    kinds: &[u8],
) -> Vec<Vec<u32>> {
    if map_owners.is_empty() {
        return Vec::new();
    }
    let mut next = 0usize;
    let mut source = 0usize;
    kinds
        .iter()
        .map(|kind| {
            if *kind == 1 {
                return reduce_owners.to_vec();
            }
            let n = sources.get(source).copied().unwrap_or(0) as usize;
            source += 1;
            let owned = map_owners.get(next..next + n).unwrap_or_default().to_vec();
            next += n;
            owned
        })
        .collect()
}

/// The watermark a reduce task may act on: per input, the minimum over the
/// map partitions that have seen rows; over inputs, the minimum, and none
/// until every input has one (a join must not close a window before the
/// other side has spoken).
pub(super) fn watermark_of(notices: &[pb::MapOutputReady], inputs: &[(u32, u32)]) -> Option<i64> {
    let mut overall: Option<i64> = None;
    for &(stage, _) in inputs {
        let w = notices
            .iter()
            .filter(|n| n.stage == stage)
            .filter_map(|n| n.watermark_us)
            .min()?;
        overall = Some(overall.map_or(w, |o| o.min(w)));
    }
    overall
}

/// A report's operator figures: per stage, its input (`step` =
/// [`INPUT_STEP`]) and each step of its chain, since the last report.
fn operator_stats(stats: BTreeMap<u32, StageStats>) -> Vec<pb::OperatorStats> {
    let mut out = Vec::new();
    for (stage, s) in stats {
        let one = |step: u32, st: &StepStats, tasks: u64| pb::OperatorStats {
            stage,
            step,
            rows_in: st.rows_in,
            rows_out: st.rows_out,
            time_us: st.time_ns / 1000,
            tasks,
        };
        out.push(one(INPUT_STEP, &s.input, s.tasks));
        for (i, st) in s.steps.iter().enumerate() {
            out.push(one(i as u32, st, 0));
        }
    }
    out
}

/// A report's gauges: per stage, the state its partitions on this worker
/// hold and the lowest watermark they acted on.
fn stage_gauges(gauges: &BTreeMap<(u32, u32), Gauge>) -> Vec<pb::StageGauge> {
    let mut out: Vec<pb::StageGauge> = Vec::new();
    for (&(stage, _), g) in gauges {
        if out.last().is_none_or(|o| o.stage != stage) {
            out.push(pb::StageGauge {
                stage,
                state_bytes: 0,
                state_keys: 0,
                watermark_us: g.watermark_us,
            });
        }
        if let Some(o) = out.last_mut() {
            o.state_bytes += g.state.bytes;
            o.state_keys += g.state.keys;
            o.watermark_us = match (o.watermark_us, g.watermark_us) {
                (Some(a), Some(b)) => Some(a.min(b)),
                _ => None,
            };
        }
    }
    out
}
