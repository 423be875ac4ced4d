//! Arrow Flight transport for shuffle blocks.
//!
//! A consumer learns from a `MapOutputReady` notice where a block lives and
//! pulls it with `do_get`; the ticket is the block's id
//! ([`BlockId::to_ticket`]). Serving a block reads it from the producer's
//! [`BlockStore`] by its rule: removed once served, or kept until a
//! checkpoint covers it when its query retains blocks for recovery.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightClient, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::block::decode_block;
use crate::error::{Result, ShuffleError};
use crate::ids::{BlockId, QueryToken};
use crate::store::BlockStore;

/// Serves a worker's shuffle blocks over Arrow Flight (`do_get` only).
#[derive(Debug)]
pub struct BlockFlightService {
    store: Arc<BlockStore>,
    served: AtomicU64,
}

impl BlockFlightService {
    /// A service over `store`.
    pub fn new(store: Arc<BlockStore>) -> Self {
        Self {
            store,
            served: AtomicU64::new(0),
        }
    }

    /// Blocks served so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

type FlightStream<T> = Pin<Box<dyn futures::Stream<Item = std::result::Result<T, Status>> + Send>>;

fn unimplemented<T>(what: &str) -> std::result::Result<T, Status> {
    Err(Status::unimplemented(format!(
        "{what}: a Drizzle worker's Flight endpoint serves shuffle blocks by do_get only"
    )))
}

#[tonic::async_trait]
impl FlightService for BlockFlightService {
    type HandshakeStream = FlightStream<HandshakeResponse>;
    type ListFlightsStream = FlightStream<FlightInfo>;
    type DoGetStream = FlightStream<FlightData>;
    type DoPutStream = FlightStream<PutResult>;
    type DoExchangeStream = FlightStream<FlightData>;
    type DoActionStream = FlightStream<arrow_flight::Result>;
    type ListActionsStream = FlightStream<ActionType>;

    async fn handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> std::result::Result<Response<Self::HandshakeStream>, Status> {
        unimplemented("handshake")
    }

    async fn list_flights(
        &self,
        _request: Request<Criteria>,
    ) -> std::result::Result<Response<Self::ListFlightsStream>, Status> {
        unimplemented("list_flights")
    }

    async fn get_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        unimplemented("get_flight_info")
    }

    async fn poll_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<PollInfo>, Status> {
        unimplemented("poll_flight_info")
    }

    async fn get_schema(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<SchemaResult>, Status> {
        unimplemented("get_schema")
    }

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<Self::DoGetStream>, Status> {
        let ticket = &request.get_ref().ticket;
        let id =
            BlockId::from_ticket(ticket).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !self
            .store
            .authorizes(id.query, BlockId::ticket_token(ticket))
        {
            return Err(Status::permission_denied(
                "the ticket does not carry its query's token",
            ));
        }
        let bytes = self
            .store
            .read(&id)
            .map_err(|e| Status::not_found(e.to_string()))?;
        let batches = decode_block(&bytes).map_err(|e| Status::internal(e.to_string()))?;
        self.served.fetch_add(1, Ordering::Relaxed);
        let stream = FlightDataEncoderBuilder::new()
            .build(futures::stream::iter(batches.into_iter().map(Ok)))
            .map_err(Status::from);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn do_put(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> std::result::Result<Response<Self::DoPutStream>, Status> {
        unimplemented("do_put")
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> std::result::Result<Response<Self::DoExchangeStream>, Status> {
        unimplemented("do_exchange")
    }

    async fn do_action(
        &self,
        _request: Request<Action>,
    ) -> std::result::Result<Response<Self::DoActionStream>, Status> {
        unimplemented("do_action")
    }

    async fn list_actions(
        &self,
        _request: Request<Empty>,
    ) -> std::result::Result<Response<Self::ListActionsStream>, Status> {
        unimplemented("list_actions")
    }
}

/// Pulls one block from the producer at `location` (for errors) through
/// `client`.
pub async fn fetch_block(
    client: &mut FlightClient,
    location: &str,
    id: BlockId,
    token: &QueryToken,
) -> Result<Vec<RecordBatch>> {
    let fail = |message: String| ShuffleError::Fetch {
        block: id.to_string(),
        location: location.to_string(),
        message,
    };
    let stream = client
        .do_get(Ticket::new(id.to_ticket(token)))
        .await
        .map_err(|e| fail(e.to_string()))?;
    let stream: BoxStream<'_, _> = stream.boxed();
    stream.try_collect().await.map_err(|e| fail(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{BatchId, MapPartition, QueryId, ReducePartition, StageId};
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow_flight::flight_service_server::FlightServiceServer;

    #[tokio::test]
    async fn do_get_serves_a_block_once_or_until_covered_over_loopback() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3])),
                Arc::new(StringArray::from(vec![Some("a"), None, Some("c")])),
            ],
        )
        .unwrap();
        let store = Arc::new(BlockStore::new());
        let token = QueryToken([9; 16]);
        store.set_token(QueryId(1), token);
        let id = BlockId {
            query: QueryId(1),
            batch: BatchId(2),
            stage: StageId(0),
            map: MapPartition(3),
            reduce: ReducePartition(4),
        };
        store.put(
            id,
            crate::block::encode_block(&schema, std::slice::from_ref(&batch)).unwrap(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = BlockFlightService::new(Arc::clone(&store));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(FlightServiceServer::new(service))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = FlightClient::new(channel);
        // A ticket without the query's token is refused, and consumes nothing.
        let mut near = [9u8; 16];
        near[15] = 8;
        for wrong in [QueryToken([0; 16]), QueryToken(near)] {
            let err = fetch_block(&mut client, &addr.to_string(), id, &wrong)
                .await
                .unwrap_err();
            assert!(err.to_string().contains("token"), "{err}");
        }
        let got = fetch_block(&mut client, &addr.to_string(), id, &token)
            .await
            .unwrap();
        assert_eq!(got, vec![batch.clone()]);
        // Consumed: the store no longer holds it, a second fetch fails.
        assert_eq!(store.usage(), (0, 0));
        let err = fetch_block(&mut client, &addr.to_string(), id, &token)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        // A query that retains blocks for recovery: served as often as
        // asked, until a checkpoint covers the batch.
        store.retain(QueryId(1), true);
        store.put(
            id,
            crate::block::encode_block(&schema, std::slice::from_ref(&batch)).unwrap(),
        );
        for _ in 0..2 {
            let got = fetch_block(&mut client, &addr.to_string(), id, &token)
                .await
                .unwrap();
            assert_eq!(got, vec![batch.clone()]);
        }
        store.drop_through(QueryId(1), 2);
        assert!(fetch_block(&mut client, &addr.to_string(), id, &token)
            .await
            .is_err());
    }
}
