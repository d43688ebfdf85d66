//! The JSON payloads of the session setup, defined with the rest of the
//! wire format (docs/protocol.md lists every field):
//!
//! - [`SessionSetup`]: the `VmConfig` message (type 8), client → server
//!   right after the handshake: the VM's config and the session's
//!   parameters ([`ArbiterSetup`], [`Generations`], [`ReturnTo`]).
//! - [`SyncPlan`]: the `SyncPlan` message (type 9), server → client
//!   before Ready (version 5 on): how the disks will be synchronised.
//!
//! Generations ([`Gen`], [`Generations`]) name lines of a copy's data; the
//! rules by which they move (diverge, adopt, synced) are part of the
//! resync protocol and live here with them. A peer's sync plan is bounded
//! as it is parsed ([`MAX_PLAN_DISKS`], [`MAX_RUNS`]); a setup is bounded
//! by its frame and validated by the receiving agent before use.

use serde::{Deserialize, Serialize};

pub use remus_config::VmConfig;

/// Generations kept in `history`.
const HISTORY: usize = 4;

/// A generation identifier: random, never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Gen(#[serde(with = "hex_u64")] pub u64);

impl std::fmt::Display for Gen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

mod hex_u64 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:016x}"))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        u64::from_str_radix(&s, 16).map_err(serde::de::Error::custom)
    }
}

impl Gen {
    /// A fresh random generation.
    pub fn new() -> Gen {
        loop {
            let mut b = [0u8; 8];
            if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
                let _ = std::io::Read::read_exact(&mut f, &mut b);
            }
            let mut v = u64::from_ne_bytes(b);
            if v == 0 {
                // No urandom: time and pid, which still differ per call.
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1);
                v = t ^ (u64::from(std::process::id()) << 40);
            }
            if v != 0 {
                return Gen(v);
            }
        }
    }
}

impl Default for Gen {
    fn default() -> Gen {
        Gen::new()
    }
}

/// A copy's generations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generations {
    /// The line of data this copy holds.
    pub current: Gen,
    /// Set while this copy has gone on alone: the generation its change
    /// records count from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<Gen>,
    /// Earlier generations of this copy, newest first.
    #[serde(default)]
    pub history: Vec<Gen>,
}

impl Generations {
    pub fn fresh() -> Generations {
        Generations {
            current: Gen::new(),
            bitmap: None,
            history: Vec::new(),
        }
    }

    fn push_history(&mut self, g: Gen) {
        if !self.history.contains(&g) {
            self.history.insert(0, g);
            self.history.truncate(HISTORY);
        }
    }

    /// This copy goes on alone (failover, or its session ended): a new
    /// current generation; change records count from the old one unless
    /// they already count from an earlier one.
    pub fn diverge(&mut self) {
        if self.bitmap.is_none() {
            self.bitmap = Some(self.current);
        }
        self.push_history(self.current);
        self.current = Gen::new();
    }

    /// A resync from `source` committed here: this copy now holds the
    /// source's generation and has no changes of its own.
    pub fn adopt(&mut self, source: &Generations) {
        if self.current != source.current {
            self.push_history(self.current);
        }
        self.current = source.current;
        self.bitmap = None;
        for g in source.history.iter().rev() {
            self.push_history(*g);
        }
    }

    /// A resync from this copy committed on its peer: its change records
    /// are spent.
    pub fn synced(&mut self) {
        if let Some(b) = self.bitmap.take() {
            self.push_history(b);
        }
    }
}

/// How the disks of a session are synchronised.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// Digests of every chunk are compared.
    #[default]
    Full,
    /// Only the chunks either side's change records mark are compared.
    Changed,
}

/// The backup's answer to a session setup (the SyncPlan message).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncPlan {
    pub mode: SyncMode,
    /// Why, in words, for the logs and the operator.
    pub reason: String,
    /// The generation both copies descend from (changed mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub common: Option<Gen>,
    /// Changed mode: per replicated disk, the chunks the target's own
    /// change records mark, as (first, count) runs. Bounded as it is
    /// read (at most [`MAX_PLAN_DISKS`] lists of [`MAX_RUNS`] runs): a
    /// peer's plan is parsed before it is checked against the VM, and an
    /// unbounded list of empty lists would cost 8 times its size.
    #[serde(default, deserialize_with = "bounded_runs")]
    pub target_runs: Vec<Vec<(u64, u64)>>,
}

/// Most disk lists in a sync plan: a VM has at most 26 disks (vda..vdz).
pub const MAX_PLAN_DISKS: usize = 26;

