"""Benchmark one training step without TrAct, with TrActOptimizer and with the authors' package.

Step time: every variant trains its own copy of the same model on the same batch; the variants
run interleaved in one process (rotating their order each round) after a warm-up, so machine
noise hits all of them alike. Reported: the median step time of each variant and, round by
round, its ratio to the plain step of the same round (median over rounds). On CUDA a step is
timed with CUDA events around it (the stream is idle before it starts, and the step is
synchronised after it, so the time includes any host read inside the step).

Amortised statistics (``--stats-every K``, default 16: the variants "…, stats every K steps"):
such an optimizer refreshes its statistics (and factorises them) on every K-th step only, so
one step is not representative: a refresh step costs about as much as exact TrAct, a step in
between little more than plain. Its fair step time is the cost averaged over a refresh cycle,
(refresh + (K − 1) · between) / K, where refresh and between are the medians of its refresh
rounds and of its other rounds (ratios likewise, from the per-round ratios to plain). After
the warm-up it is advanced to a refresh, so its first timed round is one and the rounds then
cycle through the steps between (with 15 rounds and K = 16: one refresh, 14 between); this
needs at least 2 rounds, and costs one step per round like every other variant, where timing
whole cycles would cost K. A compiled amortised variant compiles two graphs (refresh and
between, both compiled before timing). Its memory is that of a refresh step (the peak).

Peak memory: on CPU each (case, variant) runs one step in a fresh subprocess; the peak-RSS mark
is reset to the current RSS after setup, and the extra is the peak after the step minus that
baseline (``VmHWM``; ``ru_maxrss`` where /proc is missing). On CUDA, in the same process after
the timed rounds: ``torch.cuda.max_memory_allocated`` during one more step minus the memory
allocated before it.

``--gpu-suite DIR`` is the one-shot GPU preset (first layers at realistic batches, whole
ResNet-50 and ViT-S/16 steps with bf16 autocast, eager and ``torch.compile``, exact and
amortised) under a time budget, writing JSON and markdown to DIR after every case. It prints
how long every case with every variant is expected to take (calibrated on an earlier H200 run;
compilation dominates) and runs, in order of priority, what is expected to fit; ``--only`` picks
cases, e.g. to run the rest in a second call. The authors' package (PyPI ``torch-tract``) is
optional; its column is left out when it is not installed. Run ``python -m scripts.bench
--help`` from the repository root for the options: ``-m`` puts the root first on ``sys.path``,
so the tract_optim of this checkout is benchmarked, not an installed one.

Modules: ``cases`` (what is run), ``variants`` (how the first layer is trained), ``runner`` (one
variant of one case, and the interleaved timing), ``memory`` (the peak-memory subprocess),
``suite`` (the GPU suite), ``report`` (JSON, markdown tables and progress lines) and
``__main__`` (the command line).
"""
