//! Shared token store for several replicas of the proxy.
//!
//! With refresh-token rotation, replicas that share one client and refresh
//! token must not refresh on their own: each refresh revokes the refresh
//! token the others hold. With `[store] kind = "redis"` the access token,
//! its expiry and the newest refresh token live in Redis, one replica
//! refreshes per window under a lease lock, and the others read its result.
//! See [`SharedStoreSource`] and `docs/replicas.md`.

mod redis;
mod source;

pub use self::{
    redis::{
        Commit, Fence, NewTokens, RedisConnectOptions, RedisStore, StoreError, StoreKeys,
        TokenRecord,
    },
    source::{SharedStoreOptions, SharedStoreSource},
};
