//! One query's coordination as a state machine without I/O: [`QueryMachine`].
//!
//! The machine decides everything the coordinator decides for a query:
//! where each partition runs in an attempt, what each group's launches
//! carry, when the next group ships, when a checkpoint is asked for and when
//! it is complete, BSP's barriers, and how an attempt ends: a lost worker
//! (lost-work recovery or a rollback), a rebalance at a checkpoint, or the
//! query's end. It sends nothing, reads no clock and spawns nothing: its
//! driver ([`super::attempt`]) feeds it [`Event`]s with the current time and
//! performs the [`Action`]s it returns, and the membership it sees comes
//! through the [`Cluster`] trait. Unit tests drive it the same way with
//! virtual workers and virtual time, recovery sequences included.
//!
//! Its lifecycle is [`Phase`]:
//!
//! ```text
//!            ┌──────────────── rebalance: closing checkpoint written ───────────────┐
//!            ▼                                                                      │
//!  Placing ──▶ Running ──(membership or parallelism changed)──▶ Rebalancing ────────┘
//!   ▲   ▲        │  ▲ checkpoint group asked ─▶ checkpointing ─▶ written
//!   │   │        └─ worker lost ─▶ Recovering (lost work: survivors keep theirs)
//!   │   └───────────────────────────────┘  or Placing after a rollback
//!   └ no live worker yet                    any phase ── cancelled ──▶ Ended
//! ```

use super::*;

/// How often a running attempt looks at membership (lost, draining or new
/// workers) when nothing told it that membership changed.
const MEMBERSHIP_CHECK: Duration = Duration::from_millis(20);

/// The longest the machine waits without an event before it looks again.
const IDLE_WAKE: Duration = Duration::from_millis(50);

/// A registered worker as the machine sees it.
#[derive(Debug, Clone)]
pub(super) struct Member {
    pub(super) id: WorkerId,
    pub(super) epoch: u64,
    pub(super) address: String,
    /// Asked to stop: no new placements.
    pub(super) draining: bool,
    /// Still heartbeats.
    pub(super) live: bool,
}

/// The cluster as a query's coordination sees it: the registered workers.
pub(super) trait Cluster {
    /// Every registered worker, by id.
    fn members(&self) -> Vec<Member>;
    /// One registered worker.
    fn member(&self, id: WorkerId) -> Option<Member>;
    /// Registered workers that are not draining.
    fn active(&self) -> usize;
    /// Declares a worker incarnation lost: it is forgotten (if alive, it
    /// registers again as a new worker).
    fn forget(&self, id: WorkerId, epoch: u64, why: &str);
    /// The lookup tables' version, for launches.
    fn tables_version(&self) -> u64;
}

/// The coordinator's settings a query's machine uses.
#[derive(Debug, Clone)]
pub(super) struct MachineConfig {
    /// A checkpoint store is configured.
    pub(super) checkpoints: bool,
    pub(super) checkpoint_interval: Duration,
    pub(super) adaptive: AdaptiveGroupSize,
    /// How long a query waits for a first worker to register.
    pub(super) worker_wait: Duration,
    /// Where workers register (for the error when none does).
    pub(super) cluster_address: String,
}

/// What happened, for the machine.
#[derive(Debug)]
pub(super) enum Event {
    /// Time passed (a wake-up the machine asked for, or any other).
    Tick,
    /// The collector released every batch below this one.
    Released(u64),
    /// Workers registered, were lost or started draining.
    MembershipChanged,
    /// BSP: a producer's output is ready.
    MapOutputReady(pb::MapOutputReady),
    /// The answer to [`Action::Launch`]: the launches that failed.
    Launched { failed: Vec<(Placed, String)> },
    /// The answer to [`Action::LaunchReduces`]: the first failure.
    ReducesLaunched { failed: Option<String> },
    /// The answer to [`Action::WriteCheckpoint`].
    CheckpointWritten(std::result::Result<Manifest, String>),
    /// The query was cancelled (its client went away, or it ended).
    Cancelled,
}

/// What the driver must do for the machine. Launches and checkpoint writes
/// are answered with an [`Event`] before the machine is stepped again by
/// anything else; the machine emits nothing after one in the same step.
#[derive(Debug)]
pub(super) enum Action {
    /// The workers an attempt placed the query on (the data endpoint lets
    /// only them read its inputs).
    Place(Vec<WorkerId>),
    /// One group's launches, one per worker that runs a task of it.
    Launch(Vec<(Placed, pb::LaunchGroupRequest)>),
    /// BSP: the tasks of a batch's consuming stage, after its barrier.
    LaunchReduces(Vec<(Placed, pb::LaunchReduceRequest)>),
    /// Tell these workers to drop the query's `attempt` and older ones
    /// (0: every attempt), in the background.
    Cancel { workers: Vec<Placed>, attempt: u64 },
    /// Write this complete checkpoint's manifest.
    WriteCheckpoint(Manifest),
    /// The query's coordination ended.
    End(Result<()>),
}

/// Where a query's coordination is.
pub(super) enum Phase {
    /// Between attempts: the next one is placed afresh once `not_before`
    /// passed and a worker is live. `after_loss`: the last attempt lost a
    /// worker and rolls back to the last checkpoint.
    Placing {
        after_loss: bool,
        not_before: Instant,
        /// When the wait for a first registered worker started.
        since: Instant,
    },
    /// Lost-work recovery: the next attempt continues the generation from
    /// what the last one launched; the survivors keep their partitions.
    Recovering {
        carry: Carry,
        not_before: Instant,
        since: Instant,
    },
    /// An attempt runs: groups ship about one group ahead of the released
    /// batches; checkpoint groups are asked for every checkpoint interval.
    Running(Box<Attempt>),
    /// The attempt's closing checkpoint group (through batch `closing`) is
    /// launched because membership or the parallelism changed: no more
    /// groups; once that checkpoint is written, a new generation starts
    /// from it with the new placement.
    Rebalancing { attempt: Box<Attempt>, closing: u64 },
    /// Coordination ended.
    Ended,
}

impl Phase {
    /// The phase's name, as logs and tests show it.
    pub(super) fn name(&self) -> &'static str {
        match self {
            Phase::Placing { .. } => "placing",
            Phase::Recovering { .. } => "recovering",
            Phase::Running(a) if a.checkpointing() => "checkpointing",
            Phase::Running(_) => "running",
            Phase::Rebalancing { .. } => "rebalancing",
            Phase::Ended => "ended",
        }
    }
}

/// What the machine waits for before it takes another decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Awaiting {
    Nothing,
    Launch,
    Reduces,
    Checkpoint,
}

