"""One short TrAct training script per framework: ``python -m scripts.examples.NAME --quick``."""
