//! The worker's gRPC service (what the coordinator and peers call),
//! registration, heartbeats, and lookup tables read from the coordinator.

use super::*;

#[tonic::async_trait]
impl WorkerRpc for WorkerService {
    async fn launch_group(
        &self,
        request: Request<pb::LaunchGroupRequest>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        self.shared.check_coordinator(&request).await?;
        let req = request.into_inner();
        crate::cluster::check_version(req.protocol_version, "the coordinator")?;
        let epoch = self.shared.identity.lock().1;
        // Fencing: a launch for another incarnation of this address is stale.
        if req.epoch != epoch {
            return Err(Status::failed_precondition(format!(
                "launch for registration epoch {} reached a worker at epoch {epoch}",
                req.epoch
            )));
        }
        let before = self
            .shared
            .tables_version
            .fetch_max(req.tables_version, Ordering::AcqRel);
        if req.tables_version > before {
            // A change this worker had not heard of: its tables are read
            // again in the background.
            self.shared.refresh_tables();
        }
        self.shared
            .counters
            .launches_received
            .fetch_add(1, Ordering::Relaxed);
        self.shared.send(Msg::Launch(Box::new(req)));
        Ok(Response::new(pb::Ack {}))
    }

    async fn notices(
        &self,
        request: Request<tonic::Streaming<pb::MapOutputReady>>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        let mut notices = request.into_inner();
        while let Some(notice) = notices.message().await? {
            self.shared.send(Msg::Notice(notice));
        }
        Ok(Response::new(pb::Ack {}))
    }

    async fn launch_reduce(
        &self,
        request: Request<pb::LaunchReduceRequest>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        self.shared.check_coordinator(&request).await?;
        self.shared.send(Msg::LaunchReduce(request.into_inner()));
        Ok(Response::new(pb::Ack {}))
    }

    async fn cancel_query(
        &self,
        request: Request<pb::CancelQueryRequest>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        self.shared.check_coordinator(&request).await?;
        let req = request.into_inner();
        self.shared
            .send(Msg::Cancel(QueryId(req.query), req.attempt));
        Ok(Response::new(pb::Ack {}))
    }

    async fn tables_changed(
        &self,
        request: Request<pb::TablesChangedRequest>,
    ) -> std::result::Result<Response<pb::Ack>, Status> {
        self.shared.check_coordinator(&request).await?;
        self.shared
            .tables_version
            .fetch_max(request.into_inner().version, Ordering::AcqRel);
        self.shared.refresh_tables();
        Ok(Response::new(pb::Ack {}))
    }
}

/// A fresh nonzero registration epoch: wall clock, process and a counter.
pub(crate) fn new_epoch() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let e = nanos ^ (u64::from(std::process::id()) << 40) ^ n.rotate_left(20);
    e.max(1)
}

/// Registers (again); retries while the coordinator is unreachable, fails
/// on a protocol mismatch.
pub(super) async fn register(shared: &Shared) -> Result<()> {
    let mut delay = Duration::from_millis(50);
    loop {
        let mut client = shared.coordinator.clone();
        // The new incarnation is this worker's epoch before the coordinator
        // can place anything on it (a launch may overtake the response).
        let epoch = new_epoch();
        shared.identity.lock().1 = epoch;
        let req = pb::RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            address: shared.address.clone(),
            epoch,
            task_slots: shared.counters.task_slots.load(Ordering::Relaxed) as u32,
        };
        match client.register(req).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                *shared.credential.write() =
                    tonic::metadata::MetadataValue::try_from(resp.member_credential.as_str()).ok();
                *shared.identity.lock() = (resp.worker_id, resp.epoch);
                let before = shared
                    .tables_version
                    .fetch_max(resp.tables_version, Ordering::AcqRel);
                if resp.tables_version > before {
                    shared.refresh_tables();
                }
                shared.open_events();
                return Ok(());
            }
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                return Err(rpc_error("the coordinator refused this worker", s));
            }
            Err(s) => {
                tracing::debug!("coordinator not reachable yet: {}", s.message());
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

pub(super) async fn heartbeat_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        let (worker_id, epoch) = *shared.identity.lock();
        let req = pb::HeartbeatRequest {
            protocol_version: PROTOCOL_VERSION,
            worker_id,
            epoch,
            counters: Some(shared.counters.to_proto(&shared.store)),
        };
        let mut client = shared.coordinator.clone();
        match client.heartbeat(req).await {
            Ok(resp) if resp.get_ref().known => {}
            Ok(_) => {
                tracing::warn!("the coordinator does not know this worker; registering again");
                // A new worker: nothing of the old registration survives.
                shared.send(Msg::Cancel(QueryId(u64::MAX), 0));
                if let Err(e) = register(&shared).await {
                    tracing::error!("{e}");
                    return;
                }
            }
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                tracing::error!("heartbeat refused: {}", s.message());
                return;
            }
            Err(s) => tracing::warn!("heartbeat failed: {}", s.message()),
        }
    }
}

impl TableEvaluator for RemoteTables {
    /// The coordinator's signal that some relation changed: the join then
    /// asks whether its own did ([`Self::evaluate`] with the held version).
    fn version(&self, _spec: &LookupJoinSpec) -> u64 {
        self.any_version()
    }

    fn any_version(&self) -> u64 {
        // The coordinator's signal, and what landed in the cache since:
        // both only grow, so a join looks again when either moved.
        self.shared
            .tables_version
            .load(Ordering::Acquire)
            .wrapping_add(self.cache.landed.load(Ordering::Acquire))
    }

    fn evaluate(
        &self,
        spec: &LookupJoinSpec,
        held: Option<u64>,
    ) -> Result<Option<(u64, Vec<RecordBatch>)>> {
        // Read ahead, or refreshed in the background since the join last
        // read it: a newer version is handed over; the same one means no
        // newer one landed yet (the refresh bumps the version when it does).
        if let Some((v, rows)) = self.cache.tables.lock().get(&spec.id) {
            if held != Some(*v) {
                return Ok(Some((*v, rows.clone())));
            }
            if !self.cache.failed.lock().contains(&spec.id) {
                return Ok(None);
            }
        }
        // Only when a background read failed: read it now, on the slot.
        let data = self.shared.data.clone();
        let req = pb::ReadTableRequest {
            query: self.query.0,
            join: spec.id,
            held_version: held,
        };
        let read = self
            .shared
            .handle
            .block_on(async move { data.read_table(req).await })?;
        if let Some((v, rows)) = &read {
            self.cache.offer(spec.id, *v, rows);
        }
        Ok(read)
    }
}
