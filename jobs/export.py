r"""Export a trained extractor alone, for serving: a state dict with its timm name and transforms, TorchScript, torch.export.

    python jobs/export.py runs/<run>                       # -> runs/<run>/export/
    python jobs/export.py runs/<run>/checkpoint_<time> --out exported/ --format state_dict torch_export

On a cluster, where the run directory is on storage every node sees:
    ray job submit --working-dir . -- python jobs/export.py /mnt/shared/runs/<run> --out /mnt/shared/models/<run>

The source is a run directory (its best checkpoint, best/state.pt, unless --which latest), a
checkpoint directory or a state.pt. The export folder holds extractor.json (the extractor's name and
arguments, its timm architecture, embedding size, validation transforms and input size) and, by
--format: extractor.safetensors (state_dict), extractor.torchscript.pt (torchscript: a trace in eval
mode), extractor.pt2 (torch_export: eval mode, any batch size). Each gives the embeddings of the
checkpoint's extractor in eval mode. In Python: raymetric.export.load_exported(folder) returns the
model and its transform. To train from it: extractor.args.weights=<folder or run directory>.

The last line printed is `export: <folder>`. Exit status: 0 done; 2 no checkpoint at the source, or a
bad format.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from raymetric.export import FORMATS, ExportError, default_export_dir, export_extractor  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a run directory, a checkpoint directory or a state.pt")
    parser.add_argument("--out", help="export folder (default: <run directory of the source>/export)")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=["state_dict", "torchscript"],
                        help="what to write (default: state_dict torchscript)")
    parser.add_argument("--which", choices=["best", "latest"], default="best",
                        help="checkpoint of a run directory: best/state.pt if present (default), or the latest")
    args = parser.parse_args(argv)
    out = args.out or default_export_dir(args.source)
    try:
        written = export_extractor(args.source, out, formats=args.format, which=args.which)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for fmt, path in written.items():
        print(f"{fmt:<13} {path}")
    print(f"export: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
