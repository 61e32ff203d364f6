"""Shared by the tests and the benchmarks (never shipped): real processes and simulated fleets.

- `processes`: free ports, the CLIs as subprocesses, a real Mosquitto broker.
- `fleetkit`: a digits-shaped bundle with a real reference, and device summaries.
- `bundles`: signed test bundles made in code (a digits-shaped CNN with a real reference and self-test).
"""
