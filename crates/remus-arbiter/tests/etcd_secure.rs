//! The arbiter against a real etcd that checks who talks to it: client
//! TLS with client certificates (a CA made by the test), user/password
//! authentication with a role limited to the arbiter's prefix, and both
//! together. Each test starts its own single-member cluster; the members
//! are killed by PID and the certificates and password files removed
//! with their temporary directories, also when a test fails.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use remus_arbiter::{Arbiter, ArbiterConfig, ArbiterError, Password, TlsFiles};
use remus_testbed::etcd::{EtcdCluster, EtcdOptions, EtcdUser};
use remus_testbed::pki::{CertFiles, TestPki};

const PREFIX: &str = "/remus-test";
const TTL: Duration = Duration::from_secs(2);
const MARGIN: Duration = Duration::from_millis(300);

/// The users every authenticating cluster here has: `remus`, limited to
/// the arbiter's prefix, and `other`, limited to another one.
fn users() -> Vec<EtcdUser> {
    vec![
        EtcdUser::new("remus", &format!("{PREFIX}/")),
        EtcdUser::new("other", "/other/"),
    ]
}

/// `password` as an operator would store it (a line in a file only its
/// owner reads), read back the way the agent reads it.
fn password_file(dir: &Path, name: &str, password: &str) -> Password {
    let p = dir.join(format!("{name}.password"));
    std::fs::write(&p, format!("{password}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    Password::from_file(&p).unwrap()
}

fn tls(ca: &Path, client: Option<&CertFiles>) -> TlsFiles {
    TlsFiles {
        ca: Some(ca.to_path_buf()),
        cert: client.map(|c| c.cert.clone()),
        key: client.map(|c| c.key.clone()),
    }
}

/// An arbiter for `host` on `endpoints`, with TLS files and a user if
/// given.
fn arbiter(
    endpoints: Vec<String>,
    files: Option<&TlsFiles>,
    user: Option<(&str, Password)>,
    host: &str,
) -> Arbiter {
    let mut cfg = ArbiterConfig::new(endpoints, PREFIX).unwrap();
    if let Some(f) = files {
        cfg = cfg.with_tls(f).unwrap();
    }
    if let Some((name, pw)) = user {
        cfg = cfg.with_user(name, pw).unwrap();
    }
    Arbiter::new(cfg, host).unwrap()
}

/// `a` takes `vm`'s key, renews its lease (each renewal moves the fence
/// deadline on), keeps `b` out meanwhile, and releases it: then the key
/// is gone and `b` may take it.
fn acquire_renew_release(a: &Arbiter, b: &Arbiter, vm: &str) {
    assert_eq!(a.holder(vm).unwrap(), None);
    let mut lease = a.acquire(vm, TTL, MARGIN).unwrap();
    let h = a.holder(vm).unwrap().expect("a holder");
    assert_eq!((h.host.as_str(), h.lease), (a.host(), lease.id));
    let mut fence = lease.fence_at();
    for _ in 0..3 {
        let renewed = a.renew(&mut lease, MARGIN).unwrap();
        assert!(renewed > fence, "a renewal moves the fence deadline on");
        fence = renewed;
        match b.acquire(vm, TTL, MARGIN) {
            Err(ArbiterError::HeldByOther { holder, .. }) => assert_eq!(holder, a.host()),
            other => panic!(
                "{} must be refused while {} holds the key: {other:?}",
                b.host(),
                a.host()
            ),
        }
    }
    a.release(lease).unwrap();
    assert_eq!(b.holder(vm).unwrap(), None, "released: the key is gone");
    let l = b.acquire(vm, TTL, MARGIN).expect("free after release");
    b.release(l).unwrap();
}

#[test]
fn tls_with_a_client_certificate_acquires_renews_and_releases() {
    let etcd = EtcdCluster::start_with(
        1,
        "127.0.0.1",
        None,
        &EtcdOptions {
            tls: true,
            ..Default::default()
        },
    )
    .expect("etcd with TLS");
    let pki = etcd.pki().unwrap();
    let files = tls(&pki.ca, Some(&pki.client));
    let a = arbiter(etcd.endpoints(), Some(&files), None, "host-a");
    let b = arbiter(etcd.endpoints(), Some(&files), None, "host-b");
    assert_eq!(
        a.config().plaintext_warning(),
        None,
        "https draws no warning"
    );
    assert_eq!(a.health().unwrap(), etcd.endpoints()[0]);
    acquire_renew_release(&a, &b, "vm1");
}

#[test]
fn tls_refuses_clients_without_a_certificate_of_the_members_ca() {
    let etcd = EtcdCluster::start_with(
        1,
        "127.0.0.1",
        None,
        &EtcdOptions {
            tls: true,
            ..Default::default()
        },
    )
    .expect("etcd with TLS");
    let pki = etcd.pki().unwrap();
    let ep = etcd.endpoints();
    let tls_refusal = |a: &Arbiter| match a.acquire("vm1", TTL, MARGIN) {
        Err(ArbiterError::Tls { endpoint, reason }) => {
            assert_eq!(endpoint, ep[0]);
            reason
        }
        other => panic!("a TLS refusal expected: {other:?}"),
    };

    // No client certificate: etcd's --client-cert-auth closes the
    // connection; the error says a certificate is wanted.
    let none = arbiter(ep.clone(), Some(&tls(&pki.ca, None)), None, "host-a");
    let reason = tls_refusal(&none);
    assert!(
        reason.contains("asks for a client certificate") && reason.contains("--arbiter-cert"),
        "{reason}"
    );

    // A certificate from another CA (with the agents' very name): refused,
    // the certificate named.
    let rogue = arbiter(
        ep.clone(),
        Some(&tls(&pki.ca, Some(&pki.rogue_client))),
        None,
        "host-a",
    );
    let reason = tls_refusal(&rogue);
    assert!(
        reason.contains("refused this host's client certificate")
            && reason.contains(&pki.rogue_client.cert.display().to_string()),
        "{reason}"
    );

    // The other way round: a member whose certificate is not from the CA
    // this host trusts is refused by this host.
    let wrong_ca = arbiter(
        ep.clone(),
        Some(&tls(&pki.rogue_ca, Some(&pki.client))),
        None,
        "host-a",
    );
    let reason = tls_refusal(&wrong_ca);
    assert!(
        reason.contains("not signed by the CA")
            && reason.contains(&pki.rogue_ca.display().to_string()),
        "{reason}"
    );

    // The member's certificate names 127.0.0.1 only: reached as
    // "localhost", it does not match.
    let by_name = vec![ep[0].replace("127.0.0.1", "localhost")];
    let files = tls(&pki.ca, Some(&pki.client));
    let a = arbiter(by_name.clone(), Some(&files), None, "host-a");
    match a.holder("vm1") {
        Err(ArbiterError::Tls { endpoint, reason }) => {
            assert_eq!(endpoint, by_name[0]);
            assert!(
                reason.contains("not valid for name \"localhost\"")
                    && reason.contains("subject alternative names"),
                "{reason}"
            );
        }
        other => panic!("a TLS refusal expected: {other:?}"),
    }

    // None of them got anything written.
    let good = arbiter(ep, Some(&files), None, "host-b");
    assert_eq!(good.holder("vm1").unwrap(), None);
}

#[test]
fn an_ipv6_endpoint_is_checked_against_its_address() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback here");
        return;
    }
    let etcd = EtcdCluster::start_with(
        1,
        "::1",
        None,
        &EtcdOptions {
            tls: true,
            ..Default::default()
        },
    )
    .expect("etcd with TLS on ::1");
    let ep = etcd.endpoints();
    assert!(ep[0].starts_with("https://[::1]:"), "{ep:?}");
    let files = tls(&etcd.pki().unwrap().ca, Some(&etcd.pki().unwrap().client));
    let a = arbiter(ep.clone(), Some(&files), None, "host-a");
    let b = arbiter(ep, Some(&files), None, "host-b");
    acquire_renew_release(&a, &b, "vm6");
}

