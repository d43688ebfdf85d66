//! Writes seed inputs for every fuzz target: valid encodings made with the
//! crates' own encoders (every message type, checkpoint streams as the
//! sender writes them, compressed pages and device state, NBD headers and
//! options, the example VM config, the libvirt fixtures of remus-config's
//! tests), plus a few near misses. Each seed is run through its target's
//! checks before it is written.
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus -- OUT
//!
//! writes `OUT/<target>/seed-<name>`. `scripts/fuzz.sh --seed` does this
//! and merges what adds coverage into `fuzz/corpus/`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use remus_fuzz::assembler::{self, EpochSel, Op, PageSel, Setup};
use remus_fuzz::{delta, frame, message, nbd};
use remus_proto::delta::DeltaEncoder;
use remus_proto::{
    CheckpointEnd, CheckpointKind, CheckpointWriter, DiskCompat, DiskDigests, DiskLogDigest,
    DiskOp, DiskRecord, DiskSyncRuns, Epoch, ErrorCode, Hello, HelloAck, Message, MsgType,
    PAGE_SIZE, PageRun, Purpose, VmCompat, write_page_run,
};

type Seeds = BTreeMap<String, Vec<u8>>;
/// A target's name, its seeds and the checks each seed must pass.
type Target = (&'static str, Seeds, fn(&[u8]));

fn main() {
    let out = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .expect("usage: gen_corpus OUT_DIR");
    let targets: [Target; 9] = [
        ("frame_decode", frame_seeds(), frame::run),
        ("message_decode", message_seeds(), message::run),
        ("delta_decode", delta_seeds(), delta::run),
        ("checkpoint_assembler", assembler_seeds(), |d| {
            assembler::run(d);
        }),
        ("nbd_request", nbd_seeds(), nbd::run),
        ("config_toml", config_seeds(), remus_fuzz::config::run),
        ("libvirt_xml", libvirt_seeds(), remus_fuzz::libvirt::run),
        (
            "channel_records",
            remus_fuzz::channel::seeds().into_iter().collect(),
            remus_fuzz::channel::run,
        ),
        (
            "handshake",
            remus_fuzz::handshake::seeds().into_iter().collect(),
            remus_fuzz::handshake::run,
        ),
    ];
    for (target, seeds, run) in targets {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir).expect("create the output directory");
        for (name, data) in &seeds {
            run(data);
            std::fs::write(dir.join(format!("seed-{name}")), data).expect("write a seed");
        }
        println!("{target}: {} seeds", seeds.len());
    }
}

fn pages(n: usize, salt: u8) -> Vec<u8> {
    (0..n * PAGE_SIZE)
        .map(|i| {
            if i % 512 < 8 {
                (i / 8) as u8 ^ salt
            } else {
                salt
            }
        })
        .collect()
}

