//! Redis as the shared token store: one hash per token source holding the
//! current tokens, a lease lock with a fencing value, and the Lua scripts
//! that keep both consistent across replicas.
//!
//! Keys, for a prefix `P` and a source identity `I`:
//!
//! | key | type | what |
//! |---|---|---|
//! | `P I :token` | hash | `generation`, `access_token`, `expires_at_ms`, `refresh_token`, `fence`, `writer`, `updated_at_ms` |
//! | `P I :lock` | string, `PX` lease | `FENCE:PID:RANDOM` of the replica refreshing now |
//! | `P I :fence` | counter | last fencing number handed out |
//!
//! The token hash never expires: it holds the only live refresh token when
//! the service rotates them.

use std::{
    collections::HashMap,
    fmt,
    path::PathBuf,
    sync::LazyLock,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use redis::{
    Client, ConnectionAddr, IntoConnectionInfo, RedisError, Script, TlsCertificates,
    aio::{ConnectionManager, ConnectionManagerConfig},
};

use crate::secret::Secret;

/// How to reach Redis.
#[derive(Clone)]
pub struct RedisConnectOptions {
    /// `redis://host:port/db` or `rediss://host:port/db` (TLS). Must not
    /// carry credentials.
    pub url: String,
    /// ACL user name (Redis 6+).
    pub username: Option<String>,
    /// Password of the user (or of `requirepass`).
    pub password: Option<Secret>,
    /// PEM file with the CA certificates that sign the server's certificate
    /// (`rediss://` only); replaces the built-in web PKI roots.
    pub ca_file: Option<PathBuf>,
    /// Limit for connecting and for each command.
    pub command_timeout: Duration,
}

impl fmt::Debug for RedisConnectOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConnectOptions")
            .field("url", &redact_userinfo(&self.url))
            .field("username", &self.username)
            .field("password", &self.password)
            .field("ca_file", &self.ca_file)
            .field("command_timeout", &self.command_timeout)
            .finish()
    }
}

/// The URL with any `user:password@` replaced by `***@`.
fn redact_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{scheme}://***{}", &rest[at..]),
        None => url.to_owned(),
    }
}

/// A failed store operation. Never carries a token or password.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The settings cannot work (bad URL, unreadable CA file).
    #[error("invalid Redis settings: {0}")]
    Config(String),
    /// Redis did not answer in time.
    #[error("Redis at {endpoint}: {op}: no answer within {timeout:?}")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// `host:port` of the server.
        endpoint: String,
        /// The limit that elapsed.
        timeout: Duration,
    },
    /// Redis answered with an error, or the connection failed.
    #[error("Redis at {endpoint}: {op}: {message}")]
    Redis {
        /// The operation.
        op: &'static str,
        /// `host:port` of the server.
        endpoint: String,
        /// What went wrong.
        message: String,
    },
    /// The token hash exists but cannot be understood.
    #[error("Redis key {key} is not a token record ({reason}); fix or delete it")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

impl StoreError {
    /// The operation that failed, for the `op` metric label.
    pub fn op(&self) -> &'static str {
        match self {
            Self::Config(_) => "config",
            Self::Timeout { op, .. } | Self::Redis { op, .. } => op,
            Self::Corrupt { .. } => "read",
        }
    }

    /// Whether Redis is out of reach (as opposed to holding bad data).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Timeout { .. } | Self::Redis { .. })
    }
}

/// The keys of one token source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreKeys {
    /// The token hash.
    pub record: String,
    /// The refresh lock.
    pub lock: String,
    /// The fencing counter.
    pub fence: String,
}

impl StoreKeys {
    /// Keys for `identity` under `prefix`.
    pub fn new(prefix: &str, identity: &str) -> Self {
        Self {
            record: format!("{prefix}{identity}:token"),
            lock: format!("{prefix}{identity}:lock"),
            fence: format!("{prefix}{identity}:fence"),
        }
    }
}

/// The shared tokens as stored. `Debug` redacts the tokens.
#[derive(Clone, Debug)]
pub struct TokenRecord {
    /// Incremented by every write; 0 means no record.
    pub generation: u64,
    /// The current access token.
    pub access_token: Secret,
    /// When it expires.
    pub expires_at: SystemTime,
    /// The newest refresh token.
    pub refresh_token: Secret,
    /// Fencing number of the lock the writer held (0: written without it).
    pub fence: u64,
    /// Which replica wrote it (`PID:RANDOM`).
    pub writer: String,
    /// When it was written.
    pub updated_at: SystemTime,
}

