//! The driver of a query's coordination (`Runtime::coordinate`): it feeds
//! the query's [`QueryMachine`] the events of its workers, its collector,
//! its session and timers, and performs what the machine decides (launches,
//! BSP barriers, cancellations, checkpoint writes) over the network.

use std::collections::VecDeque;

use super::*;

type WorkerClient = pb::worker_client::WorkerClient<crate::cluster::ClusterChannel>;

impl Cluster for State {
    fn members(&self) -> Vec<Member> {
        self.workers
            .read()
            .values()
            .map(|w| self.member_of(w))
            .collect()
    }

    fn member(&self, id: WorkerId) -> Option<Member> {
        self.workers.read().get(&id).map(|w| self.member_of(w))
    }

    fn active(&self) -> usize {
        self.workers.read().values().filter(|w| !w.draining).count()
    }

    fn forget(&self, id: WorkerId, epoch: u64, why: &str) {
        self.forget_worker(id, epoch, why);
    }

    fn tables_version(&self) -> u64 {
        self.tables.any_version()
    }
}

impl State {
    fn member_of(&self, w: &WorkerEntry) -> Member {
        Member {
            id: w.id,
            epoch: w.epoch,
            address: w.address.clone(),
            draining: w.draining,
            live: self.is_live(w),
        }
    }
}

/// The gRPC clients of the workers a query was placed on, by registration:
/// kept after a worker is forgotten, so that it can still be told to drop
/// the query.
#[derive(Default)]
struct Clients(HashMap<WorkerId, (u64, WorkerClient)>);

impl Clients {
    fn get(&mut self, state: &State, placed: &Placed) -> Option<WorkerClient> {
        if let Some((epoch, c)) = self.0.get(&placed.id) {
            if *epoch == placed.epoch {
                return Some(c.clone());
            }
        }
        let client = {
            let workers = state.workers.read();
            let w = workers
                .get(&placed.id)
                .filter(|w| w.epoch == placed.epoch)?;
            w.client.clone()
        };
        self.0.insert(placed.id, (placed.epoch, client.clone()));
        Some(client)
    }
}

impl Runtime {
    /// The coordination of one query until it ends: the query's
    /// [`QueryMachine`] driven by its events (see the machine's docs for the
    /// lifecycle: placing, running, checkpointing, recovering, rebalancing).
    pub(super) async fn coordinate(
        &self,
        query: &Arc<CompiledQuery>,
        mut done: watch::Receiver<u64>,
        mut reports: mpsc::UnboundedReceiver<pb::GroupReport>,
        mut map_done: mpsc::UnboundedReceiver<pb::MapOutputReady>,
    ) -> Result<()> {
        let config = MachineConfig {
            checkpoints: self.state.checkpoints.is_some(),
            checkpoint_interval: self.state.checkpoint_interval,
            adaptive: self.state.adaptive,
            worker_wait: self.worker_wait,
            cluster_address: self.cluster_address.clone(),
        };
        let mut machine = QueryMachine::new(Arc::clone(query), config, Instant::now());
        let mut clients = Clients::default();
        let mut event = Event::Tick;
        let mut phase = "";
        loop {
            // Registered before the machine looks, so that nothing said
            // while it decides is missed.
            let workers_changed = self.state.workers_changed.notified();
            let progress = query.checkpoint_progress.notified();
            let cancelled = query.cancel.notify.notified();
            tokio::pin!(workers_changed, progress, cancelled);
            workers_changed.as_mut().enable();
            progress.as_mut().enable();
            cancelled.as_mut().enable();
            if query.cancel.is_cancelled() {
                event = Event::Cancelled;
            }
            let mut actions: VecDeque<Action> =
                machine.step(Instant::now(), event, &*self.state).into();
            while let Some(action) = actions.pop_front() {
                let answer = match action {
                    Action::Place(ids) => {
                        self.state.placements.lock().insert(query.id, ids);
                        None
                    }
                    Action::Launch(sends) => Some(Event::Launched {
                        failed: self.launch(sends, &mut clients).await,
                    }),
                    Action::LaunchReduces(sends) => Some(Event::ReducesLaunched {
                        failed: self.launch_reduces(sends, &mut clients).await,
                    }),
                    Action::Cancel { workers, attempt } => {
                        self.cancel_on(&workers, query.id, attempt, &mut clients);
                        None
                    }
                    Action::WriteCheckpoint(manifest) => {
                        let written = match self.state.checkpoints.as_ref() {
                            Some(store) => store
                                .commit(&manifest)
                                .await
                                .map(|()| manifest)
                                .map_err(|e| e.to_string()),
                            None => Err("no checkpoint store".to_string()),
                        };
                        Some(Event::CheckpointWritten(written))
                    }
                    Action::End(result) => {
                        *query.status.phase.lock() = machine.phase().name();
                        return result;
                    }
                };
                if let Some(answer) = answer {
                    actions.extend(machine.step(Instant::now(), answer, &*self.state));
                }
            }
            if machine.phase().name() != phase {
                phase = machine.phase().name();
                *query.status.phase.lock() = phase;
                tracing::debug!(query = %query.id, phase, "coordination phase");
            }
            let wake = machine.wake_at(Instant::now());
            event = loop {
                tokio::select! {
                    r = done.changed() => break match r {
                        Ok(()) => Event::Released(*done.borrow()),
                        Err(_) => Event::Cancelled,
                    },
                    _ = &mut cancelled => break Event::Cancelled,
                    _ = &mut workers_changed => break Event::MembershipChanged,
                    _ = &mut progress => break Event::Tick,
                    Some(report) = reports.recv() => {
                        // Reports carry counters the service took in already.
                        tracing::trace!(query = %query.id, group = report.group, worker = report.worker, "group report");
                    }
                    Some(notice) = map_done.recv() => break Event::MapOutputReady(notice),
                    _ = tokio::time::sleep_until(wake.into()) => break Event::Tick,
                }
            };
        }
    }

