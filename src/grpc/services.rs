//! One thin handler per RPC, run inside the gate (access, rate limit, metrics): convert, call
//! the scheduler, convert back.

use super::convert;
use super::gate::{Access, Gate};
use super::pb;
use super::pb::app_service_server::AppService;
use super::pb::deployment_service_server::DeploymentService;
use super::pb::process_service_server::ProcessService;
use super::pb::room_service_server::RoomService;
use crate::core::types::{DeploymentSpec, RegionPolicy};
use crate::Scheduler;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

type Reply<T> = Result<Response<T>, Status>;

/// `roomsched.v1.RoomService`.
#[derive(Debug, Clone)]
pub struct RoomApi {
    scheduler: Scheduler,
    gate: Arc<Gate>,
}

impl RoomApi {
    pub fn new(scheduler: Scheduler, gate: Arc<Gate>) -> Self {
        RoomApi { scheduler, gate }
    }
}

/// `roomsched.v1.ProcessService`.
#[derive(Debug, Clone)]
pub struct ProcessApi {
    scheduler: Scheduler,
    gate: Arc<Gate>,
}

impl ProcessApi {
    pub fn new(scheduler: Scheduler, gate: Arc<Gate>) -> Self {
        ProcessApi { scheduler, gate }
    }
}

/// `roomsched.v1.DeploymentService`.
#[derive(Debug, Clone)]
pub struct DeploymentApi {
    scheduler: Scheduler,
    gate: Arc<Gate>,
}

impl DeploymentApi {
    pub fn new(scheduler: Scheduler, gate: Arc<Gate>) -> Self {
        DeploymentApi { scheduler, gate }
    }
}

/// `roomsched.v1.AppService`: capacity policies and usage.
#[derive(Debug, Clone)]
pub struct AppApi {
    scheduler: Scheduler,
    gate: Arc<Gate>,
}

impl AppApi {
    pub fn new(scheduler: Scheduler, gate: Arc<Gate>) -> Self {
        AppApi { scheduler, gate }
    }
}

#[tonic::async_trait]
impl RoomService for RoomApi {
    async fn create_room(
        &self,
        req: Request<pb::CreateRoomRequest>,
    ) -> Reply<pb::CreateRoomResponse> {
        self.gate
            .call(
                "CreateRoom",
                Access::Manage,
                req,
                |r| &r.app_id,
                |r| async move {
                    let placement = self.scheduler.create_room(r.into()).await?;
                    Ok::<_, Status>(convert::placement(placement))
                },
            )
            .await
    }

    async fn get_room(&self, req: Request<pb::GetRoomRequest>) -> Reply<pb::Room> {
        self.gate
            .call(
                "GetRoom",
                Access::Manage,
                req,
                |r| &r.app_id,
                |r| async move {
                    Ok::<_, Status>(convert::room(
                        self.scheduler.get_room(&r.app_id, &r.room_id).await?,
                    ))
                },
            )
            .await
    }

    async fn destroy_room(
        &self,
        req: Request<pb::DestroyRoomRequest>,
    ) -> Reply<pb::DestroyRoomResponse> {
        self.gate
            .call(
                "DestroyRoom",
                Access::Manage,
                req,
                |r| &r.app_id,
                |r| async move {
                    self.scheduler.destroy_room(&r.app_id, &r.room_id).await?;
                    Ok::<_, Status>(pb::DestroyRoomResponse {})
                },
            )
            .await
    }

    async fn update_room_config(
        &self,
        req: Request<pb::UpdateRoomConfigRequest>,
    ) -> Reply<pb::Room> {
        self.gate
            .call(
                "UpdateRoomConfig",
                Access::Manage,
                req,
                |r| &r.app_id,
                |r| async move {
                    let room = self
                        .scheduler
                        .update_room_config(&r.app_id, &r.room_id, r.room_config)
                        .await?;
                    Ok::<_, Status>(convert::room(room))
                },
            )
            .await
    }

    async fn get_connection_info(
        &self,
        req: Request<pb::GetConnectionInfoRequest>,
    ) -> Reply<pb::ConnectionInfo> {
        self.gate
            .call(
                "GetConnectionInfo",
                Access::ConnectionInfo,
                req,
                |r| &r.app_id,
                |r| async move {
                    let info = self
                        .scheduler
                        .connection_info(&r.app_id, &r.room_id)
                        .await?;
                    Ok::<_, Status>(convert::connection_info(info))
                },
            )
            .await
    }

    type WatchConnectionInfoStream =
        Pin<Box<dyn Stream<Item = Result<pb::ConnectionInfo, Status>> + Send>>;