/// One attempt: its frozen placement and how far it launched.
pub(super) struct Attempt {
    number: u64,
    generation: u64,
    layout: Layout,
    /// The first batch the attempt runs (after its checkpoint).
    first_batch: u64,
    /// The first batch not launched yet.
    next_batch: u64,
    /// Groups launched.
    group: u64,
    started: Instant,
    /// Whether each slot got the plan (its first launch).
    plan_sent: Vec<bool>,
    /// Each slot's map tasks (stage, partition) and reduce partitions:
    /// listed once per attempt, so a group's launches cost O(workers).
    slot_maps: Vec<Vec<(usize, u32)>>,
    slot_reduces: Vec<Vec<u32>>,
    reduce_placement: Vec<String>,
    map_owners: Vec<u32>,
    reduce_owners: Vec<u32>,
    restore: Option<pb::Restore>,
    /// Where each map partition starts: (stage, partition) → (offset, max event).
    starts: HashMap<(usize, u32), (u64, Option<i64>)>,
    mode: SchedulingMode,
    /// BSP: notices per batch, collected by the coordinator.
    barrier: ShuffleBarrier,
    /// Slots that run reduce partitions.
    reduce_workers: Vec<usize>,
    last_boundary: Option<Instant>,
    /// Coordination time since the last boundary (adaptive group size).
    coordinated: Duration,
    last_checkpoint_at: Instant,
    /// A checkpoint group was launched and its checkpoint is not written.
    checkpoint_asked: Option<u64>,
    membership_changed: bool,
    last_membership_check: Instant,
    /// The group being launched: when its planning started, its size,
    /// whether it closes the attempt, and its launch messages.
    launching: Option<(Instant, u64, bool, u64)>,
    /// When the BSP launch of a consuming stage started.
    reducing: Option<Instant>,
}

impl Attempt {
    fn checkpointing(&self) -> bool {
        self.checkpoint_asked.is_some()
    }
}

/// One query's coordination; see the module docs.
pub(super) struct QueryMachine {
    query: Arc<CompiledQuery>,
    config: MachineConfig,
    phase: Phase,
    awaiting: Awaiting,
    /// Workers that may hold the query: told to drop it when it ends.
    placed: Vec<Placed>,
    /// Attempts that fail at once back off (10 ms doubling to 1 s), so a
    /// cluster in flux is never spun on.
    backoff: Duration,
    /// Batches below this were released by the collector.
    released: u64,
    cancelled: bool,
    /// A failed checkpoint write is tried again from then on.
    checkpoint_retry_at: Option<Instant>,
    /// BSP notices that came while the machine awaited an answer.
    deferred: std::collections::VecDeque<pb::MapOutputReady>,
}

impl QueryMachine {
    pub(super) fn new(query: Arc<CompiledQuery>, config: MachineConfig, now: Instant) -> Self {
        let released = query.released.load(Ordering::Acquire);
        Self {
            query,
            config,
            phase: Phase::Placing {
                after_loss: false,
                not_before: now,
                since: now,
            },
            awaiting: Awaiting::Nothing,
            placed: Vec::new(),
            backoff: Duration::ZERO,
            released,
            cancelled: false,
            checkpoint_retry_at: None,
            deferred: std::collections::VecDeque::new(),
        }
    }

    pub(super) fn phase(&self) -> &Phase {
        &self.phase
    }

    /// When the machine wants a [`Event::Tick`] without any other event.
    pub(super) fn wake_at(&self, now: Instant) -> Instant {
        match &self.phase {
            Phase::Placing {
                not_before, since, ..
            }
            | Phase::Recovering {
                not_before, since, ..
            } => {
                if *not_before > now {
                    *not_before
                } else {
                    // Waiting for a worker to register.
                    (now + Duration::from_millis(200)).min(*since + self.config.worker_wait)
                }
            }
            Phase::Running(a) | Phase::Rebalancing { attempt: a, .. } => {
                let mut at = now + IDLE_WAKE;
                if a.membership_changed || !self.deferred.is_empty() {
                    at = now;
                }
                if let Some(retry) = self.checkpoint_retry_at {
                    at = at.min(retry.max(now));
                }
                at
            }
            Phase::Ended => now + Duration::from_secs(3600),
        }
    }

