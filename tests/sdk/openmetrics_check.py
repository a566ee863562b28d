"""Parses an OpenMetrics exposition from stdin with prometheus_client's strict parser
(pinned in tests/sdk/requirements.txt; tests/api/hardening.rs runs this on /metrics):
exits non-zero with the parser's complaint, else prints `name type samples` per family."""

import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

try:
    families = list(text_string_to_metric_families(sys.stdin.read()))
except ValueError as e:
    sys.exit(f"not OpenMetrics: {e}")
for f in families:
    print(f.name, f.type, len(f.samples))
