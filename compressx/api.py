"""The Python API in one place: the engine's ``apply`` and ``prepare`` (``compressx.engine``) and the recipe
runner's ``run_recipe`` (``compressx.runner``, what ``compressx apply recipe.yaml`` does).

The runner's names are imported on first use, so ``import compressx.api`` loads the engine only: torch and
compressx's core, not transformers, diffusers, timm, accelerate, the trainer or the evaluators.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from compressx.engine import ApplyResult, StepResult, StepSpec, apply, check_calibration, prepare

if TYPE_CHECKING:
    from compressx.runner import RunResult, is_main_process, open_checkpoint_dirs, run_recipe

_RUNNER_NAMES = ("RunResult", "is_main_process", "open_checkpoint_dirs", "run_recipe")

__all__ = [
    "ApplyResult",
    "RunResult",
    "StepResult",
    "StepSpec",
    "apply",
    "check_calibration",
    "is_main_process",
    "open_checkpoint_dirs",
    "prepare",
    "run_recipe",
]


def __getattr__(name: str) -> Any:
    if name in _RUNNER_NAMES:
        from compressx import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
