"""Scripts that reproduce the Adapprox paper's tables and figures next to the real peers.

Run each one from the repository root as ``python -m bench.<script>`` (see ``bench/README.md``).
"""
