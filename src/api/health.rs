//! `vitals.v1.HealthCheckService`: parse the request into domain values
//! (every violation at once), call the use case in
//! [`crate::service::health`], convert the result back. No rules live here.

use std::{pin::Pin, sync::Arc};

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::{
    convert::{
        Violations, check_out, duration_in, duration_out, evaluation_out, flapping_in, run_out, status_in, status_out,
        summary_out, system_out, thresholds_in, timestamp_in, timestamp_out, transition_out, window_out,
    },
    page_token::{self, Kind, PageTokenKey},
};
use crate::{
    auth::Access,
    domain::{
        CheckId, FieldViolation, Latency, MAX_DEPENDENCIES, MAX_RUNS_CONSIDERED, MaintenanceWindow, RunId, RunMessage,
        SystemId,
    },
    error::Error,
    middleware::RequestDeadline,
    proto::{self, health_check_service_server::HealthCheckService},
    service::HealthService,
    store::{CheckUpdate, NewRun, RunCursor, TRANSITION_RETENTION, Transition},
};

/// Runs may be observed at most this far in the future (clock skew allowance).
const MAX_FUTURE_SKEW: chrono::TimeDelta = chrono::TimeDelta::minutes(5);
/// Page size when the client gives none.
const DEFAULT_PAGE_SIZE: u32 = 50;
/// Largest page.
const MAX_PAGE_SIZE: u32 = 1000;
/// Longest system id prefix: as long as an id.
const MAX_PREFIX_BYTES: usize = 256;

/// The handler state.
#[derive(Debug, Clone)]
pub struct HealthApi {
    /// What each RPC does once parsed.
    service: HealthService,
    /// Signs and checks the listings' page tokens.
    page_tokens: Arc<PageTokenKey>,
}

impl HealthApi {
    /// Handlers calling `service`, signing page tokens with `page_tokens`.
    pub fn new(service: HealthService, page_tokens: Arc<PageTokenKey>) -> Self {
        HealthApi { service, page_tokens }
    }
}

