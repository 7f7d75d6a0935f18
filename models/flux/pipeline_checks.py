"""Argument checks of the FLUX pipeline, as pure functions: `FluxPipeline.__call__` runs
them, and the command line runs them before loading any weights."""

from __future__ import annotations

from models.pipeline_common import check_int, check_real

MAX_SEQUENCE_LENGTH = 512             # what FLUX.1's T5 was trained with


def check_arguments(*, height: int | None = None, width: int | None = None,
                    num_inference_steps: int | None = None, dense_steps: int | None = None,
                    max_sequence_length: int | None = None, guidance_scale=None,
                    multiple: int = 16) -> None:
    """The size and step checks of `FluxPipeline.__call__`, without a pipeline (the CLI
    runs them before loading anything); an argument left None is not checked.

    height, width: >= 1 and multiples of `multiple` (FLUX: the VAE's 8, then 2x2 patches);
    num_inference_steps >= 1; dense_steps in [0, num_inference_steps] (>= 0 when the step
    count is not given); max_sequence_length in [1, 512]; guidance_scale a finite real
    number. Raises TypeError / ValueError naming the argument.
    """
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            check_int(name, value, 1, multiple=multiple)
    if num_inference_steps is not None:
        check_int("num_inference_steps", num_inference_steps, 1)
    if dense_steps is not None:
        check_int("dense_steps", dense_steps, 0, num_inference_steps)
    if max_sequence_length is not None:
        check_int("max_sequence_length", max_sequence_length, 1, MAX_SEQUENCE_LENGTH)
    if guidance_scale is not None:
        check_real(guidance_scale)
