//! Replicas sharing one client and refresh token through Redis
//! (`[store] kind = "redis"`), against a real `redis-server` that each test
//! starts on a free loopback port (tests/support/redis.rs) and the
//! in-process emulator with refresh-token rotation on.
//!
//! * The store's scripts: the lease lock, compare-and-delete release,
//!   renewal, and the commit rules, against the real server.
//! * Eight proxy processes refreshing in turns: one `CreateToken` per
//!   window, no `InvalidGrant`, no failed request. The issue asks for five
//!   minutes of windows: `.ci/run` sets `SSO_REPLICA_RUN_SECS=300` for that;
//!   a plain `cargo test` runs 40 s (about 40 windows with 2 s tokens) to
//!   stay quick. Processes cannot share a paused clock, so time is real.
//! * The lock holder killed with SIGKILL in the middle of a refresh.
//! * Redis stopped mid-run, then started again.
//!
//! Nothing is skipped: without `redis-server` the tests fail and say to run
//! `bash scripts/test.sh` (which installs it).

#[allow(dead_code)]
#[path = "support/binary_harness.rs"]
mod harness;
#[allow(dead_code)]
#[path = "support/redis.rs"]
mod redis_support;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use harness::{BIN, Env, Http, assert_no_secrets, free_addr, poll_until};
use redis_support::RedisServer;
use sso_token_proxy::{
    Secret,
    cache::{CacheOptions, Rejection, TokenCache},
    emulator::{EmulatorConfig, Fault},
    oidc::{OidcClient, Operation},
    store::{
        Commit, NewTokens, RedisConnectOptions, RedisStore, SharedStoreOptions, SharedStoreSource,
        StoreKeys, TokenRecord,
    },
    token::{RefreshTokenSource, Reuse, TokenSource},
};
use tokio::{
    process::{Child, Command},
    time::{Instant, sleep, timeout},
};

const PREFIX: &str = "test:";

fn store_for(url: &str) -> RedisStore {
    RedisStore::connect(&RedisConnectOptions {
        url: url.to_owned(),
        username: None,
        password: None,
        ca_file: None,
        command_timeout: Duration::from_secs(2),
    })
    .expect("store settings")
}

fn tokens(n: u32) -> NewTokens {
    NewTokens {
        access_token: Secret::new(format!("access-{n}")),
        expires_at: SystemTime::now() + Duration::from_secs(60),
        refresh_token: Secret::new(format!("refresh-{n}")),
    }
}

async fn bounded<F: std::future::Future>(limit: Duration, what: &str, f: F) -> F::Output {
    timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: did not finish within {limit:?}"))
}

// === the store's scripts ===

#[tokio::test]
async fn lock_is_exclusive_and_only_its_holder_renews_or_releases_it() {
    let redis = RedisServer::start();
    let store = store_for(&redis.url());
    let keys = StoreKeys::new(PREFIX, "unit:lock");
    let lease = Duration::from_secs(30);

    let a = store
        .try_lock(&keys, "1:aaaa", lease)
        .await
        .unwrap()
        .expect("free lock is taken");
    assert_eq!(a.pid(), Some(1));
    assert!(
        store
            .try_lock(&keys, "2:bbbb", lease)
            .await
            .unwrap()
            .is_none(),
        "held lock is not taken again"
    );
    assert_eq!(store.lock_holder(&keys).await.unwrap().as_ref(), Some(&a));

    // A stranger's value neither renews nor releases it.
    let mut stranger = a.clone();
    stranger.value = format!("{}:2:bbbb", a.number);
    assert!(!store.renew(&keys, &stranger, lease).await.unwrap());
    assert!(!store.release(&keys, &stranger).await.unwrap());
    assert!(store.renew(&keys, &a, lease).await.unwrap());
    assert!(store.release(&keys, &a).await.unwrap());
    assert!(!store.release(&keys, &a).await.unwrap(), "released twice");

    let b = store
        .try_lock(&keys, "2:bbbb", lease)
        .await
        .unwrap()
        .expect("released lock is free");
    assert!(
        b.number > a.number,
        "fencing numbers increase: {} then {}",
        a.number,
        b.number
    );
}

#[tokio::test]
async fn an_expired_lease_passes_the_lock_on_and_the_old_holder_cannot_touch_it() {
    let redis = RedisServer::start();
    let store = store_for(&redis.url());
    let keys = StoreKeys::new(PREFIX, "unit:lease");
    let a = store
        .try_lock(&keys, "1:aaaa", Duration::from_millis(200))
        .await
        .unwrap()
        .unwrap();
    sleep(Duration::from_millis(300)).await;
    let b = store
        .try_lock(&keys, "2:bbbb", Duration::from_secs(30))
        .await
        .unwrap()
        .expect("lock free after its lease");
    assert!(b.number > a.number);
    assert!(
        !store
            .renew(&keys, &a, Duration::from_secs(30))
            .await
            .unwrap()
    );
    assert!(
        !store.release(&keys, &a).await.unwrap(),
        "compare-and-delete spares the new holder"
    );
    assert_eq!(store.lock_holder(&keys).await.unwrap(), Some(b));
}