    async fn watch_connection_info(
        &self,
        req: Request<pb::GetConnectionInfoRequest>,
    ) -> Reply<Self::WatchConnectionInfoStream> {
        self.gate.call("WatchConnectionInfo", Access::ConnectionInfo, req, |r| &r.app_id, |r| async move {
            let mut watch = self.scheduler.watch_connection_info(&r.app_id, &r.room_id).await?;
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
            Ok::<_, Status>(Box::pin(ReceiverStream::new(rx)) as Self::WatchConnectionInfoStream)
        }).await
    }

    async fn list_active_rooms_for_process(
        &self,
        req: Request<pb::ListRoomsForProcessRequest>,
    ) -> Reply<pb::ListRoomsResponse> {
        self.gate
            .call(
                "ListActiveRoomsForProcess",
                Access::Manage,
                req,
                |r| &r.app_id,
                |r| async move {
                    let pid = convert::process_id(&r.app_id, &r.process_id)?;
                    let rooms = self.scheduler.list_active_rooms(&r.app_id, pid).await?;
                    Ok::<_, Status>(convert::rooms_page(rooms, r.page_size, &r.page_token)?)
                },
            )
            .await
    }

    async fn list_inactive_rooms_for_process(
        &self,
        req: Request<pb::ListRoomsForProcessRequest>,
    ) -> Reply<pb::ListRoomsResponse> {
        self.gate
            .call(
                "ListInactiveRoomsForProcess",
                Access::Manage,
                req,
                |r| &r.app_id,
                |r| async move {
                    let pid = convert::process_id(&r.app_id, &r.process_id)?;
                    let rooms = self.scheduler.list_inactive_rooms(&r.app_id, pid).await?;
                    Ok::<_, Status>(convert::rooms_page(rooms, r.page_size, &r.page_token)?)
                },
            )
            .await
    }
}

#[tonic::async_trait]
impl ProcessService for ProcessApi {
    async fn create_process(&self, req: Request<pb::CreateProcessRequest>) -> Reply<pb::Process> {
        self.gate
            .call(
                "CreateProcess",
                Access::Manage,
                req,
                |r| &r.app_id,
                |r| async move {
                    let deployment = Some(r.deployment_id).filter(|d| *d != 0);
                    let p = self
                        .scheduler
                        .create_process(&r.app_id, &r.region, deployment)
                        .await?;
                    Ok::<_, Status>(convert::process(p))
                },
            )
            .await
    }

    async fn get_process(&self, req: Request<pb::GetProcessRequest>) -> Reply<pb::Process> {
        self.gate
            .call(
                "GetProcess",
                Access::Manage,
                req,
                |r| &r.app_id,
                |r| async move {
                    let pid = convert::process_id(&r.app_id, &r.process_id)?;
                    Ok::<_, Status>(convert::process(
                        self.scheduler.get_process(&r.app_id, pid).await?,
                    ))
                },
            )
            .await
    }

    async fn list_processes(
        &self,
        req: Request<pb::ListProcessesRequest>,
    ) -> Reply<pb::ListProcessesResponse> {
        self.gate
            .call(
                "ListProcesses",
                Access::Manage,
                req,
                |r| &r.app_id,
                |r| async move {
                    let filter = convert::process_filter(r.app_id, &r.statuses, r.regions)?;
                    let page = self
                        .scheduler
                        .list_processes(&filter, r.page_size as usize, Some(&r.page_token))
                        .await?;
                    Ok::<_, Status>(pb::ListProcessesResponse {
                        processes: page.processes.into_iter().map(convert::process).collect(),
                        next_page_token: page.next_page_token.unwrap_or_default(),
                    })
                },
            )
            .await
    }

    async fn count_processes(
        &self,
        req: Request<pb::CountProcessesRequest>,
    ) -> Reply<pb::CountProcessesResponse> {
        self.gate
            .call(
                "CountProcesses",
                Access::Manage,
                req,
                |r| &r.app_id,
                |r| async move {
                    let filter = convert::process_filter(r.app_id, &r.statuses, r.regions)?;
                    Ok::<_, Status>(pb::CountProcessesResponse {
                        count: self.scheduler.count_processes(&filter).await?,
                    })
                },
            )
            .await
    }

    async fn drain_process(&self, req: Request<pb::DrainProcessRequest>) -> Reply<pb::Process> {
        self.gate
            .call(
                "DrainProcess",
                Access::Manage,
                req,
                |r| &r.app_id,
                |r| async move {
                    let pid = convert::process_id(&r.app_id, &r.process_id)?;
                    Ok::<_, Status>(convert::process(
                        self.scheduler.drain_process(&r.app_id, pid).await?,
                    ))
                },
            )
            .await
    }