/// One message of every type (several shapes for some).
fn messages() -> Vec<(String, Message)> {
    let compat = VmCompat {
        memory_mib: 256,
        vcpus: 2,
        machine: "q35".into(),
        cpu_model: "max".into(),
        disks: vec![
            DiskCompat {
                target: "vda".into(),
                size_bytes: 1 << 30,
            },
            DiskCompat {
                target: "vdb".into(),
                size_bytes: 64 << 20,
            },
        ],
        macs: vec![[0x52, 0x54, 0, 0x12, 0x34, 0x56]],
    };
    let mut enc = DeltaEncoder::new(1 << 20);
    enc.begin_checkpoint();
    let plain = enc.encode_pages(7, &pages(3, 1));
    enc.begin_checkpoint();
    let mut changed = pages(3, 1);
    changed[100] ^= 0xff;
    changed[PAGE_SIZE * 2 + 9] = 3;
    let xored = enc.encode_pages(7, &changed);
    let dev1 = enc.encode_device_state(&vec![7u8; 3000]);
    let mut state = vec![7u8; 3000];
    state[1000] = 1;
    state.extend_from_slice(b"grown");
    let dev2 = enc.encode_device_state(&state);
    let mut log = DiskLogDigest::default();
    let write = DiskRecord {
        epoch: Epoch(5),
        disk: 0,
        op: DiskOp::Write {
            offset: 4096,
            fua: true,
            data: b"sector data".to_vec(),
        },
    };
    let zero = DiskRecord {
        epoch: Epoch(5),
        disk: 1,
        op: DiskOp::Zero {
            offset: 1 << 20,
            len: 65536,
            trim: true,
            fua: false,
        },
    };
    let flush = DiskRecord {
        epoch: Epoch(5),
        disk: 0,
        op: DiskOp::Flush,
    };
    for r in [&write, &zero, &flush] {
        log.add(r);
    }
    let mut v: Vec<(&str, Message)> = vec![
        (
            "hello",
            Message::Hello(Hello {
                max_version: 5,
                min_version: 4,
                purpose: Purpose::Protect,
                vm_name: "demo".into(),
                compat: compat.clone(),
                client_nonce: [9; 32],
            }),
        ),
        (
            "hello-migrate",
            Message::Hello(Hello {
                max_version: 5,
                min_version: 5,
                purpose: Purpose::Migrate,
                vm_name: "vm-ü".into(),
                compat: VmCompat::default(),
                client_nonce: [0; 32],
            }),
        ),
        (
            "hello-ack",
            Message::HelloAck(HelloAck {
                chosen_version: 5,
                server_nonce: [1; 32],
                server_proof: [2; 32],
            }),
        ),
        (
            "auth-proof",
            Message::AuthProof {
                client_proof: [3; 32],
            },
        ),
        ("ready", Message::Ready),
        (
            "error",
            Message::Error {
                code: ErrorCode::Incompatible,
                message: "memory: primary 256 MiB, backup 512 MiB\nvcpus: primary 1, backup 2"
                    .into(),
            },
        ),
        (
            "error-other",
            Message::Error {
                code: ErrorCode::Other(999),
                message: String::new(),
            },
        ),
        (
            "heartbeat",
            Message::Heartbeat {
                seq: 42,
                sent_at_us: 1_800_000_000_000_000,
            },
        ),
        ("ack", Message::Ack { epoch: Epoch(7) }),
        (
            "vm-config",
            Message::VmConfig {
                json: r#"{"name":"demo","memory":256,"vcpus":1,"disk":[{"path":"/d.img","target":"vda"}]}"#
                    .into(),
            },
        ),
        (
            "sync-plan",
            Message::SyncPlan {
                json: r#"{"mode":"changed","disks":[{"chunks":[[0,4]]}]}"#.into(),
            },
        ),
        (
            "begin-initial",
            Message::CheckpointBegin {
                epoch: Epoch(1),
                kind: CheckpointKind::InitialSync,
            },
        ),
        (
            "begin-round",
            Message::CheckpointBegin {
                epoch: Epoch(2),
                kind: CheckpointKind::Round,
            },
        ),
        (
            "begin-checkpoint",
            Message::CheckpointBegin {
                epoch: Epoch(3),
                kind: CheckpointKind::Checkpoint,
            },
        ),
        (
            "page-run",
            Message::PageRun(PageRun {
                first_page: 16,
                data: pages(1, 0xa5),
            }),
        ),
        (
            "page-run-2",
            Message::PageRun(PageRun {
                first_page: u64::MAX - 2,
                data: pages(2, 0),
            }),
        ),
        ("device-state-empty", Message::DeviceState { data: vec![] }),
        (
            "device-state",
            Message::DeviceState {
                data: b"QEVM\0\0\0\x03device state".to_vec(),
            },
        ),
        ("page-delta-plain", Message::PageDelta(plain[0].clone())),
        ("page-delta-xor", Message::PageDelta(xored[0].clone())),
        (
            "device-state-delta",
            Message::DeviceStateDelta(dev1[0].clone()),
        ),
        (
            "device-state-delta-xor",
            Message::DeviceStateDelta(dev2[0].clone()),
        ),
        (
            "checkpoint-end",
            Message::CheckpointEnd(CheckpointEnd {
                epoch: Epoch(3),
                page_count: 12,
                device_state_len: 300_000,
                digest: [0x5a; 16],
            }),
        ),
        ("switch-over", Message::SwitchOver { epoch: Epoch(9) }),
        ("done", Message::Done),
        ("tune", Message::Tune { timeout_ms: 5_000 }),
        (
            "suspend",
            Message::Suspend {
                epoch: Epoch(7),
                grace_ms: 60_000,
            },
        ),
        ("resumable", Message::Resumable { resumed_at: 7 }),
        ("restarting", Message::Restarting),
        ("devices-only-state", Message::DevicesOnlyState),
        ("disk-write", Message::Disk(write.clone())),
        ("disk-zero", Message::Disk(zero.clone())),
        ("disk-flush", Message::Disk(flush.clone())),
        ("disk-seal", Message::DiskSeal(log.seal(Epoch(5)))),
        (
            "disk-digests",
            Message::DiskDigests(DiskDigests {
                disk: 0,
                chunk_size: 1 << 20,
                first_chunk: 3,
                digests: vec![[1; 16], [2; 16]],
            }),
        ),
        (
            "disk-sync-runs",
            Message::DiskSyncRuns(DiskSyncRuns {
                disk: 1,
                chunk_size: 1 << 20,
                runs: vec![(0, 4), (10, 1), (12, 100)],
            }),
        ),
        (
            "disk-sync-runs-empty",
            Message::DiskSyncRuns(DiskSyncRuns {
                disk: 0,
                chunk_size: 4096,
                runs: vec![],
            }),
        ),
        (
            "noise-handshake",
            Message::NoiseHandshake {
                data: (0..48).collect(),
            },
        ),
    ];
    // Every type number this build knows has a sample.
    for t in (0..64).filter_map(MsgType::from_u16) {
        assert!(
            t == MsgType::Invalid || v.iter().any(|(_, m)| m.msg_type() == t),
            "no sample of {t:?}"
        );
    }
    v.drain(..).map(|(n, m)| (n.to_string(), m)).collect()
}