#[tokio::test]
async fn commits_need_the_lock_or_an_unchanged_record() {
    let redis = RedisServer::start();
    let store = store_for(&redis.url());
    let keys = StoreKeys::new(PREFIX, "unit:commit");
    assert!(store.read(&keys).await.unwrap().is_none());

    // The holder writes generation 1.
    let a = store
        .try_lock(&keys, "1:aaaa", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    let c = store
        .commit(&keys, Some(&a), 0, &tokens(1), "1:aaaa")
        .await
        .unwrap();
    assert_eq!(
        c,
        Commit::Locked {
            generation: 1,
            replaced: 0
        }
    );
    let rec: TokenRecord = store.read(&keys).await.unwrap().unwrap();
    assert_eq!(rec.generation, 1);
    assert_eq!(rec.access_token.expose(), "access-1");
    assert_eq!(rec.refresh_token.expose(), "refresh-1");
    assert_eq!(rec.fence, a.number);
    assert_eq!(rec.writer, "1:aaaa");
    assert!(rec.ttl() > Duration::from_secs(50));
    assert!(store.release(&keys, &a).await.unwrap());

    // A holder whose lease ran out still stores its result when nobody
    // else wrote since its refresh started...
    let c = store
        .commit(&keys, Some(&a), 1, &tokens(2), "1:aaaa")
        .await
        .unwrap();
    assert_eq!(c, Commit::Unlocked { generation: 2 });
    // ...and not when somebody did.
    let c = store
        .commit(&keys, Some(&a), 1, &tokens(3), "1:aaaa")
        .await
        .unwrap();
    assert_eq!(c, Commit::Conflict { current: 2 });
    // The same rules for a refresh made while Redis was unreachable.
    let c = store
        .commit(&keys, None, 1, &tokens(4), "2:bbbb")
        .await
        .unwrap();
    assert_eq!(c, Commit::Conflict { current: 2 });
    let c = store
        .commit(&keys, None, 2, &tokens(5), "2:bbbb")
        .await
        .unwrap();
    assert_eq!(c, Commit::Unlocked { generation: 3 });
    let rec = store.read(&keys).await.unwrap().unwrap();
    assert_eq!(rec.refresh_token.expose(), "refresh-5");
    assert_eq!(rec.fence, 0, "written without the lock");
    // Redis lost the record (restarted without persistence): whoever
    // refreshed meanwhile may store its result.
    let mut del = redis::cmd("DEL");
    del.arg(&keys.record);
    let admin = redis::Client::open(redis.url()).unwrap();
    let mut conn = admin.get_multiplexed_async_connection().await.unwrap();
    del.exec_async(&mut conn).await.unwrap();
    let c = store
        .commit(&keys, None, 3, &tokens(6), "2:bbbb")
        .await
        .unwrap();
    assert_eq!(c, Commit::Unlocked { generation: 1 });
}

#[tokio::test]
async fn an_unreachable_redis_is_a_prompt_unavailable_error() {
    let addr = free_addr();
    let store = RedisStore::connect(&RedisConnectOptions {
        url: format!("redis://{addr}"),
        username: None,
        password: None,
        ca_file: None,
        command_timeout: Duration::from_millis(500),
    })
    .unwrap();
    let keys = StoreKeys::new(PREFIX, "unit:down");
    let started = Instant::now();
    let err = store.read(&keys).await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let err = store
        .try_lock(&keys, "1:a", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
}

#[tokio::test]
async fn an_acl_user_limited_to_the_prefix_is_enough_and_others_are_refused() {
    let redis = RedisServer::start_with(&["--requirepass", "admin-password-for-tests"]);
    // The documented ACL: the proxies' user may touch only its prefix.
    let admin =
        redis::Client::open(format!("redis://:admin-password-for-tests@{}", redis.addr)).unwrap();
    let mut conn = admin.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "sso-token-proxy",
            "on",
            ">proxy-password-for-tests",
            "resetkeys",
            "~test:*",
            "resetchannels",
            "-@all",
            "+ping",
            "+hgetall",
            "+hget",
            "+hset",
            "+get",
            "+set",
            "+exists",
            "+incr",
            "+pexpire",
            "+del",
            "+evalsha",
            "+eval",
            "+script|load",
        ])
        .exec_async(&mut conn)
        .await
        .unwrap();

    let connect = |user: Option<&str>, password: &str| {
        RedisStore::connect(&RedisConnectOptions {
            url: format!("redis://{}", redis.addr),
            username: user.map(str::to_owned),
            password: Some(Secret::new(password)),
            ca_file: None,
            command_timeout: Duration::from_secs(2),
        })
        .unwrap()
    };
    let store = connect(Some("sso-token-proxy"), "proxy-password-for-tests");
    let keys = StoreKeys::new(PREFIX, "unit:acl");
    let fence = store
        .try_lock(&keys, "1:a", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    store
        .commit(&keys, Some(&fence), 0, &tokens(1), "1:a")
        .await
        .unwrap();
    assert_eq!(store.read(&keys).await.unwrap().unwrap().generation, 1);
    assert!(store.release(&keys, &fence).await.unwrap());
    // Outside the prefix: refused.
    let other = StoreKeys::new("other:", "unit:acl");
    assert!(store.read(&other).await.is_err());
    // A wrong password: refused, and the error does not echo it.
    let err = connect(Some("sso-token-proxy"), "wrong-password-123")
        .ping()
        .await
        .unwrap_err();
    assert!(!err.to_string().contains("wrong-password-123"), "{err}");
}

// === config ===

#[tokio::test]
async fn store_config_problems_name_the_key() {
    let env = Env::new(EmulatorConfig::default()).await;
    let base = env.config_text(free_addr(), free_addr(), &harness::Opts::default());
    let cases = [
        (
            "kind = \"memcached\"\n",
            "store.kind: `memcached` is not a store",
        ),
        ("kind = \"redis\"\n", "store.url: missing required key"),
        (
            "kind = \"redis\"\nurl = \"redis://user:pw@127.0.0.1:6379\"\n",
            "store.url: must not contain credentials",
        ),
        (
            "kind = \"redis\"\nurl = \"http://127.0.0.1:6379\"\n",
            "store.url: scheme `http` is not supported",
        ),
        (
            "kind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\nlock_lease = \"soon\"\n",
            "store.lock_lease: `soon` is not a duration",
        ),
        (
            "kind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\nttl = \"1s\"\n",
            "store.ttl: unknown key",
        ),
    ];
    for (store, expected) in cases {
        let path = env.write("bad.toml", &format!("{base}\n[store]\n{store}"));
        let (status, _, stderr) = harness::run_binary(
            &["check-config", "--no-bind-check"],
            &path,
            "error",
            Duration::from_secs(20),
        )
        .await;
        assert_eq!(status.code(), Some(2), "{store}: {stderr}");
        let line = format!("{}: {expected}", path.display());
        assert!(
            stderr.contains(&line),
            "{store}: expected {line:?} in:\n{stderr}"
        );
        assert!(!stderr.contains("pw@"), "{stderr}");
    }
    let good = env.write(
        "good.toml",
        &format!(
            "{base}\n[store]\nkind = \"redis\"\nurl = \"rediss://redis.internal:6380/1\"\nusername = \"proxy\"\npassword = \"x\"\nlock_lease = \"5s\"\nrefresh_without_store = true\n"
        ),
    );
    let (status, stdout, stderr) = harness::run_binary(
        &["check-config", "--no-bind-check"],
        &good,
        "error",
        Duration::from_secs(20),
    )
    .await;
    assert!(status.success(), "{stdout}{stderr}");
}

// === SharedStoreSource in one process ===

/// Sources in one process stand in for replicas: a cold burst across all of
/// them is one `CreateToken`, and each later window is one more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_in_one_process_share_one_refresh_per_window() {
    bounded(Duration::from_secs(60), "in-process replicas", async {
        let redis = RedisServer::start();
        let env = Env::new(EmulatorConfig::default()).await;
        let replicas: Vec<Arc<SharedStoreSource>> = (0..4)
            .map(|i| {
                let oidc = OidcClient::builder()
                    .endpoint(env.emulator.url())
                    .build()
                    .unwrap();
                let inner = RefreshTokenSource::builder(
                    oidc,
                    env.client_id.clone(),
                    Secret::new(env.client_secret.clone()),
                    Secret::new(env.refresh_token.clone()),
                )
                .state_file(env.path(&format!("state-{i}.json")))
                .build()
                .unwrap();
                Arc::new(SharedStoreSource::new(
                    inner,
                    store_for(&redis.url()),
                    env.client_id.clone(),
                    Secret::new(env.refresh_token.clone()),
                    SharedStoreOptions {
                        key_prefix: PREFIX.to_owned(),
                        lock_lease: Duration::from_secs(5),
                        wait_timeout: Duration::from_secs(5),
                        expiry_margin: Duration::from_secs(1),
                        ..Default::default()
                    },
                ))
            })
            .collect();
        let fetch_all = |reuse: Reuse| {
            let tasks: Vec<_> = replicas
                .iter()
                .flat_map(|r| (0..3).map(move |_| Arc::clone(r)))
                .map(|r| {
                    tokio::spawn(
                        async move { r.fetch(reuse).await.map(|t| t.access_token().clone()) },
                    )
                })
                .collect();
            async move {
                let mut out = Vec::new();
                for t in tasks {
                    out.push(t.await.unwrap().expect("fetch succeeds"));
                }
                out
            }
        };
        let first = fetch_all(Reuse::IfValidFor(Duration::from_secs(60))).await;
        assert!(
            first.iter().all(|t| t == &first[0]),
            "every replica got the same token"
        );
        assert_eq!(env.emulator.counters().create_token, 1);

        // Every replica finds the token too short-lived: still one refresh.
        let second = fetch_all(Reuse::IfValidFor(Duration::from_secs(7200))).await;
        assert!(second.iter().all(|t| t == &second[0]));
        assert_ne!(second[0], first[0]);
        assert_eq!(env.emulator.counters().create_token, 2);
        assert_eq!(
            env.emulator.counters().errors_by_kind.get("InvalidGrant"),
            None
        );

        let record = store_for(&redis.url())
            .read(replicas[0].keys())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(record.generation, 2);
        assert!(
            env.emulator
                .is_refresh_token_live(record.refresh_token.expose())
        );
        // Every replica's state file caught up with the rotated token.
        for i in 0..4 {
            let state =
                sso_token_proxy::token::StateFile::load(&env.path(&format!("state-{i}.json")))
                    .unwrap()
                    .unwrap();
            assert_eq!(
                state.refresh_token.as_ref(),
                Some(&record.refresh_token),
                "replica {i}"
            );
        }
        let text = format!("{:?}", replicas[0]);
        assert!(!text.contains(record.refresh_token.expose()), "{text}");
    })
    .await;
}

