"""Datasets: procedural scenes for demos and tests (`synthetic`) and readers of public
benchmarks in their standard layouts. Import from the modules themselves."""
