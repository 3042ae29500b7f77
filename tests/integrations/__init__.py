"""Tests of TrAct inside real training frameworks (Lightning, Accelerate, Transformers, DDP)."""