    /// Takes in an event and returns what to do, in order.
    pub(super) fn step(
        &mut self,
        now: Instant,
        event: Event,
        cluster: &dyn Cluster,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Tick => {}
            Event::Released(n) => self.released = self.released.max(n),
            Event::MembershipChanged => {
                if let Phase::Running(a) | Phase::Rebalancing { attempt: a, .. } = &mut self.phase {
                    a.membership_changed = true;
                }
            }
            Event::Cancelled => self.cancelled = true,
            Event::MapOutputReady(notice) => self.on_notice(now, notice, &mut out),
            Event::Launched { failed } => self.on_launched(now, failed, cluster, &mut out),
            Event::ReducesLaunched { failed } => self.on_reduces_launched(now, failed, &mut out),
            Event::CheckpointWritten(r) => self.on_checkpoint_written(now, r),
        }
        self.drive(now, cluster, &mut out);
        out
    }

    /// Takes every decision that is due, until the machine must wait.
    fn drive(&mut self, now: Instant, cluster: &dyn Cluster, out: &mut Vec<Action>) {
        loop {
            if self.awaiting != Awaiting::Nothing || matches!(self.phase, Phase::Ended) {
                return;
            }
            if self.cancelled {
                self.end(Ok(()), out);
                return;
            }
            if let Some(notice) = self.deferred.pop_front() {
                self.on_notice(now, notice, out);
                continue;
            }
            let progressed = match self.phase {
                Phase::Placing { .. } | Phase::Recovering { .. } => self.place(now, cluster, out),
                Phase::Running(_) | Phase::Rebalancing { .. } => self.run(now, cluster, out),
                Phase::Ended => false,
            };
            if !progressed {
                return;
            }
        }
    }

    /// Ends coordination: every worker that may hold the query drops it.
    fn end(&mut self, result: Result<()>, out: &mut Vec<Action>) {
        self.phase = Phase::Ended;
        out.push(Action::Cancel {
            workers: std::mem::take(&mut self.placed),
            attempt: 0,
        });
        out.push(Action::End(result));
    }

    /// Placing or Recovering: starts the next attempt when it may. Returns
    /// whether the phase changed.
    fn place(&mut self, now: Instant, cluster: &dyn Cluster, out: &mut Vec<Action>) -> bool {
        let (not_before, since) = match &self.phase {
            Phase::Placing {
                not_before, since, ..
            }
            | Phase::Recovering {
                not_before, since, ..
            } => (*not_before, *since),
            _ => return false,
        };
        if now < not_before {
            return false;
        }
        let members = cluster.members();
        if members.is_empty() {
            if now.saturating_duration_since(since) >= self.config.worker_wait {
                let address = &self.config.cluster_address;
                self.end(
                    Err(ExecError::Unavailable {
                        message: format!(
                            "no worker registered with the coordinator at {address} within {} s; start one with `drizzle worker --coordinator {address}`",
                            self.config.worker_wait.as_secs(),
                        ),
                    }),
                    out,
                );
                return true;
            }
            return false;
        }
        let query = Arc::clone(&self.query);
        let phase = std::mem::replace(&mut self.phase, Phase::Ended);
        let attempt = query.status.attempt.fetch_add(1, Ordering::AcqRel) + 1;
        let start = match phase {
            Phase::Recovering { carry, .. } => self.continue_from(carry, attempt, cluster, out),
            Phase::Placing { after_loss, .. } => Start::Fresh { after_loss },
            _ => Start::Fresh { after_loss: false },
        };
        match self.start_attempt(now, attempt, start, &members) {
            Ok(a) => {
                self.placed = a.layout.workers.clone();
                out.push(Action::Place(
                    a.layout.workers.iter().map(|p| p.id).collect(),
                ));
                self.phase = Phase::Running(Box::new(a));
            }
            Err(after_loss) => {
                // Every worker is draining: wait for one to come.
                self.phase = Phase::Placing {
                    after_loss,
                    not_before: now + IDLE_WAKE,
                    since: now,
                };
            }
        }
        true
    }

    /// Plans lost-work recovery from what the last attempt launched: its
    /// live workers keep their partitions, the lost workers' partitions move
    /// to the least loaded live ones that are not draining. A fresh start
    /// when none may take them.
    fn continue_from(
        &mut self,
        carry: Carry,
        attempt: u64,
        cluster: &dyn Cluster,
        out: &mut Vec<Action>,
    ) -> Start {
        let (keep, take): (Vec<bool>, Vec<bool>) = carry
            .layout
            .workers
            .iter()
            .map(|p| match cluster.member(p.id) {
                Some(w) if w.epoch == p.epoch && w.live => (true, !w.draining),
                _ => (false, false),
            })
            .unzip();
        // A lost worker that is merely cut off drops the query when it hears.
        let gone: Vec<Placed> = carry
            .layout
            .workers
            .iter()
            .zip(&keep)
            .filter(|(_, k)| !**k)
            .map(|(p, _)| p.clone())
            .collect();
        out.push(Action::Cancel {
            workers: gone,
            attempt: attempt - 1,
        });
        match carry.layout.after_loss(&keep, &take) {
            Some((layout, moved)) if !layout.workers.is_empty() => Start::Continue {
                layout,
                next_batch: carry.next_batch,
                moved,
            },
            _ => {
                // Nobody to continue on: every survivor drops the query.
                out.push(Action::Cancel {
                    workers: carry.layout.workers.clone(),
                    attempt: attempt - 1,
                });
                Start::Fresh { after_loss: true }
            }
        }
    }

    /// Places attempt `attempt`. `Err(after_loss)` when no worker may take
    /// a fresh start (every one is draining).
    fn start_attempt(
        &mut self,
        now: Instant,
        attempt: u64,
        start: Start,
        members: &[Member],
    ) -> std::result::Result<Attempt, bool> {
        let query = Arc::clone(&self.query);
        // A checkpoint an earlier attempt asked for never comes: this
        // attempt asks again at its first checkpoint group.
        *query.checkpoint_due.lock() = None;
        let resume = query.last_checkpoint.lock().clone();
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
        let (layout, next_batch) = match start {
            Start::Fresh { after_loss } => {
                recovering = after_loss;
                let workers: Vec<Placed> = members
                    .iter()
                    .filter(|w| !w.draining && w.live)
                    .map(|w| Placed {
                        id: w.id,
                        address: w.address.clone(),
                        epoch: w.epoch,
                    })
                    .collect();
                if workers.is_empty() {
                    return Err(after_loss);
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
        *query.owners.lock() = Owners::of(&layout);
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
        let placement = &layout.workers;
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
        let mut starts = HashMap::new();
        for (stage, n) in map_partitions.iter().enumerate() {
            for p in 0..*n {
                let from_checkpoint = resume.as_ref().and_then(|m| {
                    m.maps
                        .iter()
                        .find(|c| c.stage as usize == stage && c.partition == p)
                        .map(|c| (c.next_offset, c.max_event_us))
                });
                let start = from_checkpoint.unwrap_or_else(|| {
                    let offset = query
                        .inputs
                        .get(stage)
                        .and_then(|i| i.start_offsets.get(p as usize).copied())
                        .unwrap_or(0);
                    (offset, None)
                });
                starts.insert((stage, p), start);
            }
        }
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
        let reduce_workers: Vec<usize> = {
            let mut v = layout.reduces.clone();
            v.sort();
            v.dedup();
            v
        };
        let barrier = ShuffleBarrier::new(&query.graph, &map_partitions, reduce_partitions);
        Ok(Attempt {
            number: attempt,
            generation,
            plan_sent: vec![false; placement.len()],
            slot_maps,
            slot_reduces,
            reduce_placement,
            map_owners,
            reduce_owners,
            restore,
            starts,
            mode,
            barrier,
            reduce_workers,
            layout,
            first_batch,
            next_batch,
            group: 0,
            started: now,
            last_boundary: None,
            coordinated: Duration::ZERO,
            last_checkpoint_at: now,
            checkpoint_asked: None,
            membership_changed: false,
            last_membership_check: now,
            launching: None,
            reducing: None,
        })
    }

    /// Running or Rebalancing: writes complete checkpoints, watches
    /// membership and ships the next group when it is due. Returns whether
    /// the machine should look again at once.
    fn run(&mut self, now: Instant, cluster: &dyn Cluster, out: &mut Vec<Action>) -> bool {
        if self.checkpoint_retry_at.is_none_or(|at| now >= at) {
            self.checkpoint_retry_at = None;
            let attempt = match &self.phase {
                Phase::Running(a) | Phase::Rebalancing { attempt: a, .. } => a.number,
                _ => return false,
            };
            if let Some(manifest) = self.checkpoint_ready(attempt) {
                self.awaiting = Awaiting::Checkpoint;
                out.push(Action::WriteCheckpoint(manifest));
                return false;
            }
        }
        let written = self.query.last_checkpoint.lock().as_ref().map(|m| m.batch);
        if let Phase::Rebalancing { closing, .. } = &self.phase {
            if written.is_some_and(|b| b >= *closing) {
                self.rebalanced(now, out);
                return true;
            }
        }
        let checkpoints_on = self.config.checkpoints;
        let query = Arc::clone(&self.query);
        let (a, closing) = match &mut self.phase {
            Phase::Running(a) => (a, false),
            Phase::Rebalancing { attempt, .. } => (attempt, true),
            _ => return false,
        };
        if a.checkpoint_asked
            .is_some_and(|b| written.is_some_and(|w| w >= b))
        {
            a.checkpoint_asked = None;
        }
        let mut plan_now = false;
        if a.membership_changed
            || now.saturating_duration_since(a.last_membership_check) >= MEMBERSHIP_CHECK
        {
            a.membership_changed = false;
            a.last_membership_check = now;
            if let Some(lost) = lost_worker(&a.layout.workers, cluster) {
                let next = a.next_batch;
                self.worker_lost(now, lost, next, out);
                return true;
            }
            if !closing && checkpoints_on && needs_rebalance(&query, &a.layout.workers, cluster) {
                plan_now = true; // plan the closing group now
            }
        }
        if closing {
            return false;
        }
        // Drizzle ships the next group once the previous one is done and
        // this one is half way through the previous one's length: about
        // one group ahead, so a boundary never stalls the pipeline (with
        // G = 1 too). BSP waits for its batch: that barrier is BSP.
        let g = query.status.group_size.load(Ordering::Relaxed).max(1) as u64;
        let threshold = match query.scheduling {
            Scheduling::Bsp => a.next_batch,
            _ => a.next_batch.saturating_sub(g) + g / 2,
        };
        if a.group > 0 && !plan_now && self.released < threshold {
            return false;
        }
        // The placement is checked before every group.
        if let Some(lost) = lost_worker(&a.layout.workers, cluster) {
            let next = a.next_batch;
            self.worker_lost(now, lost, next, out);
            return true;
        }
        self.plan_group(now, cluster, out);
        false
    }

    /// Plans the attempt's next group and emits its launches.
    fn plan_group(&mut self, now: Instant, cluster: &dyn Cluster, out: &mut Vec<Action>) {
        let query = Arc::clone(&self.query);
        let config = &self.config;
        let Phase::Running(a) = &mut self.phase else {
            return;
        };
        if query.status.adaptive {
            // A group boundary: adapt to the last group's coordination share.
            if let Some(since) = a.last_boundary {
                let wall = now.saturating_duration_since(since).as_secs_f64();
                let share = a.coordinated.as_secs_f64() / wall.max(1e-9);
                let g = query.status.group_size.load(Ordering::Relaxed);
                query
                    .status
                    .group_size
                    .store(config.adaptive.next(g, share), Ordering::Relaxed);
            }
            a.last_boundary = Some(now);
            a.coordinated = Duration::ZERO;
        }
        let g = query.status.group_size.load(Ordering::Relaxed).max(1) as u64;
        let rebalance = config.checkpoints && needs_rebalance(&query, &a.layout.workers, cluster);
        let checkpoint = config.checkpoints
            && (rebalance
                || now.saturating_duration_since(a.last_checkpoint_at)
                    >= config.checkpoint_interval);
        if checkpoint {
            a.last_checkpoint_at = now;
            a.checkpoint_asked = Some(a.next_batch + g - 1);
            // Due once the group's last batch has triggered: from then on,
            // a checkpoint that does not come is late.
            let last = a.next_batch + g - 1;
            let trigger = query.trigger_at(BatchId(last));
            query.checkpoint_due.lock().get_or_insert(trigger.max(now));
        }
        // A recovery's first group also re-covers, for the partitions it
        // moved, every batch since the checkpoint (the survivors skip what
        // they already ran).
        let from = if a.group == 0 {
            a.first_batch
        } else {
            a.next_batch
        };
        // Map outputs are kept for lost-work recovery while checkpoints
        // keep releasing them; a checkpoint ten intervals late (after its
        // group's last batch triggered) means the store is failing.
        let stall = (config.checkpoint_interval * 10).max(Duration::from_secs(2));
        query.check_retention(stall, from, now);
        let retain_blocks = query.retaining.load(Ordering::Acquire);
        let batches = pb::BatchRange {
            first: from,
            count: a.next_batch + g - from,
            origin_unix_us: query.start_unix_us,
            interval_ns: query.interval.as_nanos() as u64,
        };
        let tables_version = cluster.tables_version();
        let covered_through = query.last_checkpoint.lock().as_ref().map(|m| m.batch);
        // A rebalance's closing checkpoint is written in full: the attempt
        // waits for it, so it must never depend on a base.
        let delta_base = if rebalance { None } else { query.delta_base() };
        let map_partitions = query.partitions(0);
        let reduce_partitions = a.layout.reduces.len() as u32;
        let shuffle_inputs: Vec<u32> = (0..query.inputs.len())
            .map(|s| query.partitions(s))
            .collect();
        let mut sends = Vec::new();
        for (i, placed) in a.layout.workers.iter().enumerate() {
            let first = !a.plan_sent[i];
            let map_tasks: Vec<pb::MapTaskSpec> = a.slot_maps[i]
                .iter()
                .map(|&(stage, p)| {
                    let (start, max_event) = if first {
                        a.starts.get(&(stage, p)).copied().unwrap_or((0, None))
                    } else {
                        (0, None)
                    };
                    pb::MapTaskSpec {
                        partition: p,
                        stage: stage as u32,
                        start_offset: first.then_some(start),
                        max_event_us: max_event,
                    }
                })
                .collect();
            let reduce_tasks = a.slot_reduces[i].clone();
            if map_tasks.is_empty() && reduce_tasks.is_empty() {
                continue;
            }
            let req = pb::LaunchGroupRequest {
                protocol_version: PROTOCOL_VERSION,
                query: query.id.0,
                group: a.group,
                epoch: placed.epoch,
                plan: if first {
                    query.encoded_plan.clone()
                } else {
                    Vec::new()
                },
                mode: a.mode as i32,
                map_partitions,
                reduce_partitions,
                // The layout travels in an attempt's first launch to each
                // worker; later ones leave it empty (unchanged), so they do
                // not grow with the cluster.
                reduce_placement: if first {
                    a.reduce_placement.clone()
                } else {
                    Vec::new()
                },
                map_tasks,
                reduce_tasks,
                batches: Some(batches),
                label: query.status.label.clone(),
                tables_version,
                shuffle_inputs: if reduce_partitions > 0 && first {
                    shuffle_inputs.clone()
                } else {
                    Vec::new()
                },
                attempt: a.number,
                checkpoint,
                restore: if first { a.restore.clone() } else { None },
                generation: a.generation,
                map_owners: if first {
                    a.map_owners.clone()
                } else {
                    Vec::new()
                },
                reduce_owners: if first {
                    a.reduce_owners.clone()
                } else {
                    Vec::new()
                },
                retain_blocks,
                covered_through,
                memory_limit: query.status.memory_limit,
                delta_base,
                query_token: query.token.0.to_vec(),
            };
            a.plan_sent[i] = true;
            sends.push((placed.clone(), req));
        }
        a.launching = Some((now, g, rebalance, sends.len() as u64));
        self.awaiting = Awaiting::Launch;
        out.push(Action::Launch(sends));
    }

    fn on_launched(
        &mut self,
        now: Instant,
        failed: Vec<(Placed, String)>,
        cluster: &dyn Cluster,
        out: &mut Vec<Action>,
    ) {
        if self.awaiting != Awaiting::Launch {
            return;
        }
        self.awaiting = Awaiting::Nothing;
        let query = Arc::clone(&self.query);
        let Phase::Running(a) = &mut self.phase else {
            return;
        };
        let Some((t0, g, rebalance, n)) = a.launching.take() else {
            return;
        };
        let mut lost = None;
        for (who, message) in failed {
            // A worker that cannot take its launch is gone (dead, cut off,
            // or registered again): forgotten, so that no attempt counts on
            // its state again.
            tracing::warn!(query = %query.id, "launch to worker {} ({}) failed: {message}", who.id.0, who.address);
            cluster.forget(who.id, who.epoch, "its launch failed");
            lost = Some(format!("{} ({})", who.id.0, who.address));
        }
        if let Some(who) = lost {
            // Survivors that took the launch hold its batches: a
            // continuation re-covers them.
            let next = a.next_batch + g;
            self.worker_lost(now, who, next, out);
            return;
        }
        query.status.launches.fetch_add(n, Ordering::Relaxed);
        query.status.groups.fetch_add(1, Ordering::Relaxed);
        let spent = now.saturating_duration_since(t0);
        a.coordinated += spent;
        query
            .status
            .coordination_us
            .fetch_add(spent.as_micros() as u64, Ordering::Relaxed);
        a.next_batch += g;
        a.group += 1;
        if rebalance {
            let closing = a.next_batch - 1;
            let Phase::Running(a) = std::mem::replace(&mut self.phase, Phase::Ended) else {
                return;
            };
            self.phase = Phase::Rebalancing {
                attempt: a,
                closing,
            };
        }
    }

    /// BSP: a producer's notice; the consuming stage's tasks of the batch
    /// start once all its producers reported (the worker tells the stage
    /// from the notices).
    fn on_notice(&mut self, now: Instant, notice: pb::MapOutputReady, out: &mut Vec<Action>) {
        let query = Arc::clone(&self.query);
        if self.awaiting != Awaiting::Nothing {
            self.deferred.push_back(notice);
            return;
        }
        let (Phase::Running(a) | Phase::Rebalancing { attempt: a, .. }) = &mut self.phase else {
            return;
        };
        if notice.attempt != a.number {
            return;
        }
        let Some((batch, _stage, notices)) = a.barrier.add(notice) else {
            return;
        };
        let sends = a
            .reduce_workers
            .iter()
            .map(|&i| {
                (
                    a.layout.workers[i].clone(),
                    pb::LaunchReduceRequest {
                        query: query.id.0,
                        batch,
                        notices: notices.clone(),
                    },
                )
            })
            .collect();
        a.reducing = Some(now);
        self.awaiting = Awaiting::Reduces;
        out.push(Action::LaunchReduces(sends));
    }

    fn on_reduces_launched(&mut self, now: Instant, failed: Option<String>, out: &mut Vec<Action>) {
        if self.awaiting != Awaiting::Reduces {
            return;
        }
        self.awaiting = Awaiting::Nothing;
        let query = Arc::clone(&self.query);
        let (Phase::Running(a) | Phase::Rebalancing { attempt: a, .. }) = &mut self.phase else {
            return;
        };
        if let Some(t0) = a.reducing.take() {
            let spent = now.saturating_duration_since(t0);
            a.coordinated += spent;
            query
                .status
                .coordination_us
                .fetch_add(spent.as_micros() as u64, Ordering::Relaxed);
        }
        if let Some(message) = failed {
            let next = a.next_batch;
            self.worker_lost(
                now,
                format!("(launching reduce tasks: {message})"),
                next,
                out,
            );
        }
    }

    /// The attempt lost a worker: lost-work recovery continues the
    /// generation from what it launched (through `next_batch`), a rollback
    /// drops it everywhere.
    fn worker_lost(&mut self, now: Instant, who: String, next_batch: u64, out: &mut Vec<Action>) {
        let query = Arc::clone(&self.query);
        let (Phase::Running(a) | Phase::Rebalancing { attempt: a, .. }) =
            std::mem::replace(&mut self.phase, Phase::Ended)
        else {
            return;
        };
        self.backoff = if now.saturating_duration_since(a.started) < Duration::from_secs(1) {
            (self.backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1))
        } else {
            Duration::ZERO
        };
        query.status.recoveries.fetch_add(1, Ordering::Relaxed);
        let from = query.last_checkpoint.lock().as_ref().map(|m| m.batch);
        let attempt = a.number;
        let not_before = now + self.backoff;
        if query.can_recover_lost_work() {
            tracing::warn!(query = %query.id, attempt, "worker {who} lost; re-running its work from checkpoint {from:?}");
            self.phase = Phase::Recovering {
                carry: Carry {
                    layout: a.layout,
                    next_batch,
                },
                not_before,
                since: not_before,
            };
        } else {
            tracing::warn!(query = %query.id, attempt, "worker {who} lost; rolling back to checkpoint {from:?}");
            // Every worker drops the attempt's state.
            out.push(Action::Cancel {
                workers: self.placed.clone(),
                attempt,
            });
            self.phase = Phase::Placing {
                after_loss: true,
                not_before,
                since: not_before,
            };
        }
    }

    /// The closing checkpoint of a rebalance is written: the attempt ends,
    /// and the next one starts from that checkpoint with the new placement.
    fn rebalanced(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Phase::Rebalancing { attempt: a, .. } =
            std::mem::replace(&mut self.phase, Phase::Ended)
        else {
            return;
        };
        tracing::info!(query = %self.query.id, attempt = a.number, "rebalancing at a group boundary");
        self.backoff = Duration::ZERO;
        out.push(Action::Cancel {
            workers: self.placed.clone(),
            attempt: a.number,
        });
        self.phase = Phase::Placing {
            after_loss: false,
            not_before: now,
            since: now,
        };
    }

    /// The latest checkpoint of `attempt` that is complete and whose
    /// batches the sink has committed, as a manifest to write.
    fn checkpoint_ready(&mut self, attempt: u64) -> Option<Manifest> {
        if !self.config.checkpoints {
            return None;
        }
        let query = &self.query;
        let committed = query.committed_through()?;
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
            return None;
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
            return None;
        };
        Some(Manifest {
            key: query.key.clone(),
            batch,
            origin_unix_us: query.start_unix_us,
            interval_us: query.interval.as_micros() as u64,
            reduce_partitions: reduces as u32,
            maps: map_states,
            states,
            last_emitted: Some(committed),
            created_unix_ms: unix_us() / 1000,
        })
    }

    fn on_checkpoint_written(
        &mut self,
        now: Instant,
        written: std::result::Result<Manifest, String>,
    ) {
        if self.awaiting != Awaiting::Checkpoint {
            return;
        }
        self.awaiting = Awaiting::Nothing;
        let query = &self.query;
        let manifest = match written {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(query = %query.id, "checkpoint not written: {e}");
                self.checkpoint_retry_at = Some(now + IDLE_WAKE);
                return;
            }
        };
        let batch = manifest.batch;
        query.pending_checkpoints.lock().retain(|b, _| *b > batch);
        if manifest.states.iter().all(|s| s.chain.is_empty()) {
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
    }
}

