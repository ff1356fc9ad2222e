//! One thin handler per RPC: convert, call the scheduler, convert back.

use super::convert;
use super::pb;
use super::pb::app_service_server::AppService;
use super::pb::deployment_service_server::DeploymentService;
use super::pb::process_service_server::ProcessService;
use super::pb::room_service_server::RoomService;
use crate::core::types::{DeploymentSpec, RegionPolicy};
use crate::Scheduler;
use std::pin::Pin;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

type Reply<T> = Result<Response<T>, Status>;

/// `roomsched.v1.RoomService`.
#[derive(Debug, Clone)]
pub struct RoomApi(pub Scheduler);

/// `roomsched.v1.ProcessService`.
#[derive(Debug, Clone)]
pub struct ProcessApi(pub Scheduler);

/// `roomsched.v1.DeploymentService`.
#[derive(Debug, Clone)]
pub struct DeploymentApi(pub Scheduler);

/// `roomsched.v1.AppService`: capacity policies and usage.
#[derive(Debug, Clone)]
pub struct AppApi(pub Scheduler);

#[tonic::async_trait]
impl RoomService for RoomApi {
    async fn create_room(
        &self,
        req: Request<pb::CreateRoomRequest>,
    ) -> Reply<pb::CreateRoomResponse> {
        let placement = self.0.create_room(req.into_inner().into()).await?;
        Ok(Response::new(convert::placement(placement)))
    }

    async fn get_room(&self, req: Request<pb::GetRoomRequest>) -> Reply<pb::Room> {
        let r = req.into_inner();
        Ok(Response::new(convert::room(
            self.0.get_room(&r.app_id, &r.room_id).await?,
        )))
    }

    async fn destroy_room(
        &self,
        req: Request<pb::DestroyRoomRequest>,
    ) -> Reply<pb::DestroyRoomResponse> {
        let r = req.into_inner();
        self.0.destroy_room(&r.app_id, &r.room_id).await?;
        Ok(Response::new(pb::DestroyRoomResponse {}))
    }

    async fn update_room_config(
        &self,
        req: Request<pb::UpdateRoomConfigRequest>,
    ) -> Reply<pb::Room> {
        let r = req.into_inner();
        let room = self
            .0
            .update_room_config(&r.app_id, &r.room_id, r.room_config)
            .await?;
        Ok(Response::new(convert::room(room)))
    }

    async fn get_connection_info(
        &self,
        req: Request<pb::GetConnectionInfoRequest>,
    ) -> Reply<pb::ConnectionInfo> {
        let r = req.into_inner();
        let info = self.0.connection_info(&r.app_id, &r.room_id).await?;
        Ok(Response::new(convert::connection_info(info)))
    }

    type WatchConnectionInfoStream =
        Pin<Box<dyn Stream<Item = Result<pb::ConnectionInfo, Status>> + Send>>;

