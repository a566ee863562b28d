//! The warm pool: `claude -p --input-format stream-json` processes started ahead of time,
//! each in its own staged run dir and process group, waiting on stdin. A `/run` whose
//! (model, system prompt, tools, schema) matches an idle one skips the CLI's ~0.6 s start-up.
//!
//! Which combinations are kept, `CLAWDFORGE_WARM_POOL` processes in total: one each for the
//! most recently requested other combinations (at most size - 1),
//! and all the rest for the default model with no system prompt.
//! Idle processes hold no admission slot; they are replaced after
//! `CLAWDFORGE_WARM_MAX_IDLE_SECS`, when the CLI probe changes (version or login), when one
//! dies, and after each use (one process serves exactly one run: the CLI keeps the first
//! exchange in context). A warm process's dir is its run's dir from the start,
//! `RUNS_DIR/<run id>`: it cannot be moved later, because the CLI checks the path it
//! started in.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::process::{child_env, Proc, Spec};
use crate::store::Db;
use crate::util::new_id;

/// How often idle processes are checked for having died.
const HEALTH_CHECK: Duration = Duration::from_secs(5);

/// What a warm process is fixed to at spawn (model, system prompt, tools, schema).
pub type Key = super::invocation::Fixed;

/// A pre-started process, not yet given a prompt.
pub struct Warm {
    pub proc: Proc,
    pub run_id: String,
    pub dir: PathBuf,
    key: Key,
    born: Instant,
    generation: u64,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct PoolStats {
    /// Processes the pool may keep (`CLAWDFORGE_WARM_POOL`).
    pub size: usize,
    /// Processes idle right now.
    pub idle: usize,
    /// Runs served by a warm process.
    pub hits: u64,
    /// Runs that found none and started cold.
    pub misses: u64,
}

struct Inner {
    idle: Vec<Warm>,
    /// Keys by recency of demand, most recent first (never holds the default key).
    recent: VecDeque<Key>,
    /// Spawns under way, by key, so a burst of demand does not start duplicates.
    starting: Vec<Key>,
}

pub struct WarmPool {
    config: Arc<Config>,
    db: Db,
    size: usize,
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Bumped when the CLI probe changes; processes of an older generation are discarded.
    generation: AtomicU64,
    stop: CancellationToken,
}

impl WarmPool {
    pub fn new(config: Arc<Config>, db: Db, stop: CancellationToken) -> Arc<WarmPool> {
        Arc::new(WarmPool {
            size: config.settings.warm_pool as usize,
            config,
            db,
            inner: Mutex::new(Inner {
                idle: Vec::new(),
                recent: VecDeque::new(),
                starting: Vec::new(),
            }),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            stop,
        })
    }

    fn default_key(&self) -> Key {
        Key {
            model: self.config.settings.default_model.clone(),
            system: None,
            tools: super::invocation::Tools::DEFAULT,
            json_schema: None,
        }
    }

    fn max_idle(&self) -> Duration {
        Duration::from_secs(self.config.settings.warm_max_idle_secs.max(1))
    }