fn frame_seeds() -> Seeds {
    let mut s = Seeds::new();
    for (name, m) in messages() {
        let mut f = Vec::new();
        m.encode(&mut f);
        s.insert(name, f);
    }
    let hb = Message::Heartbeat {
        seq: 1,
        sent_at_us: 2,
    };
    let payload = hb.encode_payload();
    s.insert(
        "advisory-flags".into(),
        frame::frame_with_flags(MsgType::Heartbeat as u16, 0x0001, &payload),
    );
    s.insert(
        "critical-flags".into(),
        frame::frame_with_flags(MsgType::Heartbeat as u16, 0x0100, &payload),
    );
    s.insert(
        "unknown-type".into(),
        frame::frame_with_flags(99, 0, b"from the future"),
    );
    let mut f = Vec::new();
    hb.encode(&mut f);
    let last = f.len() - 1;
    f[last] ^= 1;
    s.insert("bad-crc".into(), f.clone());
    s.insert("truncated".into(), f[..20].to_vec());
    let mut huge = f[..16].to_vec();
    huge[8..12].copy_from_slice(&(64u32 << 20).to_be_bytes());
    s.insert("max-length".into(), huge);
    // What a sender writes for a whole checkpoint: frames back to back.
    let mut wire = Vec::new();
    let mut cw = CheckpointWriter::begin(&mut wire, Epoch(3), CheckpointKind::Checkpoint)
        .expect("write to a Vec");
    cw.pages(&mut wire, 4, &pages(2, 3), None).expect("pages");
    cw.device_state(&mut wire, b"cpu+devices", None)
        .expect("state");
    cw.end(&mut wire).expect("end");
    s.insert("checkpoint-stream".into(), wire);
    let mut run = Vec::new();
    write_page_run(&mut run, 1 << 20, &pages(1, 9)).expect("page run");
    s.insert("write-page-run".into(), run);
    s
}

fn message_seeds() -> Seeds {
    let mut s = Seeds::new();
    for (name, m) in messages() {
        s.insert(
            name,
            message::input(m.msg_type() as u16, &m.encode_payload()),
        );
    }
    s.insert("invalid-type".into(), message::input(0, b""));
    s.insert("unknown-type".into(), message::input(0x1234, b"x"));
    s
}

