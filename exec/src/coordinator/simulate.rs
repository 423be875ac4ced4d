//! Virtual workers for the coordinator's state machine: a [`VirtualCluster`]
//! of registrations, a query over a chain of stages ([`chain_spec`]), and
//! [`simulate`], which drives a [`QueryMachine`] through many micro-batches
//! with every launch encoded as it would be sent, to measure what the
//! coordinator's decisions cost per micro-batch at cluster sizes this
//! machine cannot host (`drizzle bench machine`). The machine's unit tests
//! use the same parts.

use prost::Message;

use super::*;
use drizzle_planner::graph::StageId as Id;
use drizzle_planner::{ColumnDef, Partitioning, Stage, StageOutput, StreamDef};

use crate::sources::DatagenSource;

/// A query over `stages` stages in a chain (a datagen source, then
/// `stages - 1` shuffles, the last stage the sink), with `maps` source and
/// `reduces` reduce partitions.
pub(super) fn chain_spec(
    maps: u32,
    reduces: u32,
    stages: u32,
    scheduling: Scheduling,
    group_size: u32,
) -> Result<QuerySpec> {
    let stream = StreamDef {
        name: "s".into(),
        columns: vec![ColumnDef {
            name: "k".into(),
            data_type: arrow::datatypes::DataType::Int64,
            sql_type: "BIGINT".into(),
            nullable: true,
        }],
        watermark: None,
        options: [("connector".to_string(), "datagen".to_string())].into(),
        partitions: maps,
        created_at_ms: 0,
        proctime: None,
    };
    let source: Arc<dyn crate::sources::Generator> = Arc::new(DatagenSource::new(&stream)?);
    let stages = stages.max(1);
    let graph_stages = (0..stages)
        .map(|i| Stage {
            id: Id(i),
            input: if i == 0 {
                StageInput::Source(stream.clone())
            } else {
                StageInput::Shuffle(vec![Id(i - 1)])
            },
            operators: Vec::new(),
            output: if i + 1 == stages {
                StageOutput::Sink(EmitMode::Append)
            } else {
                StageOutput::Shuffle {
                    to: Id(i + 1),
                    partitioning: Partitioning::Hash(Vec::new()),
                }
            },
        })
        .collect();
    let schema = Arc::new(arrow::datatypes::Schema::empty());
    Ok(QuerySpec {
        plan: StreamingPlan {
            graph: StageGraph {
                stages: graph_stages,
                output_schema: Arc::clone(&schema),
                state_ttl_batches: None,
            },
            limit: None,
            output_schema: schema,
            emit: EmitMode::Append,
            upsert_keys: None,
            event_time: None,
            op_column: false,
            rank_column: false,
        },
        inputs: vec![InputSpec {
            sources: (0..maps)
                .map(|p| SourcePartition::Generated(Arc::clone(&source), p))
                .collect(),
            start_offsets: vec![0; maps as usize],
        }],
        batch_interval: Duration::from_millis(10),
        group_size,
        scheduling,
        reduce_partitions: reduces,
        label: "simulated".into(),
        durability: Durability::default(),
        memory_limit: 0,
    })
}

/// Registered virtual workers, as the machine sees them.
#[derive(Default)]
pub(super) struct VirtualCluster {
    pub(super) members: Mutex<BTreeMap<WorkerId, Member>>,
    /// Workers the machine declared lost, in order.
    pub(super) forgotten: Mutex<Vec<WorkerId>>,
}

impl VirtualCluster {
    /// Worker `id` registers.
    pub(super) fn join(&self, id: u32) {
        self.members.lock().insert(
            WorkerId(id),
            Member {
                id: WorkerId(id),
                epoch: 1,
                address: format!("10.0.{}.{}:7001", id / 256, id % 256),
                draining: false,
                live: true,
            },
        );
    }

    /// Worker `id` was asked to stop (SIGTERM): it takes no new placements.
    #[cfg(test)]
    pub(super) fn drain(&self, id: u32) {
        if let Some(m) = self.members.lock().get_mut(&WorkerId(id)) {
            m.draining = true;
        }
    }

    /// Worker `id`'s process is gone: its registration ends.
    #[cfg(test)]
    pub(super) fn kill(&self, id: u32) {
        self.members.lock().remove(&WorkerId(id));
    }
}

