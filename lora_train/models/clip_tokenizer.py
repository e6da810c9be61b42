"""The CLIP BPE tokenizer files (vocab.json, merges.txt) built offline from the vocabulary open_clip ships.

Single-file checkpoints hold no tokenizer, and the hub is not always reachable; the 49,408-token CLIP
vocabulary is the same for SD1 (openai CLIP) and SD2 (OpenCLIP), and `open_clip` carries it as
`bpe_simple_vocab_16e6.txt.gz`. The files are written once into a cache folder.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path
from typing import Dict, List

VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2  # as openai CLIP's SimpleTokenizer reads the file
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> Dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2, CLIP)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _bpe_merges() -> List[str]:
    try:
        from open_clip.tokenizer import default_bpe
    except ImportError:
        raise ImportError("the CLIP vocabulary comes from open_clip: pip install open-clip-torch") from None
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    return lines[1:NUM_MERGES + 1]


def write_clip_tokenizer(folder: Path, pad_token: str = EOS) -> Path:
    """Writes CLIPTokenizer files into folder; pad_token is EOS for SD1 and "!" for SD2."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = _bpe_merges()
    byte_chars = list(_bytes_to_unicode().values())
    vocab = [*byte_chars, *(c + "</w>" for c in byte_chars), *("".join(m.split()) for m in merges), BOS, EOS]
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"open_clip's BPE file gave {len(vocab)} tokens, expected {VOCAB_SIZE}")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {**special, "model_max_length": 77, "do_lower_case": True, "errors": "replace",
              "add_prefix_space": False, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def cached_clip_tokenizer(pad_token: str = EOS) -> Path:
    """A folder with the tokenizer files, built once under the user's cache folder."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sd-webui-lora-train"
    folder = root / ("clip-tokenizer" if pad_token == EOS else "clip-tokenizer-pad-bang")
    if (folder / "tokenizer_config.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root))
    write_clip_tokenizer(staging, pad_token)
    try:
        staging.rename(folder)
    except OSError:  # another process built it first
        for child in staging.iterdir():
            child.unlink()
        staging.rmdir()
    return folder
