"""The built-in demo: a captioned shapes dataset, its analyser, and the quickstart pipeline."""
