"""The scripts in scripts/examples run (``--quick``), and the README's framework blocks are theirs.

Each README block under "Use it with your framework" must consist of lines that occur in that
framework's example script or integration test, up to the values of numbers, constants and
keyword arguments: so the code the README shows is code the tests run. Definitions
(``def``/``class``), imports, comments and lines with ``...`` are not compared, nor the two timm
lines that need timm itself (``TIMM_ONLY``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integrations._frameworks import EXAMPLES, require
from tests.kit import free_port

ROOT = EXAMPLES.parents[1]
TESTS = Path(__file__).resolve().parent
BLOCKS = {
    "PyTorch Lightning": ["lightning_example.py", "test_lightning.py"],
    "Hugging Face Accelerate": ["accelerate_example.py", "test_accelerate.py"],
    "Hugging Face Trainer": ["hf_trainer_example.py", "test_hf_trainer.py"],
    "timm": ["test_timm_recipe.py"],
    "torchrun (DDP)": ["ddp_torchrun_example.py"],
}
TIMM_ONLY = {
    'model = timm.create_model("resnet50", num_classes=100)',
    'first = model.get_submodule(model.pretrained_cfg["first_conv"])',
}
# Numbers, CONSTANTS and the values of keyword arguments (``clip_grad_norm=clip`` in a test
# is ``clip_grad_norm=1.0`` in the README).
LITERAL = re.compile(r"\b(\d+(\.\d*)?([eE]-?\d+)?|[A-Z][A-Z0-9_]+)\b|(?<==)[\w.]+")
SKIP = re.compile(r"^(def |class |import |from |@|#)|\.\.\.")


def run(args: list[str], timeout: float = 300) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, framework, options",
    [
        ("lightning_example", "lightning", []),
        ("accelerate_example", "accelerate", []),
        ("hf_trainer_example", "transformers", []),
        ("hf_trainer_example", "transformers", ["--attach"]),
    ],
    ids=["lightning", "accelerate", "hf_trainer", "hf_trainer --attach"],
)
def test_example_runs(script: str, framework: str, options: list[str]) -> None:
    require(framework)
    assert "test accuracy" in run(["-m", f"scripts.examples.{script}", "--quick", *options])


@pytest.mark.slow
def test_ddp_example_runs_under_torchrun() -> None:
    """Two gloo ranks on 127.0.0.1, the script launched as a module (``torchrun -m``); it
    checks itself that the replicas agree."""
    launcher = ["-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2"]
    address = ["--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    out = run([*launcher, *address, "-m", "scripts.examples.ddp_torchrun_example", "--quick"])
    assert "2 replicas agree" in out


def normalised(line: str) -> str:
    """A code line without indentation, trailing comment and values (``LITERAL``)."""
    code = line.split("  #")[0].strip()
    return LITERAL.sub("N", code)


def readme_blocks() -> dict[str, list[str]]:
    """The python code lines of each framework block of the README section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Use it with your framework\n", 1)[1].split("\n## ", 1)[0]
    blocks: dict[str, list[str]] = {}
    for part in section.split("\n### ")[1:]:
        title, body = part.split("\n", 1)
        code = re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL)
        blocks[title.strip()] = [line for block in code for line in block.splitlines()]
    return blocks


def test_readme_blocks_are_the_tested_code() -> None:
    blocks = readme_blocks()
    assert sorted(blocks) == sorted(BLOCKS)
    for title, files in BLOCKS.items():
        sources = [
            (EXAMPLES / name if name.endswith("_example.py") else TESTS / name).read_text()
            for name in files
        ]
        known = {normalised(line) for source in sources for line in source.splitlines()}
        code = [line.split("  #")[0].strip() for line in blocks[title]]
        checked = [c for c in code if c and not SKIP.search(c) and c not in TIMM_ONLY]
        assert len(checked) >= 3, title
        missing = [line for line in checked if normalised(line) not in known]
        assert not missing, f"README block {title!r} has lines no test runs: {missing}"