fn bounded_runs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Vec<(u64, u64)>>, D::Error> {
    use serde::de::{Error, SeqAccess, Visitor};
    struct Bounded<T>(usize, std::marker::PhantomData<T>);
    impl<'de, T: serde::Deserialize<'de>> Visitor<'de> for Bounded<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a list of at most {} items", self.0)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut v = Vec::new();
            while let Some(x) = seq.next_element()? {
                if v.len() == self.0 {
                    return Err(A::Error::custom(format!("more than {} items", self.0)));
                }
                v.push(x);
            }
            Ok(v)
        }
    }
    struct Runs;
    impl<'de> serde::de::DeserializeSeed<'de> for Runs {
        type Value = Vec<(u64, u64)>;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_seq(Bounded(MAX_RUNS, std::marker::PhantomData))
        }
    }
    struct Disks;
    impl<'de> Visitor<'de> for Disks {
        type Value = Vec<Vec<(u64, u64)>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "at most {MAX_PLAN_DISKS} lists of runs")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut v = Vec::new();
            while let Some(runs) = seq.next_element_seed(Runs)? {
                if v.len() == MAX_PLAN_DISKS {
                    return Err(A::Error::custom(format!(
                        "runs for more than {MAX_PLAN_DISKS} disks"
                    )));
                }
                v.push(runs);
            }
            Ok(v)
        }
    }
    d.deserialize_seq(Disks)
}

/// Most runs sent for one disk (16 MiB of DiskSyncRuns).
pub const MAX_RUNS: usize = 1 << 20;

/// What the primary sends after the handshake (the `VmConfig` message's
/// JSON): the VM's config and the session's parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionSetup {
    pub config: VmConfig,
    /// No checkpoint or heartbeat for this long: the primary is lost.
    pub timeout_ms: u64,
    /// The VM's replicated disks are replicated in this session (protocol
    /// D): the backup syncs and buffers them. False for `--no-disk`, for
    /// VMs without replicated disks, and from agents that predate it.
    #[serde(default)]
    pub replicate_disks: bool,
    /// The primary holds the VM's arbiter key: the backup may resume only
    /// after taking it (protocol version 4 on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arbiter: Option<ArbiterSetup>,
    /// The primary's generations (protocol version 5 on, with replicated
    /// disks): the backup plans the disk sync from them and answers with
    /// a SyncPlan before Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generations: Option<Generations>,
    /// Where the primary's agent takes replication sessions, and the
    /// session's settings: after a planned switch-over (`remus failback`)
    /// the backup protects the VM back to it with them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub return_to: Option<ReturnTo>,
    /// The primary can change the failover timeout during the session
    /// (`remus protect --set`): a backup that can take it answers with a
    /// Tune before Ready. Absent (older agents): no.
    #[serde(default)]
    pub tune: bool,
    /// The primary's agent may suspend the session when it restarts (a
    /// Suspend) and resume it afterwards: a backup that keeps its standby
    /// across that answers with a Resumable first. Absent (older agents):
    /// no.
    #[serde(default)]
    pub suspend: bool,
    /// This session resumes a suspended one from this committed epoch:
    /// the guest has stayed stopped at it since. A backup that still holds
    /// its standby at exactly that epoch answers Resumable with it and
    /// skips the copy; otherwise it sets up a new copy as usual.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<u64>,
    /// The primary can send device state without QEMU's RAM blocks (its
    /// firmware and ACPI tables, which the guest cannot write; never for
    /// a UEFI VM, whose variable store is such a block): a backup whose
    /// standby loads that answers with a DevicesOnlyState before Ready.
    /// Absent (older agents): no.
    #[serde(default)]
    pub devices_only_state: bool,
}

/// How the new primary protects back after a planned switch-over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReturnTo {
    pub address: String,
    pub interval_ms: u64,
    pub no_net: bool,
    pub no_compress: bool,
    /// After a failover (not only a switch-over), the backup protects the
    /// VM back here by itself once this host's agent answers again. Absent
    /// (older agents): yes.
    #[serde(default = "yes")]
    pub reprotect: bool,
    /// The new primary wants the protection back kept up (it sets it up
    /// again when its backup is lost); false for `remus protect
    /// --manual`. Absent (older agents): yes.
    #[serde(default = "yes")]
    pub heal: bool,
    /// The VM's `--max-rate` (bytes/s) for the copy back; 0 (and absent,
    /// older agents): the new primary's own default.
    #[serde(default)]
    pub max_rate: u64,
}

fn yes() -> bool {
    true
}

/// The arbiter a protection session is decided by.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArbiterSetup {
    /// etcd's cluster ID as the primary sees it: the backup must talk to
    /// the same cluster.
    pub cluster_id: u64,
    pub prefix: String,
    /// The primary's lease (hex) and the revision it was taken at.
    pub lease: String,
    pub revision: i64,
    /// Every output of the VM waits for its checkpoint in this session
    /// (every NIC buffered, every writable disk replicated), and the
    /// primary holds its output after any end of the session until the
    /// key is pinned to it. So a backup that loses the primary may take
    /// the key from the tenure at `revision` at once, without waiting for
    /// the lease to lapse: whichever of the two writes the key first wins.
    /// Absent (older agents): no; the backup waits for the lease.
    #[serde(default)]
    pub fast_takeover: bool,
}