impl TokenRecord {
    /// Time left until the access token expires (zero once expired).
    pub fn ttl(&self) -> Duration {
        self.expires_at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
    }

    /// The lifetime the access token was issued with: from the write (right
    /// after the refresh) to its expiry; at least what it has left.
    pub fn lifetime(&self) -> Duration {
        self.expires_at
            .duration_since(self.updated_at)
            .unwrap_or(Duration::ZERO)
            .max(self.ttl())
    }
}

/// What to write: the tokens a refresh produced.
#[derive(Clone, Debug)]
pub struct NewTokens {
    /// The access token.
    pub access_token: Secret,
    /// When it expires.
    pub expires_at: SystemTime,
    /// The newest refresh token.
    pub refresh_token: Secret,
}

/// A held refresh lock: the value stored under the lock key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The fencing number (strictly increasing per source).
    pub number: u64,
    /// `NUMBER:PID:RANDOM`, compared by every script that acts as holder.
    pub value: String,
}

impl Fence {
    /// Parses a lock value.
    pub fn parse(value: &str) -> Option<Self> {
        let number = value.split(':').next()?.parse().ok()?;
        Some(Self {
            number,
            value: value.to_owned(),
        })
    }

    /// The process id in the value, if it has one.
    pub fn pid(&self) -> Option<u32> {
        self.value.split(':').nth(1)?.parse().ok()
    }
}

/// Result of [`RedisStore::commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Commit {
    /// Written while holding the lock; `replaced` is the generation that was
    /// there (differs from the expected one only if someone wrote without
    /// the lock meanwhile).
    Locked {
        /// The new generation.
        generation: u64,
        /// The generation it replaced.
        replaced: u64,
    },
    /// Written without the lock (lease lost, or a refresh made while Redis
    /// was unreachable) because the record was still the expected one.
    Unlocked {
        /// The new generation.
        generation: u64,
    },
    /// Not written: no lock, and another replica wrote a newer record.
    Conflict {
        /// The generation in Redis.
        current: u64,
    },
}

/// Takes the lock if it is free: `SET lock FENCE NX PX lease` with a fresh
/// fencing number, atomically. Returns the value or nil.
static LOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local n = redis.call('INCR', KEYS[2])
local v = n .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], v, 'PX', ARGV[2])
return v
",
    )
});

/// Extends the lease, only if the caller still holds the lock.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
",
    )
});

/// Compare-and-delete: releases the lock only if the caller holds it.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// Writes a new record when the caller holds the lock (status 1), or when
/// it does not but the record is still the generation its refresh started
/// from, or gone (Redis restarted empty) (status 2); otherwise writes
/// nothing (status 0).
/// Returns `{status, generation now in Redis, generation replaced}`.
static COMMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local gen = tonumber(redis.call('HGET', KEYS[1], 'generation') or '0')
local status = 0
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) == ARGV[1] then
  status = 1
elseif gen == tonumber(ARGV[2]) or gen == 0 then
  status = 2
else
  return {0, gen, gen}
end
local next = gen + 1
redis.call('HSET', KEYS[1],
  'generation', next,
  'access_token', ARGV[3],
  'expires_at_ms', ARGV[4],
  'refresh_token', ARGV[5],
  'fence', ARGV[6],
  'writer', ARGV[7],
  'updated_at_ms', ARGV[8])
return {status, next, gen}
",
    )
});

/// A connection to the shared store. Cheap to clone; reconnects by itself.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    endpoint: String,
    command_timeout: Duration,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("endpoint", &self.endpoint)
            .field("command_timeout", &self.command_timeout)
            .finish_non_exhaustive()
    }
}

fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn from_epoch_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl RedisStore {
    /// Prepares a connection; nothing is sent until the first command, so a
    /// replica starts while Redis is down. Must be called inside a Tokio
    /// runtime.
    pub fn connect(options: &RedisConnectOptions) -> Result<Self, StoreError> {
        let mut info = options
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| StoreError::Config(format!("store.url: {e}")))?;
        let mut settings = info.redis_settings().clone();
        if let Some(user) = &options.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = &options.password {
            settings = settings.set_password(password.expose());
        }
        info = info.set_redis_settings(settings);
        let endpoint = info.addr().to_string();
        let tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
        let client = match &options.ca_file {
            Some(path) if tls => {
                let pem = std::fs::read(path).map_err(|e| {
                    StoreError::Config(format!(
                        "store.ca_file: cannot read {}: {e}",
                        path.display()
                    ))
                })?;
                Client::build_with_tls(
                    info,
                    TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
            }
            Some(_) => {
                return Err(StoreError::Config(
                    "store.ca_file needs a rediss:// URL".to_owned(),
                ));
            }
            None => Client::open(info),
        }
        .map_err(|e| StoreError::Config(format!("store.url: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.command_timeout))
            .set_response_timeout(Some(options.command_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| StoreError::Config(format!("store.url: {e}")))?;
        Ok(Self {
            conn,
            endpoint,
            command_timeout: options.command_timeout,
        })
    }

    /// `host:port` of the server (no credentials).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Runs one command, bounded by the command timeout as a whole. A
    /// command that fails on a broken connection (Redis restarted) is sent
    /// once more on the connection the manager re-establishes.
    async fn bounded<T, F, Fut>(&self, op: &'static str, mut send: F) -> Result<T, StoreError>
    where
        F: FnMut(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let attempts = async {
            match send(self.conn.clone()).await {
                Err(e) if e.is_io_error() || e.is_connection_dropped() => {
                    send(self.conn.clone()).await
                }
                other => other,
            }
        };
        match tokio::time::timeout(self.command_timeout, attempts).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Redis {
                op,
                endpoint: self.endpoint.clone(),
                message: e.to_string(),
            }),
            Err(_) => Err(StoreError::Timeout {
                op,
                endpoint: self.endpoint.clone(),
                timeout: self.command_timeout,
            }),
        }
    }

    async fn script<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        call: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.bounded(
            op,
            |mut conn| async move { call.invoke_async(&mut conn).await },
        )
        .await
    }

    async fn command<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T, StoreError> {
        self.bounded(
            op,
            |mut conn| async move { cmd.query_async(&mut conn).await },
        )
        .await
    }

    /// `PING`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.command::<String>("ping", &redis::cmd("PING"))
            .await
            .map(|_| ())
    }

    /// The current record, `None` when there is none yet.
    pub async fn read(&self, keys: &StoreKeys) -> Result<Option<TokenRecord>, StoreError> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(&keys.record);
        let fields: HashMap<String, String> = self.command("read", &cmd).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        parse_record(&keys.record, &fields).map(Some)
    }

    /// Takes the lock when it is free. `owner` (`PID:RANDOM`) identifies the
    /// replica; the lease is the lock's time to live.
    pub async fn try_lock(
        &self,
        keys: &StoreKeys,
        owner: &str,
        lease: Duration,
    ) -> Result<Option<Fence>, StoreError> {
        let mut call = LOCK.prepare_invoke();
        call.key(&keys.lock)
            .key(&keys.fence)
            .arg(owner)
            .arg(lease_ms(lease));
        let value: Option<String> = self.script("lock", &call).await?;
        Ok(value.as_deref().and_then(Fence::parse))
    }

    /// Extends the lease; `false` when the lock is no longer ours.
    pub async fn renew(
        &self,
        keys: &StoreKeys,
        fence: &Fence,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let mut call = RENEW.prepare_invoke();
        call.key(&keys.lock).arg(&fence.value).arg(lease_ms(lease));
        let renewed: i64 = self.script("renew", &call).await?;
        Ok(renewed == 1)
    }

    /// Releases the lock if it is still ours (compare-and-delete); `false`
    /// when it was not (the lease had run out).
    pub async fn release(&self, keys: &StoreKeys, fence: &Fence) -> Result<bool, StoreError> {
        let mut call = RELEASE.prepare_invoke();
        call.key(&keys.lock).arg(&fence.value);
        let deleted: i64 = self.script("release", &call).await?;
        Ok(deleted == 1)
    }

    /// `SET key value` with an optional time to live (for what a device
    /// login publishes to the other replicas).
    #[cfg_attr(not(feature = "proxy"), allow(dead_code))]
    pub(crate) async fn set_value(
        &self,
        key: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value);
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(lease_ms(ttl));
        }
        self.command::<()>("write", &cmd).await
    }

    /// `GET key`.
    #[cfg_attr(not(feature = "proxy"), allow(dead_code))]
    pub(crate) async fn get_value(&self, key: &str) -> Result<Option<String>, StoreError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        self.command("read", &cmd).await
    }

    /// `DEL key`.
    #[cfg_attr(not(feature = "proxy"), allow(dead_code))]
    pub(crate) async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(key);
        self.command::<i64>("write", &cmd).await.map(|_| ())
    }

    /// The current lock value, if the lock is held.
    pub async fn lock_holder(&self, keys: &StoreKeys) -> Result<Option<Fence>, StoreError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(&keys.lock);
        let value: Option<String> = self.command("read", &cmd).await?;
        Ok(value.as_deref().and_then(Fence::parse))
    }

    /// Writes `tokens` as the next generation: as holder of `fence`, or,
    /// without the lock (`fence` is `None` or the lease ran out), only if
    /// the record is still `expected_generation` or there is none.
    pub async fn commit(
        &self,
        keys: &StoreKeys,
        fence: Option<&Fence>,
        expected_generation: u64,
        tokens: &NewTokens,
        writer: &str,
    ) -> Result<Commit, StoreError> {
        let mut call = COMMIT.prepare_invoke();
        call.key(&keys.record)
            .key(&keys.lock)
            .arg(fence.map_or("", |f| f.value.as_str()))
            .arg(expected_generation)
            .arg(tokens.access_token.expose())
            .arg(epoch_ms(tokens.expires_at))
            .arg(tokens.refresh_token.expose())
            .arg(fence.map_or(0, |f| f.number))
            .arg(writer)
            .arg(epoch_ms(SystemTime::now()));
        let reply: Vec<u64> = self.script("commit", &call).await?;
        match reply.as_slice() {
            [1, generation, replaced] => Ok(Commit::Locked {
                generation: *generation,
                replaced: *replaced,
            }),
            [2, generation, _] => Ok(Commit::Unlocked {
                generation: *generation,
            }),
            [0, current, _] => Ok(Commit::Conflict { current: *current }),
            other => Err(StoreError::Redis {
                op: "commit",
                endpoint: self.endpoint.clone(),
                message: format!("unexpected script reply {other:?}"),
            }),
        }
    }
}