fn page_size(v: &mut Violations, field: &str, raw: i32) -> u32 {
    match u32::try_from(raw) {
        Ok(0) => DEFAULT_PAGE_SIZE,
        Ok(n) if n <= MAX_PAGE_SIZE => n,
        _ => {
            v.push(field, format!("must be between 0 and {MAX_PAGE_SIZE}"));
            DEFAULT_PAGE_SIZE
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<proto::WatchTransitionsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl HealthCheckService for HealthApi {
    async fn evaluate_health(
        &self,
        request: Request<proto::EvaluateHealthRequest>,
    ) -> Result<Response<proto::EvaluateHealthResponse>, Status> {
        let req = request.into_inner();
        let mut v = Violations::default();
        if req.statuses.len() > MAX_RUNS_CONSIDERED {
            v.push(
                "statuses",
                format!("at most {MAX_RUNS_CONSIDERED} statuses are evaluated"),
            );
        }
        let mut statuses = Vec::with_capacity(req.statuses.len().min(MAX_RUNS_CONSIDERED));
        for (i, raw) in req.statuses.iter().take(MAX_RUNS_CONSIDERED + 1).enumerate() {
            if let Some(s) = v.take(status_in(&format!("statuses[{i}]"), *raw)) {
                statuses.push(s);
            }
        }
        let thresholds = v.take_all(thresholds_in("thresholds", req.thresholds));
        let thresholds = v.finish(|| thresholds)?.unwrap_or_default();
        let evaluation = self.service.evaluate(&statuses, &thresholds);
        Ok(Response::new(proto::EvaluateHealthResponse {
            status: status_out(evaluation.status) as i32,
            evaluation: Some(evaluation_out(&evaluation)),
        }))
    }

    async fn submit_run(
        &self,
        request: Request<proto::SubmitRunRequest>,
    ) -> Result<Response<proto::SubmitRunResponse>, Status> {
        let deadline = RequestDeadline::of(&request);
        let access = Access::of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::default();
        let run_id = if req.run_id.is_empty() {
            RunId::parse("run_id", uuid::Uuid::now_v7().to_string()).ok()
        } else {
            v.take(RunId::parse("run_id", req.run_id))
        };
        let system_id = v.take(SystemId::parse("system_id", req.system_id));
        let check_id = v.take(CheckId::parse("check_id", req.check_id));
        let status = v.take(status_in("status", req.status));
        let now = chrono::Utc::now();
        let observed_at = match &req.observed_at {
            None => Some(timestamp_in("observed_at", &crate::api::convert::timestamp_out(now)).unwrap_or(now)),
            Some(ts) => v.take(timestamp_in("observed_at", ts).and_then(|t| {
                if t > now + MAX_FUTURE_SKEW {
                    Err(crate::domain::FieldViolation::new(
                        "observed_at",
                        "must not be more than 5 minutes in the future",
                    ))
                } else {
                    Ok(t)
                }
            })),
        };
        let latency = match &req.latency {
            None => Some(None),
            Some(d) => v
                .take(duration_in("latency", d).and_then(|d| Latency::parse("latency", d)))
                .map(Some),
        };
        let message = v.take(RunMessage::parse("message", req.message));
        let new = v.finish(|| {
            Some(NewRun {
                run_id: run_id?,
                system_id: system_id?,
                check_id: check_id?,
                status: status?,
                observed_at: observed_at?,
                observed_at_given: req.observed_at.is_some(),
                latency: latency?,
                message: message?,
            })
        })?;
        access.check_system(new.system_id.as_str())?;

        let outcome = self.service.submit_run(&new, deadline).await?;
        Ok(Response::new(proto::SubmitRunResponse {
            system_health: Some(system_out(&outcome.health)),
            transition: outcome.transition.as_ref().map(transition_out),
            duplicate: outcome.duplicate,
            run: Some(run_out(&outcome.run)),
        }))
    }

    async fn get_system_health(
        &self,
        request: Request<proto::GetSystemHealthRequest>,
    ) -> Result<Response<proto::GetSystemHealthResponse>, Status> {
        let access = Access::of(&request)?;
        let req = request.into_inner();
        let system_id = SystemId::parse("system_id", req.system_id).map_err(|v| Error::InvalidArgument(vec![v]))?;
        access.check_system(system_id.as_str())?;
        let health = self.service.system(&system_id).await?;
        Ok(Response::new(proto::GetSystemHealthResponse {
            system_health: Some(system_out(&health)),
        }))
    }

    async fn list_runs(
        &self,
        request: Request<proto::ListRunsRequest>,
    ) -> Result<Response<proto::ListRunsResponse>, Status> {
        let access = Access::of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::default();
        let filter = format!("{}\u{0}{}", req.system_id, req.check_id);
        let system_id = v.take(SystemId::parse("system_id", req.system_id));
        let check_id = if req.check_id.is_empty() {
            Some(None)
        } else {
            v.take(CheckId::parse("check_id", req.check_id)).map(Some)
        };
        let limit = page_size(&mut v, "page_size", req.page_size);
        let cursor = if req.page_token.is_empty() {
            Some(None)
        } else {
            v.take(
                page_token::decode(&self.page_tokens, "page_token", Kind::Runs, &filter, &req.page_token).and_then(
                    |body| {
                        page_token::parse_run_cursor(&body)
                            .map(|(observed_at, run_id)| Some(RunCursor { observed_at, run_id }))
                            .ok_or_else(|| {
                                crate::domain::FieldViolation::new("page_token", "is not a valid page token")
                            })
                    },
                ),
            )
        };
        let (system_id, check_id, cursor) = v.finish(|| Some((system_id?, check_id?, cursor?)))?;
        access.check_system(system_id.as_str())?;
        let page = self
            .service
            .list_runs(&system_id, check_id.as_ref(), cursor.as_ref(), limit)
            .await?;
        let next_page_token = page
            .items
            .last()
            .filter(|_| page.more)
            .map(|r| {
                page_token::encode(
                    &self.page_tokens,
                    Kind::Runs,
                    &filter,
                    &page_token::run_cursor_body(r.observed_at, &r.run_id),
                )
            })
            .transpose()?
            .unwrap_or_default();
        Ok(Response::new(proto::ListRunsResponse {
            runs: page.items.iter().map(run_out).collect(),
            next_page_token,
        }))
    }

    async fn list_transitions(
        &self,
        request: Request<proto::ListTransitionsRequest>,
    ) -> Result<Response<proto::ListTransitionsResponse>, Status> {
        let access = Access::of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::default();
        let filter = req.system_id.clone();
        let system_id = if req.system_id.is_empty() {
            Some(None)
        } else {
            v.take(SystemId::parse("system_id", req.system_id)).map(Some)
        };
        let limit = page_size(&mut v, "page_size", req.page_size);
        let before = if req.page_token.is_empty() {
            Some(None)
        } else {
            v.take(
                page_token::decode(
                    &self.page_tokens,
                    "page_token",
                    Kind::Transitions,
                    &filter,
                    &req.page_token,
                )
                .and_then(|body| {
                    <[u8; 8]>::try_from(body.as_slice())
                        .map(|b| Some(u64::from_be_bytes(b)))
                        .map_err(|_| crate::domain::FieldViolation::new("page_token", "is not a valid page token"))
                }),
            )
        };
        let (system_id, before) = v.finish(|| Some((system_id?, before?)))?;
        if let Some(system_id) = &system_id {
            access.check_system(system_id.as_str())?;
        }
        let page = self.service.list_transitions(system_id.as_ref(), before, limit).await?;
        // The token resumes after the last transition read, shown or not: a
        // page of systems the caller may not read is empty but not the end.
        let next_page_token = page
            .items
            .last()
            .filter(|_| page.more)
            .map(|t| page_token::encode(&self.page_tokens, Kind::Transitions, &filter, &t.sequence.to_be_bytes()))
            .transpose()?
            .unwrap_or_default();
        Ok(Response::new(proto::ListTransitionsResponse {
            transitions: page
                .items
                .iter()
                .filter(|t| access.may_use_system(t.system_id.as_str()))
                .map(transition_out)
                .collect(),
            next_page_token,
        }))
    }

    type WatchTransitionsStream = WatchStream;

    async fn watch_transitions(
        &self,
        request: Request<proto::WatchTransitionsRequest>,
    ) -> Result<Response<Self::WatchTransitionsStream>, Status> {
        let access = Access::of(&request)?;
        let req = request.into_inner();
        let system_id = if req.system_id.is_empty() {
            None
        } else {
            Some(SystemId::parse("system_id", req.system_id).map_err(|v| Error::InvalidArgument(vec![v]))?)
        };
        if let Some(system_id) = &system_id {
            access.check_system(system_id.as_str())?;
        }
        let subscription = self.service.watch(system_id, req.after_sequence).await?;
        // A watch of every system shows the caller only the systems it may
        // read; the others pass by unseen, as do the transitions the caller
        // asked to leave out.
        let (exclude_maintenance, exclude_flapping) = (req.exclude_maintenance, req.exclude_flapping);
        let readable = move |item: &Result<Arc<Transition>, Error>| {
            futures::future::ready(item.as_ref().map_or(true, |t| {
                access.may_use_system(t.system_id.as_str())
                    && !(exclude_maintenance && t.in_maintenance)
                    && !(exclude_flapping && t.flapping)
            }))
        };
        let stream = subscription.filter(readable).map(|item| {
            item.map(|t| proto::WatchTransitionsResponse {
                transition: Some(transition_out(&t)),
            })
            .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn configure_check(
        &self,
        request: Request<proto::ConfigureCheckRequest>,
    ) -> Result<Response<proto::ConfigureCheckResponse>, Status> {
        let deadline = RequestDeadline::of(&request);
        let access = Access::of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::default();
        let system_id = v.take(SystemId::parse("system_id", req.system_id));
        let check_id = v.take(CheckId::parse("check_id", req.check_id));
        let thresholds = v.take_all(thresholds_in("thresholds", req.thresholds));
        let flapping = v.take_all(flapping_in("flapping", req.flapping));
        let update = v.finish(|| {
            Some(CheckUpdate {
                system_id: system_id?,
                check_id: check_id?,
                thresholds: thresholds?,
                enabled: req.enabled,
                flapping: flapping?,
            })
        })?;
        access.check_system(update.system_id.as_str())?;
        let outcome = self.service.configure_check(&update, deadline).await?;
        // Who changed what a check does is an audit record, whoever asks
        // (the request id is the span's).
        tracing::info!(
            principal = access.name(),
            system_id = update.system_id.as_str(),
            check_id = update.check_id.as_str(),
            enabled = outcome.check.enabled,
            "check configured"
        );
        Ok(Response::new(proto::ConfigureCheckResponse {
            check: Some(check_out(&outcome.check)),
            system_health: Some(system_out(&outcome.health)),
            transition: outcome.transition.as_ref().map(transition_out),
        }))
    }

    async fn list_systems(
        &self,
        request: Request<proto::ListSystemsRequest>,
    ) -> Result<Response<proto::ListSystemsResponse>, Status> {
        let access = Access::of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::default();
        let status = if req.status == proto::HealthStatus::Unspecified as i32 {
            Some(None)
        } else {
            v.take(status_in("status", req.status)).map(Some)
        };
        if req.system_id_prefix.len() > MAX_PREFIX_BYTES {
            v.push("system_id_prefix", format!("must be at most {MAX_PREFIX_BYTES} bytes"));
        }
        if req.system_id_prefix.chars().any(char::is_control) {
            v.push("system_id_prefix", "must not contain control characters");
        }
        let filter = format!("{}\u{0}{}", req.status, req.system_id_prefix);
        let limit = page_size(&mut v, "page_size", req.page_size);
        let after = if req.page_token.is_empty() {
            Some(None)
        } else {
            v.take(
                page_token::decode(&self.page_tokens, "page_token", Kind::Systems, &filter, &req.page_token).and_then(
                    |body| {
                        String::from_utf8(body)
                            .map(Some)
                            .map_err(|_| FieldViolation::new("page_token", "is not a valid page token"))
                    },
                ),
            )
        };
        let (status, after) = v.finish(|| Some((status?, after?)))?;
        let page = self
            .service
            .list_systems(status, &req.system_id_prefix, access.systems(), after.as_deref(), limit)
            .await?;
        // The store read only what the caller may see: the token names a
        // system it was shown.
        let next_page_token = page
            .items
            .last()
            .filter(|_| page.more)
            .map(|s| page_token::encode(&self.page_tokens, Kind::Systems, &filter, s.system_id.as_bytes()))
            .transpose()?
            .unwrap_or_default();
        Ok(Response::new(proto::ListSystemsResponse {
            systems: page
                .items
                .iter()
                // Already so; kept as a second guard.
                .filter(|s| access.may_use_system(s.system_id.as_str()))
                .map(summary_out)
                .collect(),
            next_page_token,
        }))
    }

    async fn delete_check(
        &self,
        request: Request<proto::DeleteCheckRequest>,
    ) -> Result<Response<proto::DeleteCheckResponse>, Status> {
        let deadline = RequestDeadline::of(&request);
        let access = Access::of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::default();
        let system_id = v.take(SystemId::parse("system_id", req.system_id));
        let check_id = v.take(CheckId::parse("check_id", req.check_id));
        let (system_id, check_id) = v.finish(|| Some((system_id?, check_id?)))?;
        access.check_system(system_id.as_str())?;
        let outcome = self.service.delete_check(&system_id, &check_id, deadline).await?;
        if outcome.deleted {
            tracing::info!(
                principal = access.name(),
                system_id = system_id.as_str(),
                check_id = check_id.as_str(),
                "check deleted"
            );
        }
        Ok(Response::new(proto::DeleteCheckResponse {
            deleted: outcome.deleted,
            system_health: outcome.health.as_ref().map(system_out),
            transition: outcome.transition.as_ref().map(transition_out),
        }))
    }

    async fn delete_system(
        &self,
        request: Request<proto::DeleteSystemRequest>,
    ) -> Result<Response<proto::DeleteSystemResponse>, Status> {
        let deadline = RequestDeadline::of(&request);
        let access = Access::of(&request)?;
        let req = request.into_inner();
        let system_id = SystemId::parse("system_id", req.system_id).map_err(|v| Error::InvalidArgument(vec![v]))?;
        access.check_system(system_id.as_str())?;
        let deleted = self.service.delete_system(&system_id, deadline).await?;
        if deleted {
            tracing::info!(
                principal = access.name(),
                system_id = system_id.as_str(),
                "system deleted"
            );
        }
        Ok(Response::new(proto::DeleteSystemResponse { deleted }))
    }

    async fn set_maintenance(
        &self,
        request: Request<proto::SetMaintenanceRequest>,
    ) -> Result<Response<proto::SetMaintenanceResponse>, Status> {
        let deadline = RequestDeadline::of(&request);
        let access = Access::of(&request)?;
        let req = request.into_inner();
        // At the stored precision: the window replied is the window stored.
        let now = chrono::Utc::now();
        let now = chrono::DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
        let mut v = Violations::default();
        let system_id = v.take(SystemId::parse("system_id", req.system_id));
        let starts_at = match &req.starts_at {
            None => Some(now),
            Some(ts) => v.take(timestamp_in("starts_at", ts)),
        };
        let ends_at = match &req.ends_at {
            None => {
                v.push("ends_at", "is required");
                None
            }
            Some(ts) => v.take(timestamp_in("ends_at", ts)),
        };
        let window = match (starts_at, ends_at) {
            (Some(starts_at), Some(ends_at)) => {
                v.take_all(MaintenanceWindow::requested(starts_at, ends_at, req.reason, now))
            }
            _ => None,
        };
        let (system_id, window) = v.finish(|| Some((system_id?, window?)))?;
        access.check_system(system_id.as_str())?;
        let (window, health) = self.service.set_maintenance(&system_id, window, deadline).await?;
        tracing::info!(
            principal = access.name(),
            system_id = system_id.as_str(),
            starts_at = %window.starts_at,
            ends_at = %window.ends_at,
            "maintenance window set"
        );
        Ok(Response::new(proto::SetMaintenanceResponse {
            window: Some(window_out(&window)),
            system_health: Some(system_out(&health)),
        }))
    }

    async fn clear_maintenance(
        &self,
        request: Request<proto::ClearMaintenanceRequest>,
    ) -> Result<Response<proto::ClearMaintenanceResponse>, Status> {
        let deadline = RequestDeadline::of(&request);
        let access = Access::of(&request)?;
        let req = request.into_inner();
        let system_id = SystemId::parse("system_id", req.system_id).map_err(|v| Error::InvalidArgument(vec![v]))?;
        access.check_system(system_id.as_str())?;
        let (cleared, health) = self.service.clear_maintenance(&system_id, deadline).await?;
        if cleared > 0 {
            tracing::info!(
                principal = access.name(),
                system_id = system_id.as_str(),
                cleared,
                "maintenance cleared"
            );
        }
        Ok(Response::new(proto::ClearMaintenanceResponse {
            cleared,
            system_health: health.as_ref().map(system_out),
        }))
    }

    async fn get_uptime(
        &self,
        request: Request<proto::GetUptimeRequest>,
    ) -> Result<Response<proto::GetUptimeResponse>, Status> {
        let access = Access::of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::default();
        let system_id = v.take(SystemId::parse("system_id", req.system_id));
        let window = match &req.window {
            None => {
                v.push("window", "is required");
                None
            }
            Some(d) => v.take(duration_in("window", d).and_then(|d| {
                if d < std::time::Duration::from_secs(1) {
                    Err(FieldViolation::new("window", "must be at least 1s"))
                } else {
                    Ok(d)
                }
            })),
        };
        let (system_id, window) = v.finish(|| Some((system_id?, window?)))?;
        access.check_system(system_id.as_str())?;
        // At the stored precision, so that every duration is whole microseconds.
        let now = chrono::Utc::now();
        let to = chrono::DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
        // Older transitions are gone: a longer window would count a guess.
        let window = chrono::TimeDelta::from_std(window)
            .unwrap_or(TRANSITION_RETENTION)
            .min(TRANSITION_RETENTION);
        let from = to - window;
        let uptime = self.service.uptime(&system_id, from, to).await?;
        let delta_out = |d: chrono::TimeDelta| duration_out(d.to_std().unwrap_or_default());
        Ok(Response::new(proto::GetUptimeResponse {
            system_id: system_id.into_inner(),
            window_start: Some(timestamp_out(from)),
            window_end: Some(timestamp_out(to)),
            counted_from: Some(timestamp_out(uptime.counted_from)),
            healthy: Some(delta_out(uptime.healthy)),
            degraded: Some(delta_out(uptime.degraded)),
            unhealthy: Some(delta_out(uptime.unhealthy)),
            maintenance: Some(delta_out(uptime.maintenance)),
            healthy_percent: uptime.percent(crate::domain::Status::Healthy),
            degraded_percent: uptime.percent(crate::domain::Status::Degraded),
            unhealthy_percent: uptime.percent(crate::domain::Status::Unhealthy),
        }))
    }

    async fn configure_system(
        &self,
        request: Request<proto::ConfigureSystemRequest>,
    ) -> Result<Response<proto::ConfigureSystemResponse>, Status> {
        let deadline = RequestDeadline::of(&request);
        let access = Access::of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::default();
        let system_id = v.take(SystemId::parse("system_id", req.system_id));
        let limit = usize::try_from(MAX_DEPENDENCIES).unwrap_or(usize::MAX);
        if req.depends_on.len() > limit {
            v.push("depends_on", format!("at most {MAX_DEPENDENCIES} systems"));
        }
        let mut depends_on = Vec::with_capacity(req.depends_on.len().min(limit));
        for (i, raw) in req.depends_on.into_iter().take(limit + 1).enumerate() {
            if let Some(id) = v.take(SystemId::parse(&format!("depends_on[{i}]"), raw)) {
                depends_on.push(id);
            }
        }
        depends_on.sort_unstable();
        depends_on.dedup();
        let system_id = v.finish(|| system_id)?;
        access.check_system(system_id.as_str())?;
        // Naming a dependency exposes its state in caused_by: the caller must
        // be allowed to read it.
        for dependency in &depends_on {
            access.check_system(dependency.as_str())?;
        }
        let health = self.service.configure_system(&system_id, &depends_on, deadline).await?;
        tracing::info!(
            principal = access.name(),
            system_id = system_id.as_str(),
            dependencies = depends_on.len(),
            "system configured"
        );
        Ok(Response::new(proto::ConfigureSystemResponse {
            system_health: Some(system_out(&health)),
        }))
    }
}
