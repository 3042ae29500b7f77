"""The digits demo, the paper's experiments, the benchmarks and the framework examples.

A package so that its modules import each other as ``scripts.NAME`` (no generic top-level names
such as ``data`` or ``models`` that an installed package could shadow). Run them from the
repository root: ``python -m scripts.reproduce``, ``python -m scripts.bench``,
``python -m scripts.plot DIR``, ``python -m scripts.accuracy``.
"""
