"""`make bench`: throughput, latency, memory and scale figures of the forwarder.

Not a test: it measures and reports, next to the targets, and never fails on timing.
See bench/README.md.
"""
