//! The coordinator's gRPC service: what workers call (registration,
//! heartbeats, events, drain); rows go by the data plane ([`super::data`]).

use super::*;

/// The caller's credential is not a current registration's.
pub(super) fn stale_member() -> Status {
    Status::permission_denied(
        "not a registered worker of this coordinator (unknown or stale registration)",
    )
}

pub(super) fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

impl CoordinatorService {
    pub(super) async fn do_register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> std::result::Result<Response<pb::RegisterResponse>, Status> {
        let req = request.into_inner();
        crate::cluster::check_version(req.protocol_version, "the worker")?;
        if req.epoch == 0 {
            return Err(Status::invalid_argument(
                "a registration needs a nonzero epoch",
            ));
        }
        let epoch = req.epoch;
        // The registration's credential: the worker's proof of identity to
        // the coordinator, and the coordinator's to the worker.
        let credential = crate::cluster::random_credential();
        let client = worker_client(
            &req.address,
            &self
                .state
                .secret
                .with_credential(crate::cluster::ClusterSecret::credential_slot(Some(
                    &credential,
                ))),
        )
        .map_err(internal)?;
        let id = WorkerId(self.state.next_worker.fetch_add(1, Ordering::Relaxed));
        {
            let mut workers = self.state.workers.write();
            // The same address registering again is a new worker.
            workers.retain(|_, w| w.address != req.address);
            workers.insert(
                id,
                WorkerEntry {
                    draining: false,
                    id,
                    address: req.address.clone(),
                    epoch,
                    client,
                    last_heartbeat: Instant::now(),
                    counters: pb::WorkerCounters::default(),
                    launches_sent: 0,
                    credential: credential.clone(),
                    slots: req.task_slots.clamp(1, 1024),
                },
            );
        }
        self.state.workers_changed.notify_waiters();
        tracing::info!(worker = id.0, address = %req.address, epoch, "worker registered");
        Ok(Response::new(pb::RegisterResponse {
            worker_id: id.0,
            epoch,
            heartbeat_interval_ms: crate::worker::HEARTBEAT_INTERVAL.as_millis() as u64,
            tables_version: self.state.tables.any_version(),
            member_credential: credential,
        }))
    }

    pub(super) async fn do_heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> std::result::Result<Response<pb::HeartbeatResponse>, Status> {
        let caller = self.state.member(&request);
        let req = request.into_inner();
        crate::cluster::check_version(req.protocol_version, "the worker")?;
        let mut workers = self.state.workers.write();
        let known = match workers.get_mut(&WorkerId(req.worker_id)) {
            Some(w) if w.epoch == req.epoch && caller == Some((w.id, w.epoch)) => {
                w.last_heartbeat = Instant::now();
                w.counters = req.counters.unwrap_or_default();
                true
            }
            _ => false,
        };
        Ok(Response::new(pb::HeartbeatResponse { known }))
    }

    pub(super) async fn do_events(
        &self,
        request: Request<tonic::Streaming<pb::WorkerEvent>>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        let Some((id, epoch)) = self.state.member(&request) else {
            return Err(stale_member());
        };
        let mut events = request.into_inner();
        let mut whose: Option<(u32, u64)> = Some((id.0, epoch));
        let result = self.event_loop(&mut events, &mut whose).await;
        if let Some((id, epoch)) = whose {
            // The stream broke or ended: that incarnation is gone (a live
            // worker reopens its stream under a new registration).
            self.state
                .forget_worker(WorkerId(id), epoch, "its event stream ended");
        }
        result?;
        Ok(Response::new(pb::Ack {}))
    }

    pub(super) async fn do_drain(
        &self,
        request: Request<pb::DrainRequest>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        let caller = self.state.member(&request);
        let req = request.into_inner();
        let id = WorkerId(req.worker_id);
        if caller != Some((id, req.epoch)) {
            return Err(stale_member());
        }
        {
            let mut workers = self.state.workers.write();
            match workers.get_mut(&id) {
                Some(w) if w.epoch == req.epoch => w.draining = true,
                _ => return Ok(Response::new(pb::Ack {})),
            }
        }
        self.state.workers_changed.notify_waiters();
        tracing::info!(worker = id.0, "worker draining");
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let placed = self
                .state
                .placements
                .lock()
                .values()
                .any(|p| p.contains(&id));
            if !placed || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.state.forget_worker(id, req.epoch, "it drained");
        Ok(Response::new(pb::Ack {}))
    }
}

impl CoordinatorService {
    pub(super) async fn event_loop(
        &self,
        events: &mut tonic::Streaming<pb::WorkerEvent>,
        whose: &mut Option<(u32, u64)>,
    ) -> std::result::Result<(), Status> {
        while let Some(event) = events.message().await? {
            let event = match event.event {
                Some(pb::worker_event::Event::Hello(h)) => {
                    // Who the stream is from is known by its credential;
                    // a Hello claiming another identity is a forgery.
                    if *whose != Some((h.worker, h.epoch)) {
                        return Err(Status::permission_denied(
                            "an event stream's Hello names another worker than its credential",
                        ));
                    }
                    continue;
                }
                Some(e) => e,
                None => continue,
            };
            // A worker declared lost (or registered again since) is fenced:
            // whatever it still says is ignored.
            let registered = whose.is_some_and(|(id, epoch)| {
                self.state
                    .workers
                    .read()
                    .get(&WorkerId(id))
                    .is_some_and(|w| w.epoch == epoch)
            });
            if !registered {
                continue;
            }
            let sender = whose.map_or(0, |(id, _)| id);
            match event {
                pb::worker_event::Event::GroupReport(report) => {
                    if report.worker == sender {
                        self.state.on_group_report(report)
                    }
                }
                pb::worker_event::Event::Output(output) => {
                    let worker = whose.map_or(0, |(id, _)| id);
                    self.state.on_output(worker, output)
                }
                pb::worker_event::Event::MapDone(notice) => {
                    // BSP's barrier counts a task's output only from the
                    // worker that owns it (whatever the notice claims).
                    if let Ok(q) = self.state.query(notice.query) {
                        let owner = q.owners.lock().task(notice.stage, notice.map);
                        if notice.worker == sender && owner == Some(sender) {
                            let _ = q.map_done.send(notice);
                        }
                    }
                }
                pb::worker_event::Event::FetchFailed(f) => {
                    let reporter = whose.map_or(0, |(id, _)| id);
                    self.state.on_fetch_failed(reporter, f)
                }
                pb::worker_event::Event::Hello(_) => {}
            }
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl CoordinatorRpc for CoordinatorService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> std::result::Result<Response<pb::RegisterResponse>, Status> {
        self.do_register(request).await
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> std::result::Result<Response<pb::HeartbeatResponse>, Status> {
        self.do_heartbeat(request).await
    }

    async fn events(
        &self,
        request: Request<tonic::Streaming<pb::WorkerEvent>>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        self.do_events(request).await
    }

    async fn drain(
        &self,
        request: Request<pb::DrainRequest>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        self.do_drain(request).await
    }
}
