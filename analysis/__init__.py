"""Analysis and reports: controls and probes, statistics, metrics.json, figures, REPORT.md text."""