/// Issue 13: a token an upstream rejected is not adopted back from Redis,
/// although the shared record still lists it as valid: tokens are known by
/// their value, so the replica's cache asks its source for a new one
/// (`Reuse::Never`), which refreshes and stores it for every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_rejected_upstream_is_not_adopted_back_from_redis() {
    bounded(Duration::from_secs(60), "rejected shared token", async {
        let redis = RedisServer::start();
        let env = Env::new(EmulatorConfig::default()).await;
        let replica = |i: usize| {
            let oidc = OidcClient::builder()
                .endpoint(env.emulator.url())
                .build()
                .unwrap();
            let inner = RefreshTokenSource::builder(
                oidc,
                env.client_id.clone(),
                Secret::new(env.client_secret.clone()),
                Secret::new(env.refresh_token.clone()),
            )
            .state_file(env.path(&format!("state-{i}.json")))
            .build()
            .unwrap();
            TokenCache::new(
                SharedStoreSource::new(
                    inner,
                    store_for(&redis.url()),
                    env.client_id.clone(),
                    Secret::new(env.refresh_token.clone()),
                    SharedStoreOptions {
                        key_prefix: PREFIX.to_owned(),
                        ..Default::default()
                    },
                ),
                CacheOptions::default(),
            )
        };
        let (a, b) = (replica(0), replica(1));
        let first = a.get().await.unwrap();
        assert_eq!(
            b.get().await.unwrap().id(),
            first.id(),
            "adopted from Redis"
        );
        assert_eq!(env.emulator.counters().create_token, 1);

        // The upstream rejects it at replica B; Redis still lists it.
        assert_eq!(b.reject(&first), Rejection::Refresh);
        let second = b.get().await.unwrap();
        assert_ne!(second.id(), first.id());
        assert_eq!(env.emulator.counters().create_token, 2);
        let record = store_for(&redis.url())
            .read(&StoreKeys::new(PREFIX, &b.source().identity()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(record.access_token, *second.access_token());
        for _ in 0..10 {
            assert_eq!(b.get().await.unwrap().id(), second.id());
        }
        // Replica A, told the same, takes B's token from Redis: no refresh.
        assert_eq!(a.reject(&first), Rejection::Refresh);
        assert_eq!(a.get().await.unwrap().id(), second.id());
        assert_eq!(env.emulator.counters().create_token, 2);
    })
    .await;
}

/// With `refresh_without_store = true` a replica refreshes on its own while
/// Redis is down, and stores the result once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_without_store_refreshes_alone_and_publishes_when_redis_is_back() {
    bounded(Duration::from_secs(60), "refresh without store", async {
        let mut redis = RedisServer::start();
        let env = Env::new(EmulatorConfig::default()).await;
        let oidc = OidcClient::builder()
            .endpoint(env.emulator.url())
            .build()
            .unwrap();
        let inner = RefreshTokenSource::builder(
            oidc,
            env.client_id.clone(),
            Secret::new(env.client_secret.clone()),
            Secret::new(env.refresh_token.clone()),
        )
        .state_file(env.path("state.json"))
        .build()
        .unwrap();
        let source = SharedStoreSource::new(
            inner,
            RedisStore::connect(&RedisConnectOptions {
                url: redis.url(),
                username: None,
                password: None,
                ca_file: None,
                command_timeout: Duration::from_millis(300),
            })
            .unwrap(),
            env.client_id.clone(),
            Secret::new(env.refresh_token.clone()),
            SharedStoreOptions {
                key_prefix: PREFIX.to_owned(),
                refresh_without_store: true,
                expiry_margin: Duration::from_secs(1),
                health_interval: Duration::from_millis(100),
                ..Default::default()
            },
        );
        let t1 = source
            .fetch(Reuse::IfValidFor(Duration::from_secs(60)))
            .await
            .unwrap();
        assert!(!source.degraded());
        redis.stop();
        // Held and good enough: no Redis needed.
        let again = source
            .fetch(Reuse::IfValidFor(Duration::from_secs(60)))
            .await
            .unwrap();
        assert_eq!(again.id(), t1.id());
        // Too short-lived for the caller: refreshed alone.
        let t2 = source
            .fetch(Reuse::IfValidFor(Duration::from_secs(7200)))
            .await
            .unwrap();
        assert_ne!(t2.access_token(), t1.access_token());
        assert!(source.degraded());
        assert_eq!(env.emulator.counters().create_token, 2);

        redis.restart();
        let store = store_for(&redis.url());
        let keys = source.keys().clone();
        let record = poll_until(
            Duration::from_secs(10),
            "the local refresh to be stored",
            || {
                let (store, keys) = (store.clone(), keys.clone());
                async move { store.read(&keys).await.ok().flatten() }
            },
        )
        .await;
        assert_eq!(&record.access_token, t2.access_token());
        assert!(
            env.emulator
                .is_refresh_token_live(record.refresh_token.expose())
        );
        poll_until(Duration::from_secs(5), "degraded mode to end", || async {
            (!source.degraded()).then_some(())
        })
        .await;
        let t3 = source
            .fetch(Reuse::IfValidFor(Duration::from_secs(60)))
            .await
            .unwrap();
        assert_eq!(t3.access_token(), t2.access_token());
        let counters = env.emulator.counters();
        assert_eq!(counters.create_token, 2, "{counters:?}");
        assert_eq!(counters.errors_by_kind.get("InvalidGrant"), None);
    })
    .await;
}