/// A worker of `placement` that is gone (deregistered or silent); it is
/// forgotten at once, so that the next attempt does not place on it.
fn lost_worker(placement: &[Placed], cluster: &dyn Cluster) -> Option<String> {
    let (id, epoch, who) = placement.iter().find_map(|p| match cluster.member(p.id) {
        Some(w) if w.epoch == p.epoch && w.live => None,
        _ => Some((p.id, p.epoch, format!("{} ({})", p.id.0, p.address))),
    })?;
    cluster.forget(id, epoch, "it went silent");
    Some(who)
}

/// At a boundary: should the next group close this attempt (a worker is
/// draining, a new one is idle, or the parallelism changed)?
fn needs_rebalance(query: &CompiledQuery, placement: &[Placed], cluster: &dyn Cluster) -> bool {
    let reduce_partitions = query.status.reduce_partitions.load(Ordering::Acquire);
    if query.plan.has_shuffle()
        && query.target_partitions.load(Ordering::Acquire) != reduce_partitions
    {
        return true;
    }
    cluster.active() != placement.len()
        || placement
            .iter()
            .any(|p| cluster.member(p.id).is_none_or(|w| w.draining))
}

#[cfg(test)]
mod tests {
    //! The machine driven by virtual workers and virtual time, as Ballista's
    //! `SchedulerTest` drives its scheduler: every launch, barrier,
    //! cancellation and checkpoint write is seen by the test, and a worker
    //! that is gone fails its launch as a real one would.

