//! BSP's coordinator barrier at every shuffle: a stage's tasks of a batch
//! are launched once every partition of every stage it reads has reported
//! that batch's output ([`ShuffleBarrier`]).

use super::*;

/// The notices of each (batch, consuming stage) until every producer is in.
pub(super) struct ShuffleBarrier {
    /// Consuming stage → its inputs: (producing stage, partitions).
    needs: BTreeMap<u32, Vec<(u32, u32)>>,
    /// Producing stage → the stage reading its shuffle.
    consumer: BTreeMap<u32, u32>,
    pending: BTreeMap<(u64, u32), Vec<pb::MapOutputReady>>,
}

impl ShuffleBarrier {
    /// A barrier for `graph` with `sources[i]` partitions in its i-th source
    /// stage and `reduce_partitions` in every shuffle stage.
    pub(super) fn new(graph: &StageGraph, sources: &[u32], reduce_partitions: u32) -> Self {
        let mut partitions = BTreeMap::new();
        let mut source = 0usize;
        for stage in &graph.stages {
            let n = match &stage.input {
                StageInput::Source(_) => {
                    source += 1;
                    sources.get(source - 1).copied().unwrap_or(0)
                }
                StageInput::Shuffle(_) => reduce_partitions,
            };
            partitions.insert(stage.id.0, n);
        }
        let mut needs = BTreeMap::new();
        let mut consumer = BTreeMap::new();
        for stage in &graph.stages {
            if let StageInput::Shuffle(inputs) = &stage.input {
                needs.insert(
                    stage.id.0,
                    inputs
                        .iter()
                        .map(|i| (i.0, partitions.get(&i.0).copied().unwrap_or(0)))
                        .collect(),
                );
                for i in inputs {
                    consumer.insert(i.0, stage.id.0);
                }
            }
        }
        Self {
            needs,
            consumer,
            pending: BTreeMap::new(),
        }
    }

    /// Adds a task's notice (a repeated one counts once). Returns the batch,
    /// the consuming stage and every notice it reads once the last one is in.
    pub(super) fn add(
        &mut self,
        notice: pb::MapOutputReady,
    ) -> Option<(u64, u32, Vec<pb::MapOutputReady>)> {
        let stage = *self.consumer.get(&notice.stage)?;
        let key = (notice.batch, stage);
        let list = self.pending.entry(key).or_default();
        if !list
            .iter()
            .any(|n| n.stage == notice.stage && n.map == notice.map)
        {
            list.push(notice);
        }
        let complete = self.needs.get(&stage).is_some_and(|inputs| {
            inputs.iter().all(|&(input, partitions)| {
                list.iter().filter(|n| n.stage == input).count() as u32 >= partitions
            })
        });
        if !complete {
            return None;
        }
        let notices = self.pending.remove(&key).unwrap_or_default();
        Some((key.0, key.1, notices))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drizzle_planner::graph::StageId as Id;
    use drizzle_planner::{Partitioning, Stage, StageOutput};

    fn stage(id: u32, input: StageInput, to: Option<u32>) -> Stage {
        Stage {
            id: Id(id),
            input,
            operators: Vec::new(),
            output: match to {
                Some(to) => StageOutput::Shuffle {
                    to: Id(to),
                    partitioning: Partitioning::Hash(Vec::new()),
                },
                None => StageOutput::Sink(EmitMode::Append),
            },
        }
    }

    fn source(id: u32, to: u32) -> Stage {
        let stream = drizzle_planner::StreamDef {
            name: format!("s{id}"),
            columns: Vec::new(),
            watermark: None,
            options: Default::default(),
            partitions: 0,
            created_at_ms: 0,
            proctime: None,
        };
        stage(id, StageInput::Source(stream), Some(to))
    }

    fn done(stage: u32, map: u32, batch: u64) -> pb::MapOutputReady {
        pb::MapOutputReady {
            stage,
            map,
            batch,
            ..Default::default()
        }
    }

    fn graph(stages: Vec<Stage>) -> StageGraph {
        StageGraph {
            stages,
            output_schema: Arc::new(arrow::datatypes::Schema::empty()),
            state_ttl_batches: None,
        }
    }

    #[test]
    fn a_join_stage_starts_when_both_inputs_reported_each_batch_apart() {
        // Stages 0 (2 partitions) and 1 (1) feed stage 2.
        let g = graph(vec![
            source(0, 2),
            source(1, 2),
            stage(2, StageInput::Shuffle(vec![Id(0), Id(1)]), None),
        ]);
        let mut b = ShuffleBarrier::new(&g, &[2, 1], 4);
        assert!(b.add(done(0, 0, 7)).is_none());
        assert!(b.add(done(0, 0, 7)).is_none(), "a repeat counts once");
        assert!(b.add(done(0, 1, 7)).is_none(), "stage 1 is missing");
        assert!(b.add(done(1, 0, 8)).is_none(), "another batch");
        let (batch, stage, notices) = b.add(done(1, 0, 7)).expect("batch 7 complete");
        assert_eq!((batch, stage, notices.len()), (7, 2, 3));
    }

    #[test]
    fn every_shuffle_of_a_three_stage_plan_is_a_barrier() {
        // 0 (3 partitions) → 1 (2 reduce partitions) → 2.
        let g = graph(vec![
            source(0, 1),
            stage(1, StageInput::Shuffle(vec![Id(0)]), Some(2)),
            stage(2, StageInput::Shuffle(vec![Id(1)]), None),
        ]);
        let mut b = ShuffleBarrier::new(&g, &[3], 2);
        assert!(b.add(done(0, 0, 1)).is_none());
        assert!(b.add(done(0, 1, 1)).is_none());
        assert_eq!(b.add(done(0, 2, 1)).map(|(_, s, _)| s), Some(1));
        assert!(b.add(done(1, 0, 1)).is_none());
        let (_, stage, notices) = b.add(done(1, 1, 1)).expect("stage 2 of batch 1");
        assert_eq!((stage, notices.len()), (2, 2));
        assert!(
            b.add(done(2, 0, 1)).is_none(),
            "the sink stage feeds nothing"
        );
    }
}