impl Cluster for VirtualCluster {
    fn members(&self) -> Vec<Member> {
        self.members.lock().values().cloned().collect()
    }
    fn member(&self, id: WorkerId) -> Option<Member> {
        self.members.lock().get(&id).cloned()
    }
    fn active(&self) -> usize {
        self.members.lock().values().filter(|m| !m.draining).count()
    }
    fn forget(&self, id: WorkerId, epoch: u64, _why: &str) {
        let mut members = self.members.lock();
        if members.get(&id).is_some_and(|m| m.epoch == epoch) {
            members.remove(&id);
            self.forgotten.lock().push(id);
        }
    }
    fn tables_version(&self) -> u64 {
        0
    }
}

/// What `drizzle bench machine` measured (`sim::drive_machine`).
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineFigures {
    /// Micro-batches released.
    pub batches: u64,
    /// Wall time on one thread: the machine's steps plus encoding every
    /// message it sends.
    pub elapsed: Duration,
    /// Group launches sent.
    pub launches: u64,
    /// BSP: consuming-stage launches sent after barriers.
    pub barrier_launches: u64,
    /// Bytes of every launch, encoded.
    pub bytes: u64,
}

/// Drives one query's [`QueryMachine`] over `workers` virtual workers (one
/// source and one reduce partition each, a chain of `stages` stages) for
/// `batches` micro-batches, each released as soon as it is launched; BSP's
/// producers report every batch's output to the barrier. Every launch is
/// encoded as the driver would send it. Virtual time: 1 ms per batch.
pub(crate) fn simulate(
    workers: u32,
    stages: u32,
    scheduling: Scheduling,
    group_size: u32,
    batches: u64,
) -> Result<MachineFigures> {
    let spec = chain_spec(workers, workers, stages, scheduling, group_size)?;
    let (query, _channels) = CompiledQuery::new(QueryId(1), spec, false)?;
    let cluster = VirtualCluster::default();
    for id in 0..workers {
        cluster.join(id);
    }
    let config = MachineConfig {
        checkpoints: false,
        checkpoint_interval: Duration::from_secs(3600),
        adaptive: AdaptiveGroupSize::default(),
        worker_wait: Duration::from_secs(1),
        cluster_address: String::new(),
    };
    let mut now = Instant::now();
    let started = Instant::now();
    let mut figures = MachineFigures::default();
    let mut machine = QueryMachine::new(Arc::clone(&query), config, now);
    let mut perform = |machine: &mut QueryMachine, now: Instant, event: Event| {
        let mut queue: std::collections::VecDeque<Action> =
            machine.step(now, event, &cluster).into();
        while let Some(action) = queue.pop_front() {
            let answer = match action {
                Action::Launch(sends) => {
                    for (_, req) in &sends {
                        figures.bytes += req.encode_to_vec().len() as u64;
                    }
                    figures.launches += sends.len() as u64;
                    Some(Event::Launched { failed: Vec::new() })
                }
                Action::LaunchReduces(sends) => {
                    for (_, req) in &sends {
                        figures.bytes += req.encode_to_vec().len() as u64;
                    }
                    figures.barrier_launches += sends.len() as u64;
                    Some(Event::ReducesLaunched { failed: None })
                }
                Action::WriteCheckpoint(m) => Some(Event::CheckpointWritten(Ok(m))),
                Action::End(r) => return r,
                Action::Place(_) | Action::Cancel { .. } => None,
            };
            if let Some(answer) = answer {
                queue.extend(machine.step(now, answer, &cluster));
            }
        }
        Ok(())
    };
    perform(&mut machine, now, Event::Tick)?;
    let attempt = query.status.attempt.load(Ordering::Acquire);
    for b in 0..batches {
        if scheduling == Scheduling::Bsp {
            for stage in 0..stages.saturating_sub(1) {
                for map in 0..workers {
                    let notice = pb::MapOutputReady {
                        query: query.id.0,
                        stage,
                        map,
                        batch: b,
                        attempt,
                        ..Default::default()
                    };
                    perform(&mut machine, now, Event::MapOutputReady(notice))?;
                }
            }
        }
        now += Duration::from_millis(1);
        query.released.store(b + 1, Ordering::Release);
        perform(&mut machine, now, Event::Released(b + 1))?;
    }
    figures.batches = batches;
    figures.elapsed = started.elapsed();
    Ok(figures)
}
