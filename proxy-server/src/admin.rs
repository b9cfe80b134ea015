//! What the server's admin and operator listeners serve (the listeners themselves are
//! [`proxy_common::admin`]'s). The admin listener, for the platform: health, readiness (the
//! listeners, the drain, the warm-up) and metrics. The operator listener, for people: the same,
//! plus the status page, the cluster list and the kubeconfigs, off loopback only for operators.

use std::sync::Arc;

use proxy_common::admin::Admin;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, FrontendAuth};
use crate::fleet::Fleet;
use crate::status::Status;

/// The admin listener: health, readiness and metrics. Readiness fails once `listener_lost`
/// fires (a listener stopped) or `draining` (shutdown began), and while the warm-up lasts.
pub(crate) fn routes(
    config: &Config,
    draining: &CancellationToken,
    fleet: &Arc<Fleet>,
    prometheus: prometheus_client::registry::Registry,
    listener_lost: &CancellationToken,
) -> Admin {
    let (lost, draining, warming) = (listener_lost.clone(), draining.clone(), fleet.clone());
    Admin {
        checks: vec![
            (
                "listeners",
                Arc::new(move || {
                    if lost.is_cancelled() {
                        Err("a listener stopped; shutting down".into())
                    } else if draining.is_cancelled() {
                        Err("draining for shutdown: not accepting connections".into())
                    } else {
                        Ok("agent, frontend and admin listeners serving".into())
                    }
                }),
            ),
            ("warmup", Arc::new(move || warmup_check(&warming))),
        ],
        metrics: Arc::new(prometheus),
        routes: None,
        keepalive: config.tcp_keepalive,
        hosts: config.admin_hosts.clone().into(),
        authorize: None,
    }
}

/// The operator listener: the admin listener's endpoints plus the status page, cluster list and
/// kubeconfigs; off loopback, only for clients marked `operator: true` in the auth file
/// (`Config::from_args` refuses it off loopback without one).
pub(crate) fn operator_routes(config: &Config, admin: Admin, status: Arc<Status>) -> Admin {
    let authorize: Option<proxy_common::admin::Authorize> = match (
        &config.frontend_auth,
        config.operator_addr.ip().is_loopback(),
    ) {
        (_, true) => None,
        (FrontendAuth::Policy(policy), false) => {
            let policy = policy.clone();
            Some(Arc::new(move |header| policy.current().operator(header)))
        }
        (_, false) => Some(Arc::new(|_| false)),
    };
    Admin {
        routes: Some(status.routes()),
        authorize,
        ..admin
    }
}

/// Readiness during the warm-up: with other replicas to serve clients, this one stays out of the
/// client load balancer's rotation until agents have had time to find it. A lone replica is
/// ready at once (CONNECTs it gets meanwhile wait for their agent, see `--warmup`).
fn warmup_check(fleet: &Fleet) -> Result<String, String> {
    match fleet.warmup_left() {
        Some(left) if fleet.count() > 1 => Err(format!(
            "warming up: agents are still finding this replica ({:.0} s left, {} replica(s))",
            left.as_secs_f64().ceil(),
            fleet.count()
        )),
        _ => Ok(format!(
            "server {} of a fleet of {}",
            fleet.server_id,
            fleet.count()
        )),
    }
}
