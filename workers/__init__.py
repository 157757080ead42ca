"""Tollgate's workers: generation jobs, provider adapters, the reconciler, the simulator."""
