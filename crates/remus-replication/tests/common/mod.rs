//! What the backup tests share: a scripted primary on one end of a real
//! encrypted channel (a TCP connection after the real handshake), the
//! backup's receive loop on the other.

use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use remus_disk::EpochBuffer;
use remus_proto::{Channel, HelloParams, Key, Message, Purpose, ServerOptions, VmCompat};
use remus_replication::backup::{BackupConfig, BackupEnd, receive};
use remus_replication::replica::Replica;

/// The next frame from the backup that is not a heartbeat.
pub fn next(r: &mut Channel) -> Message {
    loop {
        match Message::read_from(r).expect("frame from the backup") {
            Message::Heartbeat { .. } => continue,
            m => return m,
        }
    }
}

/// Runs the backup's receive loop into `replica` (and `disks`) on one
/// accepted connection while `primary` scripts the other end (its reads
/// time out after 10 s); returns how the session ended, once both are
/// done.
pub fn session(
    replica: &mut Replica,
    disks: Option<&mut EpochBuffer>,
    primary: impl FnOnce(Channel) + Send + 'static,
) -> BackupEnd {
    session_with(replica, disks, false, None, primary).unwrap()
}

/// [`session`] with the backup taking a Suspend or not (it said
/// Resumable), and its agent's restart flag, returning the receive loop's
/// error too.
#[allow(dead_code)]
pub fn session_with(
    replica: &mut Replica,
    disks: Option<&mut EpochBuffer>,
    suspendable: bool,
    restarting: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    primary: impl FnOnce(Channel) + Send + 'static,
) -> Result<BackupEnd, remus_replication::ReplError> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let key = Key::from_bytes(&[3; 32]).unwrap();
    let client_key = key.clone();
    let t = std::thread::spawn(move || {
        let (s, _) = remus_proto::client_handshake(
            TcpStream::connect(addr).unwrap(),
            &client_key,
            &HelloParams::new(Purpose::Protect, "t", VmCompat::default()),
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        primary(s);
    });
    let (tcp, _) = listener.accept().unwrap();
    let (stream, _, _) =
        remus_proto::server_handshake(tcp, &key, &ServerOptions::default(), |_, _| Ok(None))
            .unwrap();
    let cfg = BackupConfig {
        timeout: Duration::from_secs(10),
        heartbeat: Duration::from_millis(200),
        changed_sync: false,
        suspendable,
        restarting,
        stream_checkpoints: false,
    };
    let end = receive(
        stream,
        replica,
        disks,
        &cfg,
        &|_| {},
        &|_| Err("no switch-over here".into()),
        &|| true,
    );
    t.join().unwrap();
    end
}
