"""The test kit: everything the tests share, imported as ``from tests.kit import ...``.

- ``reference``: the float64 TrAct references and the tolerances built on them (independent of
  ``tract_optim``: nothing there imports it);
- ``nets``: the tiny models and batches the tests train;
- ``strategies``: ``draw_conv``, a random convolution and input for hypothesis tests;
- ``stack``: a multi-process gloo runner, state comparisons, a counting compile backend;
- ``steps``: one TrAct step through the library, returning raw and preconditioned gradients;
- ``report``: ``ErrorLog``, the errors tests measured, printed at the end of the run;
- ``timm_like``: stand-ins for timm's first layers (timm is not installed here).
"""

from . import timm_like
from .nets import (
    TinyNet,
    TwoStem,
    conv_net,
    linear_with,
    random_batch,
    tiny_batch,
    tiny_net,
    token_net,
    two_stem,
)
from .reference import (
    ERROR_PER_COND,
    U32,
    U64,
    assert_fp32_gram,
    assert_update,
    condition,
    damped,
    relative_error,
    stacked_rows,
    tract_grad,
    unfold_rows,
)
from .report import ErrorLog
from .stack import (
    CountingBackend,
    assert_same,
    free_port,
    max_abs_diff,
    max_relative_error,
    run_workers,
)
from .steps import tract_gradient
from .strategies import draw_conv

__all__ = [
    "ERROR_PER_COND",
    "U32",
    "U64",
    "CountingBackend",
    "ErrorLog",
    "TinyNet",
    "TwoStem",
    "assert_fp32_gram",
    "assert_same",
    "assert_update",
    "condition",
    "conv_net",
    "damped",
    "draw_conv",
    "free_port",
    "linear_with",
    "max_abs_diff",
    "max_relative_error",
    "random_batch",
    "relative_error",
    "run_workers",
    "stacked_rows",
    "timm_like",
    "tiny_batch",
    "tiny_net",
    "token_net",
    "tract_grad",
    "tract_gradient",
    "two_stem",
    "unfold_rows",
]