fn lease_ms(lease: Duration) -> u64 {
    u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn parse_record(key: &str, fields: &HashMap<String, String>) -> Result<TokenRecord, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: key.to_owned(),
        reason,
    };
    let text = |name: &str| {
        fields
            .get(name)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| corrupt(format!("field {name} is missing")))
    };
    let number = |name: &str| -> Result<u64, StoreError> {
        text(name)?
            .parse()
            .map_err(|_| corrupt(format!("field {name} is not a number")))
    };
    Ok(TokenRecord {
        generation: number("generation")?,
        access_token: Secret::new(text("access_token")?.clone()),
        expires_at: from_epoch_ms(number("expires_at_ms")?),
        refresh_token: Secret::new(text("refresh_token")?.clone()),
        fence: fields
            .get("fence")
            .and_then(|f| f.parse().ok())
            .unwrap_or(0),
        writer: fields.get("writer").cloned().unwrap_or_default(),
        updated_at: from_epoch_ms(
            fields
                .get("updated_at_ms")
                .and_then(|f| f.parse().ok())
                .unwrap_or(0),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_values_parse() {
        let f = Fence::parse("17:4242:a1b2c3d4").unwrap();
        assert_eq!(f.number, 17);
        assert_eq!(f.pid(), Some(4242));
        assert!(Fence::parse("x:1:2").is_none());
    }

    #[test]
    fn records_need_every_token_field_and_debug_redacts() {
        let mut fields: HashMap<String, String> = [
            ("generation", "3"),
            ("access_token", "S3CRET-a"),
            ("expires_at_ms", "1700000000000"),
            ("refresh_token", "S3CRET-r"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let record = parse_record("k", &fields).unwrap();
        assert_eq!(record.generation, 3);
        assert_eq!(epoch_ms(record.expires_at), 1_700_000_000_000);
        assert!(!format!("{record:?}").contains("S3CRET"));
        fields.remove("refresh_token");
        let err = parse_record("k", &fields).unwrap_err();
        assert!(err.to_string().contains("refresh_token"), "{err}");
        assert!(!err.to_string().contains("S3CRET"));
    }

    #[test]
    fn debug_hides_credentials() {
        let options = RedisConnectOptions {
            url: "rediss://user:S3CRET@redis.internal:6380/0".to_owned(),
            username: None,
            password: Some(Secret::new("S3CRET-too")),
            ca_file: None,
            command_timeout: Duration::from_secs(1),
        };
        let text = format!("{options:?}");
        assert!(!text.contains("S3CRET"), "{text}");
        assert!(
            text.contains("rediss://***@redis.internal:6380/0"),
            "{text}"
        );
    }

    #[test]
    fn keys_share_the_prefix_and_identity() {
        let keys = StoreKeys::new("p:", "refresh_token:client");
        assert_eq!(keys.record, "p:refresh_token:client:token");
        assert_eq!(keys.lock, "p:refresh_token:client:lock");
        assert_eq!(keys.fence, "p:refresh_token:client:fence");
    }
}