    use std::collections::{BTreeSet, HashSet, VecDeque};

    use super::super::simulate::{chain_spec, VirtualCluster};
    use super::*;

    /// A three-stage plan (source, shuffle, shuffle, sink) over `maps`
    /// source partitions.
    fn spec(maps: u32, reduces: u32, scheduling: Scheduling, group_size: u32) -> QuerySpec {
        chain_spec(maps, reduces, 3, scheduling, group_size).expect("a query")
    }

    /// The machine, its query, virtual workers and what they were sent.
    struct Harness {
        query: Arc<CompiledQuery>,
        machine: QueryMachine,
        cluster: VirtualCluster,
        now: Instant,
        _channels: QueryChannels,
        /// Launches each worker took, in order.
        launches: BTreeMap<u32, Vec<pb::LaunchGroupRequest>>,
        /// BSP: consuming-stage launches, per batch.
        barriers: BTreeMap<u64, u32>,
        cancels: Vec<(u32, u64)>,
        written: Vec<u64>,
        ended: Option<Result<()>>,
        /// Workers whose next launch fails (a network cut).
        refusing: HashSet<u32>,
        /// The checkpoint store fails every write.
        store_down: bool,
    }

    impl Harness {
        fn new(spec: QuerySpec, workers: u32, lost_work: bool, checkpoints: bool) -> Self {
            let (query, channels) = CompiledQuery::new(QueryId(1), spec, lost_work && checkpoints)
                .expect("query compiles");
            let now = Instant::now();
            let config = MachineConfig {
                checkpoints,
                checkpoint_interval: Duration::from_millis(100),
                adaptive: AdaptiveGroupSize::default(),
                worker_wait: Duration::from_secs(1),
                cluster_address: "127.0.0.1:1".into(),
            };
            let cluster = VirtualCluster::default();
            for id in 0..workers {
                cluster.join(id);
            }
            let mut h = Self {
                machine: QueryMachine::new(Arc::clone(&query), config, now),
                query,
                cluster,
                now,
                _channels: channels,
                launches: BTreeMap::new(),
                barriers: BTreeMap::new(),
                cancels: Vec::new(),
                written: Vec::new(),
                ended: None,
                refusing: HashSet::new(),
                store_down: false,
            };
            h.step(Event::Tick);
            h
        }

