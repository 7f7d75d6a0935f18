"""The FLUX.1 tokenizers give transformers' ids (fixtures from make_tokenizer_fixtures.py)."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest

from models.checkpoint import CheckpointError
from models.text_encoders.tokenizers import CLIPTokenizer, T5Tokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizers")
with open(os.path.join(FIXTURES, "expected_ids.json"), encoding="utf-8") as _f:
    EXPECTED = json.load(_f)
PROMPTS = EXPECTED["prompts"]
FOLDERS = {"clip": CLIPTokenizer, "clip_json": CLIPTokenizer,
           "t5_spm": T5Tokenizer, "t5_json": T5Tokenizer}
CASES = [(name, int(n)) for name in FOLDERS for n in EXPECTED[name] if n.isdigit()]


@pytest.fixture(scope="module")
def tokenizers():
    return {name: cls.from_folder(os.path.join(FIXTURES, name)) for name, cls in FOLDERS.items()}


def encode(tok, prompts, max_length):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = tok(prompts, max_length=max_length)
    return ids, [str(w.message) for w in caught if w.category is UserWarning]


@pytest.mark.parametrize("name,max_length", CASES)
def test_ids_equal_transformers(tokenizers, name, max_length):
    ids, _ = encode(tokenizers[name], PROMPTS, max_length)
    assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), max_length)
    for i, prompt in enumerate(PROMPTS):
        np.testing.assert_array_equal(ids[i], EXPECTED[name][str(max_length)][i],
                                      err_msg=f"{name}, prompt {i}: {prompt!r}")


@pytest.mark.parametrize("name,max_length", CASES)
def test_one_prompt_at_a_time_equals_the_batch(tokenizers, name, max_length):
    batch, _ = encode(tokenizers[name], PROMPTS, max_length)
    for i, prompt in enumerate(PROMPTS):
        one, _ = encode(tokenizers[name], prompt, max_length)
        np.testing.assert_array_equal(one, batch[i:i + 1])


def test_both_layouts_give_the_same_ids(tokenizers):
    for a, b in (("clip", "clip_json"), ("t5_spm", "t5_json")):
        for n in (77, 16, 24, 300):
            np.testing.assert_array_equal(encode(tokenizers[a], PROMPTS, n)[0],
                                          encode(tokenizers[b], PROMPTS, n)[0])


def test_special_ids_and_defaults(tokenizers):
    clip, t5 = tokenizers["clip"], tokenizers["t5_spm"]
    assert clip.max_length == 77 and t5.max_length == 512
    assert clip.pad_id == clip.eos_id == clip.vocab_size - 1  # FLUX pools at argmax(ids)
    assert (t5.pad_id, t5.eos_id) == (0, 1)
    ids = clip("a photo of a cat")
    assert ids.shape == (1, 77) and ids[0, 0] == clip.bos_id
    assert np.argmax(ids[0]) == len(EXPECTED["clip"]["untruncated"][1]) - 1  # the first eos
    assert t5(["a cat", ""]).shape == (2, 512)


def test_truncation_warns_with_the_removed_text(tokenizers):
    for name, n in CASES:
        _, messages = encode(tokenizers[name], PROMPTS, n)
        removed = EXPECTED[name][f"removed_{n}"]
        cut = [i for i, r in enumerate(removed) if r is not None]
        assert len(messages) == len(cut) and cut, (name, n, messages)
        for i, message in zip(cut, messages):
            untruncated = len(EXPECTED[name]["untruncated"][i])
            assert message.startswith(f"{'CLIP' if name.startswith('clip') else 'T5'} tokenizer: "
                                      f"prompt {i} has {untruncated} tokens, more than "
                                      f"max_length={n}; this part was removed: "), message
            assert message.endswith(repr(removed[i])), (message, removed[i])


def test_no_warning_at_exactly_max_length(tokenizers):
    for name in FOLDERS:
        n = len(EXPECTED[name]["untruncated"][1])
        ids, messages = encode(tokenizers[name], PROMPTS[1], n)
        assert messages == [] and list(ids[0]) == EXPECTED[name]["untruncated"][1]
        ids, messages = encode(tokenizers[name], PROMPTS[1], n - 1)
        assert len(messages) == 1 and ids[0, -1] == tokenizers[name].eos_id


@pytest.mark.parametrize("name", ["clip", "t5_json"])
def test_bad_prompts(tokenizers, name):
    tok = tokenizers[name]
    with pytest.raises(ValueError, match="prompts must hold at least one prompt"):
        tok([])
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a string, got int"):
        tok(["a cat", 3])
    with pytest.raises(TypeError, match="prompts must be a string or a sequence"):
        tok(None)
    with pytest.raises(TypeError, match="max_length must be an int, got float"):
        tok("a cat", max_length=7.0)
    least = 2 if name == "clip" else 1
    with pytest.raises(ValueError, match=f"max_length must be at least {least}"):
        tok("a cat", max_length=least - 1)
    assert tok("", max_length=least).shape == (1, least)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"no such folder.*vocab\.json \+ merges\.txt"):
        CLIPTokenizer.from_folder(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"vocab\.json: is a file; expected a CLIP "
                                              r"tokenizer folder"):
        CLIPTokenizer.from_folder(os.path.join(FIXTURES, "clip", "vocab.json"))
    with pytest.raises(CheckpointError, match=r"no T5 vocabulary; expected tokenizer\.json "
                                              r"or spiece\.model"):
        T5Tokenizer.from_folder(tmp_path)
    shutil.copy(os.path.join(FIXTURES, "clip", "vocab.json"), tmp_path)
    with pytest.raises(CheckpointError, match=r"expected vocab\.json \+ merges\.txt or "
                                              r"tokenizer\.json, found \['vocab\.json'\]"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(CheckpointError, match="merges must be pairs"):
        CLIPTokenizer.from_folder(tmp_path)


def test_wrong_files_are_named(tmp_path):
    bad = tmp_path / "t5"
    bad.mkdir()
    (bad / "spiece.model").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="spiece.model: not a sentencepiece model"):
        T5Tokenizer.from_folder(bad)
    with pytest.raises(CheckpointError, match="expected a Unigram model, got 'BPE'"):
        T5Tokenizer.from_folder(_copy_as(tmp_path, "clip_json", "tokenizer.json"))


def _copy_as(tmp_path, folder, name):
    out = tmp_path / f"copy_{folder}"
    out.mkdir()
    shutil.copy(os.path.join(FIXTURES, folder, name), out / name)
    return out


def test_config_in_older_formats(tmp_path):
    """Special tokens written as AddedToken dicts, no length limit, or no config at all."""
    for folder, cls, default in (("clip", CLIPTokenizer, 77), ("t5_spm", T5Tokenizer, 512)):
        out = tmp_path / folder
        shutil.copytree(os.path.join(FIXTURES, folder), out)
        cfg = json.loads((out / "tokenizer_config.json").read_text())
        cfg["model_max_length"] = 1e30
        cfg["pad_token"] = {"__type": "AddedToken", "content": cfg["pad_token"], "lstrip": False}
        (out / "tokenizer_config.json").write_text(json.dumps(cfg))
        tok = cls.from_folder(out)
        assert tok.max_length == default
        np.testing.assert_array_equal(encode(tok, PROMPTS[:9], None)[0],
                                      np.array(EXPECTED[folder][str(default)])[:9])
        (out / "tokenizer_config.json").unlink()
        assert cls.from_folder(out).max_length == default