// === proxy processes ===

/// What a replica's config says beyond the shared parts.
struct ReplicaOpts {
    refresh_before_expiry: &'static str,
    lock_lease: &'static str,
    wait_timeout: &'static str,
    command_timeout: &'static str,
}

/// One `sso-token-proxy` process.
struct Replica {
    index: usize,
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    stderr_path: PathBuf,
}

impl Replica {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// `/metrics` value of a metric without labels.
    async fn metric(&self, http: &Http, name: &str) -> Option<f64> {
        let resp = http
            .try_get(&format!("http://{}/metrics", self.admin))
            .await
            .ok()?;
        let text = String::from_utf8_lossy(&resp.body).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }
}

fn replica_config(
    env: &Env,
    redis_url: &str,
    i: usize,
    listen: SocketAddr,
    admin: SocketAddr,
    o: &ReplicaOpts,
) -> String {
    let url = env.emulator.url();
    format!(
        r#"[proxy]
listen = "{listen}"
upstream = "{url}"
shutdown_grace = "2s"
[admin]
listen = "{admin}"
[oidc]
endpoint = "{url}"
client_id = "{client_id}"
client_secret_file = "{secret}"
[token]
source = "refresh_token"
refresh_token_file = "{refresh}"
state_file = "{state}"
refresh_before_expiry = "{rbe}"
expiry_margin = "200ms"
[retry]
base_delay = "50ms"
[store]
kind = "redis"
url = "{redis_url}"
key_prefix = "{PREFIX}"
lock_lease = "{lease}"
wait_timeout = "{wait}"
command_timeout = "{command}"
"#,
        client_id = env.client_id,
        secret = env.path("client_secret").display(),
        refresh = env.path("refresh_token").display(),
        state = env.path(&format!("state-{i}.json")).display(),
        rbe = o.refresh_before_expiry,
        lease = o.lock_lease,
        wait = o.wait_timeout,
        command = o.command_timeout,
    )
}