        fn step(&mut self, event: Event) {
            let mut queue: VecDeque<Action> =
                self.machine.step(self.now, event, &self.cluster).into();
            while let Some(action) = queue.pop_front() {
                let answer = match action {
                    Action::Place(_) => None,
                    Action::Launch(sends) => {
                        let mut failed = Vec::new();
                        for (placed, req) in sends {
                            let up = self.cluster.member(placed.id).is_some()
                                && !self.refusing.remove(&placed.id.0);
                            if up {
                                self.launches.entry(placed.id.0).or_default().push(req);
                            } else {
                                failed.push((placed, "unreachable".to_string()));
                            }
                        }
                        Some(Event::Launched { failed })
                    }
                    Action::LaunchReduces(sends) => {
                        for (_, req) in sends {
                            *self.barriers.entry(req.batch).or_default() += 1;
                        }
                        Some(Event::ReducesLaunched { failed: None })
                    }
                    Action::Cancel { workers, attempt } => {
                        self.cancels
                            .extend(workers.iter().map(|w| (w.id.0, attempt)));
                        None
                    }
                    Action::WriteCheckpoint(m) => {
                        if self.store_down {
                            Some(Event::CheckpointWritten(Err("store down".into())))
                        } else {
                            self.written.push(m.batch);
                            Some(Event::CheckpointWritten(Ok(m)))
                        }
                    }
                    Action::End(r) => {
                        self.ended = Some(r);
                        None
                    }
                };
                if let Some(answer) = answer {
                    queue.extend(self.machine.step(self.now, answer, &self.cluster));
                }
            }
        }

        fn advance(&mut self, by: Duration) {
            self.now += by;
            self.step(Event::Tick);
        }

        /// The collector released every batch below `n`.
        fn release(&mut self, n: u64) {
            self.query.released.store(n, Ordering::Release);
            self.step(Event::Released(n));
        }

        /// Every map partition of the current attempt reported its position
        /// after `batch` (a checkpoint group's last batch).
        fn report_checkpoint(&mut self, batch: u64) {
            let attempt = self.query.status.attempt.load(Ordering::Acquire);
            let mut pending = self.query.pending_checkpoints.lock();
            let entry = pending.entry(batch).or_default();
            entry.attempt = attempt;
            for p in 0..self.query.partitions(0) {
                entry.maps.push(MapCheckpoint {
                    stage: 0,
                    partition: p,
                    next_offset: batch + 1,
                    max_event_us: None,
                });
            }
        }

        fn phase(&self) -> &'static str {
            self.machine.phase().name()
        }

        fn launch_count(&self) -> usize {
            self.launches.values().map(Vec::len).sum()
        }

        /// The last launch each worker took.
        fn last(&self, worker: u32) -> &pb::LaunchGroupRequest {
            self.launches[&worker].last().expect("a launch")
        }

