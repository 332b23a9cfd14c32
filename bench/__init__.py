"""The flex-proxy benchmark: every figure measured in one run against references on the same machine.

Run it with `.venv/bin/python -m bench` (or `bash bench/run.sh`); `--quick` is the harness self-check.
"""
