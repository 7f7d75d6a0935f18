"""The FLUX.1 tokenizers, read from the pipeline's `tokenizer/` and `tokenizer_2/` folders.

`CLIPTokenizer` (byte-level BPE) and `T5Tokenizer` (sentencepiece unigram) give the same
ids as transformers' `CLIPTokenizer` and `T5TokenizerFast` called with
`padding="max_length", truncation=True, max_length=...` (what diffusers' `FluxPipeline`
does): each builds the `tokenizers` pipeline transformers builds for these classes from the
vocabulary in the folder, and adds the special tokens, truncation and padding itself.

    clip = CLIPTokenizer.from_folder("FLUX.1-dev/tokenizer")     # vocab.json + merges.txt
    t5 = T5Tokenizer.from_folder("FLUX.1-dev/tokenizer_2")       # tokenizer.json or spiece.model
    clip(["a cat", "a dog"])            # int32 [2, 77]: <|startoftext|> ... <|endoftext|> pad
    t5("a cat", max_length=512)         # int32 [1, 512]: ... </s> <pad> ...

Text is normalised as transformers does: CLIP applies NFC, turns every run of whitespace
into one space and lowercases (no ftfy clean-up, no accent stripping); T5 applies the
sentencepiece model's character map (NFKC for T5's) and splits on whitespace. Special
tokens written in a prompt (`<|endoftext|>`, `</s>`, `<extra_id_0>`) are read as such.
This is transformers 5, whose CLIPTokenizer runs on `tokenizers`; the pure-Python
CLIPTokenizer of transformers 4 differs on CJK ideographs (one word each) and drops
zero-width and control characters.
"""

from __future__ import annotations

import base64
import os
import warnings
from typing import Sequence

import numpy as np
from jaxtyping import Int32
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from models.checkpoint import CheckpointError, read_json

__all__ = ["CLIPTokenizer", "T5Tokenizer"]

# CLIP's word splitting: special tokens, English contractions, letter runs, single digits,
# runs of other non-space characters (the pattern of CLIP's own tokenizer).
_CLIP_SPLIT = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
               r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
_WORD_END = "</w>"
_METASPACE = "\u2581"


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a string or a sequence of strings, "
                        f"got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts must hold at least one prompt, got an empty sequence "
                         "(an empty string is a valid prompt)")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a string, got {type(p).__name__}")
    return list(prompts)


def _check_max_length(max_length, default: int, least: int) -> int:
    if max_length is None:
        return default
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)):
        raise TypeError(f"max_length must be an int, got {type(max_length).__name__}")
    if max_length < least:
        raise ValueError(f"max_length must be at least {least} (room for the special "
                         f"tokens), got {max_length}")
    return int(max_length)


def _token_text(value, default: str) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if value is None:
        return default
    if isinstance(value, dict):
        return str(value.get("content", default))
    return str(value)


