"""FLUX.1 in Flax against diffusers' FluxTransformer2DModel (float32, dense attention).

Fixtures were made by tests/fixtures/make_flux_fixtures.py with diffusers 0.42.1: a tiny
random checkpoint in the BFL single-file layout, the same weights saved by diffusers
(sharded, with index), a pipeline folder, and diffusers' output on fixed inputs.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

from models.flux import load_flux
from models.flux.convert import convert
from tests.helpers import relative_error

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SOURCES = [
    ("dev", "flux_dev_bfl.safetensors"),          # with the model.diffusion_model. prefix
    ("dev", "flux_dev_diffusers"),
    ("dev", "flux_dev_pipeline"),
    ("schnell", "flux_schnell_bfl.safetensors"),  # without prefix
    ("schnell", "flux_schnell_diffusers"),
]


def _io(variant):
    return dict(np.load(os.path.join(FIXTURES, f"flux_{variant}_io.npz")))


def _forward(model, io, **kw):
    args = [io[k] for k in ("img", "img_ids", "txt", "txt_ids", "timesteps", "y")]
    return model(*args, guidance=io.get("guidance"), **kw)


@pytest.mark.parametrize("variant,source", SOURCES)
def test_matches_diffusers_in_float32(variant, source):
    io = _io(variant)
    model = load_flux(os.path.join(FIXTURES, source), dtype=jnp.float32, attention="dense",
                      axes_dim=(4, 6, 6))
    out = _forward(model, io)
    assert out.shape == io["expected"].shape and out.dtype == jnp.float32
    assert relative_error(out, io["expected"]) <= 1e-4


def test_converted_checkpoint_loads_to_the_same_model(tmp_path):
    io = _io("dev")
    out_dir = str(tmp_path / "converted")
    convert(os.path.join(FIXTURES, "flux_dev_diffusers"), out_dir, dtype=jnp.float32,
            progress=lambda *_: None)
    assert sorted(os.listdir(tmp_path)) == ["converted"]        # no temporary left over
    model = load_flux(out_dir, dtype=jnp.float32, attention="dense")
    assert model.config.axes_dim == (4, 6, 6) and model.config.guidance_embed
    assert relative_error(_forward(model, io), io["expected"]) <= 1e-4


def test_bfloat16_model_stays_close_to_float32():
    io = _io("schnell")
    model = load_flux(os.path.join(FIXTURES, "flux_schnell_diffusers"), attention="dense")
    out = _forward(model, io)
    assert out.dtype == jnp.bfloat16
    # Measured 6.3e-3 (bf16 weights and activations, float32 norms and rope); the bound
    # leaves 1.6x of that for rounding that differs between machines.
    assert relative_error(out, io["expected"]) <= 1e-2
