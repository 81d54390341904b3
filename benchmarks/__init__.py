"""Benchmarks of prequal-middleware: ``python -m benchmarks.simulate`` runs the fleet simulator."""