fn delta_seeds() -> Seeds {
    let mut s = Seeds::new();
    let mut enc = DeltaEncoder::new(1 << 20);
    enc.begin_checkpoint();
    let first = enc.encode_pages(3, &pages(9, 2)).remove(0);
    enc.begin_checkpoint();
    let mut changed = pages(9, 2);
    changed[5000] ^= 0x10;
    let second = enc.encode_pages(3, &changed).remove(0);
    for (name, d, fail) in [
        ("pages-plain", &first, 0u8),
        ("pages-xor", &second, 0),
        ("pages-xor-base-fails", &second, 3),
    ] {
        let mut v = vec![delta::MODE_PAGES, 0x42, fail];
        v.extend_from_slice(&Message::PageDelta(d.clone()).encode_payload());
        s.insert(name.into(), v);
    }
    let base: Vec<u8> = (0..5000u32).map(|i| (i % 7) as u8).collect();
    let mut state = base.clone();
    state[17] ^= 1;
    state.extend_from_slice(&[9; 100]);
    let mut enc = DeltaEncoder::new(4096);
    enc.encode_device_state(&base);
    for (name, d) in [
        ("device-state-xor", enc.encode_device_state(&state)),
        ("device-state-short", enc.encode_device_state(&state[..40])),
    ] {
        let mut v = vec![delta::MODE_DEVICE_STATE];
        v.extend_from_slice(&5000u16.to_be_bytes());
        v.push(0);
        v.extend_from_slice(&Message::DeviceStateDelta(d[0].clone()).encode_payload());
        s.insert(name.into(), v);
    }
    // Round trips: pages written, changed, evicted, sent twice in one
    // checkpoint, a run longer than one frame, device states of several
    // lengths, empty included.
    let script: &[[u8; 4]] = &[
        [2, 0, 0, 1],
        [2, 5, 2, 1],
        [1, 0, 200, 3],
        [0, 0, 0, 0],
        [2, 0, 0, 2],
        [2, 0, 0, 3],
        [2, 9, 1, 2],
        [1, 0, 220, 3],
        [0, 0, 0, 0],
        [3, 8, 2, 4],
        [1, 0, 0, 0],
        [0, 0, 0, 0],
        [2, 1, 255, 5],
        [0, 0, 0, 0],
        [2, 1, 1, 6],
    ];
    let mut v = vec![delta::MODE_ROUND_TRIP, 3];
    v.extend(script.iter().flatten());
    s.insert("round-trip".into(), v);
    s
}

fn assembler_seeds() -> Seeds {
    let small = Setup {
        guest_pages_mode: 0,
        guest_pages: 63,
        last_committed: 0,
    };
    let big = Setup {
        guest_pages_mode: 1,
        guest_pages: 262_143,
        last_committed: 5,
    };
    let begin = |k: u8| Op::Begin {
        epoch: EpochSel::Rel(1),
        kind: k,
    };
    let pages = |v: u32, count: u8| Op::Pages {
        first: PageSel::Within(v),
        count,
        fill: v as u8,
    };
    let end = Op::End {
        epoch: EpochSel::Rel(0),
        pages_delta: 0,
        dev_delta: 0,
        flip: 0,
    };
    let state = |len: u16| Op::DeviceState { len, fill: 1 };
    // A real sender's messages, as raw payloads (a digest the assembler
    // must verify without the harness's help).
    let mut raw = Vec::new();
    let mut wire = Vec::new();
    let mut cw = CheckpointWriter::begin(&mut wire, Epoch(1), CheckpointKind::Checkpoint)
        .expect("write to a Vec");
    cw.pages(&mut wire, 2, &pages_data(), None).expect("pages");
    cw.device_state(&mut wire, b"state", None).expect("state");
    cw.end(&mut wire).expect("end");
    let mut r = &wire[..];
    while !r.is_empty() {
        let m = remus_proto::read_frame(&mut r).expect("own frames decode");
        raw.push(Op::Raw {
            msg_type: m.msg_type() as u8,
            payload: m.encode_payload(),
        });
    }
    let cases: Vec<(&str, Setup, Vec<Op>, usize)> = vec![
        (
            "checkpoint",
            small,
            vec![begin(2), pages(0, 1), pages(10, 3), state(300), end.clone()],
            1,
        ),
        (
            "three-kinds",
            big,
            vec![
                begin(0),
                pages(0, 15),
                end.clone(),
                begin(1),
                pages(7, 0),
                end.clone(),
                begin(2),
                pages(7, 0),
                state(10),
                state(0),
                state(20),
                end.clone(),
                Op::Heartbeat,
            ],
            3,
        ),
        ("real-sender", small, raw.clone(), 1),
        (
            "real-sender-streaming",
            Setup {
                guest_pages_mode: 2,
                ..small
            },
            raw,
            1,
        ),
        (
            "streaming",
            Setup {
                guest_pages_mode: 3,
                ..big
            },
            vec![
                begin(0),
                pages(0, 15),
                end.clone(),
                begin(2),
                pages(7, 0),
                state(10),
                state(20),
                pages(9, 1),
                begin(2),
                pages(7, 3),
                state(10),
                state(20),
                end.clone(),
            ],
            2,
        ),
        (
            "rejections",
            small,
            vec![
                end.clone(),
                begin(2),
                begin(2),
                begin(1),
                state(1),
                begin(2),
                pages(0, 0),
                state(1),
                pages(1, 0),
                begin(2),
                Op::Pages {
                    first: PageSel::FromEnd(1),
                    count: 1,
                    fill: 0,
                },
                begin(2),
                Op::End {
                    epoch: EpochSel::Rel(1),
                    pages_delta: 0,
                    dev_delta: 0,
                    flip: 0,
                },
                begin(2),
                pages(0, 0),
                state(4),
                Op::End {
                    epoch: EpochSel::Rel(0),
                    pages_delta: 0,
                    dev_delta: 0,
                    flip: 9,
                },
                begin(0),
                pages(0, 0),
                Op::Discard,
                Op::Begin {
                    epoch: EpochSel::Raw(0),
                    kind: 0,
                },
            ],
            0,
        ),
        (
            "too-many-pages",
            Setup {
                guest_pages_mode: 0,
                guest_pages: 15,
                last_committed: 0,
            },
            vec![begin(1), pages(0, 15), pages(0, 0), end.clone()],
            0,
        ),
        (
            "last-epoch",
            Setup {
                guest_pages_mode: 0,
                guest_pages: 15,
                last_committed: 0xff,
            },
            vec![
                Op::Begin {
                    epoch: EpochSel::Raw(u64::MAX),
                    kind: 1,
                },
                begin(1),
                pages(0, 0),
                end,
            ],
            0,
        ),
    ];
    let mut s = Seeds::new();
    for (name, setup, ops, complete) in cases {
        let input = assembler::input(setup, &ops);
        let stats = assembler::run(&input);
        assert_eq!(stats.complete, complete, "{name}: {stats:?}");
        s.insert(name.into(), input);
    }
    s
}

