#!/usr/bin/env python
"""Pretrained ResNet weights: what is known, what is on this machine, is a file what it claims.

    python tools/weights.py list [--arch resnet50] [--dir /data/weights] [--json]
    python tools/weights.py verify ~/.cache/torch/hub/checkpoints/resnet50-11ad3fa6.pth
    python tools/weights.py convert resnet50-11ad3fa6.pth r50_tv2.safetensors --to res_backbone
    python tools/weights.py export-hub runs/cls/best.pth hub/my_resnet20   # timm.create_model('local-dir:...')

Nothing is downloaded. This script only parses arguments and prints what the library returns
(:mod:`res_backbone.weights`: ``catalogue``, ``identify``, ``convert``, ``hub``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from res_backbone.weights.cache import catalogue_rows, format_table
from res_backbone.weights.catalogue import archs
from res_backbone.weights.convert import FORMATS, convert_weights
from res_backbone.weights.files import CheckpointMismatchError, UnreadableWeightsError
from res_backbone.weights.hub import save_for_timm_hub
from res_backbone.weights.identify import EXIT_MISMATCH, EXIT_OK, EXIT_UNREADABLE, verify_file

EPILOG = f"""\
exit status:
  list      0
  verify    {EXIT_OK} every file readable and, where its name carries a hash, matching it;
            {EXIT_MISMATCH} some file's SHA-256 differs from the hash its name carries;
            {EXIT_UNREADABLE} some file is missing or cannot be read as a checkpoint (this wins over {EXIT_MISMATCH})
  convert   {EXIT_OK} written and checked; 1 refused or the check failed (the message names file and key);
            {EXIT_UNREADABLE} the input is missing or unreadable
  export-hub {EXIT_OK} written, timm rebuilds it with equal logits; 1 refused or check failed; {EXIT_UNREADABLE} unreadable
caches searched: $TORCH_HOME/hub/checkpoints (default ~/.cache/torch/hub/checkpoints) and the
Hugging Face hub cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub).
"""


def cmd_list(args: argparse.Namespace) -> int:
    rows = [r for r in catalogue_rows(args.arch, args.dir or ()) if r["local"] or not args.present]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    print(format_table(rows))
    found = sum(bool(r["local"]) for r in rows)
    print(f"\n{len(rows)} weights, {found} present locally (found by file name; 'verify' checks the contents). "
          "eval/crop: resolution and centre-crop fraction of the published accuracy "
          "(resize the short side to eval/crop, then crop eval x eval).")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    worst, reports = EXIT_OK, []
    for name in args.files:
        big = Path(name).is_file() and Path(name).stat().st_size >= 64 << 20 and not (args.json or args.quiet)
        with tqdm(total=Path(name).stat().st_size if big else 0, unit="B", unit_scale=True, leave=False,
                  desc=f"sha256 {Path(name).name}", disable=None if big else True) as bar:  # over 64 MiB only
            rep = verify_file(name, load=not args.no_load, progress=bar.update if big else None)
        worst = max(worst, rep.exit_code)
        reports.append(rep)
        if not args.json:
            print("\n".join(rep.lines()))
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    return worst


def _write(call) -> int:
    """Run a writing command and print its result's lines, or the error (exit 2 unreadable input, 1 refused)."""
    try:
        res = call()
    except (FileNotFoundError, CheckpointMismatchError, ValueError, TypeError, FileExistsError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNREADABLE if isinstance(e, (FileNotFoundError, UnreadableWeightsError)) else 1
    print("\n".join(res.lines()))
    return EXIT_OK


def _subcommand(sub, name: str, *, help: str, description: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description, epilog=EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="List, verify, convert and export (timm hub) ImageNet ResNet "
                                     "weights (torchvision, timm, res_backbone). Never downloads anything.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{list,verify,convert,export-hub}")

    p = _subcommand(sub, "list", help="every catalogued weight and where it is present locally",
                    description="Print the catalogue (file, hash prefix, data config, published accuracy) with the "
                    "local copies found in the torch hub and Hugging Face caches.")
    p.add_argument("--arch", choices=archs(), help="only this depth (default all)")
    p.add_argument("--dir", action="append", metavar="DIR",
                   help="also look in DIR: as a plain folder of weight files, as a TORCH_HOME and as a "
                        "Hugging Face hub cache (repeatable)")
    p.add_argument("--present", action="store_true", help="only the weights found locally")
    p.add_argument("--json", action="store_true", help="print JSON (every catalogue field, 'local': paths found)")
    p.set_defaults(func=cmd_list)

    v = _subcommand(sub, "verify", help="hash files, check them against their names, say which weights they are",
                    description="Compute each FILE's SHA-256 (streamed). If its name carries a torch-hub hash "
                    "(resnet50-11ad3fa6.pth) or it is a Hugging Face blob, report MATCH or MISMATCH; name the "
                    "catalogued weights it is by name and content; read it and say which architecture it fits.")
    v.add_argument("files", nargs="+", metavar="FILE", help="checkpoint files (.pth, .pt, .bin, .safetensors)")
    v.add_argument("--no-load", action="store_true", help="only hash; do not read the tensors")
    v.add_argument("--json", action="store_true", help="print one JSON report per file instead of text")
    v.add_argument("--quiet", action="store_true", help="no progress bar while hashing big files")
    v.set_defaults(func=cmd_verify)

    c = _subcommand(sub, "convert", help="rewrite weights in another library's layout, checked by loading them",
                    description="Read IN (torchvision/timm state dict, {'model'|'state_dict': ...} wrapper, "
                    "'module.' prefixes, or a res_backbone checkpoint) and write OUT in the --to layout; OUT's "
                    "suffix picks the container (.safetensors, else torch.save). The result is loaded into the "
                    "target library's model with strict key matching and compared tensor by tensor with IN.")
    c.add_argument("input", metavar="IN", help="source checkpoint")
    c.add_argument("output", metavar="OUT", help="destination (.pth, .pt, .bin or .safetensors)")
    c.add_argument("--to", choices=FORMATS,
                   help="torchvision: plain state dict; timm: plain state dict (hub-style with .safetensors); "
                        "res_backbone: {'model', 'arch', 'pretrained_cfg', ...} as create_model(pretrained=OUT) "
                        "reads it. Default: timm for .safetensors, torchvision otherwise")
    c.add_argument("--arch", help="architecture, e.g. resnet50 (default: from the file's metadata, its catalogue "
                                  "entry, or the one registered model its shapes fit)")
    c.add_argument("--force", action="store_true", help="replace OUT if it exists")
    c.set_defaults(func=lambda a: _write(lambda: convert_weights(a.input, a.output, to=a.to, arch=a.arch,
                                                                  overwrite=a.force)))

    h = _subcommand(sub, "export-hub", help="write a checkpoint as a timm hub folder, checked by loading it with timm",
                    description="Write CHECKPOINT (train_cls.py's, or 'convert --to res_backbone') as FOLDER/"
                    "config.json + model.safetensors (timm's hub layout): timm.create_model('local-dir:FOLDER', "
                    "pretrained=True) rebuilds architecture, classes, mean/std, input size; the tool checks that, "
                    "logits bitwise, before reporting success.")
    h.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint naming its model (model_name or arch)")
    h.add_argument("folder", metavar="FOLDER", help="the hub folder to write (upload it as a Hugging Face repo)")
    h.add_argument("--force", action="store_true", help="replace FOLDER if it exists and is not empty")
    h.set_defaults(func=lambda a: _write(lambda: save_for_timm_hub(a.checkpoint, a.folder, overwrite=a.force)))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