    async fn stop_process(&self, req: Request<pb::StopProcessRequest>) -> Reply<pb::Process> {
        self.gate
            .call(
                "StopProcess",
                Access::Manage,
                req,
                |r| &r.app_id,
                |r| async move {
                    let pid = convert::process_id(&r.app_id, &r.process_id)?;
                    Ok::<_, Status>(convert::process(
                        self.scheduler.stop_process(&r.app_id, pid).await?,
                    ))
                },
            )
            .await
    }
}

#[tonic::async_trait]
impl DeploymentService for DeploymentApi {
    async fn create_deployment(
        &self,
        req: Request<pb::CreateDeploymentRequest>,
    ) -> Reply<pb::Deployment> {
        self.gate
            .call(
                "CreateDeployment",
                Access::Manage,
                req,
                |r| &r.app_id,
                |r| async move {
                    crate::core::validate_app_id(&r.app_id)?;
                    let app_id = r.app_id.clone();
                    let spec = DeploymentSpec::try_from(r)?;
                    Ok::<_, Status>(convert::deployment(
                        self.scheduler.create_deployment(&app_id, spec).await?,
                    ))
                },
            )
            .await
    }

    async fn get_deployment(
        &self,
        req: Request<pb::GetDeploymentRequest>,
    ) -> Reply<pb::Deployment> {
        self.gate
            .call(
                "GetDeployment",
                Access::Manage,
                req,
                |r| &r.app_id,
                |r| async move {
                    Ok::<_, Status>(convert::deployment(
                        self.scheduler
                            .get_deployment(&r.app_id, r.deployment_id)
                            .await?,
                    ))
                },
            )
            .await
    }

    async fn get_latest_deployment(
        &self,
        req: Request<pb::GetLatestDeploymentRequest>,
    ) -> Reply<pb::Deployment> {
        self.gate
            .call(
                "GetLatestDeployment",
                Access::Manage,
                req,
                |r| &r.app_id,
                |r| async move {
                    Ok::<_, Status>(convert::deployment(
                        self.scheduler.latest_deployment(&r.app_id).await?,
                    ))
                },
            )
            .await
    }

    async fn list_deployments(
        &self,
        req: Request<pb::ListDeploymentsRequest>,
    ) -> Reply<pb::ListDeploymentsResponse> {
        self.gate
            .call(
                "ListDeployments",
                Access::Manage,
                req,
                |r| &r.app_id,
                |r| async move {
                    let deployments = self.scheduler.list_deployments(&r.app_id).await?;
                    Ok::<_, Status>(pb::ListDeploymentsResponse {
                        deployments: deployments.into_iter().map(convert::deployment).collect(),
                    })
                },
            )
            .await
    }
}

#[tonic::async_trait]
impl AppService for AppApi {
    async fn set_region_policy(
        &self,
        req: Request<pb::SetRegionPolicyRequest>,
    ) -> Reply<pb::RegionPolicy> {
        self.gate
            .call(
                "SetRegionPolicy",
                Access::Manage,
                req,
                |r| &r.app_id,
                |r| async move {
                    let policy = RegionPolicy {
                        min_processes: r.min_processes,
                        buffer_rooms: r.buffer_rooms,
                        max_processes: r.max_processes,
                    };
                    let set = self
                        .scheduler
                        .set_region_policy(&r.app_id, &r.region, policy)
                        .await?;
                    Ok::<_, Status>(convert::region_policy(r.app_id, r.region, set))
                },
            )
            .await
    }

    async fn get_region_policy(
        &self,
        req: Request<pb::GetRegionPolicyRequest>,
    ) -> Reply<pb::RegionPolicy> {
        self.gate
            .call(
                "GetRegionPolicy",
                Access::Manage,
                req,
                |r| &r.app_id,
                |r| async move {
                    let policy = self
                        .scheduler
                        .get_region_policy(&r.app_id, &r.region)
                        .await?;
                    Ok::<_, Status>(convert::region_policy(r.app_id, r.region, policy))
                },
            )
            .await
    }

    async fn get_usage(&self, req: Request<pb::GetUsageRequest>) -> Reply<pb::Usage> {
        self.gate
            .call(
                "GetUsage",
                Access::Manage,
                req,
                |r| &r.app_id,
                |r| async move {
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
                    let usage = self
                        .scheduler
                        .usage(&r.app_id, &r.regions, start, end)
                        .await?;
                    Ok::<_, Status>(pb::Usage {
                        regions: usage.into_iter().map(convert::region_usage).collect(),
                    })
                },
            )
            .await
    }
}
