"""Benchmarks for vitserve: runtime comparison and global vs windowed attention at high resolution.

Run from the repository root, e.g. `.venv/bin/python -m bench.runtimes`; results land in
bench/results/. See bench/README.md for what each benchmark measures.
"""
