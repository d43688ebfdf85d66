//! Resuming a standby from the last committed checkpoint.

use std::time::{Duration, Instant};

use remus_vm::{Vm, devstate};

use crate::ReplError;
use crate::replica::Replica;

/// Timings of a failover.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FailoverStats {
    pub epoch: u64,
    pub load_ms: f64,
    pub cont_ms: f64,
}

/// Loads the committed device state into the standby QEMU (started with
/// `-incoming defer` on the replica), resumes it and announces its MACs.
pub fn resume(standby: &Vm, replica: &Replica) -> Result<FailoverStats, ReplError> {
    let epoch = replica
        .committed()
        .ok_or_else(|| ReplError::Setup("no committed checkpoint to resume from".into()))?;
    let t = Instant::now();
    devstate::prepare(standby.qmp()).map_err(|e| ReplError::Vm(e.to_string()))?;
    devstate::load(standby.qmp(), replica.device_state_path())
        .map_err(|e| ReplError::Vm(e.to_string()))?;
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    standby
        .qmp()
        .execute_timeout("cont", None, Duration::from_secs(5))
        .map_err(|e| ReplError::Vm(format!("cont: {e}")))?;
    let cont_ms = t.elapsed().as_secs_f64() * 1e3;
    if !standby.config.vifs.is_empty()
        && let Err(e) = remus_vm::vm::announce_self(standby.qmp())
    {
        tracing::warn!(vm = %standby.name(), error = %e, "announce-self failed");
    }
    Ok(FailoverStats {
        epoch: epoch.0,
        load_ms,
        cont_ms,
    })
}
