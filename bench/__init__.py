"""Shipyard's benchmarks: ``./dev bench [name]``; results in bench/README.md."""
