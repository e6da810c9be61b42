"""`caption` subcommand: auto-caption a folder of training images with BLIP or GIT, or tag it with a WD14 tagger.

    python -m lora_train caption --input DIR [--output metadata.csv] [--model ID|PATH] [--prefix "sks style, "]

Without `--output` each image gets a `.txt` sidecar; with it the captions go to that metadata.csv. The model
picks the kind: a WD14 tagger (`--model SmilingWolf/wd-vit-tagger-v3`, or a folder with model.onnx and
selected_tags.csv) writes booru tags and takes the `--*-threshold`, `--exclude-tags`, `--keep-underscores` and
`--rating-tags` flags; BLIP and GIT write sentences. The flag names match the old `auto_label.py --input …
--output …`. A user mistake ends with a one-line reason on stderr
and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Tuple

from lora_train.caption_writer import MODES, CaptionError, CaptionReport, FolderOptions, caption_folder
from lora_train.captioning import DEFAULT_MODEL, DTYPES, CaptionOptions, create_captioner
from lora_train.tagger import DEFAULT_TAGGER, TaggerOptions, parse_tag_list

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def print_error(error: BaseException) -> None:
    """The error as one line on stderr."""
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Registers the `caption` subcommand on an argparse subparsers object."""
    defaults, tagger = CaptionOptions(), TaggerOptions()
    parser = subparsers.add_parser("caption", help="auto-caption a folder of images (BLIP/GIT, WD14 tagger)",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, type=Path, help="folder of images to caption")
    parser.add_argument("--output", type=Path,
                        help="metadata.csv to write (a folder means <folder>/metadata.csv); default: .txt sidecars")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"BLIP or GIT hub id or local folder; a WD14 tagger ({DEFAULT_TAGGER}) writes tags")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--prefix", default="", help='put before every caption as is, e.g. "sks style, "')
    parser.add_argument("--suffix", default="", help="put after every caption as is")
    parser.add_argument("--mode", choices=MODES, default="skip",
                        help="existing captions: skip them (default), overwrite them, or append the new one")
    parser.add_argument("--recursive", action="store_true", help="also caption images in subfolders")
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--min-length", type=int, default=defaults.min_length)
    parser.add_argument("--beams", type=int, default=defaults.num_beams, help="beam width; 1 is greedy")
    parser.add_argument("--prompt", help='conditional text the caption starts from, e.g. "a photo of"')
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--general-threshold", type=float, default=tagger.general_threshold,
                        help="tagger: write a general tag at this probability or above")
    parser.add_argument("--character-threshold", type=float, default=tagger.character_threshold,
                        help="tagger: likewise for character tags")
    parser.add_argument("--exclude-tags", default="",
                        help='tagger: comma-separated tags never written, e.g. "watermark, signature"')
    parser.add_argument("--keep-underscores", action="store_true", help="tagger: long_hair, not long hair")
    parser.add_argument("--rating-tags", action="store_true", help="tagger: also write the rating tag, first")
    parser.set_defaults(func=run)
    return parser


def _csv_path(output: Optional[Path]) -> Optional[Path]:
    if output is None:
        return None
    if output.is_dir():
        return output / "metadata.csv"
    if output.suffix.lower() != ".csv":
        raise CaptionError(f"--output {str(output)!r} is not a .csv path; give e.g. {output / 'metadata.csv'}")
    return output


def _options(args: argparse.Namespace) -> Tuple[CaptionOptions, TaggerOptions, FolderOptions]:
    if not args.input.is_dir():
        raise CaptionError(f"--input {str(args.input)!r} is not a folder; give the folder that holds the images")
    caption = CaptionOptions(max_length=args.max_length, min_length=args.min_length, num_beams=args.beams,
                             prompt=args.prompt or None, batch_size=args.batch_size, device=args.device,
                             dtype=args.dtype)
    caption.validate()
    tagger = TaggerOptions(general_threshold=args.general_threshold, character_threshold=args.character_threshold,
                           exclude_tags=parse_tag_list(args.exclude_tags),
                           underscores_to_spaces=not args.keep_underscores, rating_tags=args.rating_tags,
                           batch_size=args.batch_size, device=args.device)
    tagger.validate()
    csv_path = _csv_path(args.output)
    folder = FolderOptions(recursive=args.recursive, write_txt=csv_path is None, csv_path=csv_path,
                           prefix=args.prefix, suffix=args.suffix, mode=args.mode)
    folder.validate()
    return caption, tagger, folder


class _ProgressBar:
    """A tqdm bar opened at the first progress report (after the model loaded), so an early error prints none."""

    def __init__(self) -> None:
        try:
            from tqdm import tqdm
        except ImportError as error:
            raise ImportError("the caption command needs tqdm for its progress bar: pip install tqdm") from error
        self.tqdm, self.bar = tqdm, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = self.tqdm(total=total, unit="image", desc="captioning")
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _caption(args: argparse.Namespace, caption: CaptionOptions, tagger: TaggerOptions,
             folder: FolderOptions) -> CaptionReport:
    bar = _ProgressBar()
    captioner = create_captioner(args.model, caption, tagger)
    try:
        return caption_folder(args.input, captioner, folder, progress=bar)
    finally:
        bar.close()


def run(args: argparse.Namespace) -> int:
    """Captions args.input; 0 when done (unreadable images are listed in the report), non-zero otherwise."""
    try:
        caption, tagger, folder = _options(args)
    except CaptionError as error:
        print_error(error)
        return EXIT_USAGE
    try:
        report = _caption(args, caption, tagger, folder)
    except CaptionError as error:
        print_error(error)
        return EXIT_USAGE
    except (OSError, ImportError) as error:
        print_error(error)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("error: interrupted; the captions written so far are kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(report.summary())
    print(f"captions written to {folder.csv_path or f'.txt files beside the images in {args.input}'}")
    return EXIT_OK
