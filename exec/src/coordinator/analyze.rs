//! `EXPLAIN ANALYZE` of a running query: the figures workers report with
//! each group ([`pb::OperatorStats`], [`pb::StageGauge`]), summed per stage
//! and step, and the stage graph's EXPLAIN with them written in.

use super::*;

use crate::cluster::INPUT_STEP;
use crate::operators::{step_operators, StateSize, StepStats};

/// What a query's tasks did so far, over every worker.
#[derive(Debug, Default)]
pub struct Analysis {
    /// Per (stage, step): rows and time, summed over reports.
    steps: BTreeMap<(u32, u32), StepStats>,
    /// Per stage: tasks run.
    tasks: BTreeMap<u32, u64>,
    /// Per (worker, stage): state held and lowest watermark, as last
    /// reported.
    gauges: BTreeMap<(u32, u32), pb::StageGauge>,
}

impl Analysis {
    /// Adds a worker's group report.
    pub(super) fn add(&mut self, worker: u32, report: &pb::GroupReport) {
        for o in &report.operators {
            let s = self.steps.entry((o.stage, o.step)).or_default();
            s.rows_in += o.rows_in;
            s.rows_out += o.rows_out;
            s.time_ns += o.time_us * 1000;
            if o.step == INPUT_STEP {
                *self.tasks.entry(o.stage).or_default() += o.tasks;
            }
        }
        for g in &report.stages {
            self.gauges.insert((worker, g.stage), *g);
        }
    }

    /// Forgets a worker's gauges (it is gone; its partitions report from
    /// their new workers).
    pub(super) fn forget(&mut self, worker: u32) {
        self.gauges.retain(|(w, _), _| *w != worker);
    }

    /// A stage's state over every worker, and its lowest watermark.
    fn stage_gauge(&self, stage: u32) -> Option<(StateSize, Option<i64>)> {
        let mut found = false;
        let mut size = StateSize::default();
        let mut watermark: Option<i64> = None;
        let mut every_watermark = true;
        for g in self
            .gauges
            .iter()
            .filter(|((_, s), _)| *s == stage)
            .map(|(_, g)| g)
        {
            found = true;
            size += StateSize {
                bytes: g.state_bytes,
                keys: g.state_keys,
            };
            match g.watermark_us {
                Some(w) => watermark = Some(watermark.map_or(w, |m| m.min(w))),
                None => every_watermark = false,
            }
        }
        found.then_some((size, watermark.filter(|_| every_watermark)))
    }

    /// The graph's EXPLAIN with the figures: per stage its tasks, state and
    /// watermark lag (now minus the lowest watermark its partitions acted
    /// on), per operator its rows in and out and time.
    pub fn render(
        &self,
        header: String,
        graph: &StageGraph,
        reduce_partitions: u32,
    ) -> Vec<String> {
        let now_us = unix_now_us();
        graph.explain_annotated(header, reduce_partitions, &|stage, line| {
            let id = stage.id.0;
            match line {
                None => {
                    let mut parts = vec![format!(
                        "tasks={}",
                        self.tasks.get(&id).copied().unwrap_or(0)
                    )];
                    if let Some((size, watermark)) = self.stage_gauge(id) {
                        if stage.is_stateful() || size.bytes > 0 {
                            parts.push(format!(
                                "state={} ({} keys or rows)",
                                crate::worker::human_bytes(size.bytes),
                                size.keys
                            ));
                        }
                        if let Some(w) = watermark {
                            parts.push(format!("watermark lag={:.3} s", (now_us - w) as f64 / 1e6));
                        }
                    }
                    Some(format!("[{}]", parts.join(", ")))
                }
                Some(0) => self
                    .steps
                    .get(&(id, INPUT_STEP))
                    .map(|s| format!("[rows={}, time={}]", s.rows_out, ms(s.time_ns))),
                Some(i) => {
                    // Line i is operator i - 1; a run of kernels is one step,
                    // its figures on the run's last operator.
                    let op = i - 1;
                    let (step, range) = step_operators(stage)
                        .into_iter()
                        .enumerate()
                        .find(|(_, r)| r.contains(&op))?;
                    if op + 1 != range.end {
                        return None;
                    }
                    let s = self.steps.get(&(id, step as u32))?;
                    let over = if range.len() > 1 {
                        format!(" over these {} operators", range.len())
                    } else {
                        String::new()
                    };
                    Some(format!(
                        "[rows in={} out={}, time={}{over}]",
                        s.rows_in,
                        s.rows_out,
                        ms(s.time_ns)
                    ))
                }
            }
        })
    }
}

fn ms(ns: u64) -> String {
    format!("{:.3} ms", ns as f64 / 1e6)
}

fn unix_now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_add_up_per_step_and_gauges_keep_the_latest_per_worker() {
        let report = |worker: u32, rows: u64, bytes: u64, wm: i64| pb::GroupReport {
            worker,
            operators: vec![
                pb::OperatorStats {
                    stage: 1,
                    step: INPUT_STEP,
                    rows_in: rows,
                    rows_out: rows,
                    time_us: 10,
                    tasks: 2,
                },
                pb::OperatorStats {
                    stage: 1,
                    step: 0,
                    rows_in: rows,
                    rows_out: 1,
                    time_us: 5,
                    tasks: 0,
                },
            ],
            stages: vec![pb::StageGauge {
                stage: 1,
                state_bytes: bytes,
                state_keys: 3,
                watermark_us: Some(wm),
            }],
            ..Default::default()
        };
        let mut a = Analysis::default();
        a.add(1, &report(1, 10, 100, 50));
        a.add(2, &report(2, 20, 200, 40));
        a.add(1, &report(1, 5, 150, 60));
        assert_eq!(a.steps[&(1, INPUT_STEP)].rows_out, 35);
        assert_eq!(a.steps[&(1, 0)].rows_out, 3);
        assert_eq!(a.tasks[&1], 6);
        let (size, wm) = a.stage_gauge(1).unwrap();
        assert_eq!(size.bytes, 350, "worker 1's latest plus worker 2's");
        assert_eq!(wm, Some(40), "the lowest watermark");
        a.forget(2);
        assert_eq!(a.stage_gauge(1).unwrap().0.bytes, 150);
    }
}