fn pages_data() -> Vec<u8> {
    pages(2, 0x33)
}

fn nbd_seeds() -> Seeds {
    use remus_nbd::proto::{self, Command, ExportInfoRequest, OptionHeader, Request, SimpleReply};
    let mut s = Seeds::new();
    for (name, command, flags) in [
        ("read", Command::Read, 0),
        ("write-fua", Command::Write, proto::CMD_FLAG_FUA),
        ("disc", Command::Disc, 0),
        ("flush", Command::Flush, 0),
        ("trim", Command::Trim, 0),
        (
            "write-zeroes",
            Command::WriteZeroes,
            proto::CMD_FLAG_NO_HOLE,
        ),
        ("block-status", Command::Other(proto::CMD_BLOCK_STATUS), 0),
    ] {
        let r = Request {
            flags,
            command,
            cookie: 0x1122_3344_5566_7788,
            offset: 1 << 20,
            length: 4096,
        };
        s.insert(
            format!("request-{name}"),
            nbd::input(nbd::REQUEST, &r.encode()),
        );
    }
    let go = ExportInfoRequest {
        name: "disk0".into(),
        info_requests: vec![proto::INFO_BLOCK_SIZE, proto::INFO_NAME],
    };
    for (name, option, data) in [
        ("export-name", proto::OPT_EXPORT_NAME, b"disk0".to_vec()),
        ("abort", proto::OPT_ABORT, vec![]),
        ("list", proto::OPT_LIST, vec![]),
        ("info", proto::OPT_INFO, go.encode()),
        ("go", proto::OPT_GO, go.encode()),
        ("structured-reply", proto::OPT_STRUCTURED_REPLY, vec![]),
    ] {
        let header = OptionHeader {
            option,
            length: data.len() as u32,
        };
        s.insert(
            format!("option-header-{name}"),
            nbd::input(nbd::OPTION_HEADER, &header.encode()),
        );
        let mut v = option.to_be_bytes().to_vec();
        v.extend_from_slice(&data);
        s.insert(format!("option-{name}"), nbd::input(nbd::OPTION, &v));
    }
    s.insert(
        "info-request".into(),
        nbd::input(nbd::INFO_REQUEST, &go.encode()),
    );
    let reply = SimpleReply {
        error: proto::NBD_EINVAL,
        cookie: 7,
    };
    s.insert(
        "simple-reply".into(),
        nbd::input(nbd::SIMPLE_REPLY, &reply.encode()),
    );
    s.insert(
        "option-reply".into(),
        nbd::input(
            nbd::OPTION_REPLY,
            &proto::encode_option_reply(
                proto::OPT_GO,
                proto::REP_INFO,
                &proto::encode_info_export(1 << 30, 1),
            ),
        ),
    );
    s.insert(
        "string".into(),
        nbd::input(nbd::STRING, "disk-ü".as_bytes()),
    );
    s
}