/// Starts `n` replicas at once and waits until every one is ready (holds a
/// valid token).
async fn start_replicas(env: &Env, redis: &RedisServer, n: usize, o: &ReplicaOpts) -> Vec<Replica> {
    let mut replicas = Vec::new();
    for i in 0..n {
        let (listen, admin) = (free_addr(), free_addr());
        let config = env.write(
            &format!("replica-{i}.toml"),
            &replica_config(env, &redis.url(), i, listen, admin, o),
        );
        let stderr_path = env.path(&format!("replica-{i}.stderr"));
        let child = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info,sso_token_proxy=debug")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&stderr_path).unwrap()))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn sso-token-proxy");
        replicas.push(Replica {
            index: i,
            child,
            addr: listen,
            admin,
            stderr_path,
        });
    }
    let http = Http::new();
    for r in &mut replicas {
        let url = format!("http://{}/readyz", r.admin);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = r.child.try_wait().unwrap() {
                panic!("replica {} exited with {status}:\n{}", r.index, r.stderr());
            }
            if let Ok(Ok(resp)) = timeout(Duration::from_secs(1), http.try_get(&url)).await
                && resp.status == 200
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica {} not ready within 30 s:\n{}",
                r.index,
                r.stderr()
            );
            sleep(Duration::from_millis(20)).await;
        }
    }
    replicas
}

/// Requests through each replica every `pace`, until stopped: per replica
/// `(ok, failed)`, and the first few failures.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(u64, u64)>>,
    failures: Arc<Mutex<Vec<String>>>,
    /// Replicas (by index) whose failures are expected (killed).
    excused: Arc<Mutex<Vec<usize>>>,
}

impl Load {
    fn start(replicas: &[Replica], pace: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let excused = Arc::new(Mutex::new(Vec::new()));
        let tasks = replicas
            .iter()
            .map(|r| {
                let (stop, failures, excused) = (stop.clone(), failures.clone(), excused.clone());
                let (url, index) = (r.url("/anything"), r.index);
                tokio::spawn(async move {
                    let http = Http::new();
                    let (mut ok, mut failed) = (0, 0);
                    while !stop.load(Ordering::Relaxed) {
                        let result = timeout(Duration::from_secs(10), http.try_get(&url)).await;
                        if excused.lock().unwrap().contains(&index) {
                            return (ok, failed);
                        }
                        match result {
                            Ok(Ok(resp)) if resp.status == 200 => ok += 1,
                            other => {
                                failed += 1;
                                let what = match other {
                                    Ok(Ok(resp)) => format!(
                                        "{} {}",
                                        resp.status,
                                        String::from_utf8_lossy(&resp.body)
                                    ),
                                    Ok(Err(e)) => e,
                                    Err(_) => "no answer within 10 s".to_owned(),
                                };
                                let mut f = failures.lock().unwrap();
                                if f.len() < 10 {
                                    f.push(format!("replica {index}: {what}"));
                                }
                            }
                        }
                        sleep(pace).await;
                    }
                    (ok, failed)
                })
            })
            .collect();
        Self {
            stop,
            tasks,
            failures,
            excused,
        }
    }

    fn excuse(&self, index: usize) {
        self.excused.lock().unwrap().push(index);
    }