#[test]
fn tls_settings_are_checked_when_given_and_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(&dir.path().join("pki"), &["127.0.0.1".parse().unwrap()]).unwrap();
    let https = || ArbiterConfig::new(vec!["https://127.0.0.1:2379".into()], PREFIX).unwrap();
    let msg = |r: Result<ArbiterConfig, ArbiterError>| r.unwrap_err().to_string();

    // https without a CA: refused (it would trust nothing).
    let e = Arbiter::new(https(), "host-a").err().unwrap().to_string();
    assert!(e.contains("no CA was given (--arbiter-ca)"), "{e}");
    let e = msg(https().with_tls(&TlsFiles {
        ca: None,
        cert: Some(pki.client.cert.clone()),
        key: Some(pki.client.key.clone()),
    }));
    assert!(e.contains("--arbiter-ca"), "{e}");
    // TLS files with a plain http endpoint: refused.
    let mixed = ArbiterConfig::new(
        vec![
            "https://127.0.0.1:2379".into(),
            "http://127.0.0.1:2381".into(),
        ],
        PREFIX,
    )
    .unwrap();
    let e = msg(mixed.with_tls(&tls(&pki.ca, None)));
    assert!(e.contains("'http://127.0.0.1:2381' is plain http"), "{e}");
    // A certificate without its key.
    let e = msg(https().with_tls(&TlsFiles {
        ca: Some(pki.ca.clone()),
        cert: Some(pki.client.cert.clone()),
        key: None,
    }));
    assert!(e.contains("needs its key"), "{e}");
    // A key that is not the certificate's.
    let e = msg(https().with_tls(&TlsFiles {
        ca: Some(pki.ca.clone()),
        cert: Some(pki.client.cert.clone()),
        key: Some(pki.admin.key.clone()),
    }));
    assert!(
        e.contains(&pki.admin.key.display().to_string()) && e.contains("does not belong"),
        "{e}"
    );
    // Files that are missing or hold no PEM.
    let missing = dir.path().join("nope.pem");
    let e = msg(https().with_tls(&tls(&missing, None)));
    assert!(
        e.contains("CA file") && e.contains(&missing.display().to_string()),
        "{e}"
    );
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let e = msg(https().with_tls(&tls(&junk, None)));
    assert!(
        e.contains(&junk.display().to_string()) && e.contains("no certificate"),
        "{e}"
    );
    // A private key other users can read: refused, naming the mode.
    use std::os::unix::fs::PermissionsExt;
    let e = msg(https().with_tls(&TlsFiles {
        ca: Some(pki.ca.clone()),
        cert: Some(pki.client.cert.clone()),
        key: Some(junk.clone()),
    }));
    assert!(
        e.contains("key file") && e.contains("other users can access it (mode 644)"),
        "{e}"
    );
    let open_key = dir.path().join("open-key.pem");
    std::fs::copy(&pki.client.key, &open_key).unwrap();
    std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o604)).unwrap();
    let e = msg(https().with_tls(&TlsFiles {
        ca: Some(pki.ca.clone()),
        cert: Some(pki.client.cert.clone()),
        key: Some(open_key.clone()),
    }));
    assert!(e.contains("mode 604") && e.contains("chmod 600"), "{e}");
    // Its group may read it (root:remus 0640).
    std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert!(
        https()
            .with_tls(&TlsFiles {
                ca: Some(pki.ca.clone()),
                cert: Some(pki.client.cert.clone()),
                key: Some(open_key),
            })
            .is_ok()
    );
    std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = msg(https().with_tls(&TlsFiles {
        ca: Some(pki.ca.clone()),
        cert: Some(pki.client.cert.clone()),
        key: Some(junk.clone()),
    }));
    assert!(
        e.contains("key file") && e.contains("no private key"),
        "{e}"
    );
}

