//! Principals from `VITALS_AUTH_FILE`: every RPC against every scope, no or
//! unknown credentials, namespaces on systems and lock keys (the streaming
//! RPCs included), filtered listings and watches, the file's reload, and a
//! client certificate's SAN as the credential.

use std::{collections::HashMap, path::Path, time::Duration};

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tonic::{Code, Request, Status, transport::Channel};
use vitals::proto::{
    self, health_check_service_client::HealthCheckServiceClient, lock_service_client::LockServiceClient,
    with_lock_response::Event,
};

use crate::{
    harness::{Backend, PATIENCE, TestApp, TestDb, assert_reason, eventually, until},
    pki::{Ca, ServerFiles, as_strs, write_whole},
    withlock::{acquire, release, submit},
};

/// One `[[principal]]` of a test's auth file.
struct Entry<'a> {
    name: &'a str,
    token: &'a str,
    scopes: &'a [&'a str],
    systems: Option<&'a [&'a str]>,
    lock_keys: Option<&'a [&'a str]>,
}

impl<'a> Entry<'a> {
    fn new(name: &'a str, token: &'a str, scopes: &'a [&'a str]) -> Self {
        Entry {
            name,
            token,
            scopes,
            systems: None,
            lock_keys: None,
        }
    }
}

fn toml_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// The auth file naming `entries`, tokens as their SHA-256.
fn auth_file(entries: &[Entry<'_>]) -> String {
    let mut text = String::new();
    for e in entries {
        text.push_str(&format!(
            "[[principal]]\nname = {:?}\ntoken_sha256 = {:?}\nscopes = {}\n",
            e.name,
            hex::encode(Sha256::digest(e.token.as_bytes())),
            toml_list(e.scopes)
        ));
        if let Some(systems) = e.systems {
            text.push_str(&format!("systems = {}\n", toml_list(systems)));
        }
        if let Some(keys) = e.lock_keys {
            text.push_str(&format!("lock_keys = {}\n", toml_list(keys)));
        }
        text.push('\n');
    }
    text
}

/// Starts vitals on `db` with the auth file `text` written into `dir`.
async fn start(db: &TestDb, dir: &Path, text: &str, extra: &[&str]) -> TestApp {
    let file = dir.join("auth.toml");
    write_whole(&file, text);
    let file = file.display().to_string();
    let mut flags = vec!["--auth-file", file.as_str(), "--file-reload-interval-ms", "50"];
    flags.extend_from_slice(extra);
    TestApp::start(db, &flags).await
}

/// `message` with `authorization: Bearer <token>` (none when `token` is
/// `None`).
fn authed<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

/// Every RPC of ours, by name, and the scope it needs.
/// DeleteSystem comes last of the health RPCs: the others need the system.
const RPCS: [(&str, &str); 20] = [
    ("EvaluateHealth", "health.read"),
    ("GetSystemHealth", "health.read"),
    ("ListRuns", "health.read"),
    ("ListTransitions", "health.read"),
    ("WatchTransitions", "health.read"),
    ("ListSystems", "health.read"),
    ("GetUptime", "health.read"),
    ("SubmitRun", "health.write"),
    ("ConfigureCheck", "health.admin"),
    ("SetMaintenance", "health.admin"),
    ("ClearMaintenance", "health.admin"),
    ("ConfigureSystem", "health.admin"),
    ("DeleteCheck", "health.admin"),
    ("GetSystemHealth", "health.read"),
    ("DeleteSystem", "health.admin"),
    ("WithLock", "locks"),
    ("ListLocks", "locks"),
    ("GetLock", "locks"),
    ("Campaign", "locks"),
    ("ObserveLeader", "locks"),
];

/// Calls `rpc` on `system` (lock key `system/lock`) with `token`; `Ok` when
/// the call was served. A stream counts as served once its first reply (a
/// granted lock, or the response headers of a watch) arrives.
async fn call(channel: &Channel, rpc: &str, system: &str, token: Option<&str>) -> Result<(), Status> {
    let mut health = HealthCheckServiceClient::new(channel.clone());
    let system_id = system.to_owned();
    match rpc {
        "EvaluateHealth" => {
            let request = proto::EvaluateHealthRequest {
                statuses: vec![proto::HealthStatus::Healthy as i32],
                ..Default::default()
            };
            health.evaluate_health(authed(request, token)).await.map(drop)
        }
        "GetSystemHealth" => health
            .get_system_health(authed(proto::GetSystemHealthRequest { system_id }, token))
            .await
            .map(drop),
        "ListRuns" => health
            .list_runs(authed(
                proto::ListRunsRequest {
                    system_id,
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        "ListTransitions" => health
            .list_transitions(authed(
                proto::ListTransitionsRequest {
                    system_id,
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        "WatchTransitions" => health
            .watch_transitions(authed(
                proto::WatchTransitionsRequest {
                    system_id,
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        "SubmitRun" => health
            .submit_run(authed(submit(&uuid::Uuid::new_v4().to_string(), system), token))
            .await
            .map(drop),
        "ConfigureCheck" => health
            .configure_check(authed(
                proto::ConfigureCheckRequest {
                    system_id,
                    check_id: "c".into(),
                    enabled: Some(true),
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        "ListSystems" => health
            .list_systems(authed(
                proto::ListSystemsRequest {
                    system_id_prefix: system_id,
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        "GetUptime" => health
            .get_uptime(authed(
                proto::GetUptimeRequest {
                    system_id,
                    window: Some(prost_types::Duration { seconds: 60, nanos: 0 }),
                },
                token,
            ))
            .await
            .map(drop),
        "SetMaintenance" => health
            .set_maintenance(authed(
                proto::SetMaintenanceRequest {
                    system_id,
                    ends_at: Some(prost_types::Timestamp {
                        seconds: chrono::Utc::now().timestamp() + 3600,
                        nanos: 0,
                    }),
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        "ClearMaintenance" => health
            .clear_maintenance(authed(proto::ClearMaintenanceRequest { system_id }, token))
            .await
            .map(drop),
        "ConfigureSystem" => health
            .configure_system(authed(
                proto::ConfigureSystemRequest {
                    system_id,
                    depends_on: Vec::new(),
                },
                token,
            ))
            .await
            .map(drop),
        "DeleteCheck" => health
            .delete_check(authed(
                proto::DeleteCheckRequest {
                    system_id,
                    check_id: "c".into(),
                },
                token,
            ))
            .await
            .map(drop),
        "DeleteSystem" => health
            .delete_system(authed(proto::DeleteSystemRequest { system_id }, token))
            .await
            .map(drop),
        "WithLock" => {
            let key = format!("{system}/lock");
            let messages = futures::stream::iter([acquire(&key, Some(Duration::from_secs(5))), release()]);
            let mut replies = LockServiceClient::new(channel.clone())
                .with_lock(authed(messages, token))
                .await?
                .into_inner();
            match replies.message().await? {
                Some(proto::WithLockResponse {
                    event: Some(Event::Acquired(_)),
                }) => Ok(()),
                other => panic!("expected the lock to be acquired, got {other:?}"),
            }
        }
        "ListLocks" => LockServiceClient::new(channel.clone())
            .list_locks(authed(proto::ListLocksRequest::default(), token))
            .await
            .map(drop),
        // Served: the key is neither held nor waited for.
        "GetLock" => match LockServiceClient::new(channel.clone())
            .get_lock(authed(
                proto::GetLockRequest {
                    key: format!("{system}/lock"),
                },
                token,
            ))
            .await
        {
            Err(status) if status.code() == Code::NotFound => Ok(()),
            other => other.map(drop),
        },
        "Campaign" => {
            let campaign = proto::CampaignRequest {
                action: Some(proto::campaign_request::Action::Campaign(proto::Campaign {
                    election: format!("{system}/lock"),
                    candidate_value: "me".into(),
                    wait_timeout: Some(prost_types::Duration { seconds: 5, nanos: 0 }),
                })),
            };
            let resign = proto::CampaignRequest {
                action: Some(proto::campaign_request::Action::Resign(proto::Resign {})),
            };
            let mut replies = LockServiceClient::new(channel.clone())
                .campaign(authed(futures::stream::iter([campaign, resign]), token))
                .await?
                .into_inner();
            match replies.message().await? {
                Some(proto::CampaignResponse {
                    event: Some(proto::campaign_response::Event::Elected(_)),
                }) => Ok(()),
                other => panic!("expected to be elected, got {other:?}"),
            }
        }
        "ObserveLeader" => LockServiceClient::new(channel.clone())
            .observe_leader(authed(
                proto::ObserveLeaderRequest {
                    election: format!("{system}/lock"),
                    after_token: 0,
                },
                token,
            ))
            .await
            .map(drop),
        other => panic!("no RPC {other}"),
    }
}

async fn every_rpc_needs_its_scope_and_known_credentials(backend: Backend) {
    let db = TestDb::create(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let entries = [
        Entry::new("reader", "t-read", &["health.read"]),
        Entry::new("writer", "t-write", &["health.write"]),
        Entry::new("admin", "t-admin", &["health.admin"]),
        Entry::new("locker", "t-locks", &["locks"]),
        Entry::new("nobody", "t-none", &[]),
    ];
    let app = start(&db, dir.path(), &auth_file(&entries), &[]).await;
    let channel = app.channel().await;
    // The system exists, so GetSystemHealth has something to return.
    call(&channel, "SubmitRun", "sys", Some("t-write")).await.unwrap();

    for (rpc, scope) in RPCS {
        for entry in &entries {
            let outcome = call(&channel, rpc, "sys", Some(entry.token)).await;
            if entry.scopes.contains(&scope) {
                assert!(outcome.is_ok(), "{rpc} as {}: {outcome:?}", entry.name);
            } else {
                let status = outcome.expect_err(rpc);
                let info = assert_reason(&status, Code::PermissionDenied, "PERMISSION_DENIED");
                assert_eq!(info.metadata.get("scope").map(String::as_str), Some(scope), "{rpc}");
                assert_eq!(info.metadata.get("principal"), Some(&entry.name.to_owned()), "{rpc}");
            }
        }
        for token in [None, Some("not-a-known-token"), Some("")] {
            let status = call(&channel, rpc, "sys", token).await.expect_err(rpc);
            assert_reason(&status, Code::Unauthenticated, "UNAUTHENTICATED");
        }
    }
    // Health stays open: probes carry no credentials.
    assert_eq!(
        app.serving_status("").await,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    app.stop().await;
}

async fn namespaces_bound_the_systems_and_lock_keys_a_principal_touches(backend: Backend) {
    let db = TestDb::create(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let all_scopes: &[&str] = &["health.read", "health.write", "health.admin", "locks"];
    let payments = Entry {
        systems: Some(&["payments-*", "ledger"]),
        lock_keys: Some(&["payments/*"]),
        ..Entry::new("payments", "t-payments", all_scopes)
    };
    let app = start(&db, dir.path(), &auth_file(&[payments]), &[]).await;
    let channel = app.channel().await;
    let token = Some("t-payments");

    for system in ["payments-eu", "ledger"] {
        // A run first, so GetSystemHealth finds the system.
        call(&channel, "SubmitRun", system, token).await.unwrap();
        for (rpc, _) in RPCS {
            // Lock keys are payments/*, not the systems' names.
            if ["WithLock", "GetLock", "Campaign", "ObserveLeader"].contains(&rpc) {
                continue;
            }
            call(&channel, rpc, system, token)
                .await
                .unwrap_or_else(|s| panic!("{rpc} on {system}: {s:?}"));
        }
    }
    call(&channel, "WithLock", "payments", token).await.unwrap();

    for system in ["billing", "ledger-2", "payment"] {
        for rpc in [
            "SubmitRun",
            "ConfigureCheck",
            "GetSystemHealth",
            "ListRuns",
            "ListTransitions",
            "WatchTransitions",
            "GetUptime",
            "SetMaintenance",
            "ClearMaintenance",
            "ConfigureSystem",
            "DeleteCheck",
            "DeleteSystem",
        ] {
            let status = call(&channel, rpc, system, token).await.expect_err(rpc);
            let info = assert_reason(&status, Code::PermissionDenied, "PERMISSION_DENIED");
            assert_eq!(
                info.metadata.get("system_id"),
                Some(&system.to_owned()),
                "{rpc} on {system}"
            );
        }
    }
    // Naming a dependency outside the namespace would show its state.
    let status = HealthCheckServiceClient::new(channel.clone())
        .configure_system(authed(
            proto::ConfigureSystemRequest {
                system_id: "ledger".into(),
                depends_on: vec!["billing".into()],
            },
            token,
        ))
        .await
        .expect_err("a dependency outside the namespace");
    let info = assert_reason(&status, Code::PermissionDenied, "PERMISSION_DENIED");
    assert_eq!(info.metadata.get("system_id").map(String::as_str), Some("billing"));
    let status = call(&channel, "WithLock", "billing", token)
        .await
        .expect_err("WithLock");
    let info = assert_reason(&status, Code::PermissionDenied, "PERMISSION_DENIED");
    assert_eq!(info.metadata.get("key").map(String::as_str), Some("billing/lock"));
    until(PATIENCE, "the refused stream holds no place in the lock budget", || {
        app.lock_budget_available() == 10_000
    })
    .await;
    app.stop().await;
}

async fn listings_and_watches_of_every_system_show_only_the_principals_systems(backend: Backend) {
    let db = TestDb::create(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let narrow = Entry {
        systems: Some(&["mine-*"]),
        ..Entry::new("narrow", "t-narrow", &["health.read"])
    };
    let app = start(
        &db,
        dir.path(),
        &auth_file(&[narrow, Entry::new("root", "t-root", &["health.read", "health.write"])]),
        &[],
    )
    .await;
    let mut client = app.health_client().await;
    // The narrow principal watches every system before anything happens.
    let mut watch = client
        .watch_transitions(authed(proto::WatchTransitionsRequest::default(), Some("t-narrow")))
        .await
        .unwrap()
        .into_inner();

    // Two failures move a system to DEGRADED: one transition each, the
    // caller's systems between others'.
    // Others' systems sort before, between and after the caller's.
    let systems = [
        "alpha-1", "theirs-1", "mine-1", "alpha-2", "theirs-2", "mine-2", "alpha-3", "theirs-3",
    ];
    for system in systems {
        for i in 0..2 {
            let mut run = submit(&format!("{system}-{i}"), system);
            run.status = proto::HealthStatus::Unhealthy as i32;
            client.submit_run(authed(run, Some("t-root"))).await.unwrap();
        }
    }

    let mut watched = Vec::new();
    while watched.len() < 2 {
        let next = tokio::time::timeout(PATIENCE, watch.next())
            .await
            .expect("a transition arrives")
            .expect("the watch goes on")
            .unwrap();
        watched.push(next.transition.unwrap().system_id);
    }
    assert_eq!(watched, ["mine-1", "mine-2"]);

    // Pages of 2 over 5 transitions: every page is followed to the end, and
    // only the caller's systems appear, newest first.
    let mut listed = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_transitions(authed(
                proto::ListTransitionsRequest {
                    page_size: 2,
                    page_token: page_token.clone(),
                    ..Default::default()
                },
                Some("t-narrow"),
            ))
            .await
            .unwrap()
            .into_inner();
        listed.extend(page.transitions.into_iter().map(|t| t.system_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(listed, ["mine-2", "mine-1"]);
    // ListSystems filters before it cuts a page: the caller's two systems
    // fill the first page of two, after three of others' in id order, and
    // no page token names a system the caller may not see.
    assert_eq!(
        list_systems_pages(&mut client, "t-narrow", 0, "", 2).await,
        [["mine-1", "mine-2"]]
    );
    // The last transition of a system the caller may not read passed the
    // watch unseen: the next one it sees is its own.
    let mut run = submit("mine-1-healthy", "mine-1");
    run.status = proto::HealthStatus::Healthy as i32;
    client.submit_run(authed(run, Some("t-root"))).await.unwrap();
    let next = tokio::time::timeout(PATIENCE, watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.transition.unwrap().system_id, "mine-1");
    app.stop().await;
}

/// The pages of ListSystems as the principal of `token`, `page_size` a
/// page, with `status` (0: any) and `prefix` (at most 100 pages).
async fn list_systems_pages(
    client: &mut HealthCheckServiceClient<Channel>,
    token: &str,
    status: i32,
    prefix: &str,
    page_size: i32,
) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut page_token = String::new();
    for _ in 0..100 {
        let page = client
            .list_systems(authed(
                proto::ListSystemsRequest {
                    status,
                    system_id_prefix: prefix.into(),
                    page_size,
                    page_token: page_token.clone(),
                },
                Some(token),
            ))
            .await
            .unwrap()
            .into_inner();
        pages.push(page.systems.into_iter().map(|s| s.system_id).collect());
        if page.next_page_token.is_empty() {
            return pages;
        }
        page_token = page.next_page_token;
    }
    panic!("ListSystems did not end within 100 pages: {pages:?}");
}

/// A namespace of exact names and overlapping prefixes reads as several
/// ranges: every page of every filter lists each of the caller's systems
/// once, in order, and no other.
async fn a_namespace_of_names_and_overlapping_prefixes_pages_through_exactly_its_systems(backend: Backend) {
    let db = TestDb::create(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let patterns: &[&str] = &["b", "c/*", "d*", "e/x/*", "e/*", "zz"];
    let narrow = Entry {
        systems: Some(patterns),
        ..Entry::new("narrow", "t-narrow", &["health.read"])
    };
    let root = Entry::new("root", "t-root", &["health.read", "health.write"]);
    let app = start(&db, dir.path(), &auth_file(&[narrow, root]), &[]).await;
    let mut client = app.health_client().await;
    let systems = [
        "a", "b", "ba", "c", "c/1", "c/2", "cc", "d", "d1", "e", "e/x/1", "e/y", "f", "zz", "zzz",
    ];
    for (i, system) in systems.iter().enumerate() {
        let mut run = submit(&format!("r{i}"), system);
        if i % 3 == 0 {
            run.status = proto::HealthStatus::Unhealthy as i32;
        }
        client.submit_run(authed(run, Some("t-root"))).await.unwrap();
    }
    // Each system's status, as the root principal lists it.
    let mut statuses: HashMap<String, i32> = HashMap::new();
    let all = client
        .list_systems(authed(
            proto::ListSystemsRequest {
                page_size: 100,
                ..Default::default()
            },
            Some("t-root"),
        ))
        .await
        .unwrap()
        .into_inner();
    for s in all.systems {
        statuses.insert(s.system_id, s.status);
    }
    let visible = |id: &str| {
        patterns
            .iter()
            .any(|p| p.strip_suffix('*').map_or(id == *p, |prefix| id.starts_with(prefix)))
    };
    let mut seen_statuses: Vec<i32> = statuses.values().copied().collect();
    seen_statuses.push(0);
    seen_statuses.sort_unstable();
    seen_statuses.dedup();
    for status in seen_statuses {
        for prefix in ["", "c", "e/", "d1", "q"] {
            let want: Vec<String> = systems
                .iter()
                .filter(|id| visible(id) && id.starts_with(prefix))
                .filter(|id| status == 0 || statuses[**id] == status)
                .map(|id| (*id).to_owned())
                .collect();
            for page_size in [1, 2, 3] {
                let pages = list_systems_pages(&mut client, "t-narrow", status, prefix, page_size).await;
                let size = usize::try_from(page_size).unwrap();
                assert!(
                    pages.iter().rev().skip(1).all(|p| p.len() == size),
                    "only the last page may be short: {pages:?}"
                );
                let what = format!("status {status}, prefix {prefix:?}, pages of {page_size}");
                assert_eq!(pages.concat(), want, "{what}");
            }
        }
    }
    app.stop().await;
}

/// Holds `key` as the principal of `token` until the returned sender is dropped.
async fn hold_as(channel: &Channel, key: &str, token: &str) -> tokio::sync::mpsc::Sender<proto::WithLockRequest> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(acquire(key, Some(Duration::from_secs(5)))).await.unwrap();
    let mut replies = LockServiceClient::new(channel.clone())
        .with_lock(authed(tokio_stream::wrappers::ReceiverStream::new(rx), Some(token)))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        replies.message().await.unwrap(),
        Some(proto::WithLockResponse {
            event: Some(Event::Acquired(_))
        })
    ));
    tokio::spawn(async move { while let Ok(Some(_)) = replies.message().await {} });
    tx
}

async fn lock_listings_show_only_the_principals_keys(backend: Backend) {
    let db = TestDb::create(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let payments_entry = || Entry {
        lock_keys: Some(&["payments/*"]),
        ..Entry::new("payments", "t-payments", &["locks"])
    };
    let root_entry = || Entry::new("root", "t-root", &["locks"]);
    let app = start(&db, dir.path(), &auth_file(&[payments_entry(), root_entry()]), &[]).await;
    let channel = app.channel().await;
    let _mine = hold_as(&channel, "payments/a", "t-payments").await;
    let _theirs = hold_as(&channel, "billing/b", "t-root").await;
    let mut locks = LockServiceClient::new(channel.clone());
    let keys = |token: &'static str| {
        let mut locks = locks.clone();
        async move {
            let listed = locks
                .list_locks(authed(proto::ListLocksRequest::default(), Some(token)))
                .await
                .unwrap()
                .into_inner();
            listed.locks.into_iter().map(|l| l.key).collect::<Vec<_>>()
        }
    };
    assert_eq!(keys("t-payments").await, ["payments/a"]);
    assert_eq!(keys("t-root").await, ["billing/b", "payments/a"]);
    // Others' keys before the caller's do not take places on its pages. With
    // PostgreSQL they are held on another replica, so the published rows are
    // filtered too (the listing waits for them to be published).
    let other = match backend {
        Backend::Postgres => Some(start(&db, dir.path(), &auth_file(&[payments_entry(), root_entry()]), &[]).await),
        Backend::Embedded => None,
    };
    let other_channel = match &other {
        Some(other) => other.channel().await,
        None => channel.clone(),
    };
    let mut held = Vec::new();
    for key in ["billing/c", "billing/d", "payments/b", "payments/c"] {
        let token = if key.starts_with("payments/") {
            "t-payments"
        } else {
            "t-root"
        };
        held.push(hold_as(&other_channel, key, token).await);
    }
    let want = [vec!["payments/a", "payments/b"], vec!["payments/c"]];
    eventually(PATIENCE, "the caller's keys fill its pages", async || {
        let mut pages = Vec::new();
        let mut page_token = String::new();
        for _ in 0..3 {
            let page = locks
                .list_locks(authed(
                    proto::ListLocksRequest {
                        page_size: 2,
                        page_token: page_token.clone(),
                        ..Default::default()
                    },
                    Some("t-payments"),
                ))
                .await
                .map_err(|s| s.to_string())?
                .into_inner();
            pages.push(page.locks.into_iter().map(|l| l.key).collect::<Vec<_>>());
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        if pages == want {
            Ok(())
        } else {
            Err(format!("{pages:?}"))
        }
    })
    .await;
    let status = locks
        .get_lock(authed(
            proto::GetLockRequest {
                key: "billing/b".into(),
            },
            Some("t-payments"),
        ))
        .await
        .expect_err("another's key");
    let info = assert_reason(&status, Code::PermissionDenied, "PERMISSION_DENIED");
    assert_eq!(info.metadata.get("key").map(String::as_str), Some("billing/b"));
    drop(held);
    if let Some(other) = other {
        other.stop().await;
    }
    app.stop().await;
}

both_backends!(
    a_namespace_of_names_and_overlapping_prefixes_pages_through_exactly_its_systems,
    lock_listings_show_only_the_principals_keys,
    every_rpc_needs_its_scope_and_known_credentials,
    namespaces_bound_the_systems_and_lock_keys_a_principal_touches,
    listings_and_watches_of_every_system_show_only_the_principals_systems,
);

#[tokio::test]
async fn a_changed_auth_file_takes_effect_without_a_restart_and_a_broken_one_keeps_the_last_good() {
    let db = TestDb::embedded();
    let dir = tempfile::tempdir().unwrap();
    let app = start(
        &db,
        dir.path(),
        &auth_file(&[Entry::new("old", "t-old", &["health.read"])]),
        &[],
    )
    .await;
    let channel = app.channel().await;
    call(&channel, "EvaluateHealth", "s", Some("t-old")).await.unwrap();

    let file = dir.path().join("auth.toml");
    write_whole(&file, &auth_file(&[Entry::new("new", "t-new", &["health.read"])]));
    eventually(PATIENCE, "the new principal's token is accepted", async || {
        call(&channel, "EvaluateHealth", "s", Some("t-new")).await
    })
    .await;
    let status = call(&channel, "EvaluateHealth", "s", Some("t-old")).await.unwrap_err();
    assert_reason(&status, Code::Unauthenticated, "UNAUTHENTICATED");

    let reloads = app.auth_reloads.clone().expect("authentication is on");
    let refused = reloads.refused();
    write_whole(&file, "[[principal]]\nname = \"typo\"\nscopes = [\"health.reed\"]\n");
    until(PATIENCE, "the broken file is refused", || reloads.refused() > refused).await;
    call(&channel, "EvaluateHealth", "s", Some("t-new"))
        .await
        .expect("the last good principals stay in force");
    app.stop().await;
}

#[tokio::test]
async fn reflection_needs_a_principal_only_when_required() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let list = || ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let text = auth_file(&[Entry::new("nobody", "t-none", &[])]);
    for (required, extra) in [(false, "open"), (true, "required")] {
        let db = TestDb::embedded();
        let dir = tempfile::tempdir().unwrap();
        let app = start(&db, dir.path(), &text, &["--auth-reflection", extra]).await;
        let mut reflection = ServerReflectionClient::new(app.channel().await);
        let anonymous = reflection
            .server_reflection_info(authed(futures::stream::iter([list()]), None))
            .await;
        if required {
            assert_reason(&anonymous.unwrap_err(), Code::Unauthenticated, "UNAUTHENTICATED");
            reflection
                .server_reflection_info(authed(futures::stream::iter([list()]), Some("t-none")))
                .await
                .expect("any known principal may reflect");
        } else {
            anonymous.expect("reflection is open");
        }
        app.stop().await;
    }
}

#[tokio::test]
async fn a_verified_client_certificate_names_its_principal_without_a_token() {
    let db = TestDb::embedded();
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let files = ServerFiles::write(dir.path(), &server_ca.server(), Some(&client_ca));
    let auth = dir.path().join("auth.toml");
    write_whole(
        &auth,
        "[[principal]]\nname = \"prober\"\nclient_cert_san = \"spiffe://test/prober\"\nscopes = [\"health.write\"]\n\
         systems = [\"probed\"]\n",
    );
    let mut flags = files.flags(true);
    flags.extend(["--auth-file".to_owned(), auth.display().to_string()]);
    let prober = client_ca.client("spiffe://test/prober");
    let app = TestApp::start_tls(&db, &as_strs(&flags), prober.presented(server_ca.trusted_by_client())).await;
    let channel = app.channel().await;
    call(&channel, "SubmitRun", "probed", None).await.unwrap();
    let status = call(&channel, "SubmitRun", "elsewhere", None).await.unwrap_err();
    assert_reason(&status, Code::PermissionDenied, "PERMISSION_DENIED");
    let status = call(&channel, "EvaluateHealth", "probed", None).await.unwrap_err();
    let info = assert_reason(&status, Code::PermissionDenied, "PERMISSION_DENIED");
    assert_eq!(
        info.metadata,
        HashMap::from([
            ("principal".to_owned(), "prober".to_owned()),
            ("scope".to_owned(), "health.read".to_owned())
        ])
    );

    // A certificate of the same CA whose SAN names nobody is verified, but
    // is no principal.
    let stranger = client_ca.client("spiffe://test/stranger");
    let channel = crate::harness::tls_endpoint(app.addr, stranger.presented(server_ca.trusted_by_client()))
        .connect()
        .await
        .unwrap();
    let status = call(&channel, "SubmitRun", "probed", None).await.unwrap_err();
    assert_reason(&status, Code::Unauthenticated, "UNAUTHENTICATED");
    app.stop().await;
}