def _folder_files(path, expected: Sequence[Sequence[str]], what: str) -> dict[str, str]:
    """The files of `path` among `expected` (groups of names, any complete group will do)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        problem = "is a file" if os.path.exists(path) else "no such folder"
        raise CheckpointError(f"{path}: {problem}; expected a {what} tokenizer folder "
                              f"holding {' or '.join(' + '.join(g) for g in expected)}")
    found = {n: os.path.join(path, n) for g in expected for n in g
             if os.path.isfile(os.path.join(path, n))}
    if not any(all(n in found for n in g) for g in expected):
        raise CheckpointError(f"{path}: no {what} vocabulary; expected "
                              f"{' or '.join(' + '.join(g) for g in expected)}, "
                              f"found {sorted(os.listdir(path))}")
    return found


def _config(path: str) -> dict:
    file = os.path.join(path, "tokenizer_config.json")
    return read_json(file) if os.path.isfile(file) else {}


def _model_max_length(cfg: dict, default: int) -> int:
    # transformers writes a huge number (1e30) when no limit was set
    n = cfg.get("model_max_length")
    return int(n) if isinstance(n, (int, float)) and 0 < n <= 1_000_000 else default


class _Tokenizer:
    """Encoding, truncation with a warning, and padding shared by both tokenizers."""

    name: str
    n_special: int

    def __init__(self, backend: Tokenizer, *, eos_id: int, pad_id: int, max_length: int,
                 source: str):
        self.backend = backend
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.max_length = max_length
        self.source = source

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _wrap(self, ids: list[int]) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of token ids (without the special tokens unless asked)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __call__(self, prompts: str | Sequence[str],
                 max_length: int | None = None) -> Int32[np.ndarray, "batch length"]:
        """Token ids `[len(prompts), max_length]` (int32), padded with the pad id.

        A prompt longer than `max_length` (special tokens included) is cut, keeping the end
        token, with a `UserWarning` saying which prompt and what was removed.
        Raises TypeError for a prompt that is not a string, ValueError for an empty
        sequence of prompts or a `max_length` without room for the special tokens.
        """
        texts = _check_prompts(prompts)
        length = _check_max_length(max_length, self.max_length, self.n_special)
        room = length - self.n_special
        out = np.full((len(texts), length), self.pad_id, np.int32)
        for i, enc in enumerate(self.backend.encode_batch(texts, add_special_tokens=False)):
            ids = enc.ids
            if len(ids) > room:
                removed = self.decode(ids[room:], skip_special_tokens=False)
                warnings.warn(
                    f"{self.name}: prompt {i} has {len(ids) + self.n_special} tokens, more than "
                    f"max_length={length}; this part was removed: {removed!r}",
                    UserWarning, stacklevel=2)
                ids = ids[:room]
            row = self._wrap(ids)
            out[i, :len(row)] = row
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, "
                f"max_length={self.max_length}, source={self.source!r})")


class CLIPTokenizer(_Tokenizer):
    """CLIP's byte-level BPE: `<|startoftext|>` + tokens + `<|endoftext|>`, then pad.

    Attributes: `bos_id`, `eos_id`, `pad_id` (FLUX pads with `<|endoftext|>`),
    `max_length` (77 unless tokenizer_config.json says otherwise), `vocab_size`.
    """

    name = "CLIP tokenizer"
    n_special = 2

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
                 bos_token: str = "<|startoftext|>", eos_token: str = "<|endoftext|>",
                 pad_token: str = "<|endoftext|>", unk_token: str = "<|endoftext|>",
                 max_length: int = 77, source: str = "<memory>"):
        for role, tok in (("bos_token", bos_token), ("eos_token", eos_token),
                          ("pad_token", pad_token), ("unk_token", unk_token)):
            if tok not in vocab:
                raise CheckpointError(f"{source}: {role} {tok!r} is not in the vocabulary")
        bpe = models.BPE(vocab=dict(vocab), merges=[tuple(m) for m in merges], dropout=None,
                         continuing_subword_prefix="", end_of_word_suffix=_WORD_END,
                         fuse_unk=False, unk_token=unk_token)
        backend = Tokenizer(bpe)
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t in dict.fromkeys((bos_token, eos_token, pad_token,
                                                            unk_token))])
        super().__init__(backend, eos_id=vocab[eos_token], pad_id=vocab[pad_token],
                         max_length=max_length, source=source)
        self.bos_id = vocab[bos_token]

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> "CLIPTokenizer":
        """Reads vocab.json + merges.txt (or tokenizer.json) and tokenizer_config.json.

        Raises CheckpointError naming the folder and the files expected when they are missing.
        """
        path = os.fspath(path)
        files = _folder_files(path, [("vocab.json", "merges.txt"), ("tokenizer.json",)], "CLIP")
        if "vocab.json" in files and "merges.txt" in files:
            vocab = read_json(files["vocab.json"])
            with open(files["merges.txt"], encoding="utf-8") as f:
                lines = f.read().split("\n")
            merges = [tuple(line.split(" ")) for line in lines
                      if line and not line.startswith("#version")]
        else:
            model = read_json(files["tokenizer.json"]).get("model", {})
            if model.get("type") != "BPE":
                raise CheckpointError(f"{files['tokenizer.json']}: expected a BPE model, "
                                      f"got {model.get('type')!r}")
            vocab = model.get("vocab", {})
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                      for m in model.get("merges", [])]
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise CheckpointError(f"{path}: merges must be pairs of tokens, got {bad[0]!r}")
        cfg = _config(path)
        eos = _token_text(cfg.get("eos_token"), "<|endoftext|>")
        return cls(vocab, merges, bos_token=_token_text(cfg.get("bos_token"), "<|startoftext|>"),
                   eos_token=eos, pad_token=_token_text(cfg.get("pad_token"), eos),
                   unk_token=_token_text(cfg.get("unk_token"), eos),
                   max_length=_model_max_length(cfg, 77), source=path)

    def _wrap(self, ids: list[int]) -> list[int]:
        return [self.bos_id, *ids, self.eos_id]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # words end with `</w>`, which stands for the space after them
        return super().decode(ids, skip_special_tokens).replace(_WORD_END, " ").strip()


class T5Tokenizer(_Tokenizer):
    """T5's sentencepiece unigram: tokens + `</s>`, then `<pad>`.

    Attributes: `eos_id`, `pad_id`, `max_length` (the model_max_length of
    tokenizer_config.json, 512 if none; FLUX passes 512 for dev, 256 for schnell),
    `vocab_size` (the `<extra_id_N>` tokens included).
    """

    name = "T5 tokenizer"
    n_special = 1

    def __init__(self, vocab: Sequence[tuple[str, float]], *, unk_id: int,
                 special_tokens: Sequence[AddedToken], charsmap: bytes | None = None,
                 eos_token: str = "</s>", pad_token: str = "<pad>", max_length: int = 512,
                 source: str = "<memory>"):
        backend = Tokenizer(models.Unigram([(p, float(s)) for p, s in vocab], unk_id=unk_id,
                                           byte_fallback=False))
        if charsmap:
            backend.normalizer = normalizers.Precompiled(charsmap)
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=_METASPACE, prepend_scheme="always", split=True)])
        backend.decoder = decoders.Metaspace(replacement=_METASPACE, prepend_scheme="always",
                                             split=True)
        backend.add_special_tokens(list(special_tokens))
        ids = {}
        for role, tok in (("eos_token", eos_token), ("pad_token", pad_token)):
            ids[role] = backend.token_to_id(tok)
            if ids[role] is None:
                raise CheckpointError(f"{source}: {role} {tok!r} is not in the vocabulary")
        super().__init__(backend, eos_id=ids["eos_token"], pad_id=ids["pad_token"],
                         max_length=max_length, source=source)

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> "T5Tokenizer":
        """Reads tokenizer.json, else spiece.model (through sentencepiece), and
        tokenizer_config.json.

        Raises CheckpointError naming the folder and the files expected when they are missing.
        """
        path = os.fspath(path)
        files = _folder_files(path, [("tokenizer.json",), ("spiece.model",)], "T5")
        cfg = _config(path)
        eos = _token_text(cfg.get("eos_token"), "</s>")
        pad = _token_text(cfg.get("pad_token"), "<pad>")
        unk = _token_text(cfg.get("unk_token"), "<unk>")
        if "tokenizer.json" in files:
            vocab, unk_id, charsmap, specials = _read_unigram_json(files["tokenizer.json"])
        else:
            vocab, unk_id, charsmap = _read_spiece(files["spiece.model"])
            # transformers appends the sentinels <extra_id_{n-1}> ... <extra_id_0>
            n = int(cfg.get("extra_ids", 100))
            vocab += [(f"<extra_id_{i}>", 0.0) for i in range(n - 1, -1, -1)]
            specials = [AddedToken(t, special=True, normalized=False) for t in
                        (pad, eos, unk, *(f"<extra_id_{i}>" for i in range(n)))]
        return cls(vocab, unk_id=unk_id, special_tokens=specials, charsmap=charsmap,
                   eos_token=eos, pad_token=pad,
                   max_length=_model_max_length(cfg, 512), source=path)

    def _wrap(self, ids: list[int]) -> list[int]:
        return [*ids, self.eos_id]


def _read_unigram_json(file: str):
    data = read_json(file)
    model = data.get("model", {})
    if model.get("type") != "Unigram":
        raise CheckpointError(f"{file}: expected a Unigram model, got {model.get('type')!r}")
    norm = data.get("normalizer") or {}
    charsmap = None
    for n in norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]:
        if n.get("type") == "Precompiled" and n.get("precompiled_charsmap"):
            charsmap = base64.b64decode(n["precompiled_charsmap"])
            break
    specials = [AddedToken(t["content"], single_word=t.get("single_word", False),
                           lstrip=t.get("lstrip", False), rstrip=t.get("rstrip", False),
                           normalized=t.get("normalized", False), special=t.get("special", True))
                for t in data.get("added_tokens", [])]
    vocab = [(p, s) for p, s in model["vocab"]]
    return vocab, int(model.get("unk_id", 2)), charsmap, specials


def _read_spiece(file: str):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(file)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{file}: not a sentencepiece model ({e})") from None
    vocab = [(sp.IdToPiece(i), sp.GetScore(i)) for i in range(sp.GetPieceSize())]
    proto = sp.serialized_model_proto()
    normalizer_spec = _proto_field(proto, 3)
    charsmap = _proto_field(normalizer_spec, 2) if normalizer_spec else None
    return vocab, sp.unk_id(), charsmap


def _proto_field(buf: bytes, field: int) -> bytes | None:
    """The bytes of the last length-delimited `field` of a serialized protobuf message
    (enough to reach sentencepiece's character map without the protobuf package)."""
    def varint(i):
        value = shift = 0
        while True:
            b = buf[i]
            value |= (b & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if b < 0x80:
                return value, i

    found, i = None, 0
    while i < len(buf):
        key, i = varint(i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, i = varint(i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            size, i = varint(i)
            if number == field:
                found = buf[i:i + size]
            i += size
        else:
            raise CheckpointError(f"sentencepiece model: unexpected protobuf wire type {wire}")
    return found