#[test]
fn user_password_auth_admits_the_right_password_and_the_prefix_only() {
    let users = users();
    let etcd = EtcdCluster::start_with(
        1,
        "127.0.0.1",
        None,
        &EtcdOptions {
            auth: Some(users.clone()),
            ..Default::default()
        },
    )
    .expect("etcd with authentication");
    let dir = tempfile::tempdir().unwrap();
    let ep = etcd.endpoints();
    let remus = |host: &str| {
        let pw = password_file(dir.path(), "remus", &users[0].password);
        arbiter(ep.clone(), None, Some(("remus", pw)), host)
    };

    // The right password: the whole life of a lease works.
    let (a, b) = (remus("host-a"), remus("host-b"));
    // Plain http with a password: one warning, naming the user, not the
    // password.
    let w = a.config().plaintext_warning().expect("a warning");
    assert!(
        w.contains(&ep[0]) && w.contains("not encrypted") && w.contains("'remus'"),
        "{w}"
    );
    assert!(!w.contains(&users[0].password), "{w}");
    acquire_renew_release(&a, &b, "vm2");

    // A wrong password: refused, the user named, no password shown.
    let wrong = "hunter2-not-it";
    let bad = arbiter(
        ep.clone(),
        None,
        Some(("remus", password_file(dir.path(), "wrong", wrong))),
        "host-a",
    );
    let e = bad.acquire("vm2", TTL, MARGIN).unwrap_err();
    match &e {
        ArbiterError::AuthFailed { user, endpoint, .. } => {
            assert_eq!(
                (user.as_str(), endpoint.as_str()),
                ("remus", ep[0].as_str())
            );
        }
        other => panic!("a login refusal expected: {other:?}"),
    }
    let shown = format!("{e} {e:?}");
    assert!(
        shown.contains("'remus'") && shown.contains("wrong password"),
        "{shown}"
    );
    assert!(
        !shown.contains(wrong) && !shown.contains(&users[0].password),
        "a password leaked: {shown}"
    );
    // No such user: refused the same way.
    let nobody = arbiter(
        ep.clone(),
        None,
        Some(("nobody", password_file(dir.path(), "nobody", wrong))),
        "host-a",
    );
    assert!(
        matches!(nobody.health(), Err(ArbiterError::AuthFailed { ref user, .. }) if user == "nobody")
    );

    // A user whose role covers another prefix: logged in, but refused
    // every key of the arbiter's, with the user and the fix named.
    let other = arbiter(
        ep.clone(),
        None,
        Some((
            "other",
            password_file(dir.path(), "other", &users[1].password),
        )),
        "host-a",
    );
    for r in [
        other.health().map(|_| ()),
        other.acquire("vm2", TTL, MARGIN).map(|_| ()),
    ] {
        match r {
            Err(ArbiterError::PermissionDenied {
                user, prefix, what, ..
            }) => {
                assert_eq!((user.as_deref(), prefix.as_str()), (Some("other"), PREFIX));
                assert!(!what.is_empty());
            }
            other => panic!("a permission refusal expected: {other:?}"),
        }
    }
    let e = other.holder("vm2").unwrap_err().to_string();
    assert!(
        e.contains("user 'other' may not") && e.contains("readwrite /remus-test/"),
        "{e}"
    );
    // No user at all: told that etcd wants one.
    let anonymous = arbiter(ep.clone(), None, None, "host-a");
    let e = anonymous.holder("vm2").unwrap_err();
    assert!(
        matches!(e, ArbiterError::PermissionDenied { user: None, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("--arbiter-user"), "{e}");
    // Nothing of theirs got in.
    assert_eq!(a.holder("vm2").unwrap(), None);
}

#[test]
fn a_restarted_member_is_reached_and_logged_in_to_again() {
    // The arbiter keeps its connection and login token; a restarted
    // member dropped the one and forgot the other.
    let users = users();
    let mut etcd = EtcdCluster::start_with(
        1,
        "127.0.0.1",
        None,
        &EtcdOptions {
            tls: true,
            auth: Some(users.clone()),
            ..Default::default()
        },
    )
    .expect("etcd with TLS and authentication");
    let dir = tempfile::tempdir().unwrap();
    let pki = etcd.pki().unwrap().clone();
    let pw = password_file(dir.path(), "remus", &users[0].password);
    let files = tls(&pki.ca, Some(&pki.client));
    let a = arbiter(
        etcd.endpoints(),
        Some(&files),
        Some(("remus", pw)),
        "host-a",
    );
    // A lease long enough to outlast the restart.
    let mut lease = a.acquire("vm3", Duration::from_secs(10), MARGIN).unwrap();
    a.renew(&mut lease, MARGIN).unwrap();
    etcd.restart(0).expect("restart the member");
    a.renew(&mut lease, MARGIN)
        .expect("renewal after the member's restart");
    assert_eq!(a.holder("vm3").unwrap().unwrap().lease, lease.id);
    a.release(lease).unwrap();
}

#[test]
fn a_lapsed_login_token_is_renewed_on_the_kept_connection() {
    let users = users();
    let token_ttl = Duration::from_secs(1);
    let etcd = EtcdCluster::start_with(
        1,
        "127.0.0.1",
        None,
        &EtcdOptions {
            auth: Some(users.clone()),
            auth_token_ttl: Some(token_ttl),
            ..Default::default()
        },
    )
    .expect("etcd with authentication");
    let dir = tempfile::tempdir().unwrap();
    let ep = etcd.endpoints();
    let pw = password_file(dir.path(), "remus", &users[0].password);
    let a = arbiter(ep.clone(), None, Some(("remus", pw)), "host-a");
    assert_eq!(a.holder("vm5").unwrap(), None);
    // A plain etcd client that logged in at the same time shows when the
    // token has lapsed (no event says so: etcd drops unused tokens on its
    // own clock, checking once a second).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut plain = rt
        .block_on(etcd_client::Client::connect(
            [ep[0].as_str()],
            Some(etcd_client::ConnectOptions::new().with_user("remus", users[0].password.clone())),
        ))
        .unwrap();
    std::thread::sleep(token_ttl * 3);
    let lapsed = rt
        .block_on(plain.get(format!("{PREFIX}/vms/vm5/runner"), None))
        .unwrap_err();
    assert!(
        lapsed.to_string().contains("invalid auth token"),
        "{lapsed}"
    );
    // The arbiter's kept client logs in again by itself.
    assert_eq!(a.holder("vm5").unwrap(), None);
    let l = a.acquire("vm5", TTL, MARGIN).unwrap();
    a.release(l).unwrap();
}

#[test]
fn tls_and_auth_together_need_both_the_certificate_and_the_password() {
    let users = users();
    let etcd = EtcdCluster::start_with(
        1,
        "127.0.0.1",
        None,
        &EtcdOptions {
            tls: true,
            auth: Some(users.clone()),
            ..Default::default()
        },
    )
    .expect("etcd with TLS and authentication");
    let dir = tempfile::tempdir().unwrap();
    let pki = etcd.pki().unwrap();
    let ep = etcd.endpoints();
    let files = tls(&pki.ca, Some(&pki.client));
    let remus = |files: &TlsFiles, host: &str| {
        let pw = password_file(dir.path(), "remus", &users[0].password);
        arbiter(ep.clone(), Some(files), Some(("remus", pw)), host)
    };

    let (a, b) = (remus(&files, "host-a"), remus(&files, "host-b"));
    assert_eq!(a.config().plaintext_warning(), None);
    acquire_renew_release(&a, &b, "vm4");

    // The certificate alone is no login (its CN, remus-agent, is no
    // etcd user).
    let cert_only = arbiter(ep.clone(), Some(&files), None, "host-a");
    assert!(matches!(
        cert_only.acquire("vm4", TTL, MARGIN),
        Err(ArbiterError::PermissionDenied { user: None, .. })
    ));
    // The certificate with a wrong password.
    let wrong = arbiter(
        ep.clone(),
        Some(&files),
        Some(("remus", password_file(dir.path(), "wrong", "not-it"))),
        "host-a",
    );
    assert!(matches!(
        wrong.health(),
        Err(ArbiterError::AuthFailed { ref user, .. }) if user == "remus"
    ));
    // The right password without a trusted certificate: refused at TLS,
    // before any login.
    let rogue = remus(&tls(&pki.ca, Some(&pki.rogue_client)), "host-a");
    match rogue.acquire("vm4", TTL, MARGIN) {
        Err(ArbiterError::Tls { reason, .. }) => {
            assert!(
                reason.contains("refused this host's client certificate"),
                "{reason}"
            )
        }
        other => panic!("a TLS refusal expected: {other:?}"),
    }
    let none = remus(&tls(&pki.ca, None), "host-a");
    assert!(matches!(none.health(), Err(ArbiterError::Tls { .. })));
    assert_eq!(a.holder("vm4").unwrap(), None, "nothing of theirs got in");
}
