"""Reading an exposition back (``cachefs top``): prometheus_client's parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

#: A sample's labels, sorted by name.
Labels = tuple[tuple[str, str], ...]


def parse_samples(text: str) -> dict[str, dict[Labels, float]]:
    """Every sample of a Prometheus text exposition, by sample name
    (``cachefs_cache_hits_total``, ``..._bucket``) and labels; ValueError if
    the text is not an exposition."""
    samples: dict[str, dict[Labels, float]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = tuple(sorted(sample.labels.items()))
                samples.setdefault(sample.name, {})[labels] = sample.value
    except (ValueError, IndexError, KeyError) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from None
    return samples


__all__ = ["Labels", "parse_samples"]