    /// Stops the load: per replica `(ok, failed)`.
    async fn finish(self) -> (Vec<(u64, u64)>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = Vec::new();
        for t in self.tasks {
            out.push(t.await.unwrap());
        }
        let failures = self.failures.lock().unwrap().clone();
        (out, failures)
    }
}

/// Records every generation of the token record it sees: generation →
/// `(updated_at, fence, writer)`.
struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<BTreeMap<u64, (SystemTime, u64, String)>>,
}

impl Sampler {
    fn start(store: RedisStore, keys: StoreKeys, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut seen = BTreeMap::new();
            loop {
                // Stopping is checked after a read, so the last read comes
                // after `finish` was called.
                let stopping = flag.load(Ordering::Relaxed);
                if let Ok(Some(rec)) = store.read(&keys).await {
                    seen.entry(rec.generation).or_insert((
                        rec.updated_at,
                        rec.fence,
                        rec.writer.clone(),
                    ));
                }
                if stopping {
                    break;
                }
                sleep(every).await;
            }
            seen
        });
        Self { stop, task }
    }

    async fn finish(self) -> BTreeMap<u64, (SystemTime, u64, String)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// The emulator's counters and the stored record, taken while no refresh
/// is in flight (lock free and generation unchanged around the count), so
/// that `CreateToken` calls and stored generations can be compared.
async fn settled(
    env: &Env,
    store: &RedisStore,
    keys: &StoreKeys,
) -> (sso_token_proxy::emulator::Counters, TokenRecord) {
    for _ in 0..200 {
        let before = store.read(keys).await.unwrap().unwrap();
        let free_before = store.lock_holder(keys).await.unwrap().is_none();
        let counters = env.emulator.counters();
        let free_after = store.lock_holder(keys).await.unwrap().is_none();
        let after = store.read(keys).await.unwrap().unwrap();
        if free_before && free_after && before.generation == after.generation {
            return (counters, after);
        }
        sleep(Duration::from_millis(10)).await;
    }
    panic!("a refresh was in flight for 2 s");
}

fn keys_for(env: &Env) -> StoreKeys {
    StoreKeys::new(PREFIX, &format!("refresh_token:{}", env.client_id))
}

fn check_logs(env: &Env, replicas: &[Replica], record: &TokenRecord) {
    for r in replicas {
        assert_no_secrets(
            &format!("replica {} stderr", r.index),
            &r.stderr(),
            &[
                ("client secret", env.client_secret.as_str()),
                ("configured refresh token", env.refresh_token.as_str()),
                ("stored refresh token", record.refresh_token.expose()),
                ("stored access token", record.access_token.expose()),
            ],
            &[env.client_id.as_str()],
        );
    }
}

/// The acceptance run: 8 processes, rotation on, 2 s tokens refreshed 1 s
/// before expiry, requests through all 8 all the time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_replicas_make_one_create_token_per_window() {
    // 40 s by default; CI sets SSO_REPLICA_RUN_SECS=300 for the issue's
    // full five minutes.
    let run_secs = std::env::var("SSO_REPLICA_RUN_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(40);
    let run_for = Duration::from_secs(run_secs);
    const LIFETIME: Duration = Duration::from_secs(2);
    // The cache refreshes min(refresh_before_expiry, lifetime / 2) before
    // expiry, so a token is replaced after about LIFETIME - 1 s.
    const MIN_SPACING: Duration = Duration::from_millis(700);
    bounded(run_for + Duration::from_secs(80), "eight replicas", async {
        let redis = RedisServer::start();
        let env = Env::new(EmulatorConfig {
            access_token_lifetime: LIFETIME,
            rotate_refresh_tokens: true,
            ..Default::default()
        })
        .await;
        let opts = ReplicaOpts {
            refresh_before_expiry: "1s",
            lock_lease: "2s",
            wait_timeout: "3s",
            command_timeout: "1s",
        };
        let replicas = start_replicas(&env, &redis, 8, &opts).await;
        let store = store_for(&redis.url());
        let keys = keys_for(&env);
        let sampler = Sampler::start(store.clone(), keys.clone(), Duration::from_millis(40));
        let load = Load::start(&replicas, Duration::from_millis(20));
        let started = Instant::now();
        let create_before = env.emulator.counters().create_token;
        let first_generation = store.read(&keys).await.unwrap().unwrap().generation;
        sleep(run_for).await;
        let (per_replica, failures) = load.finish().await;
        let elapsed = started.elapsed();
        // A refresh the last requests started may still be in flight: wait
        // for it before the sampler stops, so that its generation is seen.
        let (counters, record) = settled(&env, &store, &keys).await;
        let seen = sampler.finish().await;

        let total_ok: u64 = per_replica.iter().map(|(ok, _)| ok).sum();
        let total_failed: u64 = per_replica.iter().map(|(_, f)| f).sum();
        assert_eq!(total_failed, 0, "failed requests: {failures:?}");
        for (i, (ok, _)) in per_replica.iter().enumerate() {
            assert!(*ok > 100, "replica {i} served only {ok} requests");
        }
        assert_eq!(counters.errors_by_kind.get("InvalidGrant"), None, "{counters:?}");
        assert!(counters.errors_by_kind.is_empty(), "{counters:?}");
        // Every CreateToken became exactly one stored generation.
        assert_eq!(counters.create_token, record.generation, "{counters:?}");
        let windows = counters.create_token - create_before;
        let max_windows = (elapsed.as_millis() / MIN_SPACING.as_millis()) as u64 + 1;
        let min_windows = (elapsed.as_millis() / LIFETIME.as_millis()) as u64;
        assert!(
            (min_windows..=max_windows).contains(&windows),
            "{windows} refreshes in {elapsed:?}; expected {min_windows}..={max_windows}"
        );
        // Each window had exactly one refresh: every generation was seen
        // (two in one window would be under the sampling period apart) and
        // consecutive ones are a window apart.
        let last = record.generation;
        for g in first_generation..=last {
            assert!(seen.contains_key(&g), "generation {g} never seen; seen {:?}", seen.keys());
        }
        let mut previous: Option<(u64, SystemTime)> = None;
        for (g, (at, _, _)) in seen.range(first_generation..) {
            if let Some((pg, pat)) = previous {
                let gap = at.duration_since(pat).unwrap_or_default();
                assert!(gap >= MIN_SPACING, "generations {pg} and {g} only {gap:?} apart");
            }
            previous = Some((*g, *at));
        }
        assert!(env.emulator.is_refresh_token_live(record.refresh_token.expose()));
        eprintln!(
            "8 replicas, {elapsed:?}: {total_ok} requests, {windows} CreateToken calls ({max_windows} windows expected at most)"
        );
        check_logs(&env, &replicas, &record);
    })
    .await;
}

