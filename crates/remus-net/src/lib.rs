//! remus-net: the per-VM-NIC network relay of `remusd`.
//!
//! Each VM NIC is started with
//! `-netdev stream,id=n0,server=off,addr.type=unix,addr.path=SOCK`: QEMU
//! connects as a client to a unix stream socket the agent listens on, and
//! every Ethernet frame on it is preceded by a 4-byte big-endian length
//! ([`frame`]). The agent relays those frames to and from a Linux tap
//! device ([`tap`]) attached to the bridge named in the VM config (like
//! Xen's `vif = ['bridge=xenbr0']`). Frames leaving the VM pass through the
//! [`Egress`] seam ([`relay`]), where Remus output buffering plugs in.
//!
//! Everything is synchronous: two std threads per relay, no async runtime.

pub mod commit;
pub mod frame;
pub mod inbound;
pub mod relay;
pub mod tap;

pub use commit::{CommitEgress, EpochOutput, OutputCommit, OutputSignal, OutputStats};
pub use frame::{FrameDecoder, FrameError, MAX_FRAME_LEN};
pub use inbound::{Drain, InboundGate};
pub use relay::{
    DropCounts, Egress, GateStats, PassThrough, Relay, RelayError, RelayStats, TapSink,
};
pub use tap::{Tap, TapError};