    pub fn stats(&self) -> PoolStats {
        let idle = self.inner.lock().map(|i| i.idle.len()).unwrap_or(0);
        PoolStats {
            size: self.size,
            idle,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    /// Pids of the idle processes (for tests and diagnostics).
    pub fn idle_pids(&self) -> Vec<i32> {
        self.inner
            .lock()
            .map(|i| i.idle.iter().map(|w| w.proc.pgid).collect())
            .unwrap_or_default()
    }

    /// The keys the pool should hold now: the default first, then the most recent others.
    /// One entry per process: each recent other combination gets one (the most recent
    /// first, at most `size - 1` of them), the default combination all the rest, so a
    /// burst of plain requests finds as many warm processes as the pool holds.
    fn wanted(&self, inner: &Inner) -> Vec<Key> {
        let others: Vec<Key> = inner
            .recent
            .iter()
            .take(self.size.saturating_sub(1))
            .cloned()
            .collect();
        let mut keys = vec![self.default_key(); self.size - others.len()];
        keys.extend(others);
        keys
    }

    /// Takes an idle process for `key`, if one is ready; notes the demand either way and
    /// starts whatever the pool now lacks in the background.
    pub fn take(self: &Arc<Self>, key: &Key) -> Option<Warm> {
        if self.size == 0 {
            return None;
        }
        let generation = self.generation.load(Ordering::SeqCst);
        let mut discarded = Vec::new();
        let found = {
            let Ok(mut inner) = self.inner.lock() else {
                return None;
            };
            if *key != self.default_key() {
                inner.recent.retain(|k| k != key);
                inner.recent.push_front(key.clone());
                inner.recent.truncate(self.size);
            }
            let mut found = None;
            while let Some(i) = inner.idle.iter().position(|w| w.key == *key) {
                let mut w = inner.idle.swap_remove(i);
                // Never hand out a process that died while idle, or a stale one.
                if w.generation != generation
                    || w.born.elapsed() >= self.max_idle()
                    || w.proc.has_exited()
                {
                    discarded.push(w);
                    continue;
                }
                found = Some(w);
                break;
            }
            found
        };
        drop(discarded);
        match &found {
            Some(_) => self.hits.fetch_add(1, Ordering::Relaxed),
            None => self.misses.fetch_add(1, Ordering::Relaxed),
        };
        self.refill();
        found
    }

    /// Kills surplus and stale idle processes and starts what is missing.
    pub fn refill(self: &Arc<Self>) {
        if self.size == 0 || self.stop.is_cancelled() {
            return;
        }
        let generation = self.generation.load(Ordering::SeqCst);
        let mut to_start = Vec::new();
        let mut discarded = Vec::new();
        if let Ok(mut inner) = self.inner.lock() {
            let wanted = self.wanted(&inner);
            let max_idle = self.max_idle();
            let want = |key: &Key| wanted.iter().filter(|k| *k == key).count();
            // As many live, current processes per key as wanted; everything else goes.
            let mut kept: Vec<Warm> = Vec::new();
            for mut w in std::mem::take(&mut inner.idle) {
                let fine = w.generation == generation
                    && w.born.elapsed() < max_idle
                    && kept.iter().filter(|k| k.key == w.key).count() < want(&w.key)
                    && !w.proc.has_exited();
                if fine {
                    kept.push(w);
                } else {
                    discarded.push(w);
                }
            }
            inner.idle = kept;
            let mut distinct = wanted.clone();
            distinct.dedup();
            for key in distinct {
                let have = inner.idle.iter().filter(|w| w.key == key).count()
                    + inner.starting.iter().filter(|k| **k == key).count();
                for _ in have..want(&key) {
                    inner.starting.push(key.clone());
                    to_start.push(key.clone());
                }
            }
        }
        // Dropping a Warm kills its group; its dir goes too.
        for w in discarded {
            crate::process::remove_dir(&w.dir);
        }
        for key in to_start {
            let pool = self.clone();
            tokio::spawn(async move { pool.start_one(key, generation).await });
        }
    }

    async fn start_one(self: Arc<Self>, key: Key, generation: u64) {
        let result = self.spawn(&key, generation).await;
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        // One spawn of this key is over (`starting` holds one entry per spawn).
        if let Some(i) = inner.starting.iter().position(|k| k == &key) {
            inner.starting.swap_remove(i);
        }
        match result {
            Ok(w) if !self.stop.is_cancelled() => inner.idle.push(w),
            Ok(w) => {
                drop(inner);
                crate::process::remove_dir(&w.dir);
            }
            Err(e) => {
                tracing::warn!(error = %e, model = %key.model, "could not start a warm claude")
            }
        }
    }

    async fn spawn(&self, key: &Key, generation: u64) -> anyhow::Result<Warm> {
        let run_id = new_id("run_");
        let dir = self.config.runs_dir.join(&run_id);
        tokio::fs::create_dir_all(&dir).await?;
        let args = super::invocation::warm_args(key);
        let spec = Spec {
            program: self.config.settings.claude_bin.clone(),
            args,
            cwd: dir.clone(),
            env: child_env(&self.config),
            max_output: self.config.settings.max_output_bytes,
            owns_dir: Some(dir.clone()),
            audit_id: None,
        };
        match Proc::spawn(spec, Some(&self.db)).await {
            Ok(proc) => Ok(Warm {
                proc,
                run_id,
                dir,
                key: key.clone(),
                born: Instant::now(),
                generation,
            }),
            Err(e) => {
                crate::process::remove_dir(&dir);
                Err(e.into())
            }
        }
    }

    /// The CLI changed (version or login): discard every idle process and start afresh.
    pub fn invalidate(self: &Arc<Self>) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.refill();
    }

    /// Stops every idle process and waits until they are gone (shutdown).
    pub async fn shutdown(&self) {
        let idle = self
            .inner
            .lock()
            .map(|mut i| std::mem::take(&mut i.idle))
            .unwrap_or_default();
        futures_util::future::join_all(idle.into_iter().map(|mut w| async move {
            w.proc.terminate().await;
            crate::process::remove_dir(&w.dir);
        }))
        .await;
    }

    /// Recycles idle processes past their idle life, waking when the oldest expires.
    pub fn spawn_keeper(
        self: &Arc<Self>,
        mut probes: tokio::sync::watch::Receiver<crate::probe::ProbeSnapshot>,
    ) {
        if self.size == 0 {
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            pool.refill();
            loop {
                let next = pool
                    .inner
                    .lock()
                    .ok()
                    .and_then(|i| i.idle.iter().map(|w| w.born).min())
                    .map(|born| (born + pool.max_idle()).saturating_duration_since(Instant::now()))
                    .unwrap_or(pool.max_idle())
                    // Also look every few seconds for processes that died while idle.
                    .min(HEALTH_CHECK);
                tokio::select! {
                    _ = pool.stop.cancelled() => break,
                    changed = probes.changed() => {
                        if changed.is_err() { break; }
                        pool.invalidate();
                    }
                    _ = tokio::time::sleep(next.max(Duration::from_millis(50))) => pool.refill(),
                }
            }
            // The idle processes are stopped by `App::serve`, which awaits `shutdown()`; doing
            // it here too would race it and let serve return before they are gone.
        });
    }
}