/// The replica holding the lock is killed inside `CreateToken`; another one
/// takes over once the lease runs out, with the same refresh token.
///
/// The killed replica's request is held by the emulator (`Fault::Delay`)
/// for longer than the test, i.e. it dies before the service answered. A
/// replica that dies after the service rotated the token but before storing
/// the answer loses that token whatever the protocol; only a service-side
/// reuse grace helps there (see tests/kill_during_refresh.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_lock_holder_mid_refresh_hands_over_after_the_lease() {
    const LEASE: Duration = Duration::from_secs(1);
    bounded(Duration::from_secs(120), "kill the holder", async {
        let redis = RedisServer::start();
        let env = Env::new(EmulatorConfig {
            access_token_lifetime: Duration::from_secs(6),
            rotate_refresh_tokens: true,
            ..Default::default()
        })
        .await;
        // Refresh 3 s before expiry (half the lifetime).
        let opts = ReplicaOpts {
            refresh_before_expiry: "3s",
            lock_lease: "1s",
            wait_timeout: "3s",
            command_timeout: "1s",
        };
        let mut replicas = start_replicas(&env, &redis, 4, &opts).await;
        let store = store_for(&redis.url());
        let keys = keys_for(&env);
        let load = Load::start(&replicas, Duration::from_millis(25));
        let before = store.read(&keys).await.unwrap().unwrap();

        // The next CreateToken hangs; whoever holds the lock then is inside
        // the refresh.
        env.emulator.inject(
            Operation::CreateToken,
            [Fault::Delay(Duration::from_secs(60))],
        );
        let calls = env.emulator.counters().create_token;
        let fence = poll_until(
            Duration::from_secs(10),
            "a replica to start refreshing",
            || {
                let store = store.clone();
                let keys = keys.clone();
                let emulator = env.emulator.clone();
                async move {
                    if emulator.counters().create_token <= calls {
                        return None;
                    }
                    store.lock_holder(&keys).await.ok().flatten()
                }
            },
        )
        .await;
        let pid = fence.pid().expect("lock value names the pid");
        let victim = replicas
            .iter()
            .position(|r| r.pid() == Some(pid))
            .unwrap_or_else(|| panic!("no replica has pid {pid}"));
        load.excuse(victim);
        replicas[victim].child.start_kill().unwrap();
        let killed_at = Instant::now();
        replicas[victim].child.wait().await.unwrap();

        // Another replica takes over once the lease has run out.
        let after = poll_until(
            Duration::from_secs(10),
            "another replica to store a new token",
            || {
                let store = store.clone();
                let keys = keys.clone();
                let generation = before.generation;
                async move {
                    store
                        .read(&keys)
                        .await
                        .ok()
                        .flatten()
                        .filter(|r| r.generation > generation)
                }
            },
        )
        .await;
        let took = killed_at.elapsed();
        assert!(
            after.fence > fence.number,
            "new fence {} after {}",
            after.fence,
            fence.number
        );
        assert!(
            !after.writer.starts_with(&format!("{pid}:")),
            "written by the killed replica"
        );
        assert!(
            took >= LEASE / 2,
            "took over after {took:?}, before the lease could run out"
        );
        assert!(
            env.emulator
                .is_refresh_token_live(after.refresh_token.expose())
        );

        // The survivors go on refreshing with the handed-over token.
        let later = poll_until(Duration::from_secs(15), "two more windows", || {
            let store = store.clone();
            let keys = keys.clone();
            let generation = after.generation;
            async move {
                store
                    .read(&keys)
                    .await
                    .ok()
                    .flatten()
                    .filter(|r| r.generation >= generation + 2)
            }
        })
        .await;
        let (per_replica, failures) = load.finish().await;
        let (counters, record) = settled(&env, &store, &keys).await;
        let survivors_failed: u64 = per_replica
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != victim)
            .map(|(_, (_, f))| f)
            .sum();
        assert_eq!(
            survivors_failed, 0,
            "failed requests through survivors: {failures:?}"
        );
        assert_eq!(
            counters.errors_by_kind.get("InvalidGrant"),
            None,
            "{counters:?}"
        );
        // The hung call of the killed replica is the only one not stored.
        assert!(record.generation >= later.generation);
        assert_eq!(counters.create_token, record.generation + 1, "{counters:?}");
        assert!(
            env.emulator
                .is_refresh_token_live(record.refresh_token.expose())
        );
        eprintln!(
            "holder pid {pid} killed; fence {} took over after {took:?}",
            after.fence
        );
        check_logs(&env, &replicas, &record);
    })
    .await;
}

