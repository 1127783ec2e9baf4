"""Rebuild jaxdiff/assets/clip_tokenizer/{vocab.json,merges.txt} from OpenAI's CLIP BPE file.

The BPE file `bpe_simple_vocab_16e6.txt.gz` (MIT, OpenAI) ships inside the open-clip-torch wheel; this
script reads it straight from the wheel (a zip), so open-clip-torch need not be installed:

    python scripts/build_clip_vocab.py path/to/open_clip_torch-*.whl [--out jaxdiff/assets/clip_tokenizer]

The construction is OpenAI's `SimpleTokenizer.__init__` (openai/CLIP, clip/simple_tokenizer.py), which is
also what transformers' published CLIP vocab.json / merges.txt contain: 256 byte-level characters, the
same 256 with the end-of-word marker '</w>', the concatenation of each of the first 48894 merges, then
'<|startoftext|>' and '<|endoftext|>' (49408 tokens). merges.txt is those 48894 merges, one
space-separated pair a line, under the '#version: 0.2' header that transformers skips.
"""
from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import zipfile

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
# OpenAI keeps lines[1 : 49152 - 256 - 2 + 1] of the file: 48894 merges, so that 512 byte tokens
# + 48894 merges + 2 special tokens make 49408.
NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable character table, in CLIP's order (printable bytes first)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build(bpe_text: str) -> tuple[dict[str, int], list[str]]:
    """Returns (vocab token -> id, merges as 'a b' lines) from the text of bpe_simple_vocab_16e6.txt."""
    lines = bpe_text.split("\n")
    merges = lines[1:NUM_MERGES + 1]  # line 0 is the '#version' header
    assert all(len(m.split()) == 2 for m in merges), "unexpected BPE file format"
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens) == VOCAB_SIZE, (len(vocab), len(tokens))
    return vocab, merges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=pathlib.Path, help="open_clip_torch-*.whl")
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).resolve().parents[1] / "jaxdiff/assets/clip_tokenizer")
    args = parser.parse_args()
    with zipfile.ZipFile(args.wheel) as whl:
        text = gzip.decompress(whl.read(BPE_MEMBER)).decode("utf-8")
    vocab, merges = build(text)
    args.out.mkdir(parents=True, exist_ok=True)
    # Compact JSON, ASCII-escaped like transformers writes it: byte-identical output on every platform.
    (args.out / "vocab.json").write_text(json.dumps(vocab, separators=(",", ":")) + "\n", encoding="utf-8")
    (args.out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()