fn config_seeds() -> Seeds {
    let mut s = Seeds::new();
    s.insert(
        "example-guest".into(),
        include_bytes!("../../examples/guest.toml").to_vec(),
    );
    s.insert(
        "kernel-boot".into(),
        br#"name = "demo"
memory = 256
vcpus = 2
kernel = "vmlinuz"
initrd = "/abs/initrd.img"
cmdline = "console=ttyS0"
accel = "tcg"
machine = "microvm"
cpu = "max"
arbiter = false

[[disk]]
path = "disk.img"
target = "vda"
replicate = false

[[vif]]
mac = "52:54:00:12:34:56"
bridge = "br0"

[[vif]]
bridge = "br1"
"#
        .to_vec(),
    );
    s.insert(
        "disk-boot".into(),
        br#"name = "debian12"
memory = 2048
firmware = "uefi"
accel = "kvm"

[[disk]]
path = "/var/lib/remus/images/debian12.qcow2"
format = "qcow2"
target = "vda"
readonly = false

[[disk]]
path = "data.img"
target = "vdb"
readonly = true
"#
        .to_vec(),
    );
    s.insert(
        "inline".into(),
        br#"name = 'x'
memory = 0x100
disk = [{ path = "a", target = "vdz" }]
vif = [{ bridge = "b" }]
"#
        .to_vec(),
    );
    s
}

/// The domain definitions in remus-config's tests (its raw strings that
/// hold a `<domain>`), and a few more shapes.
fn libvirt_seeds() -> Seeds {
    let tests = include_str!("../../crates/remus-config/tests/libvirt.rs");
    let mut s = Seeds::new();
    let mut rest = tests;
    let mut n = 0;
    while let Some(start) = rest.find("r#\"") {
        let body = &rest[start + 3..];
        let Some(end) = body.find("\"#") else { break };
        let xml = &body[..end];
        if xml.trim_start().starts_with("<domain") {
            n += 1;
            s.insert(format!("tests-{n}"), xml.as_bytes().to_vec());
        }
        rest = &body[end + 2..];
    }
    assert!(n >= 4, "found only {n} domains in remus-config's tests");
    s.insert(
        "direct-kernel".into(),
        br#"<domain type='kvm'>
  <name>tiny</name>
  <memory unit='MiB'>256</memory>
  <currentMemory unit='MiB'>128</currentMemory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='microvm'>hvm</type>
    <kernel>vmlinuz</kernel>
    <initrd>/boot/initrd.img</initrd>
    <cmdline>console=ttyS0</cmdline>
  </os>
  <devices>
    <interface type='bridge'><mac address='52:54:00:aa:bb:cc'/><source bridge='br0'/><model type='e1000'/></interface>
    <disk type='file' device='disk'><source file='a.img'/><target dev='sda' bus='scsi'/><readonly/></disk>
    <disk type='file' device='disk'><driver type='raw'/><source file='b.img'/><target dev='vda' bus='virtio'/></disk>
  </devices>
</domain>"#
            .to_vec(),
    );
    s.insert(
        "refused".into(),
        br#"<domain type='kvm'><name>r</name><memory unit='GB'>2</memory>
<os firmware='efi'><type arch='aarch64' machine='pc-i440fx-7.2'>hvm</type><loader type='pflash'/></os>
<devices><hostdev type='pci'/><tpm/><sound model='ich9'/><interface type='network'><source network='default'/></interface>
<disk type='block' device='disk'><target dev='vdb'/></disk><disk type='file' device='cdrom'><source file='x.iso'/><target dev='hdc'/></disk>
<filesystem/><vsock/><shmem/><smartcard/><redirdev/><watchdog/><panic/></devices></domain>"#
            .to_vec(),
    );
    s
}