    /// Sends one group's launches at once; returns those that failed. Each
    /// is bounded: a partitioned worker never answers.
    async fn launch(
        &self,
        sends: Vec<(Placed, pb::LaunchGroupRequest)>,
        clients: &mut Clients,
    ) -> Vec<(Placed, String)> {
        let mut failed = Vec::new();
        let mut calls = Vec::with_capacity(sends.len());
        for (placed, req) in sends {
            let Some(mut client) = clients.get(&self.state, &placed) else {
                failed.push((placed, "no longer registered".to_string()));
                continue;
            };
            calls.push(async move {
                let r = tokio::time::timeout(LAUNCH_TIMEOUT, client.launch_group(req))
                    .await
                    .unwrap_or_else(|_| Err(Status::deadline_exceeded("launch timed out")));
                (placed, r)
            });
        }
        let mut sent_to = Vec::with_capacity(calls.len());
        for (placed, r) in futures::future::join_all(calls).await {
            match r {
                Ok(_) => sent_to.push(placed.id),
                Err(s) => failed.push((placed, s.message().to_string())),
            }
        }
        if failed.is_empty() {
            self.state
                .launch_messages
                .fetch_add(sent_to.len() as u64, Ordering::Relaxed);
            let mut workers = self.state.workers.write();
            for id in sent_to {
                if let Some(w) = workers.get_mut(&id) {
                    w.launches_sent += 1;
                }
            }
        }
        failed
    }

    /// BSP: launches a batch's consuming stage on its workers; returns the
    /// first failure.
    async fn launch_reduces(
        &self,
        sends: Vec<(Placed, pb::LaunchReduceRequest)>,
        clients: &mut Clients,
    ) -> Option<String> {
        let mut calls = Vec::with_capacity(sends.len());
        for (placed, req) in sends {
            let Some(mut client) = clients.get(&self.state, &placed) else {
                return Some(format!("worker {} is no longer registered", placed.id.0));
            };
            calls.push(async move {
                tokio::time::timeout(LAUNCH_TIMEOUT, client.launch_reduce(req))
                    .await
                    .unwrap_or_else(|_| Err(Status::deadline_exceeded("launch timed out")))
            });
        }
        futures::future::join_all(calls)
            .await
            .into_iter()
            .find_map(|r| r.err())
            .map(|s| s.message().to_string())
    }

    /// Tells `workers` to drop `query` (`attempt` and older; 0: every
    /// attempt), in the background and bounded: a hung worker gets nothing.
    fn cancel_on(&self, workers: &[Placed], query: QueryId, attempt: u64, clients: &mut Clients) {
        for placed in workers {
            let Some(mut client) = clients.get(&self.state, placed) else {
                continue;
            };
            let req = pb::CancelQueryRequest {
                query: query.0,
                attempt,
            };
            tokio::spawn(async move {
                let _ = tokio::time::timeout(LAUNCH_TIMEOUT, client.cancel_query(req)).await;
            });
        }
    }
}