    async fn watch_connection_info(
        &self,
        req: Request<pb::GetConnectionInfoRequest>,
    ) -> Reply<Self::WatchConnectionInfoStream> {
        let r = req.into_inner();
        let mut watch = self.0.watch_connection_info(&r.app_id, &r.room_id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    info = watch.next() => match info {
                        Some(info) => {
                            if tx.send(Ok(convert::connection_info(info))).await.is_err() {
                                return;
                            }
                        }
                        None => return,
                    },
                    _ = tx.closed() => return, // the client went away
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_active_rooms_for_process(
        &self,
        req: Request<pb::ListRoomsForProcessRequest>,
    ) -> Reply<pb::ListRoomsResponse> {
        let r = req.into_inner();
        let pid = convert::process_id(&r.app_id, &r.process_id)?;
        let rooms = self.0.list_active_rooms(&r.app_id, pid).await?;
        Ok(Response::new(convert::rooms_page(
            rooms,
            r.page_size,
            &r.page_token,
        )?))
    }

    async fn list_inactive_rooms_for_process(
        &self,
        req: Request<pb::ListRoomsForProcessRequest>,
    ) -> Reply<pb::ListRoomsResponse> {
        let r = req.into_inner();
        let pid = convert::process_id(&r.app_id, &r.process_id)?;
        let rooms = self.0.list_inactive_rooms(&r.app_id, pid).await?;
        Ok(Response::new(convert::rooms_page(
            rooms,
            r.page_size,
            &r.page_token,
        )?))
    }
}

#[tonic::async_trait]
impl ProcessService for ProcessApi {
    async fn create_process(&self, req: Request<pb::CreateProcessRequest>) -> Reply<pb::Process> {
        let r = req.into_inner();
        let deployment = Some(r.deployment_id).filter(|d| *d != 0);
        let p = self
            .0
            .create_process(&r.app_id, &r.region, deployment)
            .await?;
        Ok(Response::new(convert::process(p)))
    }

    async fn get_process(&self, req: Request<pb::GetProcessRequest>) -> Reply<pb::Process> {
        let r = req.into_inner();
        let pid = convert::process_id(&r.app_id, &r.process_id)?;
        Ok(Response::new(convert::process(
            self.0.get_process(&r.app_id, pid).await?,
        )))
    }

    async fn list_processes(
        &self,
        req: Request<pb::ListProcessesRequest>,
    ) -> Reply<pb::ListProcessesResponse> {
        let r = req.into_inner();
        let filter = convert::process_filter(r.app_id, &r.statuses, r.regions)?;
        let page = self
            .0
            .list_processes(&filter, r.page_size as usize, Some(&r.page_token))
            .await?;
        Ok(Response::new(pb::ListProcessesResponse {
            processes: page.processes.into_iter().map(convert::process).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn count_processes(
        &self,
        req: Request<pb::CountProcessesRequest>,
    ) -> Reply<pb::CountProcessesResponse> {
        let r = req.into_inner();
        let filter = convert::process_filter(r.app_id, &r.statuses, r.regions)?;
        Ok(Response::new(pb::CountProcessesResponse {
            count: self.0.count_processes(&filter).await?,
        }))
    }

    async fn drain_process(&self, req: Request<pb::DrainProcessRequest>) -> Reply<pb::Process> {
        let r = req.into_inner();
        let pid = convert::process_id(&r.app_id, &r.process_id)?;
        Ok(Response::new(convert::process(
            self.0.drain_process(&r.app_id, pid).await?,
        )))
    }

    async fn stop_process(&self, req: Request<pb::StopProcessRequest>) -> Reply<pb::Process> {
        let r = req.into_inner();
        let pid = convert::process_id(&r.app_id, &r.process_id)?;
        Ok(Response::new(convert::process(
            self.0.stop_process(&r.app_id, pid).await?,
        )))
    }
}

#[tonic::async_trait]
impl DeploymentService for DeploymentApi {
    async fn create_deployment(
        &self,
        req: Request<pb::CreateDeploymentRequest>,
    ) -> Reply<pb::Deployment> {
        let r = req.into_inner();
        crate::core::validate_app_id(&r.app_id)?;
        let app_id = r.app_id.clone();
        let spec = DeploymentSpec::try_from(r)?;
        Ok(Response::new(convert::deployment(
            self.0.create_deployment(&app_id, spec).await?,
        )))
    }

    async fn get_deployment(
        &self,
        req: Request<pb::GetDeploymentRequest>,
    ) -> Reply<pb::Deployment> {
        let r = req.into_inner();
        Ok(Response::new(convert::deployment(
            self.0.get_deployment(&r.app_id, r.deployment_id).await?,
        )))
    }

    async fn get_latest_deployment(
        &self,
        req: Request<pb::GetLatestDeploymentRequest>,
    ) -> Reply<pb::Deployment> {
        let r = req.into_inner();
        Ok(Response::new(convert::deployment(
            self.0.latest_deployment(&r.app_id).await?,
        )))
    }

    async fn list_deployments(
        &self,
        req: Request<pb::ListDeploymentsRequest>,
    ) -> Reply<pb::ListDeploymentsResponse> {
        let r = req.into_inner();
        let deployments = self.0.list_deployments(&r.app_id).await?;
        Ok(Response::new(pb::ListDeploymentsResponse {
            deployments: deployments.into_iter().map(convert::deployment).collect(),
        }))
    }
}

#[tonic::async_trait]
impl AppService for AppApi {
    async fn set_region_policy(
        &self,
        req: Request<pb::SetRegionPolicyRequest>,
    ) -> Reply<pb::RegionPolicy> {
        let r = req.into_inner();
        let policy = RegionPolicy {
            min_processes: r.min_processes,
            buffer_rooms: r.buffer_rooms,
            max_processes: r.max_processes,
        };
        let set = self
            .0
            .set_region_policy(&r.app_id, &r.region, policy)
            .await?;
        Ok(Response::new(convert::region_policy(
            r.app_id, r.region, set,
        )))
    }

    async fn get_region_policy(
        &self,
        req: Request<pb::GetRegionPolicyRequest>,
    ) -> Reply<pb::RegionPolicy> {
        let r = req.into_inner();
        let policy = self.0.get_region_policy(&r.app_id, &r.region).await?;
        Ok(Response::new(convert::region_policy(
            r.app_id, r.region, policy,
        )))
    }

    async fn get_usage(&self, req: Request<pb::GetUsageRequest>) -> Reply<pb::Usage> {
        let r = req.into_inner();
        let start = r
            .start
            .as_ref()
            .map(|t| convert::from_timestamp("start", t))
            .transpose()?;
        let end = r
            .end
            .as_ref()
            .map(|t| convert::from_timestamp("end", t))
            .transpose()?;
        let usage = self.0.usage(&r.app_id, &r.regions, start, end).await?;
        Ok(Response::new(pb::Usage {
            regions: usage.into_iter().map(convert::region_usage).collect(),
        }))
    }
}
