"""Benchmarking: tasks and their samples (:mod:`~virtualst.bench.tasks`, HEST-bench folders in
:mod:`~virtualst.bench.hest_bench`), leak-free splits (:mod:`~virtualst.bench.splits`), leaderboard
rows — the HEST reference protocol, baselines and our heads (:mod:`~virtualst.bench.protocols`) —
metrics (:mod:`~virtualst.bench.metrics`), and the speed benchmarks (``*_speed``, ``embed_throughput``)."""
