//! remus-nbd: the NBD server through which `remusd` hands each VM disk to
//! QEMU over a unix socket, so that every guest write, flush and trim passes
//! through remus (and, later, can be replicated per checkpoint epoch).
//!
//! Scope: fixed newstyle handshake (`NBD_OPT_EXPORT_NAME`, `NBD_OPT_INFO`,
//! `NBD_OPT_GO`, `NBD_OPT_LIST`, `NBD_OPT_ABORT`; everything else is answered
//! `NBD_REP_ERR_UNSUP`) and simple replies only (`READ`, `WRITE`, `DISC`,
//! `FLUSH`, `TRIM`, `WRITE_ZEROES` with `FUA` / `NO_HOLE`). One export per
//! server; synchronous, one thread per connection.
//!
//! ```no_run
//! use std::{path::Path, sync::Arc};
//! use remus_nbd::{FileBackend, NbdServer};
//!
//! let disk = FileBackend::open(Path::new("/var/lib/remus/vm1.raw"), false)?;
//! let server = NbdServer::start(Path::new("/run/remus/vm1-disk0.sock"), "disk0", Arc::new(disk))?;
//! // QEMU: -blockdev driver=nbd,server.type=unix,server.path=/run/remus/vm1-disk0.sock,export=disk0,...
//! println!("{:?}", server.stats());
//! server.shutdown();
//! # Ok::<(), remus_nbd::NbdError>(())
//! ```

pub mod backend;
pub mod client;
pub mod error;
pub mod process;
pub mod proto;
pub mod qsd;
pub mod server;

pub use backend::{BlockBackend, FileBackend};
pub use client::NbdClient;
pub use error::{NbdError, ProtoError};
pub use qsd::StorageDaemon;
pub use server::{NbdServer, NbdServerHandle, NbdStats};
