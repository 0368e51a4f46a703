//! Prometheus metrics of the server: request counts by endpoint and status, token counters,
//! latency histograms, and the scheduler's queue, batch and KV-cache gauges read at scrape time.

use std::sync::atomic::Ordering::Relaxed;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::batch::scheduler::SchedulerStats;

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    /// Requests by endpoint and HTTP status.
    pub requests: IntCounterVec,
    /// Prompt tokens of finished requests.
    pub prompt_tokens: IntCounter,
    /// Tokens streamed to clients.
    pub generated_tokens: IntCounter,
    /// Request arrival to first token.
    pub ttft: Histogram,
    /// Time between consecutive tokens of a request.
    pub token_latency: Histogram,
    /// Request arrival to end.
    pub duration: Histogram,
    queue: IntGauge,
    running: IntGauge,
    kv_used: IntGauge,
    kv_total: IntGauge,
    kv_cached: IntGauge,
    kv_shared: IntGauge,
    prefix_hits: IntGauge,
    preemptions: IntGauge,
    drafted: IntGauge,
    accepted: IntGauge,
    /// Requests by API key name and HTTP status.
    pub key_requests: IntCounterVec,
    /// Prompt and generated tokens by API key name.
    pub key_tokens: IntCounterVec,
    /// Requests refused by a key's rate limit, by key name and limit (`requests`, `tokens`).
    pub rate_limited: IntCounterVec,
    /// Requests shed by the breaker (503).
    pub shed: IntCounter,
    /// 1 while the breaker is open.
    pub breaker_open: IntGauge,
    oldest_wait: IntGauge,
    step_ms: IntGauge,
    worker_running: IntGaugeVec,
    worker_queue: IntGaugeVec,
    worker_generated: IntGaugeVec,
    /// Open connections (HTTP and WebSocket).
    pub connections_open: IntGauge,
    /// The connection cap in force.
    pub connections_limit: IntGauge,
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let r = Registry::new();
        let requests = counter_vec(
            &r,
            "bitnet_requests_total",
            "HTTP requests by endpoint and status",
            &["endpoint", "status"],
        );
        let lat = prometheus::exponential_buckets(0.001, 2.0, 16).expect("valid buckets");
        Metrics {
            requests,
            prompt_tokens: counter(
                &r,
                "bitnet_prompt_tokens_total",
                "Prompt tokens of requests",
            ),
            generated_tokens: counter(&r, "bitnet_generated_tokens_total", "Generated tokens"),
            ttft: histogram(
                &r,
                "bitnet_time_to_first_token_seconds",
                "Time from request arrival to its first token",
                lat.clone(),
            ),
            token_latency: histogram(
                &r,
                "bitnet_inter_token_latency_seconds",
                "Time between consecutive tokens of a request",
                lat.clone(),
            ),
            duration: histogram(
                &r,
                "bitnet_request_duration_seconds",
                "Time from request arrival to its end",
                lat,
            ),
            queue: gauge(&r, "bitnet_queue_depth", "Requests waiting for admission"),
            running: gauge(
                &r,
                "bitnet_running_sequences",
                "Sequences in the running batch",
            ),
            kv_used: gauge(&r, "bitnet_kv_blocks_used", "KV cache blocks in use"),
            kv_total: gauge(&r, "bitnet_kv_blocks_total", "KV cache blocks in the pool"),
            kv_cached: gauge(
                &r,
                "bitnet_kv_blocks_cached",
                "Idle KV blocks holding reusable prompt prefixes",
            ),
            kv_shared: gauge(
                &r,
                "bitnet_kv_blocks_shared",
                "KV cache blocks shared by several sequences (prompt prefixes, n > 1)",
            ),
            prefix_hits: gauge(
                &r,
                "bitnet_prefix_cache_hit_tokens",
                "Prompt tokens served from cached prefix blocks (current model)",
            ),
            preemptions: gauge(
                &r,
                "bitnet_preemptions",
                "Sequences preempted for KV blocks (current model)",
            ),
            drafted: gauge(
                &r,
                "bitnet_speculative_drafted_tokens",
                "Tokens drafted by speculative decoding (current model)",
            ),
            accepted: gauge(
                &r,
                "bitnet_speculative_accepted_tokens",
                "Drafted tokens accepted (current model)",
            ),
            key_requests: counter_vec(
                &r,
                "bitnet_api_key_requests_total",
                "Requests by API key name and HTTP status",
                &["key", "status"],
            ),
            key_tokens: counter_vec(
                &r,
                "bitnet_api_key_tokens_total",
                "Prompt and generated tokens by API key name",
                &["key"],
            ),
            rate_limited: counter_vec(
                &r,
                "bitnet_rate_limited_total",
                "Requests refused (429) by an API key's rate limit",
                &["key", "limit"],
            ),
            shed: counter(
                &r,
                "bitnet_shed_requests_total",
                "Generation requests shed (503) by the load-shedding breaker",
            ),
            breaker_open: gauge(
                &r,
                "bitnet_breaker_open",
                "1 while the load-shedding breaker is open",
            ),
            oldest_wait: gauge(
                &r,
                "bitnet_queue_oldest_wait_ms",
                "How long the longest-waiting request has waited for admission",
            ),
            step_ms: gauge(
                &r,
                "bitnet_step_ms",
                "Duration of the last batched step (0 when idle)",
            ),
            worker_running: gauge_vec(
                &r,
                "bitnet_worker_running_sequences",
                "Sequences in each engine worker's batch",
                &["worker"],
            ),
            worker_queue: gauge_vec(
                &r,
                "bitnet_worker_queue_depth",
                "Requests waiting for admission by each engine worker",
                &["worker"],
            ),
            worker_generated: gauge_vec(
                &r,
                "bitnet_worker_generated_tokens",
                "Tokens each engine worker generated (current model)",
                &["worker"],
            ),
            connections_open: gauge(
                &r,
                "bitnet_connections_open",
                "Open client connections (HTTP and WebSocket)",
            ),
            connections_limit: gauge(
                &r,
                "bitnet_connections_limit",
                "Most open connections (--max-connections, within the open-file limit)",
            ),
            registry: r,
        }
    }

    /// The text exposition, with the gauges of `stats` (the serving model's schedulers
    /// together) and of each of its `workers` (name, scheduler).
    pub fn render(
        &self,
        stats: Option<&SchedulerStats>,
        workers: &[(&str, &SchedulerStats)],
    ) -> String {
        for (name, w) in workers {
            self.worker_running
                .with_label_values(&[*name])
                .set(w.running.load(Relaxed) as i64);
            self.worker_queue
                .with_label_values(&[*name])
                .set(w.queued.load(Relaxed) as i64);
            self.worker_generated
                .with_label_values(&[*name])
                .set(w.generated_tokens.load(Relaxed) as i64);
        }
        if let Some(s) = stats {
            self.queue.set(s.queued.load(Relaxed) as i64);
            self.running.set(s.running.load(Relaxed) as i64);
            self.kv_used.set(s.kv_used.load(Relaxed) as i64);
            self.kv_total.set(s.kv_total.load(Relaxed) as i64);
            self.kv_cached.set(s.kv_cached.load(Relaxed) as i64);
            self.kv_shared.set(s.kv_shared.load(Relaxed) as i64);
            self.prefix_hits
                .set(s.prefix_hit_tokens.load(Relaxed) as i64);
            self.preemptions.set(s.preemptions.load(Relaxed) as i64);
            self.drafted.set(s.drafted_tokens.load(Relaxed) as i64);
            self.accepted.set(s.accepted_tokens.load(Relaxed) as i64);
            self.oldest_wait.set(s.oldest_wait_ms.load(Relaxed) as i64);
            self.step_ms.set(s.step_ms.load(Relaxed) as i64);
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
