"""Peer serving frameworks wrapping the same ONNX file (bench.peers); each runs in its own venv."""
