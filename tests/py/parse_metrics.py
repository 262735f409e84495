#!/usr/bin/env python3
"""Parses an OpenMetrics exposition with the Prometheus project's own parser
(python3-prometheus-client) and prints one JSON line per sample:
{"name", "labels", "value", "type"}. Exits non-zero on a malformed
exposition, so the test fails on anything Prometheus would refuse.

usage: parse_metrics.py < metrics.txt
"""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families


def main():
    text = sys.stdin.read()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            print(json.dumps({"name": s.name, "labels": s.labels, "value": s.value,
                              "type": family.type}))


if __name__ == "__main__":
    main()
