//! Prometheus metrics for `GET /metrics`, kept in a `prometheus-client` registry owned by
//! the application (not a process-wide global, so tests running several servers in one
//! process each see their own numbers). Counters and histograms are updated where things
//! happen; gauges and the per-token usage are read at scrape time from the slots, the cached
//! CLI probes and the usage ledger.
//!
//! The registry API other parts call: [`Metrics::observe_run`], [`Metrics::observe_turn`],
//! [`Metrics::sweeper_action`], [`Metrics::http_request`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::governance::usage::Totals;
use crate::probe::Probes;
use crate::slots::Slots;

/// The content type of the OpenMetrics text format `prometheus-client` writes, served when
/// a scraper's `Accept` asks for it (Prometheus and the official clients do).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic Prometheus text format, served otherwise.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The OpenMetrics exposition `prometheus-client` writes, rewritten as the classic text
/// format (0.0.4) for scrapers that did not ask for OpenMetrics. The two differ where a
/// text parser would lose meaning: an OpenMetrics counter family `x` has samples `x_total`,
/// and a 0.0.4 parser only types samples whose name the `# TYPE` line names, so counters
/// are declared as `x_total`; `# UNIT` and `# EOF` do not exist in 0.0.4, and `unknown`
/// is called `untyped` there.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let described = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match described {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let name = if counters.contains(name) {
                    format!("{name}_total")
                } else {
                    name.to_string()
                };
                let tail = if prefix == "# TYPE " && tail == "unknown" {
                    "untyped"
                } else {
                    tail
                };
                out.push_str(&format!("{prefix}{name} {tail}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: String,
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CliLabels {
    cli: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    token_id: String,
    token_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenDirectionLabels {
    token_id: String,
    token_name: String,
    direction: &'static str,
}

/// Agent runs take from under a second to the 900 s timeout cap: 0.25 s doubling to ~17 min.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.25, 2.0, 13))
}

type DurationFamily = Family<OutcomeLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    http_requests: Family<HttpLabels, Counter>,
    run_duration: DurationFamily,
    turn_duration: DurationFamily,
    sweeper_actions: Family<ActionLabels, Counter>,
    live: Arc<LiveGauges>,
}

impl Metrics {
    pub fn new(slots: Slots, probes: Probes) -> Metrics {
        let mut registry = Registry::with_prefix("clawdforge");
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route template, method and status",
            http_requests.clone(),
        );
        let run_duration: DurationFamily = Family::new_with_constructor(duration_histogram);
        registry.register_with_unit(
            "run_duration",
            "Duration of POST /run agent runs, by outcome",
            Unit::Seconds,
            run_duration.clone(),
        );
        let turn_duration: DurationFamily = Family::new_with_constructor(duration_histogram);
        registry.register_with_unit(
            "turn_duration",
            "Duration of session turns, by outcome",
            Unit::Seconds,
            turn_duration.clone(),
        );
        let sweeper_actions = Family::<ActionLabels, Counter>::default();
        registry.register(
            "sweeper_actions",
            "Things the sweeper did, by action",
            sweeper_actions.clone(),
        );
        let live = Arc::new(LiveGauges {
            slots,
            probes,
            usage: Mutex::new(Vec::new()),
        });
        registry.register_collector(Box::new(live.clone()));
        Metrics {
            registry,
            http_requests,
            run_duration,
            turn_duration,
            sweeper_actions,
            live,
        }
    }

    /// One answered request. `route` is the matched route template (`/sessions/{id}`), never
    /// the raw path, so ids do not explode the label set.
    pub fn http_request(&self, route: &str, method: &str, status: u16) {
        self.http_requests
            .get_or_create(&HttpLabels {
                route: route.to_string(),
                method: method.to_string(),
                status,
            })
            .inc();
    }

    /// A finished run; `outcome` as in the audit log (`ok`, `error`, `timeout`, ...).
    pub fn observe_run(&self, outcome: &str, took: Duration) {
        observe(&self.run_duration, outcome, took);
    }

    /// A finished session turn (called by the sessions code).
    pub fn observe_turn(&self, outcome: &str, took: Duration) {
        observe(&self.turn_duration, outcome, took);
    }

    /// The sweeper did `count` of `action` (`session_closed`, `file_expired`, `dir_removed`,
    /// `audit_trimmed`, ...).
    pub fn sweeper_action(&self, action: &str, count: u64) {
        self.sweeper_actions
            .get_or_create(&ActionLabels {
                action: action.to_string(),
            })
            .inc_by(count);
    }

    /// The exposition, given the ledger's all-time totals per token (id, name, totals),
    /// which the caller reads from the database first (encoding cannot wait on it).
    pub fn render(&self, usage: Vec<(String, String, Totals)>) -> Result<String, std::fmt::Error> {
        if let Ok(mut u) = self.live.usage.lock() {
            *u = usage;
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

fn observe(family: &DurationFamily, outcome: &str, took: Duration) {
    family
        .get_or_create(&OutcomeLabels {
            outcome: outcome.to_string(),
        })
        .observe(took.as_secs_f64());
}

/// Values read at scrape time.
#[derive(Debug)]
struct LiveGauges {
    slots: Slots,
    probes: Probes,
    usage: Mutex<Vec<(String, String, Totals)>>,
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

/// One descriptor and a sample per label set.
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    samples: &[(L, M)],
) -> std::fmt::Result {
    if samples.is_empty() {
        return Ok(());
    }
    let mut desc = encoder.encode_descriptor(name, help, unit, kind)?;
    for (labels, metric) in samples {
        metric.encode(desc.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for LiveGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        gauge(
            &mut encoder,
            "processes_running",
            "Agent processes (runs and turns) running now",
            self.slots.running() as i64,
        )?;
        gauge(
            &mut encoder,
            "queue_depth",
            "Requests waiting for an agent slot now",
            self.slots.queued() as i64,
        )?;
        let snap = self.probes.snapshot();
        let present: Vec<(CliLabels, ConstGauge)> = [
            ("claude", snap.claude_version.is_some()),
            ("acpx", snap.acpx_version.is_some()),
        ]
        .into_iter()
        .map(|(cli, up)| {
            (
                CliLabels { cli: cli.into() },
                ConstGauge::new(i64::from(up)),
            )
        })
        .collect();
        family(
            &mut encoder,
            "cli_present",
            "Whether the CLI answered its last (cached) --version probe",
            None,
            MetricType::Gauge,
            &present,
        )?;
        // Absent while unknown (the probe failed or has not run): a guessed 0 would page
        // someone for nothing.
        let logged_in: Vec<(CliLabels, ConstGauge)> = snap
            .claude_logged_in
            .map(|l| {
                (
                    CliLabels {
                        cli: "claude".into(),
                    },
                    ConstGauge::new(i64::from(l)),
                )
            })
            .into_iter()
            .collect();
        family(
            &mut encoder,
            "cli_logged_in",
            "Whether the CLI is logged in, from the last (cached) `auth status` probe",
            None,
            MetricType::Gauge,
            &logged_in,
        )?;

        let usage = self.usage.lock().map(|u| u.clone()).unwrap_or_default();
        let labels = |id: &str, name: &str| TokenLabels {
            token_id: id.to_string(),
            token_name: name.to_string(),
        };
        let cost: Vec<_> = usage
            .iter()
            .map(|(id, name, t)| (labels(id, name), ConstCounter::new(t.cost_usd)))
            .collect();
        family(
            &mut encoder,
            "cost_usd",
            "Dollars spent by runs and turns, per app token (from the usage ledger)",
            None,
            MetricType::Counter,
            &cost,
        )?;
        let requests: Vec<_> = usage
            .iter()
            .map(|(id, name, t)| {
                (
                    labels(id, name),
                    ConstCounter::new(t.requests.max(0) as u64),
                )
            })
            .collect();
        family(
            &mut encoder,
            "agent_requests",
            "Runs and turns finished, per app token (from the usage ledger)",
            None,
            MetricType::Counter,
            &requests,
        )?;
        let tokens: Vec<_> = usage
            .iter()
            .flat_map(|(id, name, t)| {
                [("input", t.input_tokens), ("output", t.output_tokens)].map(|(direction, n)| {
                    (
                        TokenDirectionLabels {
                            token_id: id.clone(),
                            token_name: name.clone(),
                            direction,
                        },
                        ConstCounter::new(n.max(0) as u64),
                    )
                })
            })
            .collect();
        family(
            &mut encoder,
            "llm_tokens",
            "Model tokens used by runs and turns, per app token and direction",
            None,
            MetricType::Counter,
            &tokens,
        )
    }
}

#[cfg(test)]
mod format_tests {
    use super::to_prometheus_text;

    #[test]
    fn counters_are_declared_by_their_sample_name_in_the_text_format() {
        let om = "# HELP cf_runs Runs.\n# TYPE cf_runs counter\ncf_runs_total{a=\"b\"} 3\n\
                  # HELP cf_up Up.\n# TYPE cf_up gauge\n# UNIT cf_up_seconds seconds\ncf_up 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP cf_runs_total Runs.\n# TYPE cf_runs_total counter\ncf_runs_total{a=\"b\"} 3\n\
             # HELP cf_up Up.\n# TYPE cf_up gauge\ncf_up 1\n"
        );
    }
}
