"""``cachefs metrics``: what goes with ``--metrics`` (alerting and recording rules)."""

from __future__ import annotations

import click

from cachefs.metrics import rules_text


@click.group("metrics")
def command() -> None:
    """Prometheus metrics: `mount` and `serve` serve them with --metrics ADDR."""


@command.command("rules")
def rules() -> None:
    """Print the recording and alerting rules for Prometheus (YAML).

    \b
    Save them beside prometheus.yml and name them there:
      cachefs metrics rules > /etc/prometheus/cachefs.rules.yml
      rule_files: [cachefs.rules.yml]
    The README's "Operations" section says what each alert means and what to do.
    """
    click.echo(rules_text(), nl=False)