/// Redis goes away: requests keep succeeding on the valid token, `/metrics`
/// shows the store down and, once a refresh is due, the degraded mode (the
/// shared refresh token is not used without coordination). Redis comes
/// back empty: the replicas seed it again and go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_run_keeps_valid_tokens_and_recovers() {
    bounded(Duration::from_secs(120), "redis outage", async {
        let mut redis = RedisServer::start();
        let env = Env::new(EmulatorConfig {
            access_token_lifetime: Duration::from_secs(6),
            rotate_refresh_tokens: true,
            ..Default::default()
        })
        .await;
        let opts = ReplicaOpts {
            refresh_before_expiry: "2s",
            lock_lease: "2s",
            wait_timeout: "2s",
            command_timeout: "300ms",
        };
        let replicas = start_replicas(&env, &redis, 3, &opts).await;
        let store = store_for(&redis.url());
        let keys = keys_for(&env);
        let http = Http::new();
        let load = Load::start(&replicas, Duration::from_millis(25));

        // Stop Redis just after a refresh, so the token has most of its
        // life left.
        let first = store.read(&keys).await.unwrap().unwrap();
        let fresh = poll_until(Duration::from_secs(15), "a refresh through Redis", || {
            let (store, keys) = (store.clone(), keys.clone());
            async move {
                store
                    .read(&keys)
                    .await
                    .ok()
                    .flatten()
                    .filter(|r| r.generation > first.generation)
            }
        })
        .await;
        // ...once every replica has the new token (a replica still waiting
        // for it when Redis goes keeps its old, soon expiring one).
        for r in &replicas {
            poll_until(
                Duration::from_secs(5),
                "every replica to hold the new token",
                || async {
                    let resp = http
                        .try_get(&format!("http://{}/readyz", r.admin))
                        .await
                        .ok()?;
                    let left = resp.json()["token_expires_in_seconds"].as_u64()?;
                    (left >= 4).then_some(())
                },
            )
            .await;
        }
        redis.stop();
        let calls_at_stop = env.emulator.counters().create_token;
        let expires_at = fresh.expires_at;

        for r in &replicas {
            let up = poll_until(Duration::from_secs(5), "store_up 0", || async {
                r.metric(&http, "sso_token_proxy_store_up")
                    .await
                    .filter(|v| *v == 0.0)
            })
            .await;
            assert_eq!(up, 0.0);
        }
        // Once the refresh is due, each replica refuses to refresh alone.
        for r in &replicas {
            let degraded = poll_until(Duration::from_secs(6), "store_degraded 1", || async {
                r.metric(&http, "sso_token_proxy_store_degraded")
                    .await
                    .filter(|v| *v == 1.0)
            })
            .await;
            assert_eq!(degraded, 1.0);
        }
        // Requests succeeded all along while the token was valid.
        let remaining = expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .saturating_sub(Duration::from_millis(500));
        sleep(remaining).await;
        let (per_replica, failures) = load.finish().await;
        let failed: u64 = per_replica.iter().map(|(_, f)| f).sum();
        assert_eq!(
            failed, 0,
            "requests failed while the token was valid: {failures:?}"
        );
        assert_eq!(
            env.emulator.counters().create_token,
            calls_at_stop,
            "no refresh without coordination"
        );
        let stderr = replicas[0].stderr();
        assert!(
            stderr.contains("not refreshing the shared refresh token without coordination"),
            "{stderr}"
        );

        // Redis comes back empty; the replicas seed it from the refresh
        // token they had adopted and go on.
        sleep(Duration::from_secs(1)).await;
        redis.restart();
        for r in &replicas {
            poll_until(
                Duration::from_secs(40),
                "requests to succeed again",
                || async {
                    let resp = http.try_get(&r.url("/anything")).await.ok()?;
                    (resp.status == 200).then_some(())
                },
            )
            .await;
            poll_until(
                Duration::from_secs(5),
                "store_up 1 and degraded 0",
                || async {
                    let up = r.metric(&http, "sso_token_proxy_store_up").await?;
                    let degraded = r.metric(&http, "sso_token_proxy_store_degraded").await?;
                    (up == 1.0 && degraded == 0.0).then_some(())
                },
            )
            .await;
        }
        let (counters, record) = settled(&env, &store, &keys).await;
        assert_eq!(
            counters.errors_by_kind.get("InvalidGrant"),
            None,
            "{counters:?}"
        );
        assert_eq!(
            counters.create_token,
            calls_at_stop + record.generation,
            "{counters:?}"
        );
        assert!(
            env.emulator
                .is_refresh_token_live(record.refresh_token.expose())
        );
        check_logs(&env, &replicas, &record);
    })
    .await;
}
