#!/usr/bin/env python3
"""Writes prometheusrule.yaml (a Prometheus Operator PrometheusRule) from rules.yaml, the single
source of the rules. deploy/validate.sh checks the two agree."""
import os

import yaml

here = os.path.dirname(os.path.abspath(__file__))
rules = yaml.safe_load(open(os.path.join(here, "rules.yaml")))
doc = {
    "apiVersion": "monitoring.coreos.com/v1",
    "kind": "PrometheusRule",
    "metadata": {
        "name": "multicluster-proxy",
        "namespace": "multicluster-proxy",
        "labels": {"app.kubernetes.io/name": "multicluster-proxy"},
    },
    "spec": rules,
}


class Dumper(yaml.SafeDumper):
    pass


def text(dumper, data):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


Dumper.add_representer(str, text)
with open(os.path.join(here, "prometheusrule.yaml"), "w") as out:
    out.write(
        "# Generated from rules.yaml by prometheusrule.py: edit rules.yaml, then run\n"
        "# `python3 deploy/monitoring/prometheusrule.py` (deploy/validate.sh checks they agree).\n"
    )
    yaml.dump(doc, out, Dumper=Dumper, sort_keys=False, width=100)
