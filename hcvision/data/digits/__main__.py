"""``python -m hcvision.data.digits --export DIR``: the embedded digits as an ImageFolder (:mod:`..digits`)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ...cli import run_cli
from . import export_image_folder, folder_mean_std


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hcvision.data.digits",
                                description="Write the embedded digits (the fixed stratified 80/20 split) as an "
                                            "ImageFolder of 8x8 grey PNGs: DIR/train/<class>/*.png, DIR/val/...")
    p.add_argument("--export", required=True, metavar="DIR", help="a new or empty directory")
    args = p.parse_args(argv)
    written = export_image_folder(args.export)
    from timm.models import get_pretrained_cfg_value

    mean, std = folder_mean_std(*(get_pretrained_cfg_value("vit_digits_patch2_8_res", k) for k in ("mean", "std")))
    print(f"wrote {written['train']} train and {written['val']} val images to {args.export}; the digits models read "
          f"them as from the embedded path with: data_dir={args.export} mean={mean[0]:.8f} std={std[0]:.8f} "
          "scale=1,1 ratio=1,1 hflip=0 color_jitter=0")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="hcvision.data.digits"))