        /// Releases batches until the next group ships; returns its launches.
        fn next_group(&mut self) -> usize {
            let before = self.launch_count();
            let mut released = self.query.released.load(Ordering::Acquire);
            while self.launch_count() == before {
                released += 1;
                assert!(released < 100_000, "no group shipped");
                self.now += Duration::from_millis(10);
                self.release(released);
            }
            self.launch_count() - before
        }
    }

    fn batches(req: &pb::LaunchGroupRequest) -> (u64, u64) {
        let r = req.batches.as_ref().expect("a batch range");
        (r.first, r.first + r.count - 1)
    }

    fn reduces_of(h: &Harness, worker: u32, attempt: u64) -> BTreeSet<u32> {
        h.launches[&worker]
            .iter()
            .filter(|l| l.attempt == attempt)
            .flat_map(|l| l.reduce_tasks.iter().copied())
            .collect()
    }

    fn maps_of(h: &Harness, worker: u32, attempt: u64) -> BTreeSet<u32> {
        h.launches[&worker]
            .iter()
            .filter(|l| l.attempt == attempt)
            .flat_map(|l| l.map_tasks.iter().map(|m| m.partition))
            .collect()
    }

    #[test]
    fn drizzle_ships_one_launch_per_worker_per_group_and_nothing_inside_it() {
        let mut h = Harness::new(spec(4, 4, Scheduling::Drizzle, 10), 4, true, false);
        assert_eq!(h.phase(), "running");
        assert_eq!(h.launch_count(), 4, "group 0: one launch per worker");
        for w in 0..4 {
            let l = h.last(w);
            assert!(!l.plan.is_empty(), "the first launch carries the plan");
            assert_eq!(batches(l), (0, 9));
            assert_eq!(l.reduce_placement.len(), 4);
        }
        // Inside the group nothing is sent, whatever is released.
        for b in 1..5 {
            h.release(b);
            assert_eq!(h.launch_count(), 4, "nothing inside a group");
        }
        // Half way through the group, the next one ships: once per worker.
        for group in 1..20u64 {
            assert_eq!(h.next_group(), 4);
            for w in 0..4 {
                let l = h.last(w);
                assert_eq!(l.group, group);
                assert_eq!(batches(l), (group * 10, group * 10 + 9));
                assert!(l.plan.is_empty() && l.reduce_placement.is_empty());
            }
        }
        assert_eq!(h.launch_count(), 4 * 20);
        assert_eq!(h.query.status.launches.load(Ordering::Relaxed), 80);
        assert_eq!(h.query.status.groups.load(Ordering::Relaxed), 20);
        assert!(
            h.barriers.is_empty(),
            "no coordinator barrier in Drizzle mode"
        );
    }

    #[test]
    fn bsp_holds_a_barrier_at_every_shuffle_of_every_batch() {
        let mut h = Harness::new(spec(3, 2, Scheduling::Bsp, 1), 3, false, false);
        let attempt = h.query.status.attempt.load(Ordering::Acquire);
        for batch in 0..5u64 {
            assert_eq!(
                h.launch_count(),
                3 * (batch as usize + 1),
                "one group per batch"
            );
            // Stage 1 starts when all three source partitions reported,
            // stage 2 when both stage-1 partitions did.
            for (stage, maps) in [(0u32, 3u32), (1, 2)] {
                for map in 0..maps {
                    let before = h.barriers.get(&batch).copied().unwrap_or(0);
                    h.step(Event::MapOutputReady(pb::MapOutputReady {
                        stage,
                        map,
                        batch,
                        attempt,
                        ..Default::default()
                    }));
                    let after = h.barriers.get(&batch).copied().unwrap_or(0);
                    if map + 1 < maps {
                        assert_eq!(after, before, "the barrier waits for every producer");
                    } else {
                        // Reduce partitions 0 and 1 are on two workers.
                        assert_eq!(after, before + 2);
                    }
                }
            }
            // A notice of an older attempt is fenced.
            h.step(Event::MapOutputReady(pb::MapOutputReady {
                stage: 0,
                map: 0,
                batch: batch + 1,
                attempt: attempt + 7,
                ..Default::default()
            }));
            h.release(batch + 1);
        }
        assert_eq!(h.barriers.len(), 5);
        assert!(h.barriers.values().all(|&n| n == 4), "{:?}", h.barriers);
    }

    #[test]
    fn a_lost_worker_s_partitions_move_to_the_survivors_which_keep_theirs_twice() {
        let mut h = Harness::new(spec(3, 3, Scheduling::Drizzle, 10), 3, true, true);
        // Group 1 comes after a checkpoint interval: a checkpoint group.
        h.now += Duration::from_millis(100);
        h.next_group();
        assert!(h.last(0).checkpoint);
        assert_eq!(h.phase(), "checkpointing");
        h.report_checkpoint(19);
        h.release(20);
        assert_eq!(h.written, vec![19]);
        assert_ne!(h.phase(), "checkpointing");
        let launched_through = batches(h.last(0)).1;
        assert!(launched_through >= 29, "group 2 shipped meanwhile");
        // Worker 2 dies: its event stream ends and it is deregistered.
        h.cluster.kill(2);
        h.step(Event::MembershipChanged);
        assert_eq!(h.phase(), "recovering");
        h.advance(Duration::from_millis(10)); // the backoff
        assert_eq!(h.phase(), "running");
        assert_eq!(h.cancels, vec![(2, 1)], "the lost worker drops attempt 1");
        let s = &h.query.status;
        assert_eq!(s.attempt.load(Ordering::Relaxed), 2);
        assert_eq!(s.recoveries.load(Ordering::Relaxed), 1);
        assert_eq!(s.recovered_partitions.load(Ordering::Relaxed), 2);
        assert_eq!(
            h.query.generation.load(Ordering::Relaxed),
            1,
            "the generation goes on"
        );
        assert!(s.last_recovery.lock().as_deref().is_some_and(
            |r| r.starts_with("lost work: 2 of 6 partitions restored from checkpoint 19")
        ));
        // The survivors keep theirs and take the lost reduce and map
        // partition, one each; the recovery's group re-covers every batch
        // since the checkpoint.
        for w in [0, 1] {
            let l = h.last(w);
            assert_eq!(l.attempt, 2);
            assert_eq!(l.restore.as_ref().map(|r| r.batch), Some(19));
            assert_eq!(batches(l), (20, launched_through + 10));
            assert!(!l.plan.is_empty());
        }
        assert_eq!(reduces_of(&h, 0, 2), BTreeSet::from([0, 2]));
        assert_eq!(maps_of(&h, 0, 2), BTreeSet::from([0]));
        assert_eq!(reduces_of(&h, 1, 2), BTreeSet::from([1]));
        assert_eq!(maps_of(&h, 1, 2), BTreeSet::from([1, 2]));
        assert_eq!(h.launches[&2].iter().filter(|l| l.attempt == 2).count(), 0);
        // A second loss during the recovery: everything goes to worker 0.
        h.cluster.kill(1);
        h.step(Event::MembershipChanged);
        assert_eq!(h.phase(), "recovering");
        h.advance(Duration::from_millis(20)); // the backoff doubled
        assert_eq!(h.phase(), "running");
        assert_eq!(h.query.status.recoveries.load(Ordering::Relaxed), 2);
        assert_eq!(reduces_of(&h, 0, 3), BTreeSet::from([0, 1, 2]));
        assert_eq!(maps_of(&h, 0, 3), BTreeSet::from([0, 1, 2]));
        assert_eq!(h.last(0).restore.as_ref().map(|r| r.batch), Some(19));
        assert_eq!(batches(h.last(0)).0, 20);
        // And the last one: the query waits for a worker, then fails.
        h.cluster.kill(0);
        h.step(Event::MembershipChanged);
        h.advance(Duration::from_millis(50));
        assert!(h.ended.is_none(), "waits for a worker first");
        h.advance(Duration::from_secs(1));
        assert!(matches!(h.ended, Some(Err(ExecError::Unavailable { .. }))));
        assert_eq!(h.phase(), "ended");
    }

    #[test]
    fn without_lost_work_a_loss_rolls_every_partition_back_to_the_checkpoint() {
        let mut h = Harness::new(spec(3, 3, Scheduling::Drizzle, 10), 3, false, true);
        h.now += Duration::from_millis(100);
        h.next_group();
        h.report_checkpoint(19);
        h.release(20);
        assert_eq!(h.written, vec![19]);
        h.cluster.kill(1);
        h.step(Event::MembershipChanged);
        assert_eq!(h.phase(), "placing");
        // Every placed worker drops attempt 1.
        let mut cancelled: Vec<u32> = h.cancels.iter().map(|c| c.0).collect();
        cancelled.sort();
        assert_eq!(cancelled, vec![0, 1, 2]);
        h.advance(Duration::from_millis(10));
        assert_eq!(h.phase(), "running");
        assert_eq!(
            h.query.generation.load(Ordering::Relaxed),
            2,
            "a new generation"
        );
        assert_eq!(
            h.query.status.recovered_partitions.load(Ordering::Relaxed),
            6
        );
        let mut reduces = BTreeSet::new();
        for w in [0, 2] {
            let l = h.last(w);
            assert_eq!(l.attempt, 2);
            assert_eq!(l.restore.as_ref().map(|r| r.batch), Some(19));
            assert_eq!(batches(l).0, 20);
            reduces.extend(l.reduce_tasks.iter().copied());
        }
        assert_eq!(reduces, BTreeSet::from([0, 1, 2]));
    }

    #[test]
    fn a_new_worker_joins_at_a_closing_checkpoint_and_nothing_is_replayed() {
        let mut h = Harness::new(spec(4, 4, Scheduling::Drizzle, 10), 2, true, true);
        assert_eq!(h.launch_count(), 2);
        h.cluster.join(2);
        h.step(Event::MembershipChanged);
        // The closing group ships at once, as a full checkpoint group.
        assert_eq!(h.phase(), "rebalancing");
        assert_eq!(h.launch_count(), 4);
        let closing = h.last(0);
        assert!(closing.checkpoint && closing.delta_base.is_none());
        assert_eq!(batches(closing), (10, 19));
        // No group ships until the closing checkpoint is written.
        for b in 1..=20 {
            h.now += Duration::from_millis(10);
            h.release(b);
        }
        assert_eq!(h.launch_count(), 4);
        assert!(!h.launches.contains_key(&2));
        h.report_checkpoint(19);
        h.step(Event::Tick);
        assert_eq!(h.written, vec![19]);
        assert_eq!(h.phase(), "running");
        assert_eq!(h.cancels.len(), 2, "the old placement drops attempt 1");
        // The next attempt spreads the partitions over three workers and
        // starts after the checkpoint.
        let mut reduces = BTreeSet::new();
        for w in 0..3 {
            let l = h.last(w);
            assert_eq!(l.attempt, 2);
            assert_eq!(batches(l).0, 20);
            assert_eq!(l.restore.as_ref().map(|r| r.batch), Some(19));
            reduces.extend(l.reduce_tasks.iter().copied());
        }
        assert_eq!(reduces, BTreeSet::from([0, 1, 2, 3]));
        assert_eq!(h.query.status.recoveries.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_draining_worker_hands_its_partitions_over_at_a_closing_checkpoint() {
        let mut h = Harness::new(spec(3, 3, Scheduling::Drizzle, 10), 3, true, true);
        h.cluster.drain(1);
        h.step(Event::MembershipChanged);
        assert_eq!(h.phase(), "rebalancing");
        // The draining worker still runs the closing group: its state goes
        // into the closing checkpoint.
        assert!(h.last(1).checkpoint);
        assert_eq!(batches(h.last(1)), (10, 19));
        h.report_checkpoint(19);
        h.release(20);
        assert_eq!(h.phase(), "running");
        // It drops the query; the two others take every partition, from
        // the checkpoint, with nothing counted as a recovery.
        assert!(h.cancels.contains(&(1, 1)));
        assert_eq!(h.launches[&1].iter().filter(|l| l.attempt == 2).count(), 0);
        let mut reduces = BTreeSet::new();
        for w in [0, 2] {
            let l = h.last(w);
            assert_eq!((l.attempt, batches(l).0), (2, 20));
            assert_eq!(l.restore.as_ref().map(|r| r.batch), Some(19));
            reduces.extend(l.reduce_tasks.iter().copied());
        }
        assert_eq!(reduces, BTreeSet::from([0, 1, 2]));
        assert_eq!(h.query.status.recoveries.load(Ordering::Relaxed), 0);
        assert_eq!(
            h.query.status.recovered_partitions.load(Ordering::Relaxed),
            0
        );
    }

    #[test]
    fn a_parallelism_change_takes_effect_at_a_checkpoint() {
        let mut h = Harness::new(spec(2, 2, Scheduling::Drizzle, 10), 2, true, true);
        h.query.target_partitions.store(5, Ordering::Release);
        h.advance(Duration::from_millis(20));
        assert_eq!(h.phase(), "rebalancing");
        h.report_checkpoint(19);
        h.release(20);
        assert_eq!(h.phase(), "running");
        assert_eq!(h.query.status.reduce_partitions.load(Ordering::Relaxed), 5);
        assert_eq!(h.last(0).reduce_partitions, 5);
    }

    #[test]
    fn a_failed_launch_forgets_its_worker_and_the_survivors_recover_its_work() {
        let mut h = Harness::new(spec(2, 2, Scheduling::Drizzle, 10), 2, true, true);
        h.refusing.insert(1);
        h.next_group();
        assert_eq!(*h.cluster.forgotten.lock(), vec![WorkerId(1)]);
        assert_eq!(h.phase(), "recovering");
        h.advance(Duration::from_millis(10));
        // Worker 0 took group 1 before worker 1 failed: the recovery's
        // first group goes on after it, from the start (no checkpoint yet).
        let l = h.last(0);
        assert_eq!(l.attempt, 2);
        assert_eq!(batches(l), (0, 29));
        assert!(l.restore.is_none());
        assert_eq!(reduces_of(&h, 0, 2), BTreeSet::from([0, 1]));
    }

    #[test]
    fn a_stalled_checkpoint_store_stops_retention_and_a_loss_then_rolls_back() {
        let mut h = Harness::new(spec(2, 2, Scheduling::Drizzle, 10), 2, true, true);
        h.store_down = true;
        h.now += Duration::from_millis(100);
        h.next_group(); // a checkpoint group, through batch 19
        h.report_checkpoint(19);
        h.release(20);
        assert!(h.written.is_empty());
        assert_eq!(h.phase(), "checkpointing");
        // Ten intervals (at least 2 s) after batch 19 triggered, the next
        // group stops retaining map outputs.
        h.now += Duration::from_secs(3);
        h.next_group();
        assert!(!h.last(0).retain_blocks);
        assert_eq!(
            *h.query.status.recovery.lock(),
            "rollback (checkpoints stalled)"
        );
        h.cluster.kill(1);
        h.step(Event::MembershipChanged);
        // No lost-work recovery without retained outputs: every placed
        // worker drops attempt 1 and a new generation starts from the
        // start (no checkpoint was ever written).
        assert_eq!(h.cancels, vec![(0, 1), (1, 1)]);
        assert_eq!(h.phase(), "running");
        assert_eq!(h.query.generation.load(Ordering::Relaxed), 2);
        // Its first group starts at batch 0 (the replay catches up with the
        // released batches at once: the collector drops what it released).
        let l = h.launches[&0]
            .iter()
            .find(|l| l.attempt == 2)
            .expect("attempt 2 launched");
        assert_eq!((batches(l).0, l.restore.is_none()), (0, true));
        // The store comes back: the new attempt's checkpoint is written,
        // and map outputs are retained again.
        h.store_down = false;
        h.now += Duration::from_millis(100);
        h.next_group();
        let through = batches(h.last(0)).1;
        h.report_checkpoint(through);
        h.release(through + 1);
        assert_eq!(h.written, vec![through]);
        h.next_group();
        assert!(h.last(0).retain_blocks);
        assert_eq!(*h.query.status.recovery.lock(), "lost-work");
    }

    #[test]
    fn cancel_tells_every_placed_worker_to_drop_the_query_and_ends() {
        let mut h = Harness::new(spec(3, 3, Scheduling::Drizzle, 10), 3, true, false);
        h.step(Event::Cancelled);
        assert!(matches!(h.ended, Some(Ok(()))));
        assert_eq!(h.cancels, vec![(0, 0), (1, 0), (2, 0)]);
        let launches = h.launch_count();
        h.release(100);
        assert_eq!(h.launch_count(), launches, "nothing after the end");
    }
}
