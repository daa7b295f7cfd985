"""Benchmarks that print their figures and write JSON under ``results/``.

- :mod:`agl.bench.data`: loader throughput (``agl bench data``)
- :mod:`agl.bench.core`: plain and bi-level step times and memory (``agl bench core``)
- :mod:`agl.bench.sweep`: Ray sweep throughput and load (``agl bench ray``, ``agl bench load``)
- :mod:`agl.bench.commands`: the ``agl bench`` command and every sub-command
"""
